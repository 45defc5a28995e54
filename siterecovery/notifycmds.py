"""CLI verbs: alert notification channels (``siterecovery notify add|list|show|remove|test``).

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
    r = nsub.add_parser("remove", help="remove a channel and its undelivered notices")
    r.add_argument("name")
    r.set_defaults(func=cmd_remove)
    t = nsub.add_parser("test", help="send a test notice now; exit 1 if it was not accepted")
    t.add_argument("name")
    t.set_defaults(func=cmd_test)
    for verb in (a, ls, s, r, t):
        add_api_args(verb)
