"""A machine's serial console log, read as it grows: lines cleaned of terminal control."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from pathlib import Path

TAIL = 25
# ANSI/VT100 sequences (SGABIOS and the kernel position the cursor, clear the screen)
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>c]|[\r\x00\x07]")
LOGIN_PROMPT = re.compile(r"login:\s*$")  # a getty's prompt: the machine booted


def clean(data: bytes) -> str:
    """Console bytes as text without terminal control sequences."""
    return _CONTROL.sub("", data.decode("utf-8", "replace"))


def proves_boot(line: str, marker: str | None) -> bool:
    """Whether a console line proves the boot: it holds ``marker`` when one is set,
    else it is a login prompt."""
    return marker in line if marker else bool(LOGIN_PROMPT.search(line))


class ConsoleLog:
    """Reads ``path`` from where the previous read stopped; a missing file reads empty
    (virtlogd creates it once the machine starts)."""

    def __init__(self, path: Path, keep: int = 500) -> None:
        self.path, self.offset, self.partial = path, 0, ""
        self.lines: deque[str] = deque(maxlen=keep)

    def _read(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        text = self.partial + clean(data)
        *done, self.partial = text.split("\n")
        self.lines.extend(done)
        return done

    def find(self, match: Callable[[str], bool]) -> str | None:
        """The first new line that ``match``es (the unfinished last line counts too: a
        login prompt ends without a newline), or None."""
        for line in [*self._read(), self.partial]:
            if match(line):
                return line.strip()
        return None

    def tail(self, n: int = TAIL) -> list[str]:
        lines = [*self.lines, self.partial] if self.partial.strip() else list(self.lines)
        return [ln.rstrip() for ln in lines if ln.strip()][-n:]
