"""Whether a disk (a block device or an image file) is in use, so that nothing writes
under a mounted filesystem: what an in-place restore checks before it writes a block.

A block device is in use when it or one of its partitions is mounted (``mountinfo``
lists its ``major:minor``), is a swap area, or is held by another device (device-mapper,
md, a loop device over it: ``/sys/dev/block/M:N/holders``). An image file is in use
when a loop device is attached to it or it is a swap file. The checks read ``/proc``
and ``/sys`` only; the writer then opens a device with ``O_EXCL``, which the kernel
refuses while it is mounted, so nothing can mount it while it is being written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PROC = Path("/proc")
SYS = Path("/sys")


class DeviceInUseError(Exception):
    """The disk is mounted or held: it must not be written under its users."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path} is in use: {reason}; nothing was written. Unmount it (and "
                         "detach what holds it), or shut the machine down, then run again.")


def check_not_in_use(path: str) -> None:
    """Raise DeviceInUseError if ``path`` is mounted, swapped on or held."""
    reason = in_use(path)
    if reason is not None:
        raise DeviceInUseError(path, reason)


def in_use(path: str) -> str | None:
    """Why ``path`` is in use, or None when nothing uses it (or it does not exist)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    real = os.path.realpath(path)
    swaps = _swaps()
    if real in swaps:
        return "it is a swap area"
    if stat.S_ISBLK(st.st_mode):
        return _device_in_use(st.st_rdev, swaps)
    if stat.S_ISREG(st.st_mode):
        loops = loops_backed_by(real)
        if loops:
            return f"attached to {', '.join(loops)}"
    return None


def _device_in_use(rdev: int, swaps: set[str]) -> str | None:
    mounts = _mounts()
    for mm, name in [(f"{os.major(rdev)}:{os.minor(rdev)}", None), *_partitions(rdev)]:
        what = f"its partition {name}" if name else "it"
        if mm in mounts:
            return f"{what} is mounted at {mounts[mm]}"
        if name and f"/dev/{name}" in swaps:
            return f"{what} is a swap area"
        holders = SYS / "dev" / "block" / mm / "holders"
        try:
            held = sorted(os.listdir(holders))
        except OSError:
            held = []
        if held:
            return f"{what} is held by {', '.join(held)}"
    return None


def _partitions(rdev: int) -> list[tuple[str, str]]:
    """(major:minor, name) of each partition of the device."""
    base = SYS / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"
    out = []
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    for name in entries:
        part = base / name
        if (part / "partition").exists():
            try:
                out.append(((part / "dev").read_text().strip(), name))
            except OSError:
                continue
    return out


def _mounts() -> dict[str, str]:
    """major:minor -> the first mount point of each mounted device."""
    out: dict[str, str] = {}
    try:
        text = (PROC / "self" / "mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            out.setdefault(fields[2], _unescape(fields[4]))
    return out


def _swaps() -> set[str]:
    try:
        lines = (PROC / "swaps").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {os.path.realpath(_unescape(line.split()[0])) for line in lines if line.split()}


def loops_backed_by(real: str) -> list[str]:
    """The loop devices attached to the file at the resolved path ``real``."""
    out = []
    try:
        devices = sorted(os.listdir(SYS / "block"))
    except OSError:
        return []
    for dev in devices:
        if not dev.startswith("loop"):
            continue
        try:
            back = (SYS / "block" / dev / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if back == real:
            out.append(f"/dev/{dev}")
    return out


def _unescape(s: str) -> str:
    """mountinfo and swaps escape space, tab, newline and backslash as octal."""
    if "\\" not in s:
        return s
    return s.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")
