"""Snapshot providers: where a point's consistency label comes from (invariant 4).

A provider is an async context manager that holds the disks at one point in time
while they are read and yields the label that honestly describes the read:

- ``none``: the disks are read live; points are labelled ``inconsistent``.
- ``quiesced``: the operator guarantees nothing writes during the read (e.g. a
  stopped VM's image, or a test harness that pauses its writer): ``crash``.
- ``fsfreeze``: each mount frozen for the read (``FIFREEZE``, as ``fsfreeze -f``),
  then thawed: ``crash``.
- ``lvm``: an LVM snapshot of every disk (each disk a logical volume), taken while
  the ``freeze_mounts`` are frozen, which are thawed at once: the cycle reads the
  snapshots, so writes are held back only for the ``lvcreate`` calls, not for the
  send. ``crash`` for one disk or with frozen mounts (every disk at one moment);
  ``inconsistent`` for several disks without a freeze (their snapshots are taken
  one after the other). The snapshots are removed when the hold ends.
- ``reflink``: every disk is an image file on a filesystem that shares extents
  (XFS with reflink, Btrfs): each is cloned (``FICLONE``, no data copied), the
  clones are read and then deleted. Labels as for ``lvm``.
- ``script``: a user pre-script (application quiesce) before and post-script after,
  each with a timeout: ``app``; if the pre-script fails the cycle is labelled by
  the inner provider and the failure is logged. With ``lvm`` or ``reflink``
  inside, the post-script runs as soon as the snapshots exist.

A provider yields a label, or a ``Held`` naming the paths to read instead of the
disks' own (a block snapshot) and whether writes are already let go. A hold that can
let writes go before it ends (``fsfreeze``, and ``script`` around it) offers ``thaw``:
the cycle calls it once it has copied what it still has to read (``spool.py``), and
the hold then ends without thawing again. Those two also offer ``prepare``: the hold
with its label decided (the pre-script run) but writes not yet stopped, until the
cycle calls ``Held.freeze`` — so that what waits on the network comes before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from common.subproc import communicate

log = structlog.get_logger("mobility.snapshot")


@dataclass(frozen=True)
class Held:
    """What a provider holds: the label, and for a block snapshot where to read."""

    label: str
    paths: dict[str, str] = field(default_factory=dict)  # disk path -> snapshot path
    released: bool = False  # writes go on already: the reads come from the snapshot
    # Let writes go on now, before the hold ends (None: only when it ends).
    thaw: Callable[[], Awaitable[None]] | None = None
    # Stop writes now (``prepare``); None: they stopped when the hold began.
    freeze: Callable[[], Awaitable[None]] | None = None

    def path(self, disk_path: str) -> str:
        return self.paths.get(disk_path, disk_path)


def held(h: str | Held) -> Held:
    return h if isinstance(h, Held) else Held(h)


class SnapshotProvider(Protocol):
    def hold(self) -> contextlib.AbstractAsyncContextManager[str | Held]: ...


class NoSnapshot:
    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[str | Held]:
        yield "inconsistent"


class Quiesced:
    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[str | Held]:
        yield "crash"


async def _run(argv: list[str], timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await communicate(proc, timeout)
    except TimeoutError:
        raise RuntimeError(f"{argv[0]} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


FIFREEZE = 0xC0045877  # linux/fs.h: _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


def _fs_ioctl(mount: str, request: int) -> None:
    """What ``fsfreeze --freeze`` / ``--unfreeze`` do, without starting a process (on a
    busy machine that alone can take longer than the freeze should)."""
    what = "freeze" if request == FIFREEZE else "thaw"
    try:
        fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, request, 0)
        finally:
            os.close(fd)
    except OSError as e:
        raise RuntimeError(f"cannot {what} {mount}: {e.strerror} (freeze_mounts must be "
                           "mount points of filesystems that can be frozen, such as ext4 "
                           "or XFS)") from None


async def _fs_call(mount: str, request: int, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await asyncio.to_thread(_fs_ioctl, mount, request)
    except TimeoutError:
        raise RuntimeError(f"fsfreeze of {mount} did not finish within {timeout:g}s") from None


class FsFreeze:
    def __init__(self, mounts: list[str], timeout: float = 30.0) -> None:
        self.mounts, self.timeout = mounts, timeout

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[str | Held]:
        async with self.prepare() as h:
            assert h.freeze is not None
            await h.freeze()
            yield Held(h.label, thaw=h.thaw)

    @contextlib.asynccontextmanager
    async def prepare(self) -> AsyncIterator[Held]:
        frozen: list[str] = []

        async def freeze() -> None:
            for m in self.mounts:
                await _fs_call(m, FIFREEZE, self.timeout)
                frozen.append(m)

        async def thaw() -> None:
            thawed: list[str] = []
            try:
                while frozen:
                    await _fs_call(frozen[-1], FITHAW, self.timeout)
                    thawed.append(frozen.pop())
            finally:
                if thawed:
                    log.info("filesystems_thawed", mounts=thawed)

        try:
            yield Held("crash", thaw=thaw, freeze=freeze)
        finally:
            await thaw()


class Scripts:
    def __init__(self, pre: str, post: str, timeout: float, inner: SnapshotProvider) -> None:
        self.pre, self.post, self.timeout, self.inner = pre, post, timeout, inner

    def hold(self) -> contextlib.AbstractAsyncContextManager[str | Held]:
        return self._hold(self.inner.hold)

    def prepare(self) -> contextlib.AbstractAsyncContextManager[str | Held]:
        return self._hold(getattr(self.inner, "prepare", self.inner.hold))

    @contextlib.asynccontextmanager
    async def _hold(self, enter: Callable[[], contextlib.AbstractAsyncContextManager[str | Held]]
                    ) -> AsyncIterator[str | Held]:
        try:
            await _run([self.pre], self.timeout)
        except (RuntimeError, OSError) as e:
            log.warning("pre_script_failed", error=str(e))
            async with enter() as label:
                yield label
            return
        posted = False

        async def post() -> None:
            nonlocal posted
            if not posted:
                posted = True
                await _run([self.post], self.timeout)

        try:
            async with enter() as inner:
                h = held(inner)
                if h.released:  # the snapshot exists: the application may go on now
                    await post()
                thaw = None
                if h.thaw is not None:
                    inner_thaw = h.thaw

                    async def thaw() -> None:  # the application goes on with the disks
                        await inner_thaw()
                        await post()

                yield Held("app" if h.label != "inconsistent" else h.label, h.paths,
                           h.released, thaw, h.freeze)
        finally:
            await post()


class LvmSnapshot:
    """LVM snapshots of the disks (``lvcreate --snapshot``), read instead of the disks.

    ``size`` is the copy-on-write space of each snapshot: ``N%ORIGIN`` (extents,
    ``-l``) or a size such as ``2G`` (``-L``). Writes beyond it invalidate the
    snapshot and the cycle fails (its reads error out); make it larger, or the
    cycle interval shorter.
    """

    def __init__(self, disks: list[str], mounts: list[str], size: str = "10%ORIGIN",
                 timeout: float = 60.0) -> None:
        self.disks, self.mounts, self.size, self.timeout = disks, mounts, size, timeout

    async def _lv_of(self, path: str) -> tuple[str, str]:
        out = await _run(["lvs", "--noheadings", "-o", "vg_name,lv_name", path], self.timeout)
        parts = out.split()
        if len(parts) != 2:
            raise RuntimeError(f"{path} is not an LVM logical volume (lvs said {out.strip()!r})")
        return parts[0], parts[1]

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[Held]:
        lvs = [await self._lv_of(p) for p in self.disks]
        tag = uuid.uuid4().hex[:8]
        made: list[str] = []
        paths: dict[str, str] = {}
        size = ["-l", self.size] if self.size.upper().endswith("%ORIGIN") else ["-L", self.size]
        try:
            async with FsFreeze(self.mounts, self.timeout).hold():
                for (vg, lv), _path in zip(lvs, self.disks, strict=True):
                    snap = f"{vg}/{lv}-sr-{tag}"
                    await _run(["lvcreate", "--snapshot", "--name", f"{lv}-sr-{tag}", *size,
                                f"{vg}/{lv}"], self.timeout)
                    made.append(snap)
            for snap, path in zip(made, self.disks, strict=True):
                out = await _run(["lvs", "--noheadings", "-o", "lv_path", snap], self.timeout)
                paths[path] = out.strip()
            one_moment = len(self.disks) == 1 or bool(self.mounts)
            log.info("lvm_snapshots_taken", snapshots=made)
            yield Held("crash" if one_moment else "inconsistent", paths, released=True)
        finally:
            for snap in reversed(made):
                try:
                    await _run(["lvremove", "--yes", snap], self.timeout)
                except (RuntimeError, OSError) as e:
                    log.error("lvm_snapshot_not_removed", snapshot=snap, error=str(e),
                              hint=f"remove it by hand: lvremove {snap}")


FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


def reflink_clone(src: str, dst: str) -> None:
    """Make ``dst`` (which must not exist) a clone of ``src``: it shares every extent,
    no data is copied. Raises ``OSError`` (and leaves no ``dst``) where the filesystem
    has no reflinks or the two lie on different filesystems."""
    with open(src, "rb") as s, open(dst, "xb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
        except OSError:
            os.unlink(dst)
            raise


def _clone(src: str, dst: str) -> None:
    try:
        reflink_clone(src, dst)
    except OSError as e:
        raise RuntimeError(f"cannot clone {src} ({e.strerror}): snapshot = 'reflink' "
                           "needs the disk images on a filesystem with reflinks (XFS "
                           "made with reflink=1, Btrfs)") from None


def clone_path(image: str, tag: str) -> str:
    """Where ``ReflinkSnapshot`` clones ``image`` for the hold ``tag``: beside it."""
    d, name = os.path.split(image)
    return os.path.join(d, f".{name}.sr-{tag}")


def is_clone_of(path: str, image: str) -> bool:
    """Whether ``path`` is a clone ``ReflinkSnapshot`` made of ``image`` (a file that
    shares the image's extents and that nobody writes)."""
    d, name = os.path.split(os.path.abspath(image))
    pd, pname = os.path.split(os.path.abspath(path))
    return pd == d and pname.startswith(f".{name}.sr-")


class ReflinkSnapshot:
    """Clones of image files (``FICLONE``), read instead of the images."""

    def __init__(self, disks: list[str], mounts: list[str], timeout: float = 60.0) -> None:
        self.disks, self.mounts, self.timeout = disks, mounts, timeout

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[Held]:
        tag = uuid.uuid4().hex[:8]
        made: list[str] = []
        paths: dict[str, str] = {}
        try:
            async with FsFreeze(self.mounts, self.timeout).hold():
                for path in self.disks:
                    clone = clone_path(path, tag)
                    await asyncio.to_thread(_clone, path, clone)
                    made.append(clone)
                    paths[path] = clone
            one_moment = len(self.disks) == 1 or bool(self.mounts)
            yield Held("crash" if one_moment else "inconsistent", paths, released=True)
        finally:
            for clone in made:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(clone)


def crash_provider(snapshot: str, disks: list[str], mounts: list[str],
                   lvm_size: str = "10%ORIGIN") -> SnapshotProvider:
    """The provider of crash-consistent (or honestly inconsistent) points for a
    ``snapshot`` setting; ``script`` wraps it for app-consistent ones."""
    if snapshot == "quiesced":
        return Quiesced()
    if snapshot == "lvm":
        return LvmSnapshot(disks, mounts, lvm_size)
    if snapshot == "reflink":
        return ReflinkSnapshot(disks, mounts)
    if snapshot in ("fsfreeze", "script") and mounts:
        return FsFreeze(mounts)
    return NoSnapshot()
