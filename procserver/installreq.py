"""The process server's install requests: push installs the configuration server asks for.

``InstallRequests.run`` long-polls ``GET /api/v1/internal/procservers/{name}/install-
requests`` (answered as soon as the list changes), claims each request it is not already
running (the claim's answer carries the machine's account and secret, held in memory for
that request only) and runs it (procserver/installreqsteps.py) as its own task,
reporting every step. A report that cannot be delivered is retried with back-off until
it is: a step's outcome is never lost, and a request this process server had claimed
when it stopped is listed again at the next start and run again (it is idempotent).

The agent bundle is the file ``bundle`` (``DATA_DIR/agent-bundle.tar.gz``; built with
``siterecovery agent bundle --output``), read at each request so a new one is used
without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from pathlib import Path
from typing import Any

import structlog

from common.backoff import Backoff
from procserver.csclient import ConfigServerClient, ConfigServerError
from procserver.installreqsteps import RequestStopped, read_bundle, run_request
from procserver.pushinstall import InstallFailed

log = structlog.get_logger("procserver.installreq")

POLL_SECONDS = 20
BUNDLE_NAME = "agent-bundle.tar.gz"


class InstallRequests:
    def __init__(self, client: ConfigServerClient, name: str, bundle: Path) -> None:
        self.client, self.name, self.bundle = client, name, bundle
        self._running: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        if not self.client.enabled:
            return
        await self.client.wait_token("install_requests_blocked")
        backoff = Backoff(cap=15.0, jitter=False)
        path = f"/api/v1/internal/procservers/{self.name}/install-requests"
        version = ""
        try:
            while True:
                try:
                    answer = await self.client.get(
                        path, params={"wait": str(POLL_SECONDS), "version": version},
                        timeout=POLL_SECONDS + 15)
                    if answer.status == 404:  # before our first heartbeat registers us
                        delay = backoff.next()
                        log.info("install_requests_not_registered_yet",
                                 retry_in_seconds=delay)
                        await asyncio.sleep(delay)
                        continue
                    if answer.status >= 300:
                        raise ConfigServerError(f"HTTP {answer.status}: {answer.excerpt()}")
                    doc = answer.json()
                    requests: list[dict[str, Any]] = doc["requests"]
                    version = str(doc["version"])
                    backoff.reset()
                except (ConfigServerError, ValueError, KeyError) as e:
                    delay = backoff.next()
                    log.warning("install_requests_poll_failed", error=str(e),
                                retry_in_seconds=delay)
                    await asyncio.sleep(delay)
                    continue
                for req in requests:
                    if req["id"] not in self._running:
                        task = asyncio.create_task(self._one(req), name=f"install-{req['id']}")
                        self._running[req["id"]] = task
                        task.add_done_callback(functools.partial(self._forget, req["id"]))
        finally:
            tasks = list(self._running.values())
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _forget(self, jid: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(jid, None)

    async def _post(self, path: str, doc: dict[str, Any]) -> tuple[int, Any]:
        """POST until the configuration server answers; (status, JSON answer)."""
        backoff = Backoff(jitter=False)
        while True:
            try:
                answer = await self.client.post(path, {"procserver": self.name, **doc})
                if answer.status < 500:
                    return answer.status, answer.json()
                raise ConfigServerError(f"HTTP {answer.status}: {answer.excerpt()}")
            except (ConfigServerError, ValueError) as e:
                delay = backoff.next()
                log.warning("install_request_post_failed", path=path, error=str(e),
                            retry_in_seconds=delay)
                await asyncio.sleep(delay)

    async def _one(self, req: dict[str, Any]) -> None:
        jid, machine = req["id"], req["machine"]
        base = f"/api/v1/internal/install-requests/{jid}"
        status, claimed = await self._post(f"{base}/claim", {})
        if status != 200:
            log.info("install_request_not_claimed", job=jid, machine=machine, status=status,
                     error=(claimed.get("error") or {}).get("message"))
            return
        log.info("install_request_started", job=jid, machine=machine, action=req["action"])

        async def report(step: str, state: str, message: str, extra: dict[str, Any]) -> bool:
            status, answer = await self._post(f"{base}/report", {
                "step": step, "state": state, "message": message[:20000], **extra})
            (log.info if state == "succeeded" else log.warning)(
                "install_step_reported", job=jid, machine=machine, step=step, state=state)
            return status == 200 and answer.get("state") in ("claimed", "done")

        async def sign(csr: bytes) -> tuple[bytes, bytes]:
            status, answer = await self._post(f"{base}/csr", {"csr": csr.decode()})
            if status != 201:
                raise InstallFailed("the configuration server refused the agent's certificate "
                                    f"request: {(answer.get('error') or {}).get('message')}")
            return answer["cert"].encode(), answer["ca"].encode()

        bundle = await read_bundle(self.bundle)
        try:
            await run_request(claimed, bundle, report, sign, bundle_path=self.bundle)
            log.info("install_request_done", job=jid, machine=machine)
        except RequestStopped as e:
            log.info("install_request_stopped", job=jid, machine=machine, step=str(e))
        except Exception as e:  # reported, so the job does not wait for a report in vain
            log.exception("install_request_error", job=jid, machine=machine)
            with contextlib.suppress(Exception):
                await report(claimed["steps"][0], "failed",
                             f"unexpected error on the process server: "
                             f"{type(e).__name__}: {e}", {})
