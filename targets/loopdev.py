"""Loop devices over a byte range of an image file, for the read-only checks.

Attaching and detaching are blocking calls (milliseconds) on purpose: an awaited losetup
cancelled half-way could attach a device whose name is never read, and an awaited detach
could be cut short by a second cancellation or the event loop closing. A process killed
during a check still leaves its device: ``detach_stale_loops`` at the next start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from targets.base import TargetError


class CheckToolError(TargetError):
    """A checking tool could not run at all (missing, or the loop device failed)."""

    def __init__(self, what: str, output: str) -> None:
        super().__init__("verify_tool", f"{what}: {output.strip()[-500:]}",
                         "install e2fsprogs, xfsprogs and util-linux; run as root")


class LoopDevice:
    """A loop device over ``size`` bytes of ``path`` from ``offset``, read-only unless
    asked; detached on exit."""

    def __init__(self, path: Path, offset: int, size: int, read_only: bool = True) -> None:
        self.path, self.offset, self.size, self.read_only = path, offset, size, read_only
        self.dev = ""

    async def __aenter__(self) -> str:
        self.dev = _attach(self.path, self.offset, self.size, self.read_only)
        return self.dev

    async def __aexit__(self, *exc: object) -> None:
        _detach(self.dev)


def _attach(path: Path, offset: int, size: int, read_only: bool) -> str:
    ro = ["--read-only"] if read_only else []
    try:
        res = subprocess.run(["losetup", *ro, "--find", "--show", "--offset", str(offset),
                              "--sizelimit", str(size), str(path)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise CheckToolError("losetup is not installed", str(e)) from e
    if res.returncode != 0:
        raise CheckToolError(f"losetup of {path} at byte {offset}", res.stdout + res.stderr)
    return res.stdout.strip()


def detach_stale_loops(under: Path) -> list[str]:
    """Detach every loop device whose backing file lies under ``under`` (deleted or not);
    return their names. For a server's start, before any check runs: a process killed
    (kill -9) during a check cannot detach its loop device, and nothing else will."""
    res = subprocess.run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0 or not res.stdout.strip():
        return []  # no loop devices at all (losetup prints nothing)
    root = str(under.resolve()).rstrip("/") + "/"
    stale = []
    for dev in json.loads(res.stdout).get("loopdevices", []):
        back = str(dev.get("back-file") or "").removesuffix(" (deleted)")
        if back.startswith(root):
            _detach(dev["name"])
            stale.append(dev["name"])
    return stale


def _detach(dev: str) -> None:
    subprocess.run(["losetup", "--detach", dev], stdin=subprocess.DEVNULL,
                   capture_output=True)
