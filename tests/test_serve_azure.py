"""``serve --vault azure://…``: the all-in-one installation on Azure Blob Storage (Azurite
here), through the real command, without switching to three daemons (#12 item 11)."""

from __future__ import annotations

import json
import secrets
import tomllib
from pathlib import Path

from tests.helpers import Daemon, make_disk, run_cli, sha256

PASSPHRASE = "a long enough passphrase"


async def test_serve_protects_into_an_azure_vault_and_its_points_restore(
        tmp_path: Path, azurite_conn: str) -> None:
    conn = tmp_path / "azure.conn"
    conn.write_text(azurite_conn)
    url = f"azure://c{secrets.token_hex(6)}/site1?connection_string_file={conn}"
    data = tmp_path / "data"
    pfile = tmp_path / "passphrase"
    pfile.write_text(PASSPHRASE + "\n")
    # A first start on a store it cannot use binds the data directory to nothing.
    bad = run_cli("serve", "--data-dir", str(data), "--vault",
                  f"azure://c{secrets.token_hex(6)}/x?connection_string_file={tmp_path / 'no'}",
                  "--admin-port", "0", "--site-port", "0", "--listen", "127.0.0.1:0",
                  "--metrics-port", "0")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr
    assert not (data / "vault.url").exists()
    serve = Daemon(["serve", "--data-dir", str(data), "--vault", url, "--passphrase-file",
                    str(pfile), "--admin-port", "0", "--site-port", "0",
                    "--listen", "127.0.0.1:0", "--metrics-port", "0"], "procserver_started")
    ready = await serve.start()
    disk = tmp_path / "disk.img"
    make_disk(disk, 8 << 20, seed=71)
    try:
        assert ready["vault_open"] is True and str(ready["vault"]).startswith("azure://")
        (created,) = serve.events("vault_created")
        assert created["passphrase_slot"] is True
        assert not (data / "vault").exists()  # nothing went to the local default
        api = f"http://127.0.0.1:{serve.events('configserver_started')[0]['port']}"
        r = run_cli("mobility", "enroll", "--machine", "az1", "--api", api, "--token-file",
                    str(data / "configserver" / "api-token"),
                    "--server", f"127.0.0.1:{ready['port']}", "--disk", f"sda={disk}",
                    "--out", str(tmp_path / "agent"))
        assert r.returncode == 0, r.stderr
        cfg = tmp_path / "agent" / "mobility.toml"
        assert tomllib.loads(cfg.read_text())["machine"] == "az1"
        r = run_cli("mobility", "replicate", "--config", str(cfg), "--json")
        assert r.returncode == 0, r.stderr
        first_sha = sha256(disk)
        with open(disk, "r+b") as f:
            f.seek(3 << 20)
            f.write(b"changed on the second cycle")
        r = run_cli("mobility", "replicate", "--config", str(cfg), "--json")
        assert r.returncode == 0, r.stderr
        (first, second) = await serve.wait_events("point_uploaded", 2)
    finally:
        await serve.stop()

    # From the blob store and either key alone: the key file serve created, the passphrase.
    for point, want, key in ((first["point"], first_sha, ["--key-file", str(data / "vault.key")]),
                             (second["point"], sha256(disk), ["--passphrase-file", str(pfile)])):
        out = tmp_path / "out" / str(point)[:8]
        r = run_cli("restore", "--vault", url, *key, "--point", str(point), "--out", str(out),
                    "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["point"] == point
        assert sha256(out / "sda.img") == want

    # Every vault verb finds it through the data directory too.
    r = run_cli("points", "list", "--data-dir", str(data), "--json")
    assert r.returncode == 0, r.stderr
    assert [p["id"] for p in json.loads(r.stdout)] == [first["point"], second["point"]]

    # The data directory remembers its vault: another one is refused before anything starts.
    r = run_cli("serve", "--data-dir", str(data), "--vault", f"file://{tmp_path / 'other'}",
                "--admin-port", "0", "--site-port", "0", "--listen", "127.0.0.1:0",
                "--metrics-port", "0")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "serves the vault azure://" in r.stderr and not (tmp_path / "other").exists()

    # Started again without --vault, it serves the Azure vault (and the cache's cycles).
    again = Daemon(["serve", "--data-dir", str(data), "--passphrase-file", str(pfile),
                    "--admin-port", "0", "--site-port", "0", "--listen", "127.0.0.1:0",
                    "--metrics-port", "0"], "procserver_started")
    ready = await again.start()
    try:
        assert str(ready["vault"]).startswith("azure://") and ready["vault_open"] is True
        assert not again.events("vault_created")
    finally:
        await again.stop()


async def test_serve_starts_while_the_azure_vault_it_serves_is_down(tmp_path: Path) -> None:
    """Served before, the vault is not probed at start: storage that does not answer does
    not stop serve (the process server opens the vault when it answers)."""
    from tests.backends import _free_port, azurite

    port, blobs = _free_port(), tmp_path / "azurite"
    conn = tmp_path / "azure.conn"
    url = f"azure://down/site1?connection_string_file={conn}"
    data = tmp_path / "data"
    args = ["serve", "--data-dir", str(data), "--admin-port", "0", "--site-port", "0",
            "--listen", "127.0.0.1:0", "--metrics-port", "0"]
    with azurite(blobs, port) as text:
        conn.write_text(text)
        first = Daemon([*args, "--vault", url], "procserver_started")
        assert (await first.start())["vault_open"] is True
        await first.stop()
    # Azurite is down now.
    again = Daemon(args, "procserver_started")
    ready = await again.start()
    try:
        assert ready["vault_open"] is False and str(ready["vault"]).startswith("azure://")
    finally:
        await again.stop()
