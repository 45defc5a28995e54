"""The scheduled prune within a memory budget (#16): the configuration server's Prune the
vault job runs within its ``gc_memory_mib``; at 0 it collects through temporary files
(the streaming path), and on copies of the same vault its result is the in-memory one's:
the same points forgotten, kept and rebased, the same packs deleted and repacked, the
same index, every kept point restoring byte for byte. A bad budget is refused."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from configserver import gcjob
from configserver.config import ConfigServerConfig
from siterecovery.apiclient import ApiClient
from tests.csclock import Clock, clocked_configserver
from tests.helpers import restore_all
from tests.sitehelpers import wait_job
from tests.test_memory_streaming import NOW, _build, _open
from vault import names
from vault.index import Location
from vault.memory import DEFAULT_MEMORY_MIB
from vault.regkey import make_key

SPILLS = "collecting through temporary files"


async def _scheduled_prune(root: Path, cs_dir: Path, memory_mib: int
                           ) -> tuple[dict[str, Any], list[str]]:
    """Register a configuration server of ``gc_memory_mib = memory_mib`` with the vault in
    ``root``, run its scheduled prune at ``NOW``; the job and its progress messages."""
    vault = await _open(root)
    url = f"file://{root / 'vault'}"
    clock = Clock()  # real time until registered
    try:
        with capture_logs() as logs:
            async with clocked_configserver(cs_dir, f"sqlite+aiosqlite:///{cs_dir}.db", clock,
                                            gc_memory_mib=memory_mib) as cs, \
                    ApiClient(cs.url, cs.admin_token) as api:
                await api.post("/api/v1/registration", {
                    "key": json.dumps(make_key(vault, url, time.time())),
                    "vault_key_file": str(root / "vault.key")})
                clock.now = NOW.timestamp()  # the default policy keeps 24 hours
                job = await gcjob.schedule_once(cs.services, 24,
                                                gcjob.budget(cs.services.cfg.gc_memory_mib))
                assert job is not None
                done = await wait_job(api, job.id)
    finally:
        await vault.close()
    said = [str(e["message"]) for e in logs if e.get("event") == "prune_progress"]
    return done, said


async def _state(root: Path, old_packs: set[str]) -> dict[str, Any]:
    """What a prune leaves: the points, the index of the packs that were there before
    (where a block stays), the blocks of the new packs and how many there are."""
    vault = await _open(root)
    try:
        index = await vault.load_index()
        entries: dict[bytes, Location] = dict(index.entries)
        return {"points": sorted(p.id for p in await vault.list_points()),
                "in_old_packs": {b: loc for b, loc in entries.items()
                                 if loc.pack_id in old_packs},
                "repacked": {b for b, loc in entries.items() if loc.pack_id not in old_packs},
                "new_packs": len(index.packs - old_packs)}
    finally:
        await vault.close()


async def test_scheduled_prune_within_a_tiny_budget_gives_the_in_memory_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = tmp_path / "built"
    built.mkdir()
    expected = await _build(built)
    old_packs = {names.pack_id_of(str(p.relative_to(built / "vault")))
                 for p in (built / "vault" / "packs").rglob("*") if p.is_file()}
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))  # the daemon's $TMPDIR
    runs = {}
    for name, mib in (("mem", DEFAULT_MEMORY_MIB), ("disk", 0)):
        root = shutil.copytree(built, tmp_path / name)
        done, said = await _scheduled_prune(root, tmp_path / f"cs-{name}", mib)
        assert done["state"] == "succeeded", done
        assert done["params"] == {"memory_mib": mib, "scheduled": True}
        assert (SPILLS in " ".join(said)) == (mib == 0), said  # which path it took
        runs[name] = (done["steps"][0]["message"], await _state(root, old_packs))
        # Every point kept restores byte for byte.
        vault = await _open(root)
        try:
            for p in await vault.list_points():
                assert await restore_all(vault, p, tmp_path / "out") == {"d0": expected[p.id]}
        finally:
            await vault.close()
    (mem_msg, mem), (disk_msg, disk) = runs["mem"], runs["disk"]
    assert mem_msg == disk_msg and "forgot 10 point(s), kept 10, rebased 2" in mem_msg, mem_msg
    assert "repacked 0" not in mem_msg and "deleted 0 pack" not in mem_msg
    assert disk == mem
    assert mem["repacked"] and mem["new_packs"]  # some blocks moved into new packs
    assert list(spill.iterdir()) == []  # the temporary files are gone


@pytest.mark.parametrize("bad", [-1, 1 << 21, "512", 1.5, True])
def test_a_bad_gc_memory_mib_is_refused(tmp_path: Path, bad: object) -> None:
    cfg = ConfigServerConfig(data_dir=str(tmp_path), gc_memory_mib=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gc_memory_mib must be a whole number of MiB"):
        cfg.validate()
