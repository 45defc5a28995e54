"""docs/FORMAT.md §18: the test vectors are the code's, and the document suffices to read them.

The first test regenerates the vectors with tests/make_format_vectors.py (the real vault
code) and wants them verbatim in FORMAT.md, so the document cannot drift from the code.
The others read the values *from the document* and decode them the way FORMAT.md says,
with nothing but ``cryptography``, ``zstandard``, ``blake3``, ``struct``, ``json`` and
``base64``: an independent reader built from the description gets the same answers.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import struct
from pathlib import Path

import blake3
import pytest
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from tests.make_format_vectors import BEGIN, END, render

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"
CONFIG, BLOCK, TRAILER, INDEX, POINT, MAP, LOCK, MAP_CHUNK, FRAME = 1, 2, 3, 4, 5, 6, 7, 9, 10


def doc_block() -> str:
    text = FORMAT_MD.read_text()
    start, end = text.find(BEGIN), text.find(END)
    assert 0 <= start < end, "FORMAT.md has no generated test-vector block"
    return text[start : end + len(END)] + "\n"


@functools.cache
def vectors() -> dict[str, str]:
    """``name = value`` lines of the document's code blocks; long hex continues on
    indented lines."""
    out: dict[str, str] = {}
    last = ""
    for block in re.findall(r"```text\n(.*?)```", doc_block(), re.S):
        for line in block.splitlines():
            if line.startswith("    "):
                out[last] += line.strip()
                continue
            name, sep, value = line.partition(" = ")
            assert sep and name not in out, f"bad or repeated vector line {line!r}"
            out[name] = value
            last = name
    return out


def h(name: str) -> bytes:
    return b"" if vectors()[name] == "(empty)" else bytes.fromhex(vectors()[name])


def s(name: str) -> str:
    value = json.loads(vectors()[name])
    assert isinstance(value, str)
    return value


def hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def data_root() -> bytes:
    return hkdf(h("keys.master"), b"siterecovery/v1/data")


def id_key() -> bytes:
    return hkdf(h("keys.master"), b"siterecovery/v1/block-id")


def open_unit(otype: int, name: str, sealed: bytes, extra: bytes = b"") -> bytes:
    """FORMAT.md §3-§4: header, key derivation, associated data, GCM, optional zstd."""
    version, t, flags, reserved = sealed[:4]
    assert (version, t, reserved) == (1, otype, 0) and flags & ~1 == 0
    key = hkdf(data_root(), b"siterecovery/v1/object/" + bytes([otype]) + name.encode())
    ad = sealed[:4] + struct.pack("<H", len(name.encode())) + name.encode() + extra
    payload = AESGCM(key).decrypt(sealed[4:16], sealed[16:], ad)
    if flags & 1:
        payload = zstandard.ZstdDecompressor().decompress(payload)
    return payload


def check_unit_rows(prefix: str, otype: int, name: str, extra: bytes = b"") -> bytes:
    """The intermediate values the document shows agree with a decode from scratch."""
    sealed = h(f"{prefix}.sealed")
    info = b"siterecovery/v1/object/" + bytes([otype]) + name.encode()
    assert h(f"{prefix}.key_info") == info
    assert h(f"{prefix}.key") == hkdf(data_root(), info)
    assert h(f"{prefix}.header") == sealed[:16]
    assert h(f"{prefix}.nonce") == sealed[4:16]
    assert h(f"{prefix}.tag") == sealed[-16:]
    assert int(vectors()[f"{prefix}.flags"]) == sealed[2]
    assert h(f"{prefix}.ad") == sealed[:4] + struct.pack("<H", len(name)) + name.encode() + extra
    plain = open_unit(otype, name, sealed, extra)
    shown = vectors()[f"{prefix}.plaintext"]
    assert plain == (s(f"{prefix}.plaintext").encode() if shown.startswith('"')
                     else h(f"{prefix}.plaintext"))
    return plain


def test_format_md_holds_exactly_the_vectors_the_code_makes() -> None:
    assert doc_block() == render()


def test_derived_keys() -> None:
    assert h("keys.id_key") == id_key()
    assert h("keys.data_root") == data_root()
    info = b"siterecovery/v1/object/" + bytes([BLOCK]) + s("keys.pack_id").encode()
    assert h("keys.block_key_info") == info
    assert h("keys.block_key") == hkdf(data_root(), info)


def test_config_sealed_unit() -> None:
    doc = json.loads(check_unit_rows("config", CONFIG, "config"))
    assert doc["format"] == 1 and doc["block_size"] == 65536


def read_pack() -> tuple[str, list[tuple[bytes, int, int]], bytes]:
    pack_id, pack = s("keys.pack_id"), h("pack.pack")
    t, magic = struct.unpack("<I4s", pack[-8:])
    assert magic == b"SRPK" and h("pack.tail") == pack[-8:]
    trailer = pack[-8 - t : -8]
    assert trailer == h("pack.trailer.sealed")
    plain = check_unit_rows("pack.trailer", TRAILER, pack_id)
    (count,) = struct.unpack_from("<I", plain, 0)
    assert len(plain) == 4 + 44 * count
    entries = [struct.unpack_from("<32sQI", plain, 4 + 44 * i) for i in range(count)]
    return pack_id, entries, pack


def test_pack_blocks_and_trailer() -> None:
    pack_id, entries, pack = read_pack()
    assert len(entries) == 2
    for i, (bid, off, length) in enumerate(entries):
        unit = pack[off : off + length]
        assert unit == h(f"pack.block_{i}.sealed")
        v = vectors()
        assert (bid, off, length) == (h(f"pack.block_{i}.id"), int(v[f"pack.block_{i}.offset"]),
                                      int(v[f"pack.block_{i}.length"]))
        assert unit[4:16] == i.to_bytes(12, "big") == h(f"pack.block_{i}.nonce")
        assert h(f"pack.block_{i}.ad") == (unit[:4] + struct.pack("<H", 64) + pack_id.encode()
                                           + bid)
        data = open_unit(BLOCK, pack_id, unit, extra=bid)
        assert data == h(f"pack.block_{i}.plaintext")
        assert blake3.blake3(data, key=id_key()).digest() == bid
        if unit[2] & 1:
            key = h("keys.block_key")
            payload = AESGCM(key).decrypt(unit[4:16], unit[16:], h(f"pack.block_{i}.ad"))
            assert payload == h(f"pack.block_{i}.payload")
    assert [int(vectors()[f"pack.block_{i}.flags"]) for i in (0, 1)] == [1, 0]


def test_a_moved_or_altered_block_does_not_authenticate() -> None:
    pack_id, entries, pack = read_pack()
    (bid0, off0, len0), (bid1, _off1, _len1) = entries
    unit = pack[off0 : off0 + len0]
    with pytest.raises(InvalidTag):  # block 0 claimed under block 1's id
        open_unit(BLOCK, pack_id, unit, extra=bid1)
    with pytest.raises(InvalidTag):  # one flipped bit
        open_unit(BLOCK, pack_id, unit[:20] + bytes([unit[20] ^ 1]) + unit[21:], extra=bid0)
    with pytest.raises(InvalidTag):  # the same bytes under another pack's name
        open_unit(BLOCK, "00" * 32, unit, extra=bid0)


def test_index_object() -> None:
    plain = check_unit_rows("index", INDEX, s("index.id"))
    (npacks,) = struct.unpack_from("<I", plain, 0)
    pack_raw, count = struct.unpack_from("<32sI", plain, 4)
    assert npacks == 1 and pack_raw.hex() == s("keys.pack_id")
    entries = [struct.unpack_from("<32sQI", plain, 40 + 44 * i) for i in range(count)]
    assert 40 + 44 * count == len(plain)
    assert entries == read_pack()[1]


def decode_map(plain: bytes) -> tuple[int, int, int, dict[int, bytes]]:
    kind, size, block_size, n = struct.unpack_from("<BQII", plain, 0)
    assert len(plain) == 17 + 40 * n
    blocks = dict(struct.unpack_from("<Q32s", plain, 17 + 40 * i) for i in range(n))
    return kind, size, block_size, blocks


def test_full_and_delta_maps_resolve() -> None:
    kind, size, bs, full = decode_map(check_unit_rows("map.full", MAP, s("map.full.id")))
    dkind, dsize, dbs, delta = decode_map(check_unit_rows("map.delta", MAP, s("map.delta.id")))
    assert (kind, dkind) == (0, 1) and (size, bs) == (dsize, dbs) == (131101, 65536)
    resolved = {**full, **delta}
    resolved = {n: bid for n, bid in resolved.items() if bid != bytes(32)}
    b0, b1 = h("pack.block_0.id"), h("pack.block_1.id")
    assert resolved == {1: b0, 2: b1}
    assert max(resolved) < -(-size // bs)


def test_a_chunked_map_reads_as_the_full_map() -> None:
    """§7.1: tail, table, chunks at their offsets, each at its index; the entries are
    those of §18.5's full map."""
    map_id, obj = s("chunked.id"), h("chunked.object")
    t, magic = struct.unpack("<I4s", obj[-8:])
    assert magic == b"SRMC" and h("chunked.tail") == obj[-8:]
    start = len(obj) - 8 - t
    assert obj[start:-8] == h("chunked.table.sealed")
    table = check_unit_rows("chunked.table", MAP, map_id)
    kind, size, bs, count, nchunks = struct.unpack_from("<BQIQI", table, 0)
    assert len(table) == 25 + 32 * nchunks and (kind, count, nchunks) == (0, 2, 2)
    entries = b""
    end = 0
    for i in range(nchunks):
        first, last, n, off, ln = struct.unpack_from("<QQIQI", table, 25 + 32 * i)
        assert off == end and obj[off:off + ln] == h(f"chunked.chunk_{i}.sealed")
        plain = check_unit_rows(f"chunked.chunk_{i}", MAP_CHUNK, map_id, struct.pack("<I", i))
        numbers = [struct.unpack_from("<Q", plain, 40 * k)[0] for k in range(n)]
        assert len(plain) == 40 * n and numbers[0] == first and numbers[-1] == last
        entries += plain
        end = off + ln
    assert end == start
    full = decode_map(check_unit_rows("map.full", MAP, s("map.full.id")))
    assert (kind, size, bs) == full[:3]
    assert dict(struct.unpack_from("<Q32s", entries, 40 * k) for k in range(count)) == full[3]


def test_a_pack_of_one_frame_holds_both_blocks() -> None:
    """§5.1: the trailer gives both blocks the frame's place; the frame's table and
    blocks; each block hashes to its id."""
    pack_id, pack = s("keys.pack_id"), h("frame.pack")
    t, magic = struct.unpack("<I4s", pack[-8:])
    assert magic == b"SRPK"
    trailer = check_unit_rows("frame.trailer", TRAILER, pack_id)
    (count,) = struct.unpack_from("<I", trailer, 0)
    entries = [struct.unpack_from("<32sQI", trailer, 4 + 44 * i) for i in range(count)]
    assert count == 2 and {(off, ln) for _b, off, ln in entries} == {(0, len(pack) - 8 - t)}
    frame = pack[:len(pack) - 8 - t]
    assert frame == h("frame.sealed") and frame[1] == FRAME
    plain = check_unit_rows("frame", FRAME, pack_id)
    (k,) = struct.unpack_from("<I", plain, 0)
    pos = 4 + 36 * k
    blocks = {}
    for j in range(k):
        bid, length = struct.unpack_from("<32sI", plain, 4 + 36 * j)
        blocks[bid] = plain[pos:pos + length]
        pos += length
    assert pos == len(plain) and list(blocks) == [b for b, _o, _l in entries]
    for bid, data in blocks.items():
        assert blake3.blake3(data, key=id_key()).digest() == bid
    assert list(blocks) == [h("pack.block_0.id"), h("pack.block_1.id")]


def test_point_manifest_and_its_derived_id() -> None:
    id_input = h("point.id_input")
    machine, cycle = id_input.split(b"\0")[1:]
    point_id = blake3.blake3(b"point\0" + machine + b"\0" + cycle, key=id_key()).hexdigest()
    assert point_id == s("point.id")
    doc = json.loads(check_unit_rows("point", POINT, point_id))
    assert doc["id"] == point_id and doc["machine"] == machine.decode()
    assert doc["cycle"] == cycle.decode() and doc["base"] is None and doc["chain"] == 0
    (disk,) = doc["disks"]
    assert disk["map"] == s("map.full.id") and disk["map_kind"] == "full"


def unwrap(slot_json: str, kek: bytes) -> bytes:
    doc = json.loads(slot_json)
    ad = b"siterecovery/v1/keyslot/" + doc["slot"].encode()
    return AESGCM(kek).decrypt(base64.b64decode(doc["nonce"]), base64.b64decode(doc["wrapped"]),
                               ad)


def test_keyfile_slot() -> None:
    magic, version, b64 = s("slot.keyfile.keyfile_text").split()
    assert f"{magic} {version}" == "siterecovery-keyfile v1"
    kek = base64.b64decode(b64)
    assert kek == h("slot.keyfile.kek")
    doc = json.loads(s("slot.keyfile.json"))
    assert doc["kind"] == "keyfile" and doc["kdf"] == {"name": "none"}
    assert s("slot.keyfile.object_name") == "keys/" + doc["slot"]
    assert unwrap(s("slot.keyfile.json"), kek) == h("keys.master")


def test_passphrase_slot() -> None:
    doc = json.loads(s("slot.passphrase.json"))
    kdf = doc["kdf"]
    assert doc["kind"] == "passphrase" and kdf["name"] == "scrypt"
    assert (kdf["n"], kdf["r"], kdf["p"]) == tuple(
        int(vectors()[f"slot.passphrase.scrypt_{x}"]) for x in "nrp")
    salt = base64.b64decode(kdf["salt"])
    assert salt == h("slot.passphrase.salt")
    kek = Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(
        s("slot.passphrase.passphrase").encode())
    assert kek == h("slot.passphrase.kek")
    assert unwrap(s("slot.passphrase.json"), kek) == h("keys.master")
    with pytest.raises(InvalidTag):
        unwrap(s("slot.passphrase.json"), h("slot.keyfile.kek"))


def test_lock_object() -> None:
    doc = json.loads(check_unit_rows("lock", LOCK, s("lock.id")))
    assert list(doc) == ["kind", "holder", "purpose", "created", "expires"]
    assert doc["kind"] == "exclusive" and doc["expires"] - doc["created"] == 1800
