"""What a failback found to write on each disk, kept until the failback ends, so that one
run again after an interruption (a kill -9 of the agent, a disk that failed, a lost
connection) reports what the whole failback wrote.

A failback run again compares every block again and writes only the blocks that still
differ from the point (``mobility/inplace.py``): the blocks an interrupted run wrote
already hold the point and are not written twice. To count them, the first run that
compares a disk keeps the blocks that differed then, in the state directory:
``failback-plan.DISK`` holds the point's id on its first line, then a bitmap of the
disk's blocks (bit ``n % 8`` of byte ``n // 8`` set: block ``n`` differed). A later run of
the same point finds it: the blocks of the plan that no longer differ were written by an
earlier run. A plan of another point is replaced. The plans are removed with the
failback's pending mark once the agent's state is the point.
"""

from __future__ import annotations

from pathlib import Path

from common.fs import atomic_write

PLAN = "failback-plan."  # + the disk's name, in the state directory


def _bitmap(blocks: list[int], n: int) -> bytes:
    bits = bytearray(-(-n // 8))
    for b in blocks:
        bits[b >> 3] |= 1 << (b & 7)
    return bytes(bits)


def _read(path: Path, point: str, n: int) -> bytes | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    head, sep, bits = data.partition(b"\n")
    if not sep or head.decode(errors="replace") != point or len(bits) != -(-n // 8):
        return None  # another point's (or not whole: written anew)
    return bits


def written_before(state_dir: Path, disk: str, point: str, n: int,
                   differ: list[int]) -> list[int]:
    """The blocks of ``disk`` (``n`` blocks) an interrupted earlier run of this failback of
    ``point`` wrote: those its plan says differed that are not in ``differ`` (what differs
    now). The first run keeps ``differ`` as the plan and gets an empty list."""
    path = state_dir / f"{PLAN}{disk}"
    bits = _read(path, point, n)
    if bits is None:
        atomic_write(path, point.encode() + b"\n" + _bitmap(differ, n))
        return []
    now = set(differ)
    return [i * 8 + j for i, byte in enumerate(bits) if byte for j in range(8)
            if byte >> j & 1 and i * 8 + j not in now]


def clear(state_dir: Path) -> None:
    """The failback ended (the agent's state is the point): its plans go."""
    for p in state_dir.glob(f"{PLAN}*"):
        p.unlink(missing_ok=True)
