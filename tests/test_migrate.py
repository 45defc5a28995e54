"""``siterecovery vault migrate``: the format 1 golden vault brought to format 3 through
the real CLI restores byte for byte and checks clean; the format 2 one too, its config
alone written again; a run cut short leaves a vault that restores and a second run
finishes; a damaged map is named and its point left; a format 1 vault goes on being
written as format 1 until it is migrated, and then packs of frames beside its old
packs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import sys
from pathlib import Path

from tests.helpers import REPO, open_vault, restore_all, run_cli, sha256, write_full_point
from tests.make_golden import DISK, GOLDEN2
from tests.test_golden import (
    _flip,
    _want,
    check,
    copy_golden,
    restore,
    restores_and_checks_clean,
)
from vault import names
from vault.keyslots import KeyMaterial, new_keyfile
from vault.locks import locked
from vault.mapchunks import MAGIC
from vault.migrate import migrate
from vault.repo import Vault
from vault.store.local import LocalStore


def _migrate(url: str, key: Path, *extra: str) -> tuple[int, str]:
    r = run_cli("vault", "migrate", "--vault", url, "--key-file", str(key), *extra)
    return r.returncode, r.stdout + r.stderr


def _maps(vault: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (vault / "maps").iterdir()}


async def test_the_format1_golden_vault_migrates_and_restores_exactly(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    old_maps = _maps(g.vault)
    packs = {p: p.read_bytes() for p in (g.vault / "packs").rglob("*") if p.is_file()}
    code, text = _migrate(g.url, g.key, "--json")
    assert code == 0, text
    doc = json.loads(text.splitlines()[-1])
    assert doc == {"from_format": 1, "to_format": 3, "points": 2, "migrated": 2,
                   "maps_written": 2, "maps_deleted": 2, "damaged": [], "exit_code": 0}
    new_maps = _maps(g.vault)
    assert not set(new_maps) & set(old_maps)  # new ids; the old ones deleted
    assert all(raw[-4:] == MAGIC for raw in new_maps.values())
    assert {p: p.read_bytes() for p in packs} == packs  # the data is not touched
    v = await open_vault(g.vault, g.key)
    try:
        assert v.config.format == 3
        assert [(p.id, p.format) for p in await v.list_points()] == [(g.p1, 3), (g.p2, 3)]
    finally:
        await v.close()
    restores_and_checks_clean(g, tmp_path / "out")
    code, text = _migrate(g.url, g.key)
    assert code == 0 and "already at format 3; nothing to do" in text, text
    assert _maps(g.vault) == new_maps


async def test_the_format2_golden_vault_migrates_by_its_config_alone(tmp_path: Path) -> None:
    """Format 2 to 3 writes the config only (its maps are chunked already, its packs
    stay as they are); a point written after is in frames, beside the old packs."""
    g = await copy_golden(tmp_path, GOLDEN2)
    before = {p: p.read_bytes() for p in g.vault.rglob("*") if p.is_file()}
    code, text = _migrate(g.url, g.key, "--json")
    assert code == 0, text
    doc = json.loads(text.splitlines()[-1])
    assert doc == {"from_format": 2, "to_format": 3, "points": 2, "migrated": 0,
                   "maps_written": 0, "maps_deleted": 0, "damaged": [], "exit_code": 0}
    after = {p: p.read_bytes() for p in g.vault.rglob("*") if p.is_file()}
    assert [p for p in before if before[p] != after.get(p)] == [g.path(names.CONFIG)]
    restores_and_checks_clean(g, tmp_path / "out")
    v = await open_vault(g.vault, g.key)
    try:
        assert v.config.format == 3
        assert [p.format for p in await v.list_points()] == [2, 2]
        data = bytes(range(256)) * 1024 * 4
        q = await write_full_point(v, data, cycle="c3")
        assert q.format == 3
        new = [p for p in (g.vault / "packs").rglob("*") if p.is_file() and p not in before]
        assert len(new) == 1 and new[0].read_bytes()[:2] == bytes([1, 10])  # a frame
        assert await restore_all(v, q, tmp_path / "q") == {
            "sda": hashlib.sha256(data).hexdigest()}
    finally:
        await v.close()
    code, text = check(g, "--read-data")
    assert code == 0 and "no problems" in text, text


async def test_a_migration_cut_short_restores_and_a_second_run_finishes(tmp_path: Path
                                                                        ) -> None:
    g = await copy_golden(tmp_path)
    v = await open_vault(g.vault, g.key)
    try:
        async with locked(v, "exclusive", "migrate"):
            report = await migrate(v, limit=1)  # as if killed after the first point
    finally:
        await v.close()
    assert (report.migrated, report.points) == (1, 2)
    v = await open_vault(g.vault, g.key)
    try:
        assert v.config.format == 3  # written first: an old program refuses the vault
        assert [p.format for p in await v.list_points()] == [3, 1]
    finally:
        await v.close()
    # The delta point (format 1) rests on the migrated full point (format 3).
    restores_and_checks_clean(g, tmp_path / "half")
    code, text = _migrate(g.url, g.key)
    assert code == 0, text
    assert "vault at format 3 (was 3): 1 of 2 points written again" in text
    restores_and_checks_clean(g, tmp_path / "whole")


async def test_a_damaged_map_is_named_and_its_point_left_as_it_was(tmp_path: Path) -> None:
    g = await copy_golden(tmp_path)
    path = g.path(g.delta_map)
    _flip(path, path.stat().st_size // 2)
    damaged = path.read_bytes()
    code, text = _migrate(g.url, g.key)
    assert code == 3, text
    assert f"ERROR: {g.delta_map}: damaged: points/{g.p2} (left at format 1)" in text
    assert path.read_bytes() == damaged  # not deleted, not rewritten
    v = await open_vault(g.vault, g.key)
    try:
        assert [p.format for p in await v.list_points()] == [3, 1]
    finally:
        await v.close()
    out = tmp_path / "full"
    code, text = restore(g, g.p1, out)
    assert code == 0, text
    assert sha256(out / f"{DISK}.img") == _want(g.p1)
    code, text = check(g)
    assert code == 3 and f"ERROR: {g.delta_map}: " in text, text


async def test_a_format1_vault_is_written_as_format1_until_migrated(tmp_path: Path) -> None:
    key = tmp_path / "vault.key"
    v = await Vault.create(LocalStore(tmp_path / "vault"), KeyMaterial(keyfile=new_keyfile(key)),
                           fmt=1)
    data = bytes(range(256)) * 1024 + b"tail"
    try:
        p = await write_full_point(v, data)
        assert p.format == 1
        raw = (tmp_path / "vault" / names.MAPS / p.disks[0].map).read_bytes()
        assert raw[:2] == bytes([1, 6]) and raw[-4:] != MAGIC  # one sealed unit
    finally:
        await v.close()
    url = f"file://{tmp_path / 'vault'}"
    code, text = _migrate(url, key)
    assert code == 0, text
    v = await open_vault(tmp_path / "vault", key)
    try:
        q = await write_full_point(v, data[::-1], cycle="c2")
        assert q.format == 3
        packs = [p for p in (tmp_path / "vault" / "packs").rglob("*") if p.is_file()]
        assert sorted(p.read_bytes()[1] for p in packs) == [2, 10]  # a block; a frame
    finally:
        await v.close()
    for point, want in ((p, data), (q, data[::-1])):
        out = tmp_path / f"out-{point.id[:8]}"
        r = run_cli("restore", "--vault", url, "--key-file", str(key), "--point", point.id,
                    "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        assert (out / "sda.img").read_bytes() == want


async def test_kill9_during_a_migration_leaves_every_point_restorable(tmp_path: Path) -> None:
    """The CLI killed with SIGKILL once it said it finished its first point (mid-way
    through the others): every point restores byte for byte and checks clean, and a
    second run finishes, deleting nothing a point needs."""
    key = tmp_path / "vault.key"
    v = await Vault.create(LocalStore(tmp_path / "vault"), KeyMaterial(keyfile=new_keyfile(key)),
                           fmt=1)
    images: dict[str, bytes] = {}
    try:
        for i in range(40):  # each point's migration fsyncs three objects: ~0.5 s in all
            data = bytes([i + 1]) * 65536 + bytes(range(256)) * (i + 1)
            p = await write_full_point(v, data, cycle=f"c{i}")
            images[p.id] = data
    finally:
        await v.close()
    url = f"file://{tmp_path / 'vault'}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "siterecovery", "vault", "migrate", "--vault", url,
        "--key-file", str(key), cwd=REPO, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    while line := await asyncio.wait_for(proc.stderr.readline(), 60):
        if b"map(s) chunked" in line:
            proc.send_signal(signal.SIGKILL)
            break
    assert await asyncio.wait_for(proc.wait(), 60) == -signal.SIGKILL
    v = await open_vault(tmp_path / "vault", key)
    try:
        points = await v.list_points()
        formats = [p.format for p in points]
        assert formats.count(3) >= 1 and formats.count(1) >= 1, formats  # cut mid-way
        for p in points:
            assert await restore_all(v, p, tmp_path / "out") == {
                "sda": hashlib.sha256(images[p.id]).hexdigest()}
    finally:
        await v.close()
    r = run_cli("unlock", "--vault", url, "--key-file", str(key), "--all")
    assert r.returncode == 0, r.stdout + r.stderr  # the killed run's lock
    r = run_cli("check", "--vault", url, "--key-file", str(key), "--read-data")
    assert r.returncode == 0, r.stdout + r.stderr
    code, text = _migrate(url, key, "--json")
    assert code == 0, text
    doc = json.loads(text.splitlines()[-1])
    assert doc["migrated"] == formats.count(1) and doc["damaged"] == []
    # No map left that no point names (a temporary file of the killed put is no object)
    maps = [p.name for p in (tmp_path / "vault" / "maps").iterdir()
            if not p.name.startswith(".")]
    assert len(maps) == len(images)
    r = run_cli("check", "--vault", url, "--key-file", str(key), "--read-data")
    assert r.returncode == 0 and "no problems" in r.stdout, r.stdout + r.stderr
