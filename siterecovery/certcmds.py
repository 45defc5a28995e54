"""CLI verbs: ``cert list | show | revoke | procserver`` — the CA's certificates.

(An agent renews its own certificate: ``siterecovery mobility renew``.)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from configserver.ca import Issued, write_bundle
from siterecovery.apiopts import add_api_args, call, call_and_show
from siterecovery.errors import CliError
from siterecovery.output import show, table

COLUMNS = [("serial", "SERIAL"), ("kind", "KIND"), ("subject", "SUBJECT"), ("state", "STATE"),
           ("issued_at", "ISSUED"), ("not_after", "EXPIRES"), ("revoked_at", "REVOKED")]


def _serial(text: str) -> str:
    """As the catalog spells serials: lowercase hex without leading zeros (``openssl``'s
    ``43:C6:EF:…`` is accepted too)."""
    return text.replace(":", "").lower().lstrip("0") or "0"


def _one(doc: dict[str, Any]) -> str:
    return table([doc], COLUMNS)


async def cmd_list(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", "/api/v1/certificates",
                               lambda doc: table(doc["certificates"], COLUMNS),
                               kind=args.kind, subject=args.subject, state=args.state)


async def cmd_show(args: argparse.Namespace) -> int:
    return await call_and_show(args, "GET", f"/api/v1/certificates/{_serial(args.serial)}",
                               _one)


async def cmd_revoke(args: argparse.Namespace) -> int:
    return await call_and_show(
        args, "POST", f"/api/v1/certificates/{_serial(args.serial)}/revoke",
        lambda doc: f"revoked {doc['kind']} certificate {doc['serial']} of {doc['subject']}: "
                    "the configuration server and the process servers refuse it from now on")


async def cmd_procserver(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "server.key").exists() and not args.force:
        raise CliError(f"{out / 'server.key'} exists; refusing to overwrite it (--force)")
    body: dict[str, Any] = {"name": args.name, "hosts": args.host}
    if args.days:
        body["days"] = args.days
    doc = await call(args, "POST", "/api/v1/certificates/procserver", body)
    cert, key, ca = write_bundle(out, "server", Issued(doc["cert"].encode(),
                                                       doc["key"].encode()), doc["ca"].encode())
    summary = {k: doc[k] for k in ("name", "hosts", "serial", "not_after")}
    return show({**summary, "cert": str(cert), "key": str(key), "ca": str(ca)}, args,
                f"issued process-server certificate {doc['serial']} for {', '.join(args.host)}"
                f" (valid until {doc['not_after']}):\n  tls_cert = {cert}\n  tls_key = {key}"
                f"\n  tls_ca = {ca}")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cert`` to the top-level subparsers."""
    cp = sub.add_parser("cert", help="certificates the configuration server's CA issued")
    csub = cp.add_subparsers(dest="cert_cmd", required=True)
    ls = csub.add_parser("list", help="list certificates",
                         description="Every certificate the CA issued: agents' client "
                                     "certificates, process servers' and the configuration "
                                     "server's own, with their state (valid, superseded by a "
                                     "renewal, revoked, expired).")
    ls.add_argument("--kind", choices=["agent", "procserver", "configserver"])
    ls.add_argument("--subject", help="only this machine's / server's certificates")
    ls.add_argument("--state", choices=["valid", "superseded", "revoked", "expired"])
    add_api_args(ls)
    ls.set_defaults(func=cmd_list)
    sh = csub.add_parser("show", help="show one certificate")
    sh.add_argument("serial", help="serial number (lowercase hex, from 'cert list')")
    add_api_args(sh)
    sh.set_defaults(func=cmd_show)
    rv = csub.add_parser("revoke", help="revoke a certificate",
                         description="Revoke a certificate: the configuration server refuses "
                                     "it at once, process servers as soon as their trust list "
                                     "is refreshed (a second or so).")
    rv.add_argument("serial", help="serial number (lowercase hex, from 'cert list')")
    add_api_args(rv)
    rv.set_defaults(func=cmd_revoke)
    ps = csub.add_parser("procserver", help="issue a process server's TLS certificate",
                         description="Issue a server certificate for a process server and "
                                     "write server.pem, server.key (0600) and ca.pem into "
                                     "--out, for its tls_cert, tls_key and tls_ca settings.")
    ps.add_argument("--name", required=True, help="the process server's name")
    ps.add_argument("--host", action="append", required=True,
                    help="an IP address or DNS name agents reach it by (repeatable)")
    ps.add_argument("--days", type=float, help="lifetime in days (default 365)")
    ps.add_argument("--out", required=True, help="directory to write the files into")
    ps.add_argument("--force", action="store_true", help="overwrite existing files")
    add_api_args(ps)
    ps.set_defaults(func=cmd_procserver)
