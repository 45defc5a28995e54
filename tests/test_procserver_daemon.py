"""The daemon around the components: a crashed task fails it loudly, and shutdown goes in
its fixed order (stop accepting, let sessions finish within the grace, cancel the rest and
say how many, close)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from procserver.server import ProcServer
from procserver.supervisor import TaskCrashedError
from tests.helpers import Pki, proc_config
from wire.protocol import FrameType, encode_json, read_frame


async def _never() -> None:
    await asyncio.Event().wait()


async def test_a_crashed_task_ends_serve_until_and_the_daemon_still_stops(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    ps = ProcServer(proc_config(tmp_path, pki, *vault_at))
    await ps.start()
    release = asyncio.Event()

    async def breaks() -> None:
        await release.wait()
        raise RuntimeError("the bookkeeping database went away")

    ps.supervisor.start("breaks", breaks())
    try:
        serving = asyncio.ensure_future(ps.serve_until(_never()))
        release.set()
        with pytest.raises(TaskCrashedError) as e:
            await asyncio.wait_for(serving, 10)
        assert e.value.name == "breaks"
    finally:
        await ps.stop()
    out = capsys.readouterr().out
    for event in ("task_crashed", "procserver_failed", "procserver_stopped"):
        assert event in out, event
    assert "the bookkeeping database went away" in out


async def test_serve_until_returns_when_told_to_stop(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    ps = ProcServer(proc_config(tmp_path, pki, *vault_at))
    await ps.start()
    stop = asyncio.Event()
    try:
        serving = asyncio.ensure_future(ps.serve_until(stop.wait()))
        stop.set()
        await asyncio.wait_for(serving, 10)
        assert not ps.supervisor.failed.done()
    finally:
        await ps.stop()


async def _session(ps: ProcServer, pki: Pki) -> tuple[asyncio.StreamReader,
                                                      asyncio.StreamWriter]:
    """A connected agent session that has said HELLO and then says nothing."""
    cert, key = pki.client("web01")
    ctx = ssl.create_default_context(cafile=pki.ca_path)
    ctx.load_cert_chain(cert, key)
    reader, writer = await asyncio.open_connection("127.0.0.1", ps.port, ssl=ctx)
    writer.write(encode_json(FrameType.HELLO, {"machine": "web01"}))
    await writer.drain()
    assert (await read_frame(reader, timeout=10)).type == FrameType.WELCOME
    return reader, writer


async def test_shutdown_cancels_sessions_past_the_grace_and_says_how_many(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    ps = ProcServer(proc_config(tmp_path, pki, *vault_at))
    await ps.start()
    _reader, writer = await _session(ps, pki)
    try:
        await ps.stop(grace=0.2)
    finally:
        writer.close()
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "sessions_cancelled_at_shutdown" in ln)
    assert "count=1" in line
    assert out.index("sessions_cancelled_at_shutdown") < out.index("procserver_stopped")


async def test_shutdown_with_no_session_left_cancels_none(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    ps = ProcServer(proc_config(tmp_path, pki, *vault_at))
    await ps.start()
    _reader, writer = await _session(ps, pki)
    writer.close()  # the agent leaves: its session ends within the grace
    await writer.wait_closed()
    await ps.stop(grace=10)
    out = capsys.readouterr().out
    assert "sessions_cancelled_at_shutdown" not in out and "procserver_stopped" in out
