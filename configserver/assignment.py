"""Which process server takes a machine: the least-loaded healthy one, by what each one
measured and reported with its last heartbeat.

A process server is a *candidate* when it is healthy and has room:

- it heartbeated within ``thresholds.HEARTBEAT_CRITICAL_S`` (the clock of the
  ``procserver_heartbeat_missing`` alert; a failover uses ``procserver_failover_seconds``);
- its cache is at least ``thresholds.CACHE_FREE_WARNING`` free and its upload backlog is at
  most ``thresholds.BACKLOG_WARNING_S`` old (no cache or backlog alert);
- its uploads to the vault are not failing.

Among the candidates the least loaded wins, compared in this order: upload backlog (whole
minutes), cache use (tenths of the quota), agents (its open sessions, or the machines
assigned to it when more: an assigned agent not connected yet still comes), bytes per
second it is uploading, then the name. The explanation names every process server with
its figures and why one was not a candidate, so the job step that assigned a machine says
why it went where it went.

Every process server of one configuration server writes to the vault that server is
registered with: the candidates all share the machine's vault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from configserver import db, thresholds


@dataclass(frozen=True)
class Choice:
    """The chosen process server (None: no candidate) and why."""

    server: db.ProcessServer | None
    explanation: str


def _rate(bps: float) -> str:
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bps >= size:
            return f"{bps / size:.1f} {unit}"
    return f"{bps:.0f} B/s"


def agents(ps: db.ProcessServer, machines: Mapping[str, int]) -> int:
    """The agents a process server serves or is about to: its sessions, or the machines
    assigned to it when more."""
    return max(int(ps.sessions), int(machines.get(ps.name, 0)))


def unfit(ps: db.ProcessServer, now: float, up_since: float,
          silent_after: float | None = None) -> str | None:
    """Why ``ps`` cannot take a machine now, or None when it can (``silent_after``: how
    long a silence makes it dead; the heartbeat alert's by default)."""
    silent = thresholds.HEARTBEAT_CRITICAL_S if silent_after is None else silent_after
    if now - max(ps.last_contact, up_since) >= silent:
        return f"no heartbeat for {(now - ps.last_contact) / 60:.1f} min"
    if ps.storage_failing_since is not None:
        return "its uploads to the vault are failing"
    if ps.cache_free_ratio < thresholds.CACHE_FREE_WARNING:
        return f"cache only {ps.cache_free_ratio:.0%} free"
    if ps.backlog_seconds > thresholds.BACKLOG_WARNING_S:
        return f"upload backlog {ps.backlog_seconds / 60:.0f} min"
    return None


def load_key(ps: db.ProcessServer, machines: Mapping[str, int]
             ) -> tuple[int, int, int, float, str]:
    """What is compared between candidates, smallest first (see the module's docstring)."""
    return (int(ps.backlog_seconds // 60), round((1.0 - ps.cache_free_ratio) * 10),
            agents(ps, machines), float(ps.throughput_bps), ps.name)


def describe(ps: db.ProcessServer, machines: Mapping[str, int]) -> str:
    return (f"{ps.name} (backlog {ps.backlog_seconds:.0f} s, cache {ps.cache_free_ratio:.0%} "
            f"free, {agents(ps, machines)} agent(s), uploading {_rate(ps.throughput_bps)})")


def choose(servers: Iterable[db.ProcessServer], machines: Mapping[str, int], now: float,
           up_since: float, *, exclude: Iterable[str] = (),
           silent_after: float | None = None) -> Choice:
    """The least-loaded candidate among ``servers`` (``machines``: machines assigned per
    process server; ``exclude``: names never chosen, e.g. the one a machine leaves;
    ``silent_after`` as for ``unfit``)."""
    skip = set(exclude)
    fit: list[db.ProcessServer] = []
    notes: list[str] = []
    for ps in sorted(servers, key=lambda p: p.name):
        if ps.name in skip:
            continue
        why = unfit(ps, now, up_since, silent_after)
        if why is None:
            fit.append(ps)
        else:
            notes.append(f"{ps.name}: {why}")
    if not fit:
        return Choice(None, "no healthy process server with room" +
                      (f" ({'; '.join(notes)})" if notes else " (none other is registered)"))
    fit.sort(key=lambda p: load_key(p, machines))
    best, rest = fit[0], fit[1:]
    text = f"least loaded: {describe(best, machines)}"
    if rest:
        text += "; then " + ", ".join(describe(p, machines) for p in rest)
    if notes:
        text += "; not candidates: " + "; ".join(notes)
    return Choice(best, text)
