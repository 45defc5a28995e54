"""``--memory-mib`` and ``--temp-dir``: the memory budget of the verbs that read a whole
vault's index (``check``, ``prune``, ``rebuild-index``)."""

from __future__ import annotations

import argparse

#: fits a machine of 1 GiB with the rest of the process (about 100 MiB) beside it
DEFAULT_MEMORY_MIB = 512


def memory_mib(text: str) -> int:
    """A budget in MiB: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget in MiB (a whole number, "
                                         "0 or more, e.g. 512)")
    return value


def add_memory_args(p: argparse.ArgumentParser, *, temp: bool = False) -> None:
    p.add_argument("--memory-mib", type=memory_mib, default=DEFAULT_MEMORY_MIB,
                   help="memory budget: past it the index and what is held per block go to "
                        "files in a temporary directory, read in sorted batches (default "
                        f"{DEFAULT_MEMORY_MIB}, for a machine of 1 GiB; 0: always)")
    if temp:
        p.add_argument("--temp-dir", help="where those files go (default: the system's "
                                          "temporary directory, $TMPDIR)")
