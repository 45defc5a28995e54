"""The daemon's tasks, supervised: nothing runs unseen.

Two kinds of task:

- **services** (``start``): long-lived loops the daemon cannot do without (uploader,
  reporter, trust list, policies, the vault opener, the accept loops). One that returns
  has finished its job; one that raises has *crashed*: it is logged ``task_crashed``
  (its name and the error) at once and ``failed`` resolves with the error, so the
  daemon stops and exits non-zero instead of limping on without it.
- **work** (``spawn``): bounded tasks such as one connection, or a wake-up. Shutdown
  waits for them within a grace period, then cancels the rest. An error escaping one
  is logged ``task_crashed`` too, but only that task ends.

This is ``asyncio.TaskGroup``'s contract (a crash is seen at once) for a daemon whose
start and stop are separate calls; shutdown order is the caller's: stop accepting
(``cancel`` those services), ``drain`` the work, ``cancel`` the rest, close resources.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any

import structlog

log = structlog.get_logger("procserver")


class TaskCrashedError(RuntimeError):
    """A service task ended with an error."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(f"task {name!r} crashed: {type(error).__name__}: {error}")
        self.name, self.error = name, error


class Supervisor:
    def __init__(self) -> None:
        self._services: dict[str, asyncio.Task[Any]] = {}
        self._work: set[asyncio.Task[Any]] = set()
        self._failed: asyncio.Future[TaskCrashedError] | None = None

    @property
    def failed(self) -> asyncio.Future[TaskCrashedError]:
        """Resolves with the first crash of a service (never, if none crashes)."""
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        return self._failed

    def start(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a service under ``name`` (unique among the services)."""
        if name in self._services:
            coro.close()
            raise ValueError(f"a service named {name!r} runs already")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._services[name] = task
        task.add_done_callback(self._service_done)
        return task

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None
              ) -> asyncio.Task[Any]:
        """Run a bounded piece of work that shutdown waits for (``drain``)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._work.add(task)
        task.add_done_callback(self._work_done)
        return task

    def _crashed(self, task: asyncio.Task[Any]) -> BaseException | None:
        if task.cancelled():
            return None
        e = task.exception()  # retrieved here: never "exception was never retrieved"
        if e is not None:
            log.error("task_crashed", task=task.get_name(), error=str(e) or type(e).__name__,
                      error_type=type(e).__name__)
        return e

    def _service_done(self, task: asyncio.Task[Any]) -> None:
        e = self._crashed(task)
        if e is not None and not self.failed.done():
            self.failed.set_result(TaskCrashedError(task.get_name(), e))

    def _work_done(self, task: asyncio.Task[Any]) -> None:
        self._work.discard(task)
        self._crashed(task)

    @property
    def running(self) -> list[str]:
        """The names of the services still running."""
        return [n for n, t in self._services.items() if not t.done()]

    async def cancel(self, names: Iterable[str] | None = None) -> int:
        """Cancel the named services (all when ``None``) and wait for them; return how
        many were still running."""
        tasks = [t for n, t in self._services.items()
                 if (names is None or n in names) and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for the work to finish, cancel what is left and wait
        for it; return how many were cancelled."""
        if not self._work:
            return 0
        _done, pending = await asyncio.wait(set(self._work), timeout=grace)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)
