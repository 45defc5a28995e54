"""Packs of frames (format 3, vault/pack.py): blocks sealed together read back one by
one whatever the frame size; a frame damaged, moved within its pack or lying about its
blocks is refused for every block it holds; the trailer of a framed pack tiles it; a
reader opens a frame once for the blocks of one read."""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pytest
import zstandard

from procserver.config import ProcServerConfig
from tests.helpers import restore_all, write_full_point
from vault.crypto import Keyring, ObjectType, counter_nonce, seal
from vault.errors import IntegrityError
from vault.keyslots import KeyMaterial, new_keyfile
from vault.pack import (
    FRAME_ENTRY,
    MAGIC,
    MAX_FRAME,
    TAIL,
    ZSTD_MIN_HASH_LOG,
    Frames,
    PackEntry,
    build_pack,
    frame_plaintext,
    open_block,
    pack_compressor,
    parse_trailer,
)
from vault.rebuild import layout_problem
from vault.repo import Vault
from vault.store.local import LocalStore

KEYRING = Keyring(bytes(range(64)))
PACK = "ab" * 32


def _blocks(n: int, seed: int, sizes: tuple[int, ...] = (65536,)) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = sizes[i % len(sizes)]
        data = rng.randbytes(size // 2) + bytes(size - size // 2)  # half compresses
        out.append((KEYRING.block_id(data), data))
    return out


def _pack(blocks: list[tuple[bytes, bytes]], frame_bytes: int
          ) -> tuple[bytes, list[PackEntry]]:
    data, entries = build_pack(KEYRING, PACK, list(blocks), zstandard.ZstdCompressor(level=1),
                               frame_bytes)
    return bytes(data), entries


def _trailer(data: bytes) -> list[PackEntry]:
    t, magic = TAIL.unpack(data[-TAIL.size:])
    assert magic == MAGIC
    return parse_trailer(KEYRING, PACK, data[-TAIL.size - t:-TAIL.size])


@pytest.mark.parametrize("frame_bytes", [0, 65536, 200_000, 1 << 20, 8 << 20])
def test_every_block_reads_back_whatever_the_frame_size(frame_bytes: int) -> None:
    blocks = _blocks(40, 1, sizes=(65536, 4096, 131072, 1000))
    data, entries = _pack(blocks, frame_bytes)
    assert _trailer(data) == entries
    places = {(e.offset, e.length) for e in entries}
    if frame_bytes == 0:
        assert len(places) == len(blocks) and data[1] == ObjectType.BLOCK
    else:
        assert data[1] == ObjectType.FRAME
        total = sum(len(d) for _b, d in blocks)
        assert len(places) >= -(-total // frame_bytes)  # no frame over the size...
        if frame_bytes > 131072 + 4096:
            assert len(places) < len(blocks)  # ...and blocks share frames
    end = min(e.offset for e in entries) + sum(ln for _o, ln in places)
    assert layout_problem(entries, end) is None
    for (bid, want), e in zip(blocks, entries, strict=True):
        assert e.block_id == bid
        assert open_block(KEYRING, PACK, bid, data[e.offset:e.offset + e.length]) == want


def test_a_block_larger_than_the_frame_size_is_a_frame_of_its_own() -> None:
    blocks = _blocks(3, 2, sizes=(1 << 20,))
    _data, entries = _pack(blocks, 65536)
    assert len({e.offset for e in entries}) == 3


def test_a_damaged_frame_fails_every_block_it_holds_and_none_other() -> None:
    blocks = _blocks(8, 3)
    data, entries = _pack(blocks, 4 * 65536)
    first = entries[0]
    bad = bytearray(data)
    bad[first.offset + first.length // 2] ^= 1
    for (bid, want), e in zip(blocks, entries, strict=True):
        sealed = bytes(bad[e.offset:e.offset + e.length])
        if e.offset == first.offset:
            with pytest.raises(IntegrityError, match="authentication failed"):
                open_block(KEYRING, PACK, bid, sealed)
        else:
            assert open_block(KEYRING, PACK, bid, sealed) == want


def test_a_frame_read_at_another_blocks_place_does_not_give_it() -> None:
    """Frames of equal length swapped within the pack (each authenticates under the
    pack's key): a block is looked for in the frame at its place and is not there."""
    rng = random.Random(4)
    blocks = [(KEYRING.block_id(d), d) for d in (rng.randbytes(65536) for _ in range(4))]
    data, entries = _pack(blocks, 2 * 65536)
    a, b = sorted({(e.offset, e.length) for e in entries})
    assert a[1] == b[1]  # incompressible: the same length
    swapped = data[b[0]:b[0] + b[1]] + data[a[0]:a[0] + a[1]]
    bid = blocks[0][0]
    with pytest.raises(IntegrityError, match="does not hold it"):
        open_block(KEYRING, PACK, bid, swapped[:a[1]])


def test_a_frame_whose_table_lies_is_refused() -> None:
    """What a writer holding the key could get wrong: lengths past the frame, bytes
    left over, no blocks at all."""
    bid, data = _blocks(1, 5)[0]
    aead = KEYRING.aead(ObjectType.FRAME, PACK)

    def sealed(plain: bytes, i: int) -> bytes:
        return seal(aead, ObjectType.FRAME, PACK, plain, nonce=counter_nonce(i))

    good = frame_plaintext([(bid, data)])
    assert open_block(KEYRING, PACK, bid, sealed(good, 0)) == data
    long = struct.pack("<I", 1) + FRAME_ENTRY.pack(bid, len(data) + 1) + data
    extra = good + b"x"
    empty = struct.pack("<I", 0)
    for i, plain in enumerate((long, extra, empty), start=1):
        with pytest.raises(IntegrityError, match="frame"):
            open_block(KEYRING, PACK, bid, sealed(plain, i))


def test_the_blocks_of_one_read_open_each_frame_once() -> None:
    """A reader opening the blocks of one read of a pack in offset order keeps the frame
    it opened last (one frame: one decryption, one plaintext, for its four blocks; never
    more than one frame held); a later read, of bytes altered since, is opened afresh
    and refused."""
    blocks = _blocks(12, 6)
    data, entries = _pack(blocks, 4 * 65536)
    frames: Frames = {}
    plains: dict[int, set[int]] = {}  # frame offset -> the plaintexts its blocks came from
    for (bid, want), e in zip(blocks, entries, strict=True):
        got = open_block(KEYRING, PACK, bid, data[e.offset:e.offset + e.length], frames,
                         e.offset)
        assert got == want
        assert list(frames) == [e.offset]
        plains.setdefault(e.offset, set()).add(id(frames[e.offset][0]))
    assert len(plains) == 3 and all(len(ids) == 1 for ids in plains.values())
    e = entries[0]
    bad = bytearray(data[e.offset:e.offset + e.length])
    bad[len(bad) // 2] ^= 1
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_block(KEYRING, PACK, blocks[0][0], bytes(bad), {}, e.offset)


def test_a_frame_of_blocks_from_another_pack_does_not_authenticate() -> None:
    blocks = _blocks(2, 7)
    data, entries = _pack(blocks, 1 << 20)
    e = entries[0]
    other = "cd" * 32
    with pytest.raises(IntegrityError, match="authentication failed"):
        open_block(KEYRING, other, blocks[0][0], data[e.offset:e.offset + e.length])



@pytest.mark.parametrize(("setting", "bad", "says"), [
    ("pack_frame_bytes", -1, "pack_frame_bytes must be 0"),
    ("pack_frame_bytes", MAX_FRAME + 1, "pack_frame_bytes must be 0"),
    ("pack_zstd_level", 0, "pack_zstd_level must be 1 to 19"),
    ("pack_zstd_level", 20, "pack_zstd_level must be 1 to 19")])
def test_a_process_servers_pack_settings_are_checked(setting: str, bad: int, says: str
                                                     ) -> None:
    cfg = ProcServerConfig(data_dir="/nonexistent", vault_url="file:///nonexistent",
                           vault_key_file="k", tls_cert="c", tls_key="k", tls_ca="a",
                           **{setting: bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=says):
        cfg.validate()


async def test_a_higher_zstd_level_stores_less_and_reads_the_same(tmp_path: Path) -> None:
    """The level a vault object writes at (the process server's pack_zstd_level) is not
    part of the format: the same disk at level 1 and 19, each restored byte for byte,
    the packs at 19 smaller."""
    rng = random.Random(9)
    words = [rng.randbytes(rng.randrange(3, 12)).hex().encode() for _ in range(3000)]
    data = b" ".join(rng.choice(words) for _ in range(120_000))[:2 << 20]
    sizes = {}
    for level in (1, 19):
        key = tmp_path / f"{level}.key"
        v = await Vault.create(LocalStore(tmp_path / f"v{level}"),
                               KeyMaterial(keyfile=new_keyfile(key)))
        v.zstd_level = level
        try:
            p = await write_full_point(v, data)
            assert await restore_all(v, p, tmp_path / f"out{level}") == {
                "sda": hashlib.sha256(data).hexdigest()}
        finally:
            await v.close()
        sizes[level] = sum(f.stat().st_size for f in (tmp_path / f"v{level}" / "packs").rglob("*")
                           if f.is_file())
    assert sizes[19] < 0.95 * sizes[1] < len(data), sizes


@pytest.mark.parametrize("level", [1, 2, 3, 9])
def test_packs_are_compressed_at_their_level_with_a_match_table_of_at_least_2_17(
        level: int) -> None:
    """``pack_compressor``: zstd's parameters for the level, the match table raised to
    2^17 entries from level 2 on where the level's own is smaller (level 2; level 1 stays
    zstd's fastest); what it writes is plain zstd, read back by any decompressor."""
    rng = random.Random(5)
    words = [rng.randbytes(rng.randrange(3, 12)).hex().encode() for _ in range(3000)]
    text = b" ".join(rng.choice(words) for _ in range(60_000))[:1 << 20]
    own = zstandard.ZstdCompressionParameters.from_level(level)
    raised = level >= 2 and own.hash_log < ZSTD_MIN_HASH_LOG
    assert raised == (level == 2)
    want = zstandard.ZstdCompressionParameters.from_level(
        level, hash_log=ZSTD_MIN_HASH_LOG if raised else own.hash_log)
    out = pack_compressor(level).compress(text)
    assert out == zstandard.ZstdCompressor(compression_params=want).compress(text)
    plain = zstandard.ZstdCompressor(level=level).compress(text)
    assert len(out) < len(plain) if raised else out == plain
    assert zstandard.ZstdDecompressor().decompress(out) == text
