"""The disk checks of an instant recovery, read through the disk's own NBD server.

``check_through_nbd(socket, check)`` mounts the served disk read-only as a file with
``nbdfuse`` (libnbd-bin), runs ``check`` (``targets.verify.verify_image``: partition
table, read-only fsck on loop devices) on that file, and unmounts it. The blocks the
checks read are fetched from the vault into the overlay as the guest's would be.

``check`` runs on an event loop of its own in a worker thread: the checks make blocking
reads of the file and blocking ``losetup`` calls, which this process's own NBD server
(on this loop) must answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from common.subproc import stop
from targets.base import TargetError

T = TypeVar("T")
MOUNT_BOUND = 60.0  # seconds for nbdfuse to connect and mount
POLL = 0.05


async def check_through_nbd(socket: Path, check: Callable[[Path], Awaitable[T]]) -> T:
    if shutil.which("nbdfuse") is None:
        raise TargetError("verify_tool", "nbdfuse is not installed: the disks of an instant "
                          "recovery cannot be checked", "install libnbd-bin (and fuse3)")
    mount = Path(tempfile.mkdtemp(prefix="siterecovery-nbd-"))
    pidfile = mount.with_suffix(".pid")
    proc = await asyncio.create_subprocess_exec(
        "nbdfuse", "-r", "-P", str(pidfile), str(mount / "disk"), "--unix", str(socket),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        deadline = time.monotonic() + MOUNT_BOUND
        while not pidfile.exists():  # nbdfuse writes it once the file can be read
            if proc.returncode is not None or time.monotonic() > deadline:
                err = b""
                if proc.returncode is not None and proc.stderr is not None:
                    err = await proc.stderr.read()
                raise TargetError("verify_tool", f"nbdfuse could not mount {socket}: "
                                  f"{err.decode(errors='replace').strip() or 'no answer'}",
                                  "check that /dev/fuse exists and fuse3 is installed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), POLL)
        return await asyncio.to_thread(_run_alone, check, mount / "disk")
    finally:
        await _unmount(proc, mount)
        pidfile.unlink(missing_ok=True)


def _run_alone(check: Callable[[Path], Awaitable[T]], path: Path) -> T:
    async def run() -> T:
        return await check(path)
    return asyncio.run(run())


async def _unmount(proc: asyncio.subprocess.Process, mount: Path) -> None:
    if proc.returncode is None:
        for argv in (["fusermount3", "-u", str(mount)], ["umount", str(mount)]):
            if shutil.which(argv[0]) is None:
                continue
            um = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            if await um.wait() == 0:
                break
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            await stop(proc)  # it would not unmount: the mount goes with it
    with contextlib.suppress(OSError):
        mount.rmdir()
