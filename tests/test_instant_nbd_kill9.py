"""``siterecovery instant serve`` as a real process: served while it hydrates, killed with
SIGKILL mid-hydration, restarted, resumed, and its overlay then equal to the point
restored byte for byte; SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from siterecovery.cli import main
from tests.helpers import BLOCK, REPO
from tests.test_instant_nbd import NBLOCKS, SIZE, Site, _build, run, tree_digest, zero_block


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return _build(tmp_path_factory.mktemp("instant-kill9"))


class Server:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, site: Site, tmp: Path, *extra: str) -> Server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "siterecovery", "instant", "serve",
            "--vault", f"file://{site.vault_dir}", "--key-file", str(site.key),
            "--machine", "web1", "--socket", str(tmp / "nbd.sock"),
            "--overlay", str(tmp / "ov"), "--json", *extra,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def event(self, name: str) -> dict[str, Any]:
        """The next line of ours (not a log event) named ``name``."""
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
            assert line, f"the server ended before {name!r}: {await self._stderr()}"
            doc = json.loads(line)
            if doc.get("event") == name:
                return doc  # type: ignore[no-any-return]

    async def _stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode()

    async def wait(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), 120)


def present(overlay: Path) -> list[int]:
    bits = (overlay / "present.bitmap").read_bytes()
    return [n for n in range(NBLOCKS + 1) if bits[n >> 3] >> (n & 7) & 1]


async def test_kill9_mid_hydration_then_resume_to_the_whole_disk(site: Site,
                                                                   tmp_path: Path) -> None:
    vault_before = tree_digest(site.vault_dir)
    ov = tmp_path / "ov"
    zeros = [n for n in range(NBLOCKS + 1) if zero_block(n)]
    # 1 Mbit/s: the data blocks take seconds to hydrate; the kill comes after the first.
    s = await Server.start(site, tmp_path, "--hydrate-rate", "1")
    serving = await s.event("serving")
    assert serving["uri"] == f"nbd+unix:///?socket={tmp_path / 'nbd.sock'}"
    assert serving["total_blocks"] == NBLOCKS + 1 and serving["size"] == SIZE
    assert serving["present_blocks"] == len(zeros)
    while (await s.event("hydrating"))["present_blocks"] <= len(zeros):
        pass
    s.proc.kill()
    assert await s.wait() == -signal.SIGKILL
    got = present(ov)
    assert len(zeros) < len(got) < NBLOCKS + 1, "killed before or after hydration"
    img = (ov / "disk.img").read_bytes()
    for n in got:  # every block marked present holds its bytes
        assert img[n * BLOCK:(n + 1) * BLOCK] == site.data[n * BLOCK:(n + 1) * BLOCK], n

    # Restarted: it resumes from the overlay, serves (over TCP too) while it hydrates.
    s = await Server.start(site, tmp_path, "--tcp-port", "0")
    resumed = await s.event("serving")
    assert resumed["present_blocks"] >= len(got)
    host, port = resumed["tcp"]
    assert host == "127.0.0.1"
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(site.reference),
              resumed["uri"])
    info = json.loads(await run("nbdinfo", "--json", f"nbd://{host}:{port}"))
    assert info["exports"][0]["export-size"] == SIZE
    await s.event("hydrated")
    s.proc.send_signal(signal.SIGTERM)
    stopped = await s.event("stopped")
    assert stopped["present_blocks"] == stopped["total_blocks"] == NBLOCKS + 1
    assert await s.wait() == 0
    assert not (tmp_path / "nbd.sock").exists()
    assert (ov / "disk.img").read_bytes() == site.data
    assert tree_digest(site.vault_dir) == vault_before


def test_help_and_bad_arguments(site: Site, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["instant", "serve", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "hydrate" in out and "--overlay" in out
    common = ["instant", "serve", "--vault", f"file://{site.vault_dir}", "--key-file",
              str(site.key), "--socket", str(tmp_path / "s"), "--overlay", str(tmp_path / "o")]
    assert main([*common, "--disk", "sdz"]) == 2
    assert "has no disk 'sdz'" in capsys.readouterr().err
    assert main([*common, "--point", "0000"]) != 0
    assert "no recovery point matches" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*common, "--hydrate-rate", "-3"])
    assert exc.value.code == 2 and "Mbit/s" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s") and not os.path.exists(tmp_path / "o")
