"""Routes: notification channels, where alert raise/clear notices are sent.

A channel is a webhook (signed JSON, configserver/notifysend.py) or an SMTP mailbox
(STARTTLS), for the severities it lists (``critical`` → email and webhook, ``warning`` →
webhook only, say). Its secret (the webhook's HMAC key, the SMTP password) is sealed at
once under the secrets key, like accounts' (configserver/sealed.py), never returned and
never logged. Notices wait in a durable outbox (configserver/notifyoutbox.py) until
delivered; each channel document counts them. ``POST .../test`` sends a test notice now,
bypassing the outbox, and says whether it was accepted. ``PATCH .../{name}`` changes a
channel's settings, severities or secret in place (its kind stays); its pending notices
stay in the outbox and go out with the new settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from yarl import URL

from configserver import sealed
from configserver.models import NotifyChannel, NotifyOutbox
from configserver.notifydeliver import SECRET_KINDS, open_secret, seal_name, send
from configserver.notifyoutbox import DELIVERED, FAILED, PENDING, TEST, Change, notice
from configserver.notifysend import SendError
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

log = structlog.get_logger("configserver.notify")

KINDS = ["webhook", "email"]
SEVERITIES = ["critical", "warning"]
MAX_SECRET = 4096
TEST_TIMEOUT_SECONDS = 5.0  # the test route answers within the API's response budget
_SEVS = {**array({"enum": SEVERITIES}), "minItems": 1, "uniqueItems": True,
         "description": "the alert severities this channel gets (default: both)"}
_EMAIL = {"type": "string", "pattern": "^[^@\\s<>,\"();:\\\\]+@[A-Za-z0-9.-]+$",
          "maxLength": 254}
_URL = {"type": "string", "pattern": "^https?://[A-Za-z0-9.\\[\\]:-]+(/[^\\s]*)?$",
        "maxLength": 2048, "description": "http(s) URL the notices are POSTed to"}
# No "type" on purpose: a jsonschema type error would quote the value in the 422.
SECRET = {"writeOnly": True,
          "description": "a string: the webhook's HMAC-SHA256 key, or the SMTP password. "
                         "Sealed at once, never returned."}
WEBHOOK = obj({"name": NAME, "kind": {"const": "webhook"}, "severities": _SEVS, "url": _URL,
               "secret": SECRET}, ["name", "kind", "url"])
EMAIL = obj({"name": NAME, "kind": {"const": "email"}, "severities": _SEVS,
             "to": {**array(_EMAIL), "minItems": 1, "maxItems": 20},
             "from": _EMAIL,
             "host": {"type": "string", "pattern": "^[A-Za-z0-9.-]{1,253}$",
                      "description": "SMTP server (submission)"},
             "port": {"type": "integer", "minimum": 1, "maximum": 65535,
                      "description": "default 587"},
             "starttls": {"type": "boolean", "description": "default true; a login needs it"},
             "username": {"type": "string", "pattern": "^[^\\s]{1,128}$",
                          "description": "SMTP login (the password is the secret)"},
             "ca_file": {"type": "string", "pattern": "^/[^\\x00]{0,1023}$",
                         "description": "CA bundle (on the configuration server) to verify "
                                        "the SMTP server with, instead of the system's"},
             "secret": SECRET}, ["name", "kind", "to", "from", "host"])
CREATE = {"oneOf": [WEBHOOK, EMAIL]}
# The fields each kind of channel has, besides name and kind (which never change).
FIELDS = {kind: sorted(set(s["properties"]) - {"name", "kind"})
          for kind, s in (("webhook", WEBHOOK), ("email", EMAIL))}
# What an update may remove with null: the optional settings and the secret.
REMOVABLE = ("username", "ca_file", "secret")
# Every field of CREATE but name and kind, each optional (the removable ones may be
# null); the handler refuses those that are not the channel's kind's (invalid_channel).
# (SECRET has no type on purpose, so null passes it as it is.)
UPDATE = {**obj({k: (nullable(v) if k in ("username", "ca_file") else v)
                 for s in (WEBHOOK, EMAIL) for k, v in s["properties"].items()
                 if k not in ("name", "kind")}), "minProperties": 1}
CHANNEL = obj({
    "name": {"type": "string"}, "kind": {"enum": KINDS},
    "severities": array({"enum": SEVERITIES}),
    "settings": obj({}, extra=True), "has_secret": {"type": "boolean"},
    "key_id": nullable({"type": "string", "description": "id of the secrets key that "
                                                         "sealed the secret"}),
    "pending": {"type": "integer"}, "delivered": {"type": "integer"},
    "failed": {"type": "integer"},
    "last_delivered": nullable({"type": "string"}),
    "last_error": nullable({"type": "string"}),
    "created": {"type": "string"}, "updated": {"type": "string"}},
    ["name", "kind", "severities", "settings", "has_secret", "key_id", "pending",
     "delivered", "failed", "last_delivered", "last_error", "created", "updated"])
TESTED = obj({"channel": {"type": "string"}, "delivered": {"type": "boolean"},
              "error": nullable({"type": "string"})}, ["channel", "delivered", "error"])
REFUSALS = ("secret is not a string of 1 to 4096 characters without NUL (invalid_secret)",
            "an SMTP username without a secret (the password), or a login without "
            "STARTTLS (invalid_channel)",
            "ca_file is not a readable file on the configuration server (invalid_channel)",
            "url is not a valid http(s) URL (invalid_channel)")
UPDATE_REFUSALS = ("a field that is not a setting of the channel's kind: url on an email "
                   "channel, to/from/host/port/starttls/username/ca_file on a webhook "
                   "(invalid_channel)",
                   *REFUSALS[:1],
                   "the changed settings break a rule of POST /api/v1/notify/channels: an "
                   "SMTP username without a secret (the one stored counts) or a login "
                   "without STARTTLS, a ca_file that is not a readable file, a url that is "
                   "not a valid http(s) URL (invalid_channel); the secret removed (null) "
                   "while an SMTP username stays (invalid_channel)")


def _invalid(message: str, hint: str) -> ApiError:
    return ApiError(422, "invalid_channel", message, hint)


def _secret(b: dict[str, Any]) -> bytes | None:
    """The secret as bytes, if given and plausible. Messages never quote it."""
    if "secret" not in b:
        return None
    v = b["secret"]
    if not isinstance(v, str) or not 1 <= len(v) <= MAX_SECRET or "\0" in v:
        raise ApiError(422, "invalid_secret", f"secret must be a string of 1 to {MAX_SECRET} "
                       "characters without NUL", "give it with --secret-file FILE or "
                       "--password-file FILE")
    try:
        return v.encode()
    except UnicodeEncodeError:
        raise ApiError(422, "invalid_secret", "the secret is not valid Unicode text",
                       "give it with --secret-file FILE or --password-file FILE") from None


def _settings(b: dict[str, Any], has_secret: bool) -> dict[str, Any]:
    """A channel's settings from a body with ``kind`` and its fields (no secret in them);
    ``has_secret``: the channel will have a secret (the SMTP password)."""
    if b["kind"] == "webhook":
        try:
            u = URL(b["url"])
        except (ValueError, TypeError):
            u = None
        if u is None or u.scheme not in ("http", "https") or not u.host:
            raise _invalid(f"url {b['url']!r} is not a valid http(s) URL",
                           "e.g. https://hooks.example.com/siterecovery")
        return {"url": b["url"]}
    st = {"to": b["to"], "from": b["from"], "host": b["host"], "port": b.get("port", 587),
          "starttls": b.get("starttls", True)}
    if "username" in b:
        if not has_secret:
            raise _invalid("an SMTP username needs the password", "give it with "
                           "--password-file FILE (or remove the login with it: "
                           "--no-username --no-password)")
        if not st["starttls"]:
            raise _invalid("an SMTP login without STARTTLS would send the password in "
                           "clear", "drop --no-starttls (or the login)")
        st["username"] = b["username"]
    if "ca_file" in b:
        if not Path(b["ca_file"]).is_file():
            raise _invalid(f"ca_file {b['ca_file']} is not a file on the configuration "
                           "server", "give the path of a PEM CA bundle it can read")
        st["ca_file"] = b["ca_file"]
    return st


async def _stats(s: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {n: {"pending": 0, "delivered": 0, "failed": 0,
                                          "last_delivered": None, "last_error": None}
                                      for n in names}
    rows = (await s.execute(select(NotifyOutbox.channel, NotifyOutbox.state, func.count(),
                                   func.max(NotifyOutbox.delivered))
                            .where(NotifyOutbox.channel.in_(names))
                            .group_by(NotifyOutbox.channel, NotifyOutbox.state))).all()
    for ch, state, count, last in rows:
        if state in (PENDING, DELIVERED, FAILED):
            out[ch][state] = int(count)
        if state == DELIVERED:
            out[ch]["last_delivered"] = iso(last)
    errs = (await s.execute(select(NotifyOutbox.channel, NotifyOutbox.last_error)
                            .where(NotifyOutbox.channel.in_(names),
                                   NotifyOutbox.last_error.is_not(None))
                            .order_by(NotifyOutbox.id))).all()
    for ch, err in errs:  # the newest error per channel
        out[ch]["last_error"] = err
    return out


def _doc(c: NotifyChannel, stats: dict[str, Any]) -> dict[str, Any]:
    return {"name": c.name, "kind": c.kind, "severities": c.severities,
            "settings": c.settings, "has_secret": c.secret is not None,
            "key_id": None if c.secret is None else sealed.sealed_key_id(c.secret),
            **stats, "created": iso(c.created), "updated": iso(c.updated)}


async def _seal(services: Any, name: str, kind: str, plain: bytes) -> bytes:
    """Channel ``name``'s secret sealed under the server's secrets key (503 when the key
    cannot be had)."""
    try:
        key = await sealed.key_for_sealing(services, services.cfg.secrets_key_path)
    except sealed.SecretError as e:
        raise ApiError(503, e.code, e.message, e.hint) from None
    return sealed.seal(key, seal_name(name), SECRET_KINDS[kind], plain)


async def add_channel(call: Call) -> web.Response:
    b: dict[str, Any] = call.body
    name, kind = b["name"], b["kind"]
    plain = _secret(b)
    settings = _settings(b, plain is not None)
    exists = ApiError(409, "channel_exists", f"a notification channel named {name!r} "
                      "already exists", f"remove it first (siterecovery notify remove {name}) "
                      "or pick another name")
    services = call.services
    async with services.sessionmaker() as s:
        if await s.get(NotifyChannel, name) is not None:
            raise exists
    blob = None if plain is None else await _seal(services, name, kind, plain)
    now = services.clock()
    c = NotifyChannel(name=name, kind=kind, severities=b.get("severities", SEVERITIES),
                      settings=settings, secret=blob, created=now, updated=now)
    async with services.sessionmaker() as s:
        s.add(c)
        try:
            await s.commit()
        except IntegrityError:
            raise exists from None
        stats = (await _stats(s, [name]))[name]
    log.info("notify_channel_added", channel=name, kind=kind, severities=c.severities,
             has_secret=blob is not None)
    return reply(_doc(c, stats), 201)


async def list_channels(call: Call) -> web.Response:
    async with call.services.sessionmaker() as s:
        rows = (await s.execute(select(NotifyChannel).order_by(NotifyChannel.name))
                ).scalars().all()
        stats = await _stats(s, [c.name for c in rows])
    return reply({"channels": [_doc(c, stats[c.name]) for c in rows]})


async def _get(s: Any, name: str, *, for_update: bool = False) -> NotifyChannel:
    c: NotifyChannel | None = await s.get(NotifyChannel, name, with_for_update=for_update)
    if c is None:
        raise not_found("notification channel", name, "list them: siterecovery notify list")
    return c


async def show_channel(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s:
        c = await _get(s, name)
        return reply(_doc(c, (await _stats(s, [name]))[name]))


async def update_channel(call: Call) -> web.Response:
    name = call.params["name"]
    b: dict[str, Any] = call.body
    services = call.services
    removed = sorted(k for k in REMOVABLE if k in b and b[k] is None)
    plain = _secret({k: v for k, v in b.items() if k not in removed})
    async with services.sessionmaker() as s, s.begin():
        c = await _get(s, name, for_update=True)
        foreign = [k for k in sorted(b) if k not in FIELDS[c.kind]]
        if foreign:
            raise _invalid(f"{', '.join(foreign)}: not a setting of {c.kind} channel "
                           f"{name!r}", f"a {c.kind} channel has {', '.join(FIELDS[c.kind])}; "
                           "to change its kind, remove it and add it again")
        given = {k: v for k, v in b.items()
                 if k not in ("severities", "secret") and k not in removed}
        has_secret = plain is not None or (c.secret is not None and "secret" not in removed)
        kept = {k: v for k, v in c.settings.items() if k not in removed}
        settings = _settings({"kind": c.kind, **kept, **given}, has_secret) \
            if given or removed else None
        blob = None if plain is None else await _seal(services, name, c.kind, plain)
        if settings is not None:
            c.settings = settings
        if "severities" in b:
            c.severities = b["severities"]
        if blob is not None:
            c.secret = blob
        elif "secret" in removed:
            c.secret = None
        c.updated = services.clock()
        doc = _doc(c, (await _stats(s, [name]))[name])
    log.info("notify_channel_updated", channel=name, changed=sorted(b), removed=removed,
             secret_rotated=plain is not None, key_id=doc["key_id"])
    return reply(doc)


async def remove_channel(call: Call) -> web.Response:
    name = call.params["name"]
    async with call.services.sessionmaker() as s, s.begin():
        await s.delete(await _get(s, name))
        dropped = (await s.execute(delete(NotifyOutbox).where(
            NotifyOutbox.channel == name, NotifyOutbox.state == PENDING))
        ).rowcount  # type: ignore[attr-defined]
    log.info("notify_channel_removed", channel=name, pending_dropped=dropped)
    return reply({"deleted": name})


async def test_channel(call: Call) -> web.Response:
    name = call.params["name"]
    services = call.services
    async with services.sessionmaker() as s:
        c = await _get(s, name)
    now = services.clock()
    msg = notice(Change(TEST, "notify_test", name, "critical" if "critical" in c.severities
                        else c.severities[0],
                        f"test notice from siterecovery through channel {name!r}"), now)
    error = None
    try:
        await send(c, open_secret(services.cfg.secrets_key_path, c), f"test-{int(now)}", msg,
                   now, TEST_TIMEOUT_SECONDS)
    except SendError as e:
        error = str(e)
    log.info("notify_channel_tested", channel=name, delivered=error is None, error=error)
    return reply({"channel": name, "delivered": error is None, "error": error})


_NAME_PARAM = {"name": NAME}
_BASE = "/api/v1/notify/channels"
ROUTES = [
    Route("POST", _BASE, add_channel, "Add a notification channel (webhook or email)",
          "notify", body=CREATE, responses={201: CHANNEL}, refusals=REFUSALS,
          description="Alerts of the listed severities are sent through it when raised and "
                      "when cleared. The secret is sealed under the server's secrets key "
                      "and never returned."),
    Route("GET", _BASE, list_channels, "List notification channels and their outbox",
          "notify", responses={200: obj({"channels": array(CHANNEL)}, ["channels"])}),
    Route("GET", _BASE + "/{name}", show_channel, "Show a notification channel", "notify",
          params=_NAME_PARAM, responses={200: CHANNEL}),
    Route("PATCH", _BASE + "/{name}", update_channel,
          "Change a notification channel's settings, severities or secret", "notify",
          params=_NAME_PARAM, body=UPDATE, responses={200: CHANNEL},
          refusals=UPDATE_REFUSALS,
          description="Only the fields given change (severities and to are replaced "
                      "whole); the kind stays. username, ca_file and secret given as null "
                      "are removed (an SMTP login is removed with its password: both "
                      "null). A new secret is sealed like the first and never returned. "
                      "Notices waiting in the outbox stay there and are sent with the new "
                      "settings."),
    Route("DELETE", _BASE + "/{name}", remove_channel,
          "Remove a notification channel (its undelivered notices with it)", "notify",
          params=_NAME_PARAM,
          responses={200: obj({"deleted": {"type": "string"}}, ["deleted"])}),
    Route("POST", _BASE + "/{name}/test", test_channel,
          "Send a test notice through a channel now", "notify", params=_NAME_PARAM,
          responses={200: TESTED},
          description="Bypasses the outbox; answers whether the receiver accepted it "
                      f"(within {TEST_TIMEOUT_SECONDS:g} s) and, if not, why."),
]
