"""Local-folder backend: one file per object, written temp + fsync + rename."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from common.scratch import write_all
from vault.errors import NotFoundError, PermanentStoreError
from vault.names import PACKS
from vault.store.protocol import BlobInfo, check_name, read_file_part

_TMP_SUFFIX = ".tmp"
_COPY = 4 << 20  # bytes of a file put copied at once


class LocalStore:
    """A vault in a local directory. The embedded default."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"
        # Folders are created by put() only: reading a vault never changes the disk.

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def _put(self, name: str, data: bytes | bytearray) -> None:
        self._write(name, lambda fd: write_all(fd, data), id(data))

    def _put_file(self, name: str, src: int, length: int) -> None:
        def fill(fd: int) -> None:
            off = 0
            try:  # in the kernel, nothing read into memory
                while off < length:
                    n = os.copy_file_range(src, fd, length - off, offset_src=off)
                    if n == 0:
                        break
                    off += n
            except OSError:  # a filesystem pair it does not serve: read and write
                pass
            for at in range(off, length, _COPY):
                write_all(fd, read_file_part(src, at, min(_COPY, length - at)))

        self._write(name, fill, src)

    def _write(self, name: str, fill: Callable[[int], None], tag: int) -> None:
        """Write an object: a temporary file filled by ``fill``, fsynced, renamed over
        the name, its folder fsynced."""
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{tag:x}{_TMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fill(fd)
            # Stamped to the nanosecond (the kernel's own stamp is a clock tick, a few
            # ms): two writes of a name always differ in version (``_version``), even
            # when the second one's file reuses the first one's inode.
            now = time.time_ns()
            os.utime(fd, ns=(now, now))
            os.fsync(fd)
            if name.startswith(PACKS):
                # Durable now, and read again only by a restore or a check: give the pages
                # back rather than let packs push everything else out of the page cache
                # (borg does the same). Writing into freed pages is also far cheaper than
                # growing the cache into memory never touched.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def put(self, name: str, data: bytes | bytearray) -> None:
        await asyncio.to_thread(self._put, name, data)

    async def put_file(self, name: str, fd: int, length: int) -> None:
        await asyncio.to_thread(self._put_file, name, fd, length)

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                end = size if length is None else offset + length
                if offset < 0 or end > size or end < offset:
                    raise PermanentStoreError(
                        f"range {offset}+{length} outside object {name!r} of {size} bytes"
                    )
                f.seek(offset)
                return f.read(end - offset)
        except FileNotFoundError:
            raise NotFoundError(f"object {name!r} not found in {self.url}") from None

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return await asyncio.to_thread(self._get, name, offset, length)

    async def stat(self, name: str) -> BlobInfo:
        try:
            st = await asyncio.to_thread(os.stat, self._path(name))
        except FileNotFoundError:
            raise NotFoundError(f"object {name!r} not found in {self.url}") from None
        return BlobInfo(name, st.st_size, _version(st))

    def _list(self, prefix: str) -> list[BlobInfo]:
        out: list[BlobInfo] = []
        # Walk only the directory the prefix can live in.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if fn.startswith(".") or fn.endswith(_TMP_SUFFIX):
                    continue
                full = os.path.join(dirpath, fn)
                name = os.path.relpath(full, self.root).replace(os.sep, "/")
                if name.startswith(prefix):
                    try:
                        st = os.stat(full)
                        out.append(BlobInfo(name, st.st_size, _version(st)))
                    except FileNotFoundError:
                        continue
        out.sort(key=lambda b: b.name)
        return out

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        for info in await asyncio.to_thread(self._list, prefix):
            yield info

    async def delete(self, name: str) -> None:
        try:
            await asyncio.to_thread(os.unlink, self._path(name))
        except FileNotFoundError:
            pass

    async def setup(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)

    async def server_time(self) -> float | None:
        return None  # a local folder has no clock of its own

    async def close(self) -> None:
        return None


def _version(st: os.stat_result) -> str:
    """A file's version: a put renames a new file over the name, stamped to the
    nanosecond; a write in place moves its ctime, which no caller can set back."""
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_ctime_ns}"
