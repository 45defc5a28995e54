"""Progress lines on stderr: redrawn in place on a terminal, one line per step otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, *, quiet: bool = False) -> None:
        self.label, self.quiet = label, quiet
        self.tty = sys.stderr.isatty()
        self._last_pct = -1
        self._start = time.monotonic()

    def __call__(self, *args: object) -> None:
        # Accepts (done, total) or (name, done, total).
        *names, done, total = args
        if self.quiet or not isinstance(done, int) or not isinstance(total, int):
            return
        pct = 100 if total == 0 else int(done * 100 / total)
        if pct == self._last_pct or (not self.tty and pct % 25 and pct != 100):
            return
        self._last_pct = pct
        name = f" {names[0]}" if names else ""
        rate = done / max(1e-6, time.monotonic() - self._start) / 1e6
        line = f"{self.label}{name}: {pct:3d}%  {done / 1e6:8.1f} MB  {rate:6.1f} MB/s"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if pct == 100 else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
