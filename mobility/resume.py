"""Resuming a cycle whose connection broke (feature ``resume``).

The agent reconnects and sends ``RESUME``; the process server answers ``PROGRESS``
(how many blocks it holds durably, and the highest; the agent goes on after it),
``ACK`` (END had arrived, only its ACK was lost) or ``ERROR``. The agent keeps trying
for ``resume_timeout_seconds``, and for ``REFUSED_GRACE`` seconds while connections
are refused outright. ``check_progress`` holds a PROGRESS against what was sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from common.backoff import Backoff
from mobility.config import MobilityConfig
from mobility.link import Link, broken
from wire.protocol import (
    Frame,
    FrameType,
    ProtocolError,
    RemoteError,
    encode_json,
    raise_if_error,
)

log = structlog.get_logger("mobility")
REFUSED_GRACE = 5.0  # seconds of "connection refused" after which a resume gives up


@dataclass
class Conn:
    """The cycle's current connection: a resume replaces it."""

    link: Link


async def resume(connect: Callable[[], Awaitable[Link]], cfg: MobilityConfig, conn: Conn,
                 cycle: str, error: BaseException) -> Frame:
    """The connection broke mid-cycle: reconnect (``conn.link``, with ``connect``) and
    ask to resume ``cycle``; return the server's answer."""
    link = conn.link
    await link.close()
    if not link.resumable or cfg.resume_timeout_seconds <= 0:
        raise error
    deadline = time.monotonic() + cfg.resume_timeout_seconds
    refused_since: float | None = None
    # Not jittered, as before: one agent reconnecting to the server of its own cycle.
    backoff = Backoff(0.1, 5.0, jitter=False)
    log.warning("connection_lost_resuming", cycle=cycle,
                error=str(error) or type(error).__name__)
    while True:
        try:
            new = await connect()
            try:
                new.send(encode_json(FrameType.RESUME, {"cycle": cycle}))
                answer = await new.recv(cfg.connect_timeout_seconds)
                raise_if_error(answer)
                if answer.type not in (FrameType.PROGRESS, FrameType.ACK) or \
                        answer.json().get("cycle") != cycle:
                    raise ProtocolError("bad_resume",
                                        f"unexpected {answer.type.name} after RESUME")
            except BaseException:
                await new.close()
                raise
            conn.link = new
            return answer
        except Exception as e:
            busy = isinstance(e, RemoteError) and e.code == "busy"
            if not (busy or broken(e)):
                raise
            now = time.monotonic()
            if isinstance(e, ConnectionRefusedError):
                refused_since = refused_since or now
                if now - refused_since > REFUSED_GRACE:
                    raise
            else:
                refused_since = None
            delay = backoff.next()
            if now + delay > deadline:
                raise
            await asyncio.sleep(delay)


def progress_of(frame: Frame) -> tuple[int, tuple[int, int] | None]:
    doc = frame.json()
    blocks, pos = doc.get("blocks"), doc.get("position")
    if not isinstance(blocks, int) or blocks < 0:
        raise ProtocolError("bad_progress", "PROGRESS needs a block count")
    if pos is None:
        return blocks, None
    if not (isinstance(pos, list) and len(pos) == 2 and all(isinstance(x, int) for x in pos)):
        raise ProtocolError("bad_progress", "PROGRESS position must be [disk, block] or null")
    return blocks, (pos[0], pos[1])


def check_progress(frame: Frame, cycle: str, sent: int, last: tuple[int, int] | None) -> None:
    if frame.type != FrameType.PROGRESS or frame.json().get("cycle") != cycle:
        raise ProtocolError("bad_progress", f"unexpected {frame.type.name} instead of PROGRESS")
    if progress_of(frame) != (sent, last):
        raise ProtocolError("bad_progress",
                            f"the process server holds {progress_of(frame)} of the cycle, "
                            f"the agent sent {(sent, last)}")
