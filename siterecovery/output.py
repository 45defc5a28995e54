"""What a verb prints: JSON with ``--json``, else text for a human (plain tables)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any


def add_json_arg(p: argparse.ArgumentParser) -> None:
    """``--json``: print the result as one JSON document instead of text."""
    p.add_argument("--json", action="store_true", help="machine-readable output")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain text table: ``columns`` are (key, header) pairs; ``(none)`` for no rows.
    None shows as ``-``, floats with one decimal, lists and dicts as JSON."""
    if not rows:
        return "(none)"

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}"
        if isinstance(v, (list, dict)):
            return json.dumps(v)
        return str(v)

    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def show(doc: Any, args: argparse.Namespace, human: str) -> int:
    """Print ``doc`` as JSON with --json, else the human text (nothing if it is empty);
    exit code 0."""
    if args.json:
        print(json.dumps(doc))
    elif human:
        print(human)
    return 0


def notes(prefix: str, *, quiet: bool) -> Callable[[str], None]:
    """A ``progress`` callback for a long vault operation: each message as a line
    ``<prefix>: <message>`` on stderr (stdout stays for the result); nothing if quiet."""
    def say(msg: str) -> None:
        if not quiet:
            print(f"{prefix}: {msg}", file=sys.stderr, flush=True)
    return say


def mib(size: int) -> str:
    """A disk size as the vault verbs print it: ``64 MiB``."""
    return f"{size / 2**20:.0f} MiB"
