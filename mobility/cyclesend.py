"""Sending a cycle over the connection, resuming when it breaks: the blocks (``Sender``)
and SYNC while the snapshot is held, then END until its ACK.

Before the hold is released, a SYNC makes every block durable, so that after it a
broken connection needs nothing but END again (``resume.py``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from mobility.config import MobilityConfig
from mobility.link import Link, broken
from mobility.resume import Conn, check_progress, progress_of, resume
from mobility.sender import Sender
from wire.protocol import FrameType, ProtocolError, encode_json, raise_if_error

log = structlog.get_logger("mobility")
Connect = Callable[[], Awaitable[Link]]


async def send_blocks(connect: Connect, cfg: MobilityConfig, conn: Conn,
                      sender: Sender) -> int:
    """Send every changed block of the cycle (resuming after broken connections) and,
    on a resumable link, make it durable: after this only END is left. Returns the
    resumes."""
    cycle, resumes = sender.cycle, 0
    while True:
        link = conn.link
        try:
            await sender.send(link)
            if link.resumable:
                # Everything durable before the snapshot is let go: after it, a
                # resume needs nothing but END.
                link.send(encode_json(FrameType.SYNC, {"cycle": cycle}))
                p = await link.recv(cfg.ack_timeout_seconds)
                raise_if_error(p)
                check_progress(p, cycle, sender.sent, sender.last)
            return resumes
        except Exception as e:
            if not broken(link.why(e)):
                raise link.why(e) from e
            answer = await resume(connect, cfg, conn, cycle, e)
            resumes += 1
            if answer.type != FrameType.PROGRESS:
                raise ProtocolError("bad_resume", "the process server says a cycle "
                                    "still being sent is complete") from e
            blocks, position = progress_of(answer)
            log.info("cycle_resumed", cycle=cycle, blocks=blocks, position=position,
                     sent_before=sender.sent)
            sender.rewind(blocks, position)


async def end_cycle(connect: Connect, cfg: MobilityConfig, conn: Conn, sender: Sender,
                    created: str) -> int:
    """Send END until the process server acknowledges the cycle; returns the resumes."""
    cycle, resumes = sender.cycle, 0
    end = encode_json(FrameType.END, {"cycle": cycle, "digests": sender.digests(),
                                      "created": created, "blocks": sender.sent})
    while True:
        try:
            conn.link.send(end)
            await conn.link.drain()
            ack = await conn.link.recv(cfg.ack_timeout_seconds)
            raise_if_error(ack)
            if ack.type != FrameType.ACK or ack.json().get("cycle") != cycle:
                raise ProtocolError("bad_ack", f"unexpected {ack.type.name} instead of ACK")
            return resumes
        except Exception as e:
            if not broken(conn.link.why(e)):
                raise conn.link.why(e) from e
            answer = await resume(connect, cfg, conn, cycle, e)
            resumes += 1
            if answer.type == FrameType.ACK:
                return resumes  # END had arrived; only its ACK was lost
            # Everything was durable (SYNC): only END needs sending again.
            check_progress(answer, cycle, sender.sent, sender.last)
