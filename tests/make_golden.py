"""Generate a golden vault: tests/fixtures/golden/ (format 1), golden2/ (format 2) or
golden3/ (format 3).
Run only when a format changes; the format 1 vault is kept as it was written by the
format 1 writer, so the reader of the old format stays tested.

    .venv/bin/python -m tests.make_golden --format 3 --force

The disk contents are deterministic (seeded), but object names, keys and nonces are
random, so the vault differs on every run: it is generated once and committed, and
tests/test_golden.py reads the committed copy. What it holds:

- ``vault/``: a local-folder vault (block size 64 KiB) with one machine ``golden-vm``
  and one disk ``sda`` of 5 blocks and a short 6th one (5 * 64 KiB + 1000 bytes), at
  two points written by the real ``CycleWriter``:

  1. a full point (``crash``): blocks 0, 1, 3, 4 and 5 hold data (block 1
     compresses, the rest do not), block 2 is zero;
  2. a delta point on it (``app``): block 1 gets new data, block 2 becomes a copy of
     block 0 (deduplicated: no new block stored), block 3 becomes zero, the short
     block 5 gets new data; blocks 0 and 4 are unchanged.

  One pack and one index object per point, one map per point, one key slot. From
  format 2 on the maps are written in chunks of ``CHUNK2`` (2) entries, so the full map
  has three chunks and the delta map two (a real writer's chunks hold 65 536). In
  format 3 each pack's blocks are one frame (five blocks in the full point's pack, two
  in the delta's).
- ``vault.key``: the key file that opens it.
- ``expected.json``: per point (oldest first) its id, kind and, per disk, the size and
  the SHA-256 of the restored raw image and the disk digest.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.digest import digest_of_fingerprint_map, fingerprint
from vault.keyslots import KeyMaterial, new_keyfile
from vault.repo import Vault
from vault.store.local import LocalStore
from vault.writer import CycleWriter, DiskSpec

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden"
GOLDEN2 = GOLDEN.with_name("golden2")
GOLDEN3 = GOLDEN.with_name("golden3")
CHUNK2 = 2  # entries a map chunk in golden2 and golden3
BS = 64 * 1024
SIZE = 5 * BS + 1000
MACHINE, DISK = "golden-vm", "sda"
CREATED = ("2026-01-01T00:00:00.000000Z", "2026-01-01T01:00:00.000000Z")


def _blocks(image: bytes) -> list[bytes]:
    return [image[i:i + BS] for i in range(0, len(image), BS)]


def disk_versions() -> tuple[bytes, bytes]:
    """The disk at point 1 and at point 2."""
    rng = random.Random(20261125)
    pattern = b"siterecovery golden block 1; "
    b = [rng.randbytes(BS), (pattern * (BS // len(pattern) + 1))[:BS], bytes(BS),
         rng.randbytes(BS), rng.randbytes(BS), rng.randbytes(SIZE - 5 * BS)]
    v1 = b"".join(b)
    b[1], b[2], b[3], b[5] = rng.randbytes(BS), b[0], bytes(BS), rng.randbytes(SIZE - 5 * BS)
    v2 = b"".join(b)
    assert len(v1) == len(v2) == SIZE
    return v1, v2


def digest(image: bytes) -> str:
    return digest_of_fingerprint_map(b"".join(fingerprint(b) for b in _blocks(image)))


def _items(image: bytes, only: set[int] | None = None) -> list[tuple[int, int, bytes | None]]:
    return [(0, n, None if not any(b) else b) for n, b in enumerate(_blocks(image))
            if only is None or n in only]


async def generate(out: Path, fmt: int) -> None:
    v1, v2 = disk_versions()
    out.mkdir(parents=True)
    key = out / "vault.key"
    vault = await Vault.create(LocalStore(out / "vault"), KeyMaterial(keyfile=new_keyfile(key)),
                               fmt=fmt)
    vault.map_chunk_entries = CHUNK2
    spec = [DiskSpec(DISK, SIZE, BS)]
    with ThreadPoolExecutor(2) as ex:
        w = CycleWriter(vault, await vault.load_index(), ex, machine=MACHINE, cycle="1" * 32,
                        disks=spec, full=True, base=None)
        await w.add(_items(v1))
        p1 = await w.finish({DISK: digest(v1)}, "crash", created=CREATED[0])
        changed = {n for n, (a, b) in enumerate(zip(_blocks(v1), _blocks(v2), strict=True))
                   if a != b}
        assert changed == {1, 2, 3, 5}
        w = CycleWriter(vault, await vault.load_index(), ex, machine=MACHINE, cycle="2" * 32,
                        disks=spec, full=False, base=p1)
        await w.add(_items(v2, changed))
        p2 = await w.finish({DISK: digest(v2)}, "app", created=CREATED[1])
    await vault.close()
    assert p2.base == p1.id and p2.chain == 1
    points = []
    for p, image, kind in ((p1, v1, "full"), (p2, v2, "delta")):
        points.append({"id": p.id, "created": p.created, "consistency": p.consistency,
                       "kind": kind, "disks": {DISK: {
                           "size": len(image), "block_size": BS,
                           "sha256": hashlib.sha256(image).hexdigest(),
                           "digest": digest(image)}}})
    (out / "expected.json").write_text(json.dumps(
        {"machine": MACHINE, "points": points}, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", type=int, choices=(1, 2, 3), default=3,
                    help="vault format (default: %(default)s)")
    ap.add_argument("--out", type=Path, help="default: tests/fixtures/golden (format 1), "
                                             "golden2 (format 2) or golden3 (format 3)")
    ap.add_argument("--force", action="store_true", help="replace an existing golden vault")
    args = ap.parse_args()
    args.out = args.out or {1: GOLDEN, 2: GOLDEN2, 3: GOLDEN3}[args.format]
    if args.out.exists():
        if not args.force:
            raise SystemExit(f"{args.out} exists; give --force to replace it (and commit "
                             "the new vault)")
        shutil.rmtree(args.out)
    asyncio.run(generate(args.out, args.format))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
