"""``--memory-mib`` and ``--temp-dir``: the memory budget of the verbs that read a whole
vault's index (``check``, ``prune``, ``rebuild-index``); the default and its bounds are
the vault's (vault/memory.py)."""

from __future__ import annotations

import argparse

from vault.memory import DEFAULT_MEMORY_MIB, check_memory_mib

__all__ = ["DEFAULT_MEMORY_MIB", "add_memory_args", "memory_mib"]


def memory_mib(text: str) -> int:
    """A budget in MiB: a whole number, 0 or more."""
    try:
        return check_memory_mib(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget in MiB (a whole number, "
                                         "0 or more, e.g. 512)") from None


def add_memory_args(p: argparse.ArgumentParser, *, temp: bool = False) -> None:
    p.add_argument("--memory-mib", type=memory_mib, default=DEFAULT_MEMORY_MIB,
                   help="memory budget: past it the index and what is held per block go to "
                        "files in a temporary directory, read in sorted batches (default "
                        f"{DEFAULT_MEMORY_MIB}, for a machine of 1 GiB; 0: always)")
    if temp:
        p.add_argument("--temp-dir", help="where those files go (default: the system's "
                                          "temporary directory, $TMPDIR)")
