"""Sealing alone: the CPU seconds and page faults of turning an image's blocks into packs.

The process server's sealing step in isolation, as its workers run it: the seeded image
of ``bench_e2e.py`` (its non-zero 64 KiB blocks, in order), cut into packs of
``PACK_TARGET`` bytes of blocks, each sealed by ``vault.pack.build_pack`` with the
thread's own compressor (``vault.writer.thread_compressor``, the vault's default frames
and level) on ``--threads`` worker threads, after the process server's heap settings
(``procserver.heap.return_large_buffers``). Nothing is written anywhere: what is
measured is compression, encryption and the buffers around them.

Figures: CPU seconds of the process for the sealing (``time.process_time``), minor page
faults (``getrusage``), the bytes of the packs. CPU seconds move far less with other
tenants of the machine than wall time, and page faults not at all, so two checkouts can
be compared run against run: ``PYTHONPATH=OTHER_CHECKOUT .venv/bin/python
benchmarks/bench_seal.py``, alternated.

Run: ``.venv/bin/python benchmarks/bench_seal.py [--size-mib 512] [--rounds 3] [--json]``.
Not a test: nothing here runs under pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_compress import BS, blocks
from bench_e2e import say
from diskgen import generate

from procserver.heap import return_large_buffers
from vault.crypto import MASTER_KEY_BYTES, Keyring
from vault.pack import FRAME_BYTES, ZSTD_LEVEL, build_pack
from vault.writer import PACK_TARGET, thread_compressor


def load_blocks(image: Path, keyring: Keyring) -> list[tuple[bytes, bytes | memoryview]]:
    """The image's non-zero blocks (``bench_compress.blocks``) with their ids, in order."""
    return [(keyring.block_id(b), b) for b in blocks(image)]


def seal_all(keyring: Keyring, blocks: list[tuple[bytes, bytes | memoryview]], threads: int,
             frame_bytes: int, level: int) -> dict[str, float]:
    per_pack = max(1, PACK_TARGET // BS)
    starts = range(0, len(blocks), per_pack)

    def one(start: int) -> int:
        data, _entries = build_pack(keyring, os.urandom(32).hex(),
                                    blocks[start:start + per_pack],
                                    thread_compressor(level), frame_bytes)
        return len(data)

    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        stored = sum(ex.map(one, starts))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": cpu, "wall_s": wall, "packs": len(starts), "stored_bytes": stored,
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mib", type=int, default=512, help="image size (default 512)")
    ap.add_argument("--seed", type=int, default=1, help="the image's seed (default 1)")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work",
                    help="where the image is made (default benchmarks/work/)")
    ap.add_argument("--threads", type=int, default=2,
                    help="sealing threads, as the process server's (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--frame-bytes", type=int, default=FRAME_BYTES,
                    help="pack_frame_bytes (default %(default)s; 0 = every block alone)")
    ap.add_argument("--level", type=int, default=ZSTD_LEVEL,
                    help="pack_zstd_level (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    if args.size_mib <= 0 or args.threads <= 0 or args.rounds <= 0:
        ap.error("--size-mib, --threads and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    heap = return_large_buffers()
    args.work.mkdir(parents=True, exist_ok=True)
    image = args.work / f"seal-{args.size_mib}-{args.seed}.img"
    if not image.exists():
        say(f"generating a {args.size_mib} MiB image (seed {args.seed})")
        generate(image, args.size_mib << 20, args.seed)
    keyring = Keyring(os.urandom(MASTER_KEY_BYTES))
    blocks = load_blocks(image, keyring)
    say(f"{len(blocks)} non-zero blocks, {args.threads} threads, glibc heap settings: "
        f"{'applied' if heap else 'not available'}")
    rounds = []
    for r in range(args.rounds):
        res = seal_all(keyring, blocks, args.threads, args.frame_bytes, args.level)
        rounds.append(res)
        say(f"round {r + 1}: {res['cpu_s']:.3f} CPU s (user {res['user_s']:.3f}, sys "
            f"{res['sys_s']:.3f}), {res['minor_faults']} page faults, "
            f"{res['packs']} packs, {res['stored_bytes'] / 1e6:.1f} MB")
    out = {"meta": {"size_mib": args.size_mib, "seed": args.seed, "threads": args.threads,
                    "frame_bytes": args.frame_bytes, "level": args.level,
                    "blocks": len(blocks), "heap_settings": heap,
                    "python": sys.version.split()[0]},
           "rounds": rounds,
           "median_cpu_s": sorted(r["cpu_s"] for r in rounds)[len(rounds) // 2]}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"sealing {len(blocks)} blocks: median {out['median_cpu_s']:.3f} CPU s, "
              f"{rounds[-1]['minor_faults']} page faults in the last round")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
