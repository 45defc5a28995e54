"""The block-layer write tracker: completed writes of a block device, from tracefs.

A tracefs instance of its own (``instances/siterecovery-<disk>-<id>``, the id
derived from the agent's state directory, so agents never share one) records the
``block:block_rq_complete`` events of the disk (filtered on its ``dev_t``; request
events are per whole disk, so a write to a partition counts for its disk with the
disk's sectors); a thread reads them from the instance's ``trace_pipe`` and marks
the written blocks. *Completions* are recorded, not submissions: once an event is
seen the data is on the device, so a read after it gets the new data, and a write
still in flight during a read completes later and lands in the next cycle.

At each cycle (the snapshot held) the tracker flushes the device's own page cache
(``fsync``: what a program wrote to the device itself and the kernel has not written
back yet is seen by a read of the device, so it must be on the device, traced, before
the cut), writes a marker into the instance and waits for the reader to reach it —
every write completed before is then counted — and cuts: the blocks marked since
the last cut are kept, named after the cut's cycle. What changed since ``base`` is
the union of the parts cut after ``base``'s cut. A cut of a cycle is only valid when
no write can land between the snapshot and the cut: disks read live (``none``),
quiesced or frozen (``fsfreeze``, ``script``); ``lvm`` and ``reflink`` snapshots are
refused (``config.py``).

The tracker knows when it may have missed something, and answers ``Rescan``: the
ring buffer overran or dropped events (per-cpu ``stats``), tracing was turned off,
the event disabled, the filter changed or the instance removed, the reader stopped,
the marker did not come back, or the base is older than the tracing (the parts live
in memory: an agent restart, a reboot). It then starts over from this cycle's cut.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from pathlib import Path

import structlog

from mobility.changes import Answer, Changed, Rescan

log = structlog.get_logger("mobility.tracker")
SECTOR = 512
EVENT = "events/block/block_rq_complete"
KEEP_CUTS = 4  # cycles a base may lag behind (cycles that failed after their cut)
_LINE = re.compile(rb"block_rq_complete: (\d+),(\d+) (\S*) \(.*?\) (\d+) \+ (\d+)")
_MARK = re.compile(rb"tracing_mark_write: sr-cut-(\d+)")


def tracefs_root(mounts: str = "/proc/mounts") -> str | None:
    """Where tracefs is mounted, or None."""
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "tracefs":
                return parts[1]
    return None


def kernel_dev(major: int, minor: int) -> int:
    """``dev_t`` as the kernel's trace events hold it (20 bits of minor)."""
    return (major << 20) | minor


def disk_of(path: str) -> tuple[int, int, int]:
    """The whole disk of the block device ``path``: (major, minor, first sector of
    ``path`` on it). Raises ValueError if ``path`` is not a request-based block device."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        raise ValueError(f"{path} is not a block device")
    sys = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    start = 0
    if (sys / "partition").exists():
        start = int((sys / "start").read_text())
        sys = sys.resolve().parent
    if not (sys / "mq").exists():
        raise ValueError(f"{path} is not request-based (device mapper, md): its writes "
                         "are not seen as requests")
    major, minor = (int(x) for x in (sys / "dev").read_text().split(":"))
    return major, minor, start


class _Reader:
    """The tracefs instance of one disk and the thread that marks its written blocks."""

    def __init__(self, root: str, name: str, major: int, minor: int, start: int,
                 size: int, block_size: int, buffer_kb: int) -> None:
        self.dir = os.path.join(root, "instances", name)
        self.start, self.size, self.bs = start, size, block_size
        self.filter = f"dev == {kernel_dev(major, minor)}"
        self.major, self.minor = major, minor
        self.marks = bytearray(-(-size // block_size))
        self.lock = threading.Condition()
        self.seen_cut = 0
        self.failed: str | None = None
        if os.path.isdir(self.dir):  # a previous agent's: its marks died with it
            os.rmdir(self.dir)
        os.mkdir(self.dir)
        try:
            self._write("buffer_size_kb", str(buffer_kb))
            self._write(f"{EVENT}/filter", self.filter)
            self._write(f"{EVENT}/enable", "1")
            self._write("tracing_on", "1")
            self.pipe = os.open(os.path.join(self.dir, "trace_pipe"), os.O_RDONLY)
        except BaseException:
            os.rmdir(self.dir)
            raise
        self.lost_at_start = self.lost()
        self.thread = threading.Thread(target=self._run, name=f"blocktrace-{name}",
                                       daemon=True)
        self.thread.start()

    def _write(self, rel: str, value: str) -> None:
        with open(os.path.join(self.dir, rel), "w") as f:
            f.write(value)

    def _read(self, rel: str) -> str:
        with open(os.path.join(self.dir, rel)) as f:
            return f.read()

    def lost(self) -> int:
        """Events lost so far: overruns and drops of every CPU's ring buffer."""
        total = 0
        for cpu in os.listdir(os.path.join(self.dir, "per_cpu")):
            for line in self._read(f"per_cpu/{cpu}/stats").splitlines():
                key, _, value = line.partition(":")
                if key in ("overrun", "commit overrun", "dropped events"):
                    total += int(value)
        return total

    def trouble(self) -> str | None:
        """Why the trace may be incomplete, or None."""
        try:
            if self.failed is not None:
                return self.failed
            if self._read("tracing_on").strip() != "1":
                return "tracing was turned off in the instance"
            if self._read(f"{EVENT}/enable").strip() != "1":
                return "the block_rq_complete event was disabled"
            if self._read(f"{EVENT}/filter").strip() != self.filter:
                return "the event filter was changed"
            if self.lost() != self.lost_at_start:
                return "the trace buffer overran (events lost)"
        except OSError as e:
            return f"the tracing instance is gone ({e.strerror})"
        return None

    def cut(self, n: int, timeout: float) -> bytearray | None:
        """Wait until every event before now is marked, then hand the marks over and
        start afresh; None if the reader did not get there in ``timeout`` seconds."""
        try:
            self._write("trace_marker", f"sr-cut-{n}\n")
        except OSError:
            return None
        with self.lock:
            if not self.lock.wait_for(lambda: self.seen_cut >= n or self.failed is not None,
                                      timeout):
                return None
            if self.failed is not None:
                return None
            marks, self.marks = self.marks, bytearray(len(self.marks))
            return marks

    def _run(self) -> None:
        rest = b""
        try:
            while True:
                chunk = os.read(self.pipe, 1 << 16)
                if not chunk:
                    raise OSError("trace_pipe closed")
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                with self.lock:
                    for line in lines:
                        self._take(line)
                    self.lock.notify_all()
                    if self.failed is not None:
                        return
        except OSError as e:
            with self.lock:
                self.failed = self.failed or f"the trace reader stopped ({e})"
                self.lock.notify_all()

    def _take(self, line: bytes) -> None:
        m = _LINE.search(line)
        if m is not None:
            rwbs = m.group(3)
            if b"R" in rwbs and not any(c in rwbs for c in b"WDE"):
                return  # a read
            lo = (int(m.group(4)) - self.start) * SECTOR
            hi = lo + int(m.group(5)) * SECTOR
            lo, hi = max(lo, 0), min(hi, self.size)
            if lo < hi:
                first, end = lo // self.bs, -(-hi // self.bs)
                self.marks[first:end] = b"\x01" * (end - first)
            return
        m = _MARK.search(line)
        if m is not None:
            self.seen_cut = max(self.seen_cut, int(m.group(1)))

    def close(self) -> None:
        with self.lock:
            self.failed = self.failed or "closed"
        with contextlib.suppress(OSError):
            self._write(f"{EVENT}/enable", "0")
        with contextlib.suppress(OSError):
            self._write("trace_marker", "sr-cut-0\n")  # wakes the reader: it sees "closed"
        self.thread.join(5)
        os.close(self.pipe)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


def _sync(path: str) -> str | None:
    """Write back the device's dirty pages; why not, or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return f"cannot flush {path}: {e.strerror}"
    return None


def ranges_of(marks: bytearray) -> list[tuple[int, int]]:
    """The runs of marked blocks, ``[first, end)``."""
    out: list[tuple[int, int]] = []
    pos = marks.find(1)
    while pos >= 0:
        end = marks.find(0, pos)
        end = len(marks) if end < 0 else end
        out.append((pos, end))
        pos = marks.find(1, end)
    return out


def union(parts: list[list[tuple[int, int]]]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for p in parts for r in p):
        if out and out[-1][1] >= lo:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


class BlockTraceTracker:
    """The block-layer write tracker of the block device ``path`` (see the module
    docstring). ``close`` removes its tracing instance."""

    kind = "blocktrace"

    def __init__(self, name: str, path: str, instance: str, buffer_kb: int = 4096,
                 cut_timeout: float = 30.0) -> None:
        """``instance``: the name of the tracefs instance, the same for the same agent
        and disk across restarts (a leftover of a killed agent is replaced)."""
        self.name, self.path, self.buffer_kb = name, path, buffer_kb
        self.instance = instance
        self.cut_timeout = cut_timeout
        self.reader: _Reader | None = None
        self.cuts: list[str] = []  # cycles whose cut is valid, oldest first
        self.parts: list[list[tuple[int, int]]] = []  # written between consecutive cuts
        self._n = 0
        self.rescans = 0  # answers that were Rescan because something may be missed

    def changes(self, base: str | None, cycle: str, path: str, size: int,
                block_size: int) -> Answer:
        r = self.reader
        if r is not None and (r.size != size or r.bs != block_size):
            self._stop()
            r = None
        if r is None:
            return self._start(cycle, size, block_size)
        why = r.trouble() or _sync(path)
        self._n += 1
        marks = None if why else r.cut(self._n, self.cut_timeout)
        why = why or r.trouble() or (None if marks is not None else
                                     "the trace reader did not catch up in time")
        if why is not None or marks is None:
            self.rescans += 1
            log.warning("blocktrace_may_have_missed_writes", disk=self.name, reason=why)
            self._stop()
            return self._start(cycle, size, block_size, Rescan(str(why)))
        self.parts.append(ranges_of(marks))
        self.cuts.append(cycle)
        if len(self.cuts) > KEEP_CUTS:
            del self.cuts[0], self.parts[0]
        if base is None:
            return Rescan("no acknowledged cycle to compare with")
        if base not in self.cuts[:-1]:
            return Rescan("the base cycle is older than this tracing (agent restart)")
        return Changed(union(self.parts[self.cuts.index(base):]))

    def _start(self, cycle: str, size: int, block_size: int,
               answer: Rescan | None = None) -> Answer:
        root = tracefs_root()
        if root is None:
            return Rescan("tracefs is not mounted (mount -t tracefs nodev "
                          "/sys/kernel/tracing)")
        try:
            major, minor, start = disk_of(self.path)
            self.reader = _Reader(root, self.instance, major, minor, start,
                                  size, block_size, self.buffer_kb)
        except (OSError, ValueError) as e:
            log.warning("blocktrace_unavailable", disk=self.name, error=str(e))
            return Rescan(f"cannot trace {self.path}: {e}")
        # Tracing starts now, during this cycle's hold: later cycles may use it as base.
        self.cuts, self.parts = [cycle], []
        return answer or Rescan("tracing starts with this cycle")

    def _stop(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.cuts, self.parts = [], []

    def close(self) -> None:
        self._stop()
