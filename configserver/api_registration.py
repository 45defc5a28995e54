"""Routes: registration with a vault (see configserver/registration.py for the checks)."""

from __future__ import annotations

from aiohttp import web

from configserver import db, registration
from configserver.rest import Call, Route, array, iso, nullable, obj, reply
from vault.regkey import MAX_KEY_BYTES

STATUS = obj({
    "registered": {"type": "boolean"},
    "vault_id": nullable({"type": "string"}),
    "vault_url": nullable({"type": "string"}),
    "key_id": nullable({"type": "string"}),
    "registered_at": nullable({"type": "string"}),
    "key_expires": nullable({"type": "string"}),
    "skew_seconds": nullable({"type": "number"}),
    "vault_key_file": nullable({"type": "string"}),
}, ["registered", "vault_id", "vault_url", "key_id", "registered_at", "key_expires",
    "skew_seconds", "vault_key_file"])
REGISTERED = obj({**STATUS["properties"], "clock_reference": {"enum": ["storage", "none"]},
                  "warnings": array({"type": "string"})},
                 [*STATUS["required"], "clock_reference", "warnings"])


def _status(row: db.Registration | None) -> dict[str, object]:
    if row is None:
        return {"registered": False, "vault_id": None, "vault_url": None, "key_id": None,
                "registered_at": None, "key_expires": None, "skew_seconds": None,
                "vault_key_file": None}
    return {"registered": True, "vault_id": row.vault_id, "vault_url": row.vault_url,
            "key_id": row.key_id, "registered_at": iso(row.registered_at),
            "key_expires": iso(row.key_expires), "skew_seconds": row.skew_seconds,
            "vault_key_file": row.vault_key_file}


async def show_registration(call: Call) -> web.Response:
    return reply(_status(await registration.current(call.services)))


async def register(call: Call) -> web.Response:
    out = await registration.register(call.services, call.services.cfg.vault_key_file,
                                      call.body["key"],
                                      call.body.get("vault_key_file"),
                                      call.body.get("vault_url"))
    return reply({**_status(out.row), "clock_reference": out.reference,
                  "warnings": out.warnings})


ROUTES = [
    Route("GET", "/api/v1/registration", show_registration,
          "The vault this configuration server is registered with", "registration",
          responses={200: STATUS}),
    Route("POST", "/api/v1/registration", register,
          "Register with a vault using a registration key file", "registration",
          description="Checks, in order: the key file's format, its validity window (5 days) "
                      "by this server's clock, that the server's vault key opens the vault "
                      "the key names and that it is the same vault, the key's authentication "
                      "code, and that this machine's clock is within 5 minutes of the storage "
                      "service's (a local-folder vault has no clock: accepted with a warning). "
                      "A refused key changes nothing. The vault key file is a path on this "
                      "server (this API is loopback-only), else the config's vault_key_file; "
                      "only the path is stored.",
          body=obj({"key": {"type": "string", "minLength": 1,
                            "maxLength": MAX_KEY_BYTES},
                    "vault_key_file": {"type": "string", "minLength": 1, "maxLength": 4096},
                    "vault_url": {"type": "string", "minLength": 1, "maxLength": 2048}},
                   ["key"]),
          responses={200: REGISTERED},
          refusals=("key is not the text of a registration key file (format "
                    "siterecovery-registration-key; registration_key_malformed)",
                    "the key is outside its validity window, names another vault, or its "
                    "authentication code does not verify",
                    "the vault key (vault_key_file, or the config's) is missing or does "
                    "not open the vault", "the clocks differ by more than 5 minutes")),
]
