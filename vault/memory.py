"""The memory budget of what reads a whole vault's index or maps (check, prune,
rebuild-index, restore, the scheduled prune of the configuration server): its default,
and how a budget in MiB is checked and turned into bytes.

Past a budget, the streaming paths (vault/extsort.py, vault/prunestream.py,
vault/checkstore.py, vault/indexdb.py) keep what they hold per block in files of a
temporary directory, read back in sorted batches.
"""

from __future__ import annotations

#: fits a machine of 1 GiB with the rest of the process (about 100 MiB) beside it
DEFAULT_MEMORY_MIB = 512
#: the largest budget accepted (1 TiB): a larger one is a mistaken unit
MAX_MEMORY_MIB = 1 << 20


def check_memory_mib(value: object, what: str = "memory budget") -> int:
    """``value`` as a budget in MiB (a whole number from 0, "always spill", to
    ``MAX_MEMORY_MIB``); ``ValueError`` naming ``what`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not (
            0 <= value <= MAX_MEMORY_MIB):
        raise ValueError(f"{what} must be a whole number of MiB from 0 (always spill to "
                         f"temporary files) to {MAX_MEMORY_MIB}, e.g. {DEFAULT_MEMORY_MIB}; "
                         f"got {value!r}")
    return value


def budget_bytes(mib: int) -> int:
    """A budget of ``mib`` MiB in bytes, as the streaming paths take it."""
    return check_memory_mib(mib) << 20
