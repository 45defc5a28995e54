"""Routes: push-install accounts (the user the process server logs in as over SSH to
install the Mobility agent).

The secret (a password or an unencrypted private key) is sealed at once under the
secrets key (``configserver/sealed.py``) and only the sealed bytes reach the
database. No response carries it — documents say ``has_secret`` and ``kind`` —
and no log event or error message does either: the request schema leaves the
secret's type unchecked so that a schema error cannot echo it, and the handler
checks it with messages that never quote it. ``sealed.open_secret`` gives it
back to the push installer.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
)
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from configserver import db, sealed
from configserver.rest import (
    NAME,
    ApiError,
    Call,
    Route,
    array,
    iso,
    not_found,
    nullable,
    obj,
    reply,
)

log = structlog.get_logger("configserver.accounts")

KINDS = ["password", "ssh-key"]
MAX_PASSWORD = 1024
MAX_KEY = 16384
USERNAME = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_.@-]{0,63}$",
            "description": "the user to log in as over SSH (root or one with sudo)"}
# No "type" on purpose: a jsonschema type error would quote the value in the 422.
SECRET = {"writeOnly": True,
          "description": "a string: the password, or the text of an unencrypted private key "
                         "(OpenSSH or PEM). Never returned."}
CREATE = obj({"name": NAME, "username": USERNAME, "kind": {"enum": KINDS}, "secret": SECRET},
             ["name", "username", "kind", "secret"])
UPDATE = {**obj({"username": USERNAME, "kind": {"enum": KINDS}, "secret": SECRET}),
          "minProperties": 1}
ACCOUNT = obj({"name": {"type": "string"}, "username": {"type": "string"},
               "kind": {"enum": KINDS}, "has_secret": {"type": "boolean"},
               "key_id": nullable({"type": "string",
                                   "description": "id of the secrets key that sealed it"}),
               "machines": array({"type": "string"}),
               "created": {"type": "string"}, "updated": {"type": "string"}},
              ["name", "username", "kind", "has_secret", "key_id", "machines", "created",
               "updated"])
_HINT = "give it with --password-file FILE or --ssh-key-file FILE"
# What _check_secret accepts, per kind, as far as a schema can say it (it answers 422
# invalid_secret itself, never quoting the secret). Not "type" errors from the generic
# validation, which would quote the value.
SECRET_RULES = {"oneOf": [
    {"properties": {"kind": {"const": "password"}, "secret": {
        "type": "string", "minLength": 1, "maxLength": MAX_PASSWORD,
        "pattern": "^[^\\u0000\\r\\n]*$"}}},
    {"properties": {"kind": {"const": "ssh-key"}, "secret": {
        "type": "string", "minLength": 1, "maxLength": MAX_KEY,
        "contentMediaType": "application/x-pem-file",
        "description": "the text of an unencrypted private key (OpenSSH or PEM)"}}}]}
KEY_REFUSAL = ("an ssh-key secret is not an unencrypted private key in OpenSSH or PEM form "
               "(a public key, a passphrase-protected key or other text)")


def _bad(message: str, hint: str = _HINT) -> ApiError:
    return ApiError(422, "invalid_secret", message, hint)


def _check_secret(kind: str, secret: Any) -> bytes:
    """The secret as bytes, if it is a plausible one of its kind. Messages never quote it."""
    if not isinstance(secret, str):
        raise _bad("secret must be a string (the password, or the private key's text)")
    try:
        data = secret.encode()
    except UnicodeEncodeError:
        raise _bad("the secret is not valid Unicode text (a lone surrogate)") from None
    if kind == "password":
        if not 1 <= len(secret) <= MAX_PASSWORD:
            raise _bad(f"a password must be 1 to {MAX_PASSWORD} characters "
                       f"(this one has {len(secret)})")
        if any(c in secret for c in "\0\r\n"):
            raise _bad("a password cannot contain NUL or line breaks",
                       "a password file holds the password on its first line")
        return data
    if not 1 <= len(secret) <= MAX_KEY:
        raise _bad(f"a private key must be 1 to {MAX_KEY} characters "
                   f"(this one has {len(secret)})")
    text = secret.strip()
    if text.startswith(("ssh-", "ecdsa-", "sk-", "-----BEGIN PUBLIC KEY", "-----BEGIN SSH2")):
        raise _bad("this is a public key; the push installer needs the private key",
                   "give the private key file (e.g. ~/.ssh/id_ed25519, not the .pub)")
    for load in (load_ssh_private_key, load_pem_private_key):
        try:
            load(data, None)
            return data
        except TypeError:  # "Password was not given but private key is encrypted"
            raise _bad("the private key is protected by a passphrase, which the push "
                       "installer cannot type", "use a key without one (ssh-keygen -p -N '' "
                       "-f COPY_OF_KEY) for a dedicated install user") from None
        except (ValueError, UnsupportedAlgorithm):
            continue
        except Exception:  # the parsers are not specified to raise only the above on junk
            continue
    raise _bad("the SSH key is not a private key in OpenSSH or PEM format",
               "e.g. the file 'ssh-keygen -t ed25519' wrote (not the .pub)")


def _doc(a: db.Account, machines: list[str]) -> dict[str, Any]:
    return {"name": a.name, "username": a.username, "kind": a.kind, "has_secret": True,
            "key_id": sealed.sealed_key_id(a.secret), "machines": machines,
            "created": iso(a.created), "updated": iso(a.updated)}


async def _users(s: Any, name: str) -> list[str]:
    rows = await s.execute(select(db.Machine.name).where(db.Machine.account == name)
                           .order_by(db.Machine.name))
    return list(rows.scalars().all())


async def _seal(call: Call, name: str, kind: str, secret: bytes) -> bytes:
    try:
        key = await sealed.key_for_sealing(call.services, call.services.cfg.secrets_key_path)
        return sealed.seal(key, name, kind, secret)
    except sealed.SecretError as e:
        raise ApiError(503, e.code, e.message, e.hint) from None


async def add_account(call: Call) -> web.Response:
    b: dict[str, Any] = call.body
    name, kind = b["name"], b["kind"]
    plain = _check_secret(kind, b["secret"])
    exists = ApiError(409, "account_exists", f"an account named {name!r} already exists",
                      f"change its secret with 'siterecovery account update {name}' or "
                      "pick another name")
    async with call.services.sessionmaker() as s:
        if await s.get(db.Account, name) is not None:
            raise exists
    blob = await _seal(call, name, kind, plain)
    now = call.services.clock()
    async with call.services.sessionmaker() as s:
        a = db.Account(name=name, username=b["username"], kind=kind, secret=blob,
                       created=now, updated=now)
        s.add(a)
        try:
            await s.commit()
        except IntegrityError:
            raise exists from None
    log.info("account_added", account=name, username=a.username, kind=kind,
             key_id=sealed.sealed_key_id(blob))
    return reply(_doc(a, []), 201)


async def list_accounts(call: Call) -> web.Response:
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(select(db.Account).order_by(db.Account.name))).scalars().all()
        uses = (await s.execute(select(db.Machine.account, db.Machine.name)
                                .where(db.Machine.account.is_not(None))
                                .order_by(db.Machine.name))).all()
    by: dict[str, list[str]] = {}
    for acct, machine in uses:
        by.setdefault(str(acct), []).append(machine)
    return reply({"accounts": [_doc(a, by.get(a.name, [])) for a in rows]})


async def show_account(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        a = await s.get(db.Account, name)
        if a is None:
            raise not_found("account", name, "list them: siterecovery account list")
        return reply(_doc(a, await _users(s, name)))


async def update_account(call: Call) -> web.Response:
    name = call.params["name"]
    b: dict[str, Any] = call.body
    async with call.services.sessionmaker() as s:
        a = await s.get(db.Account, name)
        if a is None:
            raise not_found("account", name, "list them: siterecovery account list")
        kind = b.get("kind", a.kind)
    if kind != a.kind and "secret" not in b:
        raise ApiError(422, "secret_required", f"changing account {name!r} from {a.kind} to "
                       f"{kind} needs the new secret", _HINT)
    blob = None
    if "secret" in b:
        blob = await _seal(call, name, kind, _check_secret(kind, b["secret"]))
    async with call.services.sessionmaker() as s:
        a2 = await s.get(db.Account, name, with_for_update=True)
        if a2 is None:
            raise not_found("account", name, "it was removed meanwhile")
        if "username" in b:
            a2.username = b["username"]
        if blob is not None:
            a2.kind, a2.secret = kind, blob
        a2.updated = call.services.clock()
        await s.commit()
        machines = await _users(s, name)
    log.info("account_updated", account=name, changed=sorted(b), secret_rotated=blob is not None,
             key_id=sealed.sealed_key_id(a2.secret))
    return reply(_doc(a2, machines))


async def remove_account(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        a = await s.get(db.Account, name, with_for_update=True)
        if a is None:
            raise not_found("account", name, "list them: siterecovery account list")
        users = await _users(s, name)
        if users:
            raise ApiError(409, "account_in_use", f"account {name!r} is the push-install "
                           f"account of {len(users)} machine(s): {', '.join(users[:10])}",
                           "give those machines another account first (siterecovery machine "
                           "update MACHINE --account OTHER | --no-account)")
        await s.delete(a)
        await s.commit()
    log.info("account_removed", account=name)
    return reply({"deleted": name})


_NAME_PARAM = {"name": NAME}
ROUTES = [
    Route("POST", "/api/v1/accounts", add_account, "Add a push-install account", "accounts",
          body=CREATE, responses={201: ACCOUNT}, rules=SECRET_RULES,
          refusals=(KEY_REFUSAL, "the secret holds a lone surrogate (not Unicode text)"),
          description="The secret is sealed under the server's secrets key and never "
                      "returned."),
    Route("GET", "/api/v1/accounts", list_accounts, "List push-install accounts", "accounts",
          responses={200: obj({"accounts": array(ACCOUNT)}, ["accounts"])}),
    Route("GET", "/api/v1/accounts/{name}", show_account, "Show a push-install account",
          "accounts", params=_NAME_PARAM, responses={200: ACCOUNT}),
    Route("PATCH", "/api/v1/accounts/{name}", update_account,
          "Change an account's user name or rotate its secret", "accounts",
          params=_NAME_PARAM, body=UPDATE, responses={200: ACCOUNT},
          description="Changing kind needs the new secret.",
          refusals=("kind changes without a new secret (secret_required)",
                    "the secret is not one of the account's kind (invalid_secret): as "
                    "for POST /api/v1/accounts")),
    Route("DELETE", "/api/v1/accounts/{name}", remove_account,
          "Remove a push-install account", "accounts", params=_NAME_PARAM,
          responses={200: obj({"deleted": {"type": "string"}}, ["deleted"])},
          description="Refused (409 account_in_use) while a machine uses it."),
]
