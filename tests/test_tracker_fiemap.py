"""Change tracking without a full read, the parts that need no special filesystem: the
extent-map comparison, the read plan of a tracked cycle, the tracker setting, and the
reflink tracker's refusals (no clone can be kept, the image read live)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from mobility.changes import Changed, FullScan, Rescan
from mobility.config import MobilityConfig
from mobility.fiemap import (
    CUT,
    FIEMAP_EXTENT_DATA_INLINE,
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_NOT_ALIGNED,
    FIEMAP_EXTENT_SHARED,
    FIEMAP_EXTENT_UNWRITTEN,
    Extent,
    FiemapError,
    block_ranges,
    differing,
    file_extents,
)
from mobility.reflinktrack import ReflinkTracker
from mobility.snapshot import clone_path, is_clone_of
from mobility.tracker import CHUNK, work
from mobility.trackers import tracker_kind, trackers_for

K = 4096
MIB = 1 << 20


def test_shared_extents_are_unchanged_and_everything_else_differs() -> None:
    size = 64 * K
    a = [Extent(0, 1000 * K, 16 * K, FIEMAP_EXTENT_SHARED),
         Extent(16 * K, 2000 * K, 16 * K, 0),
         Extent(40 * K, 3000 * K, 24 * K, FIEMAP_EXTENT_LAST)]
    # b: the first 8 KiB rewritten elsewhere, the same second extent split in two with
    # its flags differing only in what is ignored, a new extent in a's hole, and the
    # last one unwritten at the same place (flags that matter differ).
    b = [Extent(0, 5000 * K, 2 * K, 0),
         Extent(2 * K, 1002 * K, 14 * K, FIEMAP_EXTENT_SHARED),
         Extent(16 * K, 2000 * K, 8 * K, FIEMAP_EXTENT_SHARED),
         Extent(24 * K, 2008 * K, 8 * K, 0),
         Extent(32 * K, 6000 * K, 4 * K, 0),
         Extent(40 * K, 3000 * K, 24 * K, FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_LAST)]
    assert differing(a, b, size) == [(0, 2 * K), (32 * K, 36 * K), (40 * K, 64 * K)]
    assert differing(a, a, size) == []
    assert differing([], [], size) == []  # holes in both read as zeros in both
    assert differing(a, [], size) == [(0, 32 * K), (40 * K, 64 * K)]
    # The same bytes at another physical place are reported too: a superset is fine.
    moved = [dataclasses.replace(e, physical=e.physical + K) for e in a]
    assert differing(a, moved, size) == [(0, 32 * K), (40 * K, 64 * K)]


def test_compressed_extents_are_unchanged_only_where_both_maps_hold_the_same_extent(
) -> None:
    # Btrfs reports the start of the whole compressed extent as the location of every
    # piece of it: after a 4 KiB write at 68 KiB into a 128 KiB compressed extent the
    # piece behind the write has the same location at another offset. Only the very
    # same extent is unchanged; the pieces around a write are read whole.
    enc, size = FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_SHARED, 384 * K
    x, y = 1000 * K, 1030 * K
    a = [Extent(0, x, 128 * K, enc), Extent(128 * K, y, 128 * K, enc),
         Extent(256 * K, 2000 * K, 128 * K, FIEMAP_EXTENT_LAST)]
    b = [Extent(0, x, 128 * K, enc),
         Extent(128 * K, y, 64 * K, enc), Extent(192 * K, 5000 * K, 4 * K, 0),
         Extent(196 * K, y, 60 * K, enc),
         Extent(256 * K, 2000 * K, 128 * K, FIEMAP_EXTENT_LAST)]
    assert differing(a, b, size) == [(128 * K, 256 * K)]
    assert differing(a, a, size) == []
    # The location arithmetic of plain extents would call this unchanged: never here.
    shifted = [Extent(0, x, 64 * K, enc), Extent(64 * K, x + 64 * K, 64 * K, enc)]
    assert differing(a[:1], shifted, 128 * K) == [(0, 128 * K)]
    # Encoded against plain at the same location: different flags, read.
    assert differing(a[:1], [Extent(0, x, 128 * K, 0)], 128 * K) == [(0, 128 * K)]
    # An encoded extent cut at a batch boundary is not the extent the kernel reported.
    cut = [dataclasses.replace(a[0], flags=enc | CUT)]
    assert differing(cut, cut, 128 * K) == [(0, 128 * K)]


def test_extents_the_map_cannot_vouch_for_are_read_never_skipped() -> None:
    size = 16 * K
    for flags in (FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_NOT_ALIGNED,
                  FIEMAP_EXTENT_DELALLOC, 0x10, 1 << 20):  # the last two: unknown
        e = [Extent(0, 1000 * K, 8 * K, flags), Extent(8 * K, 2000 * K, 8 * K, 0)]
        assert differing(e, e, size) == [(0, 8 * K)], hex(flags)


def test_byte_ranges_become_every_block_they_touch() -> None:
    bs = 64 * 1024
    assert block_ranges([(0, 1), (bs - 1, bs + 1), (5 * bs, 6 * bs), (6 * bs, 6 * bs + 5)],
                        bs) == [(0, 2), (5, 7)]
    assert block_ranges([], bs) == []


def test_a_tracked_cycle_reads_only_the_named_blocks_a_chunk_per_task() -> None:
    bs = 64 * 1024
    per = CHUNK // bs
    size = 3 * CHUNK + 100  # a short last block
    nblocks = 3 * per + 1
    # Untracked: every block, in CHUNK-aligned tasks, the first one from the resume point.
    assert work(size, bs, None, 0) == [[(0, per)], [(per, per)], [(2 * per, per)],
                                       [(3 * per, 1)]]
    assert work(size, bs, None, per + 5) == [[(per + 5, per - 5)], [(2 * per, per)],
                                             [(3 * per, 1)]]
    # Tracked: the named ranges, cut at chunk boundaries, grouped per chunk.
    ranges = ((1, 3), (5, 6), (per - 1, per + 2), (nblocks - 1, nblocks + 7))
    assert work(size, bs, ranges, 0) == [[(1, 2), (5, 1), (per - 1, 1)], [(per, 2)],
                                         [(3 * per, 1)]]
    assert work(size, bs, ranges, per) == [[(per, 2)], [(3 * per, 1)]]
    assert work(size, bs, (), 0) == []


def config(tmp_path: Path, **kw: object) -> MobilityConfig:
    return MobilityConfig(machine="m", server_host="h", tls_ca="c", tls_cert="c",
                          tls_key="k", state_dir=str(tmp_path),
                          disks=[{"name": "sda", "path": str(tmp_path / "a.img")}],
                          **kw)  # type: ignore[arg-type]


def test_the_tracker_setting(tmp_path: Path) -> None:
    assert tracker_kind(config(tmp_path)) == "scan"
    assert tracker_kind(config(tmp_path, snapshot="reflink")) == "reflink"
    assert tracker_kind(config(tmp_path, snapshot="reflink", tracker="scan")) == "scan"
    assert isinstance(trackers_for(config(tmp_path))["sda"], FullScan)
    assert isinstance(trackers_for(config(tmp_path, snapshot="reflink"))["sda"],
                      ReflinkTracker)
    with pytest.raises(ValueError, match="tracker must be one of auto, scan, reflink"):
        config(tmp_path, tracker="bitmap").validate()
    with pytest.raises(ValueError, match="needs snapshot = 'reflink'"):
        config(tmp_path, tracker="reflink").validate()
    config(tmp_path, tracker="reflink", snapshot="reflink").validate()
    with pytest.raises(ValueError, match="'blocktrace' needs snapshot = 'none'"):
        config(tmp_path, tracker="blocktrace", snapshot="lvm").validate()
    with pytest.raises(ValueError, match="blocktrace_buffer_kb"):
        config(tmp_path, tracker="blocktrace", blocktrace_buffer_kb=2).validate()
    config(tmp_path, tracker="blocktrace", snapshot="fsfreeze", freeze_mounts=["/m"]).validate()


def test_without_reflinks_the_tracker_asks_for_a_scan_and_keeps_nothing(
        tmp_path: Path) -> None:
    image = tmp_path / "vm.img"
    image.write_bytes(b"x" * MIB)
    copy = tmp_path / "copy.img"  # stands for the cycle's snapshot
    shutil.copyfile(image, copy)
    stale = tmp_path / ".vm.img.srtrack-0123"  # a clone of a cycle never acknowledged
    stale.write_bytes(b"")
    t = ReflinkTracker(str(image))
    live = t.changes("base", "c1", str(image), MIB, 65536)
    assert isinstance(live, Rescan) and "read live" in live.reason
    assert not stale.exists()
    # The test directory is not XFS/Btrfs: no clone can be kept.
    answer = t.changes("base", "c2", str(copy), MIB, 65536)
    assert isinstance(answer, Rescan) and "cannot keep a clone" in answer.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.img", "vm.img"]


def test_the_snapshots_clone_is_kept_under_a_second_name(tmp_path: Path) -> None:
    """A cycle's snapshot made by ``snapshot = "reflink"`` is kept by a hard link (a
    clone would cost a walk of every extent again); anything else by a clone."""
    image = tmp_path / "vm.img"
    image.write_bytes(b"x" * MIB)
    snap = Path(clone_path(str(image), "0a1b2c3d"))
    shutil.copyfile(image, snap)  # stands for the snapshot's clone
    assert is_clone_of(str(snap), str(image))
    assert not is_clone_of(str(tmp_path / "copy.img"), str(image))
    assert not is_clone_of(str(tmp_path / "x" / snap.name), str(image))
    assert not is_clone_of(str(tmp_path / ".vm.img2.sr-0a1b2c3d"), str(image))
    t = ReflinkTracker(str(image))
    answer = t.changes(None, "c1", str(snap), MIB, 65536)
    assert isinstance(answer, Rescan) and "no acknowledged cycle" in answer.reason
    assert os.stat(t.kept("c1")).st_ino == snap.stat().st_ino
    snap.unlink()  # the snapshot lets go of its name: the kept one holds the content
    assert Path(t.kept("c1")).read_bytes() == b"x" * MIB


def test_extent_maps_of_an_ordinary_file(tmp_path: Path) -> None:
    # Whatever the test directory's filesystem, FIEMAP either describes the data it
    # holds or refuses (tmpfs): then the tracker must not guess.
    f = tmp_path / "f"
    f.write_bytes(b"y" * (3 * K))
    try:
        ext = file_extents(str(f), 3 * K)
    except FiemapError:
        return
    assert sum(e.length for e in ext) == 3 * K and ext[0].logical == 0
    assert isinstance(FullScan().changes("b", "c", str(f), 3 * K, 65536), Rescan)
    assert Changed(((0, 2), (5, 6))).blocks == 3
