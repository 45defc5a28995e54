"""Small files whose loss after a crash loses access (key files, the secrets key): the
file and its directory entry are fsynced before the function returns.

A crash right after ``vault key add --key-file NEW`` must not lose the new key file
while the vault already holds the slot it opens. The kernel gives no way to crash a
test machine, so the test records what is really fsynced (every ``os.fsync`` call,
with the path its descriptor points at) and asserts on those system calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common.fs import atomic_write, create_exclusive
from configserver.sealed import create_key
from vault.keyslots import new_keyfile, read_keyfile


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    seen: list[Path] = []
    real = os.fsync

    def recording(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    yield seen


@pytest.mark.parametrize("make", [
    pytest.param(lambda p: new_keyfile(p), id="vault-key-file"),
    pytest.param(lambda p: create_key(p), id="secrets-key"),
    pytest.param(lambda p: create_exclusive(p, b"x"), id="create_exclusive"),
    pytest.param(lambda p: atomic_write(p, b"x"), id="atomic_write"),
])
def test_new_file_and_its_directory_are_fsynced(tmp_path: Path, fsynced: list[Path],
                                                make: Callable[[Path], object]) -> None:
    path = tmp_path / "keys" / "new.key"
    path.parent.mkdir()
    make(path)
    # The data is fsynced under its own name or under the temporary name renamed over it.
    data = [i for i, p in enumerate(fsynced) if p.parent == path.parent.resolve()
            and "new.key" in p.name]
    assert data, "the file's data was not fsynced"
    assert path.parent.resolve() in fsynced, "the directory entry was not fsynced"
    assert fsynced.index(path.parent.resolve()) > data[0], "directory fsynced before the data"
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_key_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "vault.key"
    kek = new_keyfile(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        new_keyfile(path)
    assert path.read_bytes() == before
    assert read_keyfile(path) == kek


def test_a_failed_exclusive_create_leaves_no_partial_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        create_exclusive(tmp_path / "k", b"data")
    assert not (tmp_path / "k").exists()
