"""Commands with a deadline (common/subproc.py): a command that ended just as its time
ran out is no error of its own, one that goes on is killed and reaped, and virsh against a
libvirtd that does not answer fails with that said instead of waiting for ever."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

import pytest

from common.subproc import communicate, stop
from targets.base import TargetError
from targets.virsh import Virsh


async def _ended() -> asyncio.subprocess.Process:
    """A command that has ended and been reaped, its pipes closed: what a command that
    ends just as a timeout falls looks like by the time it is killed."""
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", "exit 3", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await proc.communicate()
    return proc


async def test_stopping_a_command_that_has_ended_is_no_error() -> None:
    proc = await _ended()
    with pytest.raises(ProcessLookupError):  # what a bare kill() does then
        proc.kill()
    assert await stop(await _ended()) == 3


async def test_a_command_past_its_deadline_is_killed_and_reaped() -> None:
    proc = await asyncio.create_subprocess_exec(
        "sleep", "600", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    with pytest.raises(TimeoutError):
        await communicate(proc, 0.2)
    assert proc.returncode == -9


async def test_a_command_within_its_deadline_gives_its_output() -> None:
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", "echo out; echo err >&2", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert await communicate(proc, 60) == (b"out\n", b"err\n")
    assert proc.returncode == 0


async def test_virsh_against_a_libvirtd_that_does_not_answer(tmp_path: Path) -> None:
    """A socket that accepts and never answers, as a hung libvirtd does: the real virsh
    waits on it, and the target's call ends with an error that says where to look."""
    assert shutil.which("virsh"), "the test command installs libvirt-clients"
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(path))
        silent.listen(8)
        uri = f"qemu:///system?socket={path}"
        with pytest.raises(TargetError) as e:
            await Virsh(uri, timeout=1.0)("domstate", "sr-anything")
    assert e.value.code == "libvirt"
    assert "got no answer" in e.value.message and uri in e.value.message
    assert "libvirtd" in e.value.hint
