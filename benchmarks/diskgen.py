"""Seeded generator of a disk image that looks like a real disk.

The image is made of 1 MiB chunks laid out in extents of 1-32 MiB, in exact
proportions:

- ``zero``: about 30 %, left as holes (or written as zeros with ``holes=False``; none
  with ``zeros=False``, their share then text: a fully allocated disk);
- ``random``: about 30 %, incompressible bytes (already-compressed media, encrypted files);
- ``text``: about 40 %, compressible file-like content: log lines, source-like
  lines, CSV rows and prose, drawn from a seeded vocabulary with a skewed word
  frequency. Every chunk draws its own line sequence, so no two 64 KiB blocks
  are the same and there is no short repeating pattern for a compressor to find.

Everything is derived from ``random.Random(seed)``, so the same seed and size give
the same bytes on every machine and Python version that keeps ``random``'s
documented reproducibility (``randbytes``, ``choices``, ``shuffle``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20
BLOCK = 64 * 1024
ZERO_SHARE = 0.30
RANDOM_SHARE = 0.30
_SYLLABLES = ("a", "e", "i", "o", "u", "an", "er", "in", "on", "st", "th", "re", "al", "ke",
              "ma", "ti", "co", "de", "lo", "ne", "pa", "ri", "se", "ul", "ve", "x", "z")
_CONSONANTS = "bcdfghjklmnprstvwz"


class TextSource:
    """Text-ish, file-like content from a seeded vocabulary and line corpus."""

    def __init__(self, seed: int, *, words: int = 6000, lines: int = 20000) -> None:
        rng = random.Random(f"diskgen-text-{seed}")
        vocab: list[str] = []
        for _ in range(words):
            n = rng.randint(1, 4)
            w = "".join(rng.choice(_CONSONANTS) + rng.choice(_SYLLABLES) for _ in range(n))
            vocab.append(w)
        # Zipf-like word frequencies: a few very common words, a long tail.
        wweights = list(itertools.accumulate(1.0 / (i + 1) for i in range(words)))
        levels = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")

        def ws(k: int) -> list[str]:
            return rng.choices(vocab, cum_weights=wweights, k=k)

        corpus: list[bytes] = []
        for _ in range(lines):
            kind = rng.random()
            if kind < 0.35:  # a log line
                s = (f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                     f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:"
                     f"{rng.randint(0, 59):02d}.{rng.randint(0, 999):03d}Z "
                     f"{rng.choice(levels)} {ws(1)[0]}[{rng.randint(100, 65535)}]: "
                     + " ".join(ws(rng.randint(3, 12)))
                     + f" {ws(1)[0]}={rng.randint(0, 10**rng.randint(1, 9))}")
            elif kind < 0.6:  # a line of source code
                a = ws(4)
                indent = " " * (4 * rng.randint(0, 3))
                form = rng.randrange(4)
                if form == 0:
                    s = f"{indent}def {a[0]}_{a[1]}({a[2]}, {a[3]}={rng.randint(0, 99)}):"
                elif form == 1:
                    s = f"{indent}{a[0]} = {a[1]}.{a[2]}({a[3]}, {rng.random():.6f})"
                elif form == 2:
                    s = f"{indent}if {a[0]} is not None and {a[1]}[{rng.randint(0, 9)}]:"
                else:
                    s = f"{indent}return {a[0]}_{a[1]} + {rng.randint(0, 1 << 16)}"
            elif kind < 0.8:  # a CSV row
                s = ",".join([str(rng.randint(1, 10**7)), ws(1)[0], f"{rng.uniform(0, 1e4):.3f}",
                              rng.randbytes(6).hex(), ws(1)[0], str(rng.randint(0, 999))])
            else:  # prose
                s = " ".join(ws(rng.randint(6, 20))).capitalize() + "."
            corpus.append(s.encode())
        self.lines = corpus
        self._cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.6 for i in range(lines)))
        self._avg = sum(len(x) + 1 for x in corpus) / len(corpus)

    def text(self, rng: random.Random, n: int) -> bytes:
        """``n`` bytes: a fresh random sequence of lines from a random part of the corpus."""
        # Like different files, each piece favours a different window of the corpus.
        shift = rng.randrange(len(self.lines))
        k = int(n / self._avg * 1.15) + 8
        picks = rng.choices(range(len(self.lines)), cum_weights=self._cum, k=k)
        nl = len(self.lines)
        out = b"\n".join([self.lines[(p + shift) % nl] for p in picks])
        while len(out) < n:  # rare: the draw came out short
            out += b"\n" + self.text(rng, n - len(out))
        return out[:n]


@dataclass(frozen=True)
class DiskLayout:
    size: int
    zero_chunks: int
    random_chunks: int
    text_chunks: int

    def describe(self) -> str:
        n = self.zero_chunks + self.random_chunks + self.text_chunks
        return (f"{self.size >> 20} MiB: {self.zero_chunks * 100 / n:.0f}% zeros, "
                f"{self.random_chunks * 100 / n:.0f}% random, "
                f"{self.text_chunks * 100 / n:.0f}% text")


def _layout(rng: random.Random, nchunks: int, zeros: bool = True) -> list[str]:
    """Chunk kinds in exact proportions, grouped in extents of 1-32 MiB, shuffled (no
    zero chunks with ``zeros=False``: their share goes to text)."""
    nzero = round(nchunks * ZERO_SHARE) if zeros else 0
    nrand = round(nchunks * RANDOM_SHARE)
    counts = {"zero": nzero, "random": nrand, "text": nchunks - nzero - nrand}
    runs: list[tuple[str, int]] = []
    for kind, left in counts.items():
        while left > 0:
            ln = min(left, rng.randint(1, 32))
            runs.append((kind, ln))
            left -= ln
    rng.shuffle(runs)
    return [kind for kind, ln in runs for _ in range(ln)]


def generate(path: str | os.PathLike[str], size: int, seed: int, *,
             holes: bool = True, zeros: bool = True) -> DiskLayout:
    """Write the image (replacing any file at ``path``) and fsync it. ``holes=False``
    writes the zero chunks instead of leaving holes; ``zeros=False`` makes none: every
    block of the image holds data (a fully allocated disk)."""
    if size <= 0:
        raise ValueError("size must be positive")
    rng = random.Random(f"diskgen-layout-{seed}")
    text = TextSource(seed)
    nchunks = (size + CHUNK - 1) // CHUNK
    kinds = _layout(rng, nchunks, zeros)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.unlink(missing_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        zero = bytes(CHUNK)
        for i, kind in enumerate(kinds):
            off = i * CHUNK
            ln = min(CHUNK, size - off)
            if kind == "zero":
                if not holes:
                    os.pwrite(fd, zero[:ln], off)
                continue
            data = rng.randbytes(ln) if kind == "random" else text.text(rng, ln)
            os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return DiskLayout(size, kinds.count("zero"), kinds.count("random"), kinds.count("text"))


def mutate(path: str | os.PathLike[str], fraction: float, seed: int,
           block: int = BLOCK) -> int:
    """Overwrite ``fraction`` of the image in scattered ``block``-sized blocks; fsync.

    New content is 60 % text, 40 % random, at seeded block positions anywhere on
    the disk (in used and in free space, like a filesystem's writes). Returns the
    number of blocks written.
    """
    rng = random.Random(f"diskgen-mutate-{seed}")
    text = TextSource(seed + 1)
    size = os.path.getsize(path)
    nblocks = size // block
    picks = sorted(rng.sample(range(nblocks), max(1, int(nblocks * fraction))))
    fd = os.open(path, os.O_WRONLY)
    try:
        for n in picks:
            data = text.text(rng, block) if rng.random() < 0.6 else rng.randbytes(block)
            os.pwrite(fd, data, n * block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(picks)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description="Write a seeded, realistic-looking disk image.")
    ap.add_argument("out", help="image path")
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-holes", action="store_true", help="write zero chunks as zeros")
    ap.add_argument("--no-zeros", action="store_true",
                    help="no zero chunks: every block holds data (a fully allocated disk)")
    args = ap.parse_args()
    t = time.perf_counter()
    lay = generate(args.out, args.size_mib << 20, args.seed, holes=not args.no_holes,
                   zeros=not args.no_zeros)
    print(f"{args.out}: {lay.describe()} in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
