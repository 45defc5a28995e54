"""``serve`` registers its configuration server with the vault it created (it holds the
key file): a machine protected on a fresh embedded installation is drilled at once,
without a registration step; a restart leaves the registration as it is."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.helpers import Daemon, make_disk, open_vault, run_cli, sha256


def _serve(data: Path) -> Daemon:
    return Daemon(["serve", "--data-dir", str(data), "--admin-port", "0", "--site-port", "0",
                   "--listen", "127.0.0.1:0", "--metrics-port", "0"], "procserver_started")


async def _cli(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    r = await asyncio.to_thread(lambda: run_cli(*args, "--json", env=env))
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


async def test_serve_registers_itself_and_a_machine_is_drilled_at_once(tmp_path: Path) -> None:
    data, disk = tmp_path / "data", tmp_path / "disk.img"
    make_disk(disk, 8 << 20, seed=5)
    with open(disk, "r+b") as f:  # an empty MBR: the drill's disk check takes it
        f.seek(446)
        f.write(bytes(64) + b"\x55\xaa")
    serve = _serve(data)
    ready = await serve.start()
    agent: Daemon | None = None
    try:
        [registered] = await serve.wait_events("registered", 1, timeout=60)
        api = f"http://127.0.0.1:{serve.events('configserver_started')[0]['port']}"
        admin = ["--api", api, "--token-file", str(data / "configserver" / "api-token")]
        vault = await open_vault(data / "vault", data / "vault.key")
        vault_id = vault.config.vault_id
        await vault.close()
        status = await _cli("register", "--status", *admin)
        assert status["vault_id"] == registered["vault"] == vault_id
        assert status["vault_key_file"] == str((data / "vault.key").resolve())

        site = f"https://127.0.0.1:{serve.events('configserver_started')[0]['site_port']}"
        # the admin path of enroll, from the environment as every admin verb takes it
        await _cli("mobility", "enroll", "--machine", "vm1", "--site-url", site, "--server",
                   f"127.0.0.1:{ready['port']}", "--disk", f"sda={disk}", "--out",
                   str(tmp_path / "agent"), env={"SITERECOVERY_API": api,
                                                 "SITERECOVERY_TOKEN_FILE": admin[3]})
        enable = await _cli("replication", "enable", "vm1", *admin)
        agent = Daemon(["mobility", "run", "--config", str(tmp_path / "agent" /
                                                           "mobility.toml")],
                       "startup_heap_settled")
        await agent.start()  # (started after the request: it checks in at once)
        assert (await _cli("jobs", "wait", str(enable["id"]), *admin))["state"] == "succeeded"
        listed = await _cli("jobs", "list", "--target", "vm1", "--kind", "finalize_protection",
                            *admin)
        [finalize] = listed["jobs"]
        done = await _cli("jobs", "wait", finalize["id"], *admin)
        assert done["state"] == "succeeded", done
        drill = await _cli("failover", "test", "vm1", "--wait", "--timeout", "120", *admin)
        assert drill["kind"] == "test_failover" and drill["state"] == "succeeded", drill
        recovered = data / "configserver" / "recovered" / "vm1" / "sda.img"
        assert sha256(recovered) == sha256(disk)
        registered_at = status["registered_at"]
    finally:
        if agent is not None:
            await agent.stop()
        assert await serve.stop() == 0

    again = _serve(data)
    await again.start()
    try:
        [kept] = await again.wait_events("self_registration_not_needed", 1, timeout=60)
        assert kept["vault"] == vault_id
        status = await _cli("register", "--status", "--api", "http://127.0.0.1:"
                            f"{again.events('configserver_started')[0]['port']}",
                            "--token-file", str(data / "configserver" / "api-token"))
        assert status["registered_at"] == registered_at
        assert not again.events("registered")
    finally:
        assert await again.stop() == 0
