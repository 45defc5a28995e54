"""What the NBD server serves: an ``Export``, a disk of a fixed size that reads, writes,
flushes and reports which of its ranges are holes or zeros.

The server knows nothing of vaults: ``instant/pointdisk.py`` is the export of a recovery
point's disk, and tests may serve any other implementation.
"""

from __future__ import annotations

from typing import Protocol


class ExportError(Exception):
    """A request the export refuses, with the NBD error number to reply with."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


class Export(Protocol):
    """A disk served over NBD. Offsets and lengths are in bytes and lie inside the disk
    (the server checks that before calling). Every method may raise ``ExportError`` (its
    errno is replied) or ``OSError`` / any vault error (replied as EIO): data that could
    not be read correctly is never returned."""

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        ...

    @property
    def block_size(self) -> int:
        """The preferred request granularity (the disk's block size)."""
        ...

    async def read(self, offset: int, length: int) -> bytes: ...

    async def write(self, offset: int, data: bytes, *, fua: bool = False) -> None: ...

    async def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    async def trim(self, offset: int, length: int) -> None:
        """Advisory: the range's content may read back as anything afterwards."""
        ...

    async def flush(self) -> None:
        """Make every write that was replied to durable."""
        ...

    async def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``base:allocation`` of ``[offset, offset + length)``: ``(length, flags)`` runs
        in order, flags of STATE_HOLE / STATE_ZERO, covering at least one byte and no
        more than ``length`` bytes."""
        ...
