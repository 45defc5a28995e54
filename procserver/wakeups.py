"""Edge-triggered wake-ups without lost signals: register, check, then wait."""

from __future__ import annotations

import asyncio


class Wakeups:
    """Every registered event is set by ``fire``. A waiter registers before it looks at
    what it waits for, so a change between its look and its wait still wakes it."""

    def __init__(self) -> None:
        self._events: set[asyncio.Event] = set()

    def fire(self) -> None:
        for ev in self._events:
            ev.set()

    def register(self) -> asyncio.Event:
        ev = asyncio.Event()
        self._events.add(ev)
        return ev

    def forget(self, ev: asyncio.Event) -> None:
        self._events.discard(ev)
