"""Zero blocks as written on a disk (not holes): the agent sends them as ZERO frames and
the process server stores zero data as zero entries, whatever the block's bytes are
held in (bytes, a view of a chunk read, a view of a mapped segment); a block that is
zero but for one byte anywhere is data, sent and stored as it is."""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.digest import fingerprint, is_zero, zero_block
from mobility.sender import _scan_frames
from mobility.tracker import data_extents, work
from vault.keyslots import KeyMaterial, new_keyfile
from vault.maps import ZERO_ID
from vault.repo import Vault
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec
from wire.protocol import BLOCK_HEAD, HEADER, FrameType, parse_header

BS = 64 * 1024


def _blocks() -> list[bytes]:
    """Block 0 data; 1 zero; 2, 3, 4 zero but for one byte: first, middle, last; 5 zero;
    6 data; 7 short (the disk's last block) and zero."""
    def one(at: int) -> bytes:
        b = bytearray(BS)
        b[at] = 7
        return bytes(b)

    return [os.urandom(BS), bytes(BS), one(0), one(BS // 2), one(BS - 1), bytes(BS),
            os.urandom(BS), bytes(BS // 2)]


def _frames(run: bytes) -> list[tuple[FrameType, int, bytes]]:
    out, pos = [], 0
    while pos < len(run):
        t, length = parse_header(run[pos:pos + HEADER.size], 1 << 24)
        body = run[pos + HEADER.size:pos + HEADER.size + length]
        _disk, n = BLOCK_HEAD.unpack_from(body, 0)
        out.append((t, n, body[BLOCK_HEAD.size:]))
        pos += HEADER.size + length
    return out


def test_the_zero_check_is_exact_for_bytes_and_views() -> None:
    for b in _blocks():
        want = b.count(0) == len(b)
        assert is_zero(b) is want
        assert is_zero(memoryview(b)) is want
        assert is_zero(memoryview(b"x" + b + b"y")[1:-1]) is want
    assert is_zero(b"") and is_zero(memoryview(b""))
    assert zero_block(BS // 2) == bytes(BS // 2) and zero_block(BS) is zero_block(BS)


def test_the_agent_sends_written_zeros_as_zero_frames_and_the_rest_as_it_is(
        tmp_path: Path) -> None:
    blocks = _blocks()
    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(blocks))  # written, no holes: every block is read
    size = image.stat().st_size
    fd = os.open(image, os.O_RDONLY)
    try:
        extents = data_extents(fd, size)
        fps = bytearray(16 * len(blocks))
        got: list[tuple[FrameType, int, bytes]] = []
        # A full cycle: zero blocks are not sent at all, data blocks are.
        for pieces in work(size, BS, None, 0):
            run, frames, nbytes, last, nread, _ = _scan_frames(
                fd, size, BS, pieces, None, extents, fps, True, 0)
            got += _frames(run)
            assert frames == len(_frames(run)) and nread == size
        data = [n for n, b in enumerate(blocks) if b.count(0) != len(b)]
        assert [(t, n) for t, n, _ in got] == [(FrameType.BLOCK, n) for n in data]
        assert all(body == blocks[n] for _t, n, body in got)
        assert nbytes == sum(len(blocks[n]) for n in data) and last == data[-1]
        assert [bytes(fps[16 * n:16 * n + 16]) for n in range(len(blocks))] == \
            [fingerprint(b) for b in blocks]
        # A delta on a map where every block was data: the zero ones become ZERO frames.
        old = b"".join(fingerprint(os.urandom(16)) for _ in blocks)
        got = []
        for pieces in work(size, BS, None, 0):
            run, *_ = _scan_frames(fd, size, BS, pieces, old, extents,
                                   bytearray(16 * len(blocks)), False, 0)
            got += _frames(run)
        assert [(t, n) for t, n, _ in got] == [
            (FrameType.BLOCK if n in data else FrameType.ZERO, n) for n in range(len(blocks))]
        assert all(body == (blocks[n] if n in data else b"") for _t, n, body in got)
    finally:
        os.close(fd)


async def test_the_process_server_stores_zero_data_from_a_mapped_segment_as_zero(
        tmp_path: Path) -> None:
    """``CycleWriter.add`` given views of a mapped segment (as the uploader hands them):
    the zero ones become zero entries, every other one its block's id, in a real vault."""
    v = await Vault.create(LocalStore(tmp_path / "vault"),
                           KeyMaterial(keyfile=new_keyfile(tmp_path / "vault.key")))
    blocks = _blocks()
    size = sum(len(b) for b in blocks)
    seg = tmp_path / "segment"
    seg.write_bytes(b"".join(blocks))
    try:
        with ThreadPoolExecutor(1) as pool, open(seg, "rb") as f, \
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            writer = CycleWriter(v, await v.load_index(), pool, machine="m1", cycle="c1",
                                 disks=[DiskSpec("sda", size, BS)], full=True, base=None)
            view = memoryview(m)
            items, pos = [], 0
            for n, b in enumerate(blocks):
                items.append((0, n, view[pos:pos + len(b)]))
                pos += len(b)
            await writer.add(items)
            await writer.checkpoint()  # the packs are sealed: nothing holds the mapping
            del items, view
        assert dict(writer.changes[0].items()) == {
            n: ZERO_ID if b.count(0) == len(b) else v.keyring.block_id(b)
            for n, b in enumerate(blocks)}
    finally:
        await v.close()
