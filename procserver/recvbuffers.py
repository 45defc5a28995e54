"""Received bytes held in memory, across sessions: bounded, and measured.

Bytes are held twice over on their way to the cache: in the connections' receive
buffers (``FrameStream.buffered``: not yet parsed) and queued for the cache writer
threads (``SegmentSink``: not yet written). The queued bytes are at most
``limit`` across the sessions receiving (each may always have ``SINK_MIN``), so a
burst rides out a briefly slow writer in bounded memory.
"""

from __future__ import annotations

from procserver.framestream import FrameStream

SINK_MIN = 1 << 20


class ReceiveBuffers:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # receive_buffer_bytes
        self.streams: set[FrameStream] = set()  # connections open now
        self.receiving = 0  # sessions receiving a cycle now
        self._queued = self._queued_total = 0

    def note_queued(self, n: int) -> None:
        """Bytes handed to the cache writers (> 0) or written or dropped by them (< 0)."""
        self._queued += n
        if n > 0:
            self._queued_total += n

    @property
    def buffered(self) -> int:
        """Bytes received and held in memory: not yet parsed, or not yet written."""
        return self._queued + sum(s.buffered for s in self.streams)

    @property
    def written(self) -> int:
        """Frame bytes written to HRL segments since start (sealed or not)."""
        return self._queued_total - self._queued

    def sink_budget(self) -> int:
        """How much one receiving session may have queued for its cache writer."""
        return max(SINK_MIN, self.limit // max(1, self.receiving))
