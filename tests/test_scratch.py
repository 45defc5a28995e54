"""common/scratch.py: a scratch file has no name from the start and is gone once closed."""

from __future__ import annotations

import os
from pathlib import Path

from common.scratch import scratch_file, write_all


def test_a_scratch_file_has_no_name_and_holds_what_was_written(tmp_path: Path) -> None:
    fd = scratch_file(tmp_path)
    try:
        write_all(fd, b"abc" * 100_000)
        assert os.listdir(tmp_path) == []
        assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_size == 300_000
        assert os.pread(fd, 6, 299_994) == b"abcabc"
    finally:
        os.close(fd)
