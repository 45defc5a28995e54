"""The operator's path through the real CLI and daemons, as subprocesses."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from siterecovery.apiclient import ApiClient
from tests.helpers import (
    Daemon,
    make_disk,
    make_vault,
    open_vault,
    run_cli,
    sha256,
    write_full_point,
    write_toml,
)


def _metric(text: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"metric {name} {labels} not exposed")


def test_demo_passes() -> None:
    r = run_cli("demo", "--size-mib", "16", "--cycles", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "byte-exact" in r.stdout
    assert "demo: PASS" in r.stdout


async def test_serve_enroll_replicate_restore(tmp_path: Path) -> None:
    data = tmp_path / "data"
    serve = Daemon(["serve", "--data-dir", str(data), "--admin-port", "0", "--site-port", "0",
                    "--listen", "127.0.0.1:0", "--metrics-port", "0"], "procserver_started")
    ready = await serve.start()
    try:
        api_port = serve.events("configserver_started")[0]["port"]
        api = f"http://127.0.0.1:{api_port}"
        token_file = data / "configserver" / "api-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        # Both servers started: their start-up objects left full collections at once.
        [settled] = await serve.wait_events("startup_heap_settled", 1, timeout=60)
        assert int(str(settled["frozen_objects"])) > 50_000
        assert (data / "vault.key").stat().st_mode & 0o777 == 0o600
        disk = tmp_path / "disk.img"
        make_disk(disk, 8 << 20, seed=9)

        r = run_cli("mobility", "enroll", "--machine", "vm1", "--api", api, "--token-file",
                    str(token_file), "--server", f"127.0.0.1:{ready['port']}",
                    "--disk", f"sda={disk}", "--out", str(tmp_path / "agent"), "--json")
        assert r.returncode == 0, r.stderr
        cfg = tmp_path / "agent" / "mobility.toml"
        enrolled = json.loads(r.stdout)
        assert (enrolled["machine"], enrolled["config"]) == ("vm1", str(cfg))
        assert enrolled["process_server"] == f"127.0.0.1:{ready['port']}"
        assert all(Path(enrolled[f]).is_file() for f in ("cert", "key", "ca"))
        async with ApiClient(api, token_file.read_text().strip()) as admin:
            issued = await admin.get(f"/api/v1/certificates/{enrolled['serial']}")
        assert issued["serial"] == enrolled["serial"]
        assert issued["not_after"] == enrolled["not_after"]
        doc = tomllib.loads(cfg.read_text())
        assert doc["machine"] == "vm1" and doc["snapshot"] == "none"
        r = run_cli("mobility", "replicate", "--config", str(cfg), "--json")
        assert r.returncode == 0, r.stderr
        first = json.loads(r.stdout)
        # A live read without a snapshot provider is never labelled consistent.
        assert first["full"] is True and first["consistency"] == "inconsistent"
        write_toml(cfg, {**doc, "snapshot": "quiesced"})
        with open(disk, "r+b") as f:
            f.write(b"changed")
        r = run_cli("mobility", "replicate", "--config", str(cfg), "--json")
        assert r.returncode == 0, r.stderr
        second = json.loads(r.stdout)
        assert second["full"] is False and second["consistency"] == "crash"
        assert second["blocks_sent"] == 1
        await serve.wait_events("point_recorded", 2)

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{api}/api/v1/points") as resp:
                assert resp.status == 401
                assert (await resp.json())["error"]["code"] == "unauthorized"
            auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
            async with http.get(f"{api}/api/v1/points", headers=auth) as resp:
                listed = (await resp.json())["points"]
            assert [p["consistency"] for p in listed] == ["inconsistent", "crash"]
        r = run_cli("points", "catalog", "--api", api, "--token-file", str(token_file),
                    "--machine", "vm1", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"points": listed}
        r = run_cli("points", "catalog", "--api", api, "--token-file", str(token_file))
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[:4] == ["MACHINE", "CREATED", "CONSISTENCY", "POINT"]
        assert [line.split()[-1] for line in r.stdout.splitlines()[1:]] == [
            p["id"] for p in listed]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{api}/metrics") as resp:
                assert _metric(await resp.text(),
                               "siterecovery_configserver_recovery_points_total") == 2
            async with http.get(f"http://127.0.0.1:{ready['metrics_port']}/metrics") as resp:
                text = await resp.text()
            assert _metric(text, "siterecovery_procserver_received_bytes_total") > 0
            assert _metric(text, "siterecovery_procserver_recovery_points_total") == 2
            # Store instrumentation: 2 manifests, 2 maps, packs and index objects were put.
            assert _metric(text, "siterecovery_vault_store_operations_total", op="put",
                           outcome="ok") >= 6
            assert _metric(text, "siterecovery_vault_store_bytes_total", op="put") > 0
    finally:
        assert await serve.stop() == 0
    assert serve.events("procserver_stopped") and serve.events("configserver_stopped")

    # With the servers gone: list and restore from the vault and its key alone.
    r = run_cli("points", "list", "--data-dir", str(data), "--json")
    assert r.returncode == 0, r.stderr
    points = json.loads(r.stdout)
    assert [p["id"] for p in points] == [p["id"] for p in listed]
    r = run_cli("machines", "list", "--data-dir", str(data), "--json")
    assert r.returncode == 0, r.stderr
    (machine,) = json.loads(r.stdout)
    assert (machine["machine"], machine["points"], machine["latest_point"]) == \
        ("vm1", 2, points[1]["id"])
    assert machine["latest_app_consistent"] is None
    r = run_cli("restore", "--data-dir", str(data), "--point", "latest-crash-consistent",
                "--out", str(tmp_path / "restored"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["point"] == points[1]["id"]
    assert sha256(tmp_path / "restored" / "sda.img") == sha256(disk)


def test_bad_arguments_get_clear_errors(tmp_path: Path) -> None:
    r = run_cli("restore", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "--out" in r.stderr
    r = run_cli("points", "list")
    assert r.returncode != 0 and "--vault and --key-file" in r.stderr
    r = run_cli("points", "list", "--data-dir", str(tmp_path / "nothing"))
    assert r.returncode != 0 and "error:" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nothing").exists()


def test_restore_unknown_point_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "k"
    r = run_cli("vault", "init", "--vault", f"file://{tmp_path / 'v'}", "--key-file", str(key),
                "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("vault", "init", "--vault", f"file://{tmp_path / 'v'}", "--key-file",
                str(tmp_path / "k2"))
    assert r.returncode == 1 and "already holds a vault" in r.stderr
    assert not (tmp_path / "k2").exists()
    r = run_cli("restore", "--vault", f"file://{tmp_path / 'v'}", "--key-file", str(key),
                "--point", "abc", "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "no recovery point matches 'abc'" in r.stderr


async def test_restore_chooses_the_point_through_the_vault_rule(tmp_path: Path) -> None:
    """--point and --machine reach vault/select.py; its refusals keep the CLI's words and
    exit codes (2: say more; 1: nothing matches)."""
    _url, key = await make_vault(tmp_path)
    v = await open_vault(tmp_path / "vault", key)
    try:
        p1 = await write_full_point(v, b"one" * 30000, machine="m1")
        p2 = await write_full_point(v, b"two" * 30000, machine="m2", cycle="c2")
    finally:
        await v.close()
    where = ["--vault", f"file://{tmp_path / 'vault'}", "--key-file", str(key)]

    def restore(*extra: str) -> subprocess.CompletedProcess[str]:
        return run_cli("restore", *where, "--out", str(tmp_path / "out"), "--json", *extra)

    r = restore()
    assert r.returncode == 2, r.stderr
    assert "the vault holds several machines (m1, m2); pick one with --machine" in r.stderr
    r = restore("--machine", "m2", "--point", "latest-crash-consistent")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["point"] == p2.id
    r = restore("--point", p1.id[:12])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["point"] == p1.id
    assert (tmp_path / "out" / "sda.img").read_bytes() == b"one" * 30000
    r = restore("--machine", "m1", "--point", "latest-app-consistent")
    assert r.returncode == 1
    assert ("error: no recovery point matches 'latest-app-consistent' for machine 'm1'; "
            "there is 1 (1 crash)") in r.stderr
