"""The block-map changes of one disk in a cycle being written: 40 bytes a block.

``CycleWriter`` keeps every block a cycle records (its number and id) until the point's
map is written. A dict of them costs about 140 bytes a block (an int key, a 32-byte
bytes object, the table's slot): 4.7 GB for the initial copy of a 2 TiB disk of 64 KiB
blocks, and as much again for the map built from it. Here they are appended to two flat
arrays instead (``u64`` block numbers, 32-byte ids), and read back in block order.

Blocks come in increasing order: an agent sends a disk's blocks in order, a resumed
cycle goes on after its position, a replay reads the journal in the order it was
written. Anything else (a block recorded again, one before the last) is sorted out when
the changes are read, the last id recorded for a block kept, as a dict would.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

ID = 32  # bytes of a block id


class BlockChanges:
    """``block number -> id`` for one disk, appended, read back in block order."""

    __slots__ = ("_ids", "_last", "_nums", "_sorted")

    def __init__(self) -> None:
        self._nums = array("Q")
        self._ids = bytearray()
        self._last = -1  # the highest block number recorded
        self._sorted = True  # every block after the one before it

    def set(self, n: int, block_id: bytes) -> None:
        """Record block ``n``'s id (a later one for the same block wins)."""
        if len(block_id) != ID:
            raise ValueError(f"a block id is {ID} bytes, not {len(block_id)}")
        if n > self._last:
            self._last = n
        else:
            self._sorted = False
        self._nums.append(n)
        self._ids += block_id

    def __len__(self) -> int:
        """How many distinct blocks."""
        self._settle()
        return len(self._nums)

    def items(self) -> Iterator[tuple[int, bytes]]:
        """``(block number, id)`` in increasing block order, each block once."""
        self._settle()
        ids = self._ids
        for i, n in enumerate(self._nums):
            yield n, bytes(ids[i * ID:(i + 1) * ID])

    def ids(self) -> Iterator[bytes]:
        """The ids, in block order."""
        return (bid for _n, bid in self.items())

    def _settle(self) -> None:
        """Put the entries in block order, the last one recorded of each block kept."""
        if self._sorted:
            return
        nums, ids = self._nums, self._ids
        # Stable: of the entries of one block, the last recorded comes last.
        order = sorted(range(len(nums)), key=nums.__getitem__)
        out_nums, out_ids = array("Q"), bytearray()
        for k, i in enumerate(order):
            if k + 1 < len(order) and nums[order[k + 1]] == nums[i]:
                continue  # recorded again later
            out_nums.append(nums[i])
            out_ids += ids[i * ID:(i + 1) * ID]
        self._nums, self._ids, self._sorted = out_nums, out_ids, True
