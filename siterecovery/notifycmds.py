"""CLI verbs: alert notification channels (``siterecovery notify
add|list|show|update|remove|test``).

Secrets (the webhook's signing key, the SMTP password) are read from files (or standard
input with ``-``), never from the command line, where other users could read them in
the process list.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from siterecovery.apiopts import add_api_args, call, call_and_show
from siterecovery.errors import UsageError
from siterecovery.output import show, table

COLUMNS = [("name", "NAME"), ("kind", "KIND"), ("severities", "SEVERITIES"),
           ("where", "TO"), ("pending", "PENDING"), ("delivered", "DELIVERED"),
           ("failed", "FAILED"), ("last_error", "LAST ERROR")]
BASE = "/api/v1/notify/channels"


def read_secret(path: str, what: str) -> str:
    """The first line of ``path`` ('-': standard input), without its line break."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the {what} from {path}: {e}") from None
    line = text.split("\n", 1)[0].removesuffix("\r")
    if not line:
        raise UsageError(f"the {what} file {path} is empty (the {what} is its first line)")
    return line


def where(c: dict[str, Any]) -> str:
    st = c["settings"]
    return str(st["url"]) if c["kind"] == "webhook" else ",".join(st["to"])


def describe(c: dict[str, Any]) -> str:
    st = c["settings"]
    lines = [f"channel:    {c['name']} ({c['kind']})",
             f"severities: {', '.join(c['severities'])}"]
    if c["kind"] == "webhook":
        lines.append(f"url:        {st['url']}")
        lines.append("signed:     " + ("yes (X-Siterecovery-Signature, HMAC-SHA256; key "
                                      f"id {c['key_id']})" if c["has_secret"] else "no"))
    else:
        lines += [f"to:         {', '.join(st['to'])}", f"from:       {st['from']}",
                  f"server:     {st['host']}:{st['port']} "
                  f"({'STARTTLS' if st['starttls'] else 'no TLS'})",
                  f"login:      {st.get('username') or '-'}"]
    lines += [f"outbox:     {c['pending']} pending, {c['delivered']} delivered, "
              f"{c['failed']} failed", f"last sent:  {c['last_delivered'] or '-'}",
              f"last error: {c['last_error'] or '-'}"]
    return "\n".join(lines)


def body_of(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"name": args.name}
    if args.severity:
        body["severities"] = sorted(set(args.severity.split(",")))
    if args.webhook:
        body.update(kind="webhook", url=args.webhook)
        if args.secret_file:
            body["secret"] = read_secret(args.secret_file, "webhook secret")
        for opt in ("smtp_host", "sender", "username", "password_file", "ca_file"):
            if getattr(args, opt):
                raise UsageError(f"--{opt.replace('_', '-')} is for --email channels")
        return body
    if not (args.smtp_host and args.sender):
        raise UsageError("an --email channel needs --smtp-host HOST and --from ADDRESS")
    if args.secret_file:
        raise UsageError("--secret-file is for --webhook channels (email: --password-file)")
    body.update(kind="email", to=args.email.split(","), host=args.smtp_host,
                port=args.smtp_port, starttls=not args.no_starttls, **{"from": args.sender})
    if args.username:
        body["username"] = args.username
    if args.password_file:
        body["secret"] = read_secret(args.password_file, "SMTP password")
    if args.ca_file:
        body["ca_file"] = str(Path(args.ca_file).resolve())
    return body


def update_body_of(args: argparse.Namespace) -> dict[str, Any]:
    """The PATCH body: only what the options given change."""
    if args.secret_file and args.password_file:
        raise UsageError("give --secret-file (webhook) or --password-file (email), not both")
    for given, removed in (("username", "no_username"), ("ca_file", "no_ca_file"),
                           ("secret_file", "no_secret"), ("password_file", "no_password"),
                           ("secret_file", "no_password"), ("password_file", "no_secret")):
        if getattr(args, given) and getattr(args, removed):
            raise UsageError(f"--{given.replace('_', '-')} and --{removed.replace('_', '-')} "
                             "contradict each other: give one")
    body: dict[str, Any] = {}
    if args.severity:
        body["severities"] = sorted(set(args.severity.split(",")))
    if args.webhook:
        body["url"] = args.webhook
    if args.email:
        body["to"] = args.email.split(",")
    if args.smtp_host:
        body["host"] = args.smtp_host
    if args.smtp_port is not None:
        body["port"] = args.smtp_port
    if args.sender:
        body["from"] = args.sender
    if args.username:
        body["username"] = args.username
    if args.starttls is not None:
        body["starttls"] = args.starttls
    if args.ca_file:
        body["ca_file"] = str(Path(args.ca_file).resolve())
    if args.secret_file:
        body["secret"] = read_secret(args.secret_file, "webhook secret")
    if args.password_file:
        body["secret"] = read_secret(args.password_file, "SMTP password")
    for removed, field in (("no_username", "username"), ("no_ca_file", "ca_file"),
                           ("no_secret", "secret"), ("no_password", "secret")):
        if getattr(args, removed):
            body[field] = None  # removed
    if not body:
        raise UsageError("nothing to change: give at least one option (see 'siterecovery "
                         "notify update --help')")
    return body


async def cmd_update(args: argparse.Namespace) -> int:
    body = update_body_of(args)
    return await call_and_show(args, "PATCH", f"{BASE}/{args.name}", describe, body)


async def cmd_add(args: argparse.Namespace) -> int:
    return await call_and_show(args, "POST", BASE, describe, body_of(args))


async def cmd_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", BASE, lambda doc: table(
        [{**c, "severities": ",".join(c["severities"]), "where": where(c)}
         for c in doc["channels"]], COLUMNS))


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"{BASE}/{args.name}", describe)


async def cmd_remove(args: argparse.Namespace) -> int:
    return await call_and_show(args, "DELETE", f"{BASE}/{args.name}",
                               lambda _: f"notification channel {args.name} removed")


async def cmd_test(args: argparse.Namespace) -> int:
    doc = await call(args, "POST", f"{BASE}/{args.name}/test")
    human = (f"test notice sent through {args.name}: accepted" if doc["delivered"]
             else f"test notice through {args.name} was not accepted: {doc['error']}")
    show(doc, args, human)
    return 0 if doc["delivered"] else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's verbs to the top-level subparsers."""
    p = sub.add_parser(
        "notify", help="alert notification channels (webhook, email)",
        description="Where alerts are sent when they are raised and when they clear: a "
                    "webhook (JSON POST, signed with HMAC-SHA256 if it has a secret) or "
                    "email over SMTP with STARTTLS, each for the severities it lists. "
                    "Notices wait in a durable outbox until delivered (retried with "
                    "back-off for about 4 hours). Secrets are sealed under the "
                    "configuration server's secrets.key, never shown and never logged.")
    nsub = p.add_subparsers(dest="notify_cmd", required=True, metavar="VERB")
    a = nsub.add_parser("add", help="add a channel",
                        description="e.g. 'notify add ops --webhook https://hooks.example/"
                                    "sr --secret-file hook.key --severity critical,warning' "
                                    "or 'notify add oncall --email oncall@example.net "
                                    "--smtp-host smtp.example.net --from sr@example.net "
                                    "--username sr --password-file smtp.pw --severity "
                                    "critical'")
    a.add_argument("name", help="channel name")
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--webhook", metavar="URL", help="POST notices as JSON to this URL")
    g.add_argument("--email", metavar="ADDR[,ADDR]", help="mail notices to these addresses")
    a.add_argument("--severity", metavar="LIST",
                   help="critical, warning or critical,warning (default: both)")
    a.add_argument("--secret-file", metavar="FILE",
                   help="webhook: file whose first line is the HMAC signing key ('-': stdin)")
    a.add_argument("--smtp-host", metavar="HOST", help="email: the SMTP server")
    a.add_argument("--smtp-port", type=int, default=587, metavar="PORT",
                   help="email: its submission port (default %(default)s)")
    a.add_argument("--from", dest="sender", metavar="ADDR", help="email: the sender address")
    a.add_argument("--username", help="email: SMTP login")
    a.add_argument("--password-file", metavar="FILE",
                   help="email: file whose first line is the SMTP password ('-': stdin)")
    a.add_argument("--no-starttls", action="store_true",
                   help="email: plain SMTP (no login allowed then)")
    a.add_argument("--ca-file", metavar="FILE",
                   help="email: CA bundle to verify the SMTP server with (on the "
                        "configuration server's host)")
    a.set_defaults(func=cmd_add)
    ls = nsub.add_parser("list", help="list channels and their outbox")
    ls.set_defaults(func=cmd_list)
    s = nsub.add_parser("show", help="show one channel (never its secret)")
    s.add_argument("name")
    s.set_defaults(func=cmd_show)
    u = nsub.add_parser(
        "update", help="change a channel in place (its undelivered notices kept)",
        description="Change what the options given say, nothing else; the channel keeps its "
                    "kind (webhook or email) and the notices waiting in its outbox, which "
                    "go out with the new settings. e.g. 'notify update ops --webhook "
                    "https://hooks.example/sr2 --secret-file new.key' or 'notify update "
                    "oncall --smtp-host smtp2.example.net --smtp-port 2525'. Options of "
                    "the other kind are refused by the server.")
    u.add_argument("name", help="channel name")
    u.add_argument("--severity", metavar="LIST",
                   help="the severities it gets from now on: critical, warning or "
                        "critical,warning (replaces the list)")
    u.add_argument("--webhook", metavar="URL",
                   help="webhook: the new URL the notices are POSTed to")
    u.add_argument("--secret-file", metavar="FILE",
                   help="webhook: rotate the signing key to the first line of FILE "
                        "('-': stdin)")
    u.add_argument("--email", metavar="ADDR[,ADDR]",
                   help="email: the new recipients (replaces the list)")
    u.add_argument("--smtp-host", metavar="HOST", help="email: the new SMTP server")
    u.add_argument("--smtp-port", type=int, metavar="PORT",
                   help="email: the new submission port")
    u.add_argument("--from", dest="sender", metavar="ADDR",
                   help="email: the new sender address")
    u.add_argument("--username",
                   help="email: the SMTP login (needs a password: the stored one or "
                        "--password-file)")
    u.add_argument("--password-file", metavar="FILE",
                   help="email: rotate the SMTP password to the first line of FILE "
                        "('-': stdin)")
    u.add_argument("--starttls", action=argparse.BooleanOptionalAction, default=None,
                   help="email: use STARTTLS (--no-starttls: plain SMTP, refused while "
                        "the channel has a login)")
    u.add_argument("--ca-file", metavar="FILE",
                   help="email: CA bundle to verify the SMTP server with (on the "
                        "configuration server's host)")
    u.add_argument("--no-secret", action="store_true",
                   help="webhook: remove the signing key (notices go unsigned)")
    u.add_argument("--no-username", action="store_true",
                   help="email: remove the SMTP login (with --no-password: no login)")
    u.add_argument("--no-password", action="store_true",
                   help="email: remove the SMTP password (only with --no-username)")
    u.add_argument("--no-ca-file", action="store_true",
                   help="email: verify the SMTP server with the system's CA bundle again")
    u.set_defaults(func=cmd_update)
    r = nsub.add_parser("remove", help="remove a channel and its undelivered notices")
    r.add_argument("name")
    r.set_defaults(func=cmd_remove)
    t = nsub.add_parser("test", help="send a test notice now; exit 1 if it was not accepted")
    t.add_argument("name")
    t.set_defaults(func=cmd_test)
    for verb in (a, ls, s, u, r, t):
        add_api_args(verb)
