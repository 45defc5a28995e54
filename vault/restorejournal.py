"""The journal of a restore into a file, ``<out>.partial.progress``: what an interrupted
restore already wrote and verified, so that running it again redoes only the rest and
still checks the whole disk digest (vault/materialize.py).

It is local and transient (removed once the restore is whole), JSON lines::

    {"format": 2, "point": ..., "disk": ..., "size": ..., "block_size": ...,
     "range_blocks": ...}                          the header: this restore, not another
    {"range": F, "pack": P, "fps": {"N": "<hex>"}} pack P's blocks of the range starting
                                                   at block F are written and synced;
                                                   their fingerprints
    {"range": F, "done": true}                     every pack of range F is noted (in this
                                                   run or an earlier one)

A note is written only after the data it speaks of was synced. Ranges are noted done in
block order, so reading the journal back feeds the disk digest in order, range by range,
and holds no more than the packs of the ranges not yet done. A journal of another
restore, of an older format, or damaged short of its last line (a torn last line is
dropped) is not used: the restore starts over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO

from common.digest import DiskDigest, fingerprint

FORMAT = 2
FP = 16  # bytes a fingerprint

# range's first block -> pack id -> block -> fingerprint
Noted = dict[int, dict[str, dict[int, bytes]]]


@dataclass
class Resumed:
    """What the journal says an earlier run did."""

    digest: DiskDigest  # fed with every block of the ranges done, in order
    next_first: int  # the first block of the first range not done
    packs: Noted = field(default_factory=dict)  # the packs noted of the ranges not done


class ZeroFingerprints:
    """A range's fingerprints as if every block were zero (the last block may be short):
    what a range starts from before its blocks are written."""

    def __init__(self, size: int, block_size: int) -> None:
        self.size, self.block_size = size, block_size
        self.nblocks = (size + block_size - 1) // block_size
        self._zero = fingerprint(bytes(block_size))
        self._short = fingerprint(bytes(size - (self.nblocks - 1) * block_size))

    def range(self, first: int, end: int) -> bytearray:
        out = bytearray(self._zero * (end - first))
        if end == self.nblocks:
            out[FP * (end - 1 - first):] = self._short
        return out


def place(buf: bytearray, first: int, fps: dict[int, bytes]) -> None:
    """Put ``fps`` (block -> fingerprint) into the range buffer starting at ``first``."""
    for n, fp in fps.items():
        buf[FP * (n - first):FP * (n - first + 1)] = fp


def read(path: str, header: dict[str, object], zeros: ZeroFingerprints, span: int
         ) -> Resumed | None:
    """What the journal at ``path`` says was done, if it is this restore's (``header``,
    ranges of ``span`` blocks) and readable; ``None`` to start over. The journal is cut
    back to its last whole line."""
    resumed = Resumed(DiskDigest(), 0)
    try:
        with open(path, "rb+") as f:
            first_line = f.readline()
            if not first_line.endswith(b"\n") or json.loads(first_line) != header:
                return None  # another restore's, or an older format
            good = f.tell()
            while (line := f.readline()).endswith(b"\n"):
                rec = json.loads(line)
                first = rec["range"]
                if (not isinstance(first, int) or first % span
                        or not resumed.next_first <= first < zeros.nblocks):
                    return None
                end = min(zeros.nblocks, first + span)
                if "pack" in rec:
                    fps = {int(n): bytes.fromhex(fp) for n, fp in rec["fps"].items()}
                    if not all(first <= n < end and len(fp) == FP for n, fp in fps.items()):
                        return None
                    resumed.packs.setdefault(first, {})[str(rec["pack"])] = fps
                elif rec.get("done") is True and first == resumed.next_first:
                    buf = zeros.range(first, end)
                    for fps in resumed.packs.pop(first, {}).values():
                        place(buf, first, fps)
                    resumed.digest.update(bytes(buf))
                    resumed.next_first = end
                else:
                    return None
                good = f.tell()
            f.truncate(good)  # a torn last line: the next note starts on a line of its own
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return resumed


class Journal:
    """The journal being written: a header for a new restore, or appended to."""

    def __init__(self, path: str, header: dict[str, object], *, new: bool) -> None:
        self._f: IO[str] = open(path, "w" if new else "a")  # noqa: SIM115 - see close()
        if new:
            self._f.write(json.dumps(header) + "\n")
            self._f.flush()

    def pack(self, first: int, pack_id: str, fps: dict[int, bytes]) -> None:
        """Pack ``pack_id``'s blocks of range ``first`` are written and synced."""
        self._note({"range": first, "pack": pack_id,
                    "fps": {str(n): fp.hex() for n, fp in fps.items()}})

    def done(self, first: int) -> None:
        """Range ``first`` is whole (noted in block order)."""
        self._note({"range": first, "done": True})

    def _note(self, rec: dict[str, object]) -> None:
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()
