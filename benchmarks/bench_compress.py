"""How big is the vault's data at each compression choice, and what does each cost?

Before format 3 the vault compressed every 64 KiB block on its own (one zstd frame per
sealed block, level 1), so any one block could be read by decompressing 64 KiB; format 3
compresses frames of up to 1 MiB of blocks at `vault/pack.py: ZSTD_LEVEL` (2) with a
match table of 2^17 entries (`pack_compressor`: the ``frame+h17`` row at level 2), and a
read of one block decompresses its frame. restic compresses its larger chunks
(512 KiB-8 MiB, content-defined). This benchmark measures, on the same seeded image as
``bench_e2e.py`` (every non-zero 64 KiB block, read in order), what each choice stores
and costs:

- ``block``: one frame per block, at zstd levels 1, 3 and 6;
- ``block+dict``: one frame per block with a dictionary trained on a sample of the image's
  blocks (a per-vault dictionary; levels 1 and 3);
- ``frame``: frames of several consecutive blocks (256 KiB, 1 MiB, 4 MiB) at levels 1
  and 3, ``frame+hN`` with a match table of 2^N entries instead of the level's own, and
  4 MiB frames with long-distance matching (zstd ``--long``, window 2^27);
  reading one block then costs decompressing its whole frame.

Each row: the stored bytes (compressed, or the block itself where compression does not
make it smaller, plus the vault's 32 bytes of sealed-unit overhead per frame), against
restic's repository after ``restic backup`` of the same image in the same run; and the
compression speed on one core (MB of input per second). A frame's size is also what must
be decompressed to read one block of it. Frames of up to 8 MiB at any level and match
table are format 3; a dictionary or a window beyond a reader's default would change the
format.

Run: ``.venv/bin/python benchmarks/bench_compress.py [--size-mib N] [--seed S] [--json]``.
Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zstandard
from bench_e2e import Restic, ensure_tool, say, tree_bytes
from diskgen import generate

from vault.pack import MAX_FRAME

BS = 64 * 1024
SEALED_OVERHEAD = 32  # vault/crypto.py: the 16-byte header and the 16-byte GCM tag
DICT_BYTES = 112 * 1024
DICT_SAMPLE_EVERY = 50


# variant, level, blocks per frame, dictionary, long-distance matching, match table
# (log2 entries; 0: the level's own)
Plan = list[tuple[str, int, int, bool, bool, int]]
PLAN: Plan = [
    ("block", 1, 1, False, False, 0), ("block", 3, 1, False, False, 0),
    ("block", 6, 1, False, False, 0),
    ("block+dict", 1, 1, True, False, 0), ("block+dict", 3, 1, True, False, 0),
    ("frame", 1, 4, False, False, 0), ("frame", 3, 4, False, False, 0),
    ("frame", 1, 16, False, False, 0), ("frame", 2, 16, False, False, 0),
    ("frame+h17", 2, 16, False, False, 17), ("frame", 3, 16, False, False, 0),
    ("frame", 1, 64, False, False, 0), ("frame", 3, 64, False, False, 0),
    ("frame+long", 3, 64, False, True, 0),
]


def parse_plan(text: str) -> Plan:
    """``LEVEL:BLOCKS[:HASHLOG][,...]``: frames of BLOCKS 64 KiB blocks at zstd LEVEL (1
    block: a block alone), with a match table of 2^HASHLOG entries if given."""
    plan: Plan = []
    for item in text.split(","):
        parts = [int(x) for x in item.split(":")]
        if len(parts) not in (2, 3):
            raise argparse.ArgumentTypeError(f"{item!r}: expected LEVEL:BLOCKS[:HASHLOG]")
        level, unit, hash_log = (*parts, 0) if len(parts) == 2 else parts
        variant = "block" if unit == 1 else "frame"
        plan.append((variant + (f"+h{hash_log}" if hash_log else ""), level, unit, False,
                     False, hash_log))
    return plan


@dataclass
class Row:
    variant: str
    level: int
    unit_kib: int
    stored_bytes: int
    vs_restic: float | None
    compress_mb_s: float
    format_change: bool


def blocks(image: Path) -> Iterator[bytes]:
    """The image's non-zero 64 KiB blocks, in order."""
    zero = bytes(BS)
    with open(image, "rb") as f:
        while b := f.read(BS):
            if b != zero[: len(b)]:
                yield b


def measure(image: Path, variant: str, level: int, unit: int, *,
            dict_data: zstandard.ZstdCompressionDict | None = None,
            ldm: bool = False, hash_log: int = 0) -> tuple[int, float]:
    """(stored bytes, seconds spent compressing) with frames of ``unit`` blocks."""
    if ldm:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, enable_ldm=True, window_log=27)
        c = zstandard.ZstdCompressor(compression_params=params)
    elif hash_log:
        params = zstandard.ZstdCompressionParameters.from_level(level, hash_log=hash_log)
        c = zstandard.ZstdCompressor(compression_params=params)
    else:
        c = zstandard.ZstdCompressor(level=level, dict_data=dict_data)
    stored = 0
    spent = 0.0
    pending: list[bytes] = []

    def flush() -> None:
        nonlocal stored, spent
        raw = b"".join(pending)
        t = time.perf_counter()
        z = c.compress(raw)
        spent += time.perf_counter() - t
        stored += min(len(z), len(raw)) + SEALED_OVERHEAD
        pending.clear()

    for b in blocks(image):
        pending.append(b)
        if len(pending) == unit:
            flush()
    if pending:
        flush()
    return stored, spent


def train(image: Path) -> zstandard.ZstdCompressionDict:
    sample: list[bytes | bytearray | memoryview] = [
        b for i, b in enumerate(blocks(image)) if i % DICT_SAMPLE_EVERY == 0]
    return zstandard.train_dictionary(DICT_BYTES, sample)


async def restic_size(image: Path, work: Path) -> int:
    ensure_tool("restic", "restic")
    r = Restic(work)
    await r.init()
    await r.backup(image)
    return tree_bytes(r.repo)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-compress-", dir=args.work))
    try:
        image = work / "disk.img"
        say(f"generating the {args.size_mib} MiB image (seed {args.seed})")
        generate(image, args.size_mib << 20, args.seed)
        raw = sum(len(b) for b in blocks(image))
        say("restic backup of the image")
        restic = asyncio.run(restic_size(image, work))
        dictionary, train_s = None, 0.0
        if any(use_dict for _v, _l, _u, use_dict, _ldm, _h in args.plan or PLAN):
            say("training a dictionary")
            t = time.perf_counter()
            dictionary = train(image)
            train_s = time.perf_counter() - t
        plan = args.plan or PLAN
        rows = []
        for variant, level, unit, use_dict, ldm, hash_log in plan:
            say(f"{variant} level {level}, {unit * BS >> 10} KiB frames")
            stored, spent = measure(image, variant, level, unit,
                                    dict_data=dictionary if use_dict else None, ldm=ldm,
                                    hash_log=hash_log)
            rows.append(Row(variant, level, unit * BS >> 10, stored,
                            round(stored / restic, 3) if restic else None,
                            round(raw / spent / 1e6, 1),
                            format_change=use_dict or ldm or unit * BS > MAX_FRAME))
        return {"image_mib": args.size_mib, "seed": args.seed, "raw_nonzero_bytes": raw,
                "restic_repo_bytes": restic, "dictionary_train_s": round(train_s, 2),
                "zstd": zstandard.ZSTD_VERSION, "cpus": os.cpu_count(),
                "rows": [asdict(r) for r in rows]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(res: dict[str, Any]) -> str:
    out = [f"{res['image_mib']} MiB image: {res['raw_nonzero_bytes'] / 1e6:.0f} MB of "
           f"non-zero blocks; restic's repository {res['restic_repo_bytes'] / 1e6:.0f} MB",
           "| variant | level | frame (decompressed to read one block) | stored | vs restic "
           "| compress (one core) | format change |",
           "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['variant']} | {r['level']} | {r['unit_kib']} KiB | "
                   f"{r['stored_bytes'] / 1e6:.0f} MB | {r['vs_restic']:.2f}x | "
                   f"{r['compress_mb_s']:.0f} MB/s | "
                   f"{'yes' if r['format_change'] else 'no'} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=2048, help="image size (default 2048)")
    ap.add_argument("--seed", type=int, default=1, help="the image's seed (default 1)")
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "work"),
                    help="where the image and restic's repository go (default "
                         "benchmarks/work/, git-ignored)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--plan", type=parse_plan, metavar="LEVEL:BLOCKS[:HASHLOG],...",
                    help="only these rows: frames of BLOCKS 64 KiB blocks at zstd LEVEL, "
                         "with a match table of 2^HASHLOG entries if given (e.g. "
                         "1:1,2:16,2:16:17,3:16; default: the full table)")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    res = run(args)
    print(json.dumps(res, indent=2) if args.json else render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
