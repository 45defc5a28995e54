"""A configuration server that holds its vault's key file registers itself with it.

Registration (``registration.py``) proves that whoever registers holds the vault's key:
the registration key is made with it. A server configured with ``vault_url`` and
``vault_key_file`` holds that key, so it makes the key itself and registers at start, as
``siterecovery vault registration-key`` then ``register`` would — the embedded
installation (``serve``), whose vault and key it created, recovers machines without a
step of the operator's. Every check of ``register`` applies (the storage service's clock
among them); a vault that cannot be read yet is tried again with back-off, a refusal is
logged with its hint and left to the operator. A server registered already (with this
vault or another) is left as it is.
"""

from __future__ import annotations

import asyncio
import json

import structlog

from common.backoff import Backoff
from configserver import registration
from configserver.core import Core
from configserver.errors import DomainError, Unavailable
from vault.regkey import make_key

log = structlog.get_logger("configserver.selfregister")

RETRY_BASE_SECONDS, RETRY_CAP_SECONDS = 5.0, 300.0


async def register_once(core: Core, url: str, key_file: str) -> bool:
    """Register with the vault at ``url`` unless registered; whether this call did."""
    current = await registration.current(core)
    if current is not None:
        log.info("self_registration_not_needed", vault=current.vault_id,
                 vault_url=current.vault_url)
        return False
    vault = await registration.open_vault(url, key_file)
    try:
        key = make_key(vault, url, core.clock())
    finally:
        await vault.close()
    await registration.register(core, key_file, json.dumps(key), key_file, None)
    return True


async def run(core: Core, url: str, key_file: str) -> None:
    """``register_once`` until it is done or refused (a background task)."""
    backoff = Backoff(RETRY_BASE_SECONDS, RETRY_CAP_SECONDS)
    while True:
        try:
            await register_once(core, url, key_file)
            return
        except Unavailable as e:  # the storage does not answer (yet)
            why = e.message
        except DomainError as e:
            log.error("self_registration_refused", vault=url, code=e.code, error=e.message,
                      hint=e.hint)
            return
        except Exception as e:  # the catalog's hiccup, or another server registering too
            why = f"{type(e).__name__}: {e}"
        wait = backoff.next()
        log.warning("self_registration_retrying", vault=url, error=why,
                    retry_in_seconds=round(wait, 1))
        await asyncio.sleep(wait)
