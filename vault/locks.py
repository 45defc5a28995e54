"""Lock objects: writers share the vault, prune excludes them; leases (below) keep what
a cycle in progress wrote while its writer lets the lock go.

A lock is a sealed JSON object ``locks/<random id>``: ``{"kind": "shared" |
"exclusive", "holder": "host:pid", "purpose", "created", "expires"}`` (times in
Unix seconds). Process servers hold a shared lock while they upload a cycle;
prune holds an exclusive one. Acquiring writes the lock, then lists the others:

- shared: if a live exclusive lock or intent exists, withdraw and wait;
- exclusive: if any other live lock exists (intents aside), withdraw and wait.

Writers are preferred: an exclusive contender that has to wait writes an *intent*
(``"kind": "intent"``, refreshed every ``INTENT_REFRESH`` seconds, expiring after
``INTENT_TTL``) for as long as it waits, so no new shared lock is granted meanwhile;
holders of shared locks that renew their holds poll ``exclusive_waiting`` and let
theirs go at their next pause (procserver/vaultlock.py), so the exclusive one gets in
within a bounded time even while uploads never stop.

Two contenders that both see each other both withdraw and retry after a random
delay. A holder refreshes its lock before it expires; a lock past its expiry, or
held by a process of this host that no longer runs, is stale and is ignored. An
exclusive holder deletes stale locks; ``siterecovery unlock`` removes them too,
``--all`` every lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import structlog

from common.backoff import Backoff
from vault import names
from vault.crypto import ObjectType, seal, unseal
from vault.errors import IntegrityError, NotFoundError, VaultError
from vault.repo import Vault

log = structlog.get_logger("vault.locks")
TTL = 30 * 60.0
REFRESH = 5 * 60.0
INTENT = "intent"  # an exclusive contender waiting: no new shared lock meanwhile
INTENT_TTL = 120.0  # short: a contender that died holds up no writer for long
INTENT_REFRESH = 30.0


class LockedError(VaultError):
    """The vault is locked by another holder."""


@dataclass(frozen=True)
class LockInfo:
    id: str
    kind: str
    holder: str
    purpose: str
    created: float
    expires: float

    def stale(self, now: float) -> bool:
        """Expired, or held by a process of this host that no longer exists."""
        if self.expires < now:
            return True
        host, _, pid = self.holder.rpartition(":")
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


def _encode(vault: Vault, lock_id: str, kind: str, purpose: str, now: float) -> bytes:
    ttl = INTENT_TTL if kind == INTENT else TTL
    body = json.dumps({"kind": kind, "holder": f"{socket.gethostname()}:{os.getpid()}",
                       "purpose": purpose, "created": now, "expires": now + ttl}).encode()
    return seal(vault.keyring.aead(ObjectType.LOCK, lock_id), ObjectType.LOCK, lock_id, body)


async def list_locks(vault: Vault) -> tuple[list[LockInfo], list[str]]:
    """Every lock object, and the names of those that fail to authenticate."""
    out, bad = [], []
    async for info in vault.store.list(names.LOCKS):
        lock_id = info.name[len(names.LOCKS):]
        try:
            raw = await vault.store.get(info.name)
            doc = json.loads(unseal(vault.keyring.aead(ObjectType.LOCK, lock_id),
                                    ObjectType.LOCK, lock_id, raw, max_size=1 << 16))
            out.append(LockInfo(lock_id, str(doc["kind"]), str(doc["holder"]),
                                str(doc.get("purpose", "")), float(doc["created"]),
                                float(doc["expires"])))
        except NotFoundError:
            continue  # released while we listed
        except (IntegrityError, ValueError, KeyError, TypeError):
            bad.append(info.name)
    return out, bad


async def remove_locks(vault: Vault, *, all_locks: bool = False) -> list[LockInfo]:
    """Delete stale locks (every lock with ``all_locks``); return what was removed."""
    locks, bad = await list_locks(vault)
    now = time.time()
    gone = [lk for lk in locks if all_locks or lk.stale(now)]
    for lk in gone:
        await vault.store.delete(names.LOCKS + lk.id)
    for name in bad:  # unreadable lock objects can only be noise or tampering
        await vault.store.delete(name)
    return gone


class Lock:
    """A held lock; refreshes itself until released."""

    def __init__(self, vault: Vault, lock_id: str, kind: str, purpose: str) -> None:
        self.vault, self.id, self.kind, self.purpose = vault, lock_id, kind, purpose
        self._task: asyncio.Task[None] | None = None

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(INTENT_REFRESH if self.kind == INTENT else REFRESH)
            await self.vault.store.put(names.LOCKS + self.id,
                                       _encode(self.vault, self.id, self.kind, self.purpose,
                                               time.time()))

    def start_refresh(self) -> None:
        self._task = asyncio.create_task(self._refresh(), name=f"lock-refresh-{self.id[:8]}")

    async def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.vault.store.delete(names.LOCKS + self.id)


async def try_acquire(vault: Vault, kind: str, purpose: str) -> Lock | LockInfo:
    """Take a lock, or return the live lock that is in the way (ours withdrawn)."""
    lock_id = names.random_id()
    await vault.store.put(names.LOCKS + lock_id,
                          _encode(vault, lock_id, kind, purpose, time.time()))
    locks, _bad = await list_locks(vault)
    now = time.time()
    for other in locks:
        if other.id == lock_id or other.stale(now):
            continue
        if kind == "exclusive" and other.kind == INTENT:
            continue  # intents hold up shared locks only
        if kind == "exclusive" or other.kind in ("exclusive", INTENT):
            await vault.store.delete(names.LOCKS + lock_id)
            return other
    if kind == "exclusive":  # sole holder now: clear what dead holders left behind
        for other in locks:
            if other.id != lock_id and other.stale(now):
                await vault.store.delete(names.LOCKS + other.id)
    lock = Lock(vault, lock_id, kind, purpose)
    lock.start_refresh()
    return lock


async def acquire(vault: Vault, kind: str, purpose: str, *, wait: float = 0.0) -> Lock:
    """Take a ``shared`` or ``exclusive`` lock, waiting up to ``wait`` seconds
    (``LockedError`` then); the caller releases it."""
    deadline = time.monotonic() + wait
    backoff = Backoff(base=0.05, cap=5.0)
    intent: Lock | None = None  # an exclusive contender's, while it waits
    try:
        while True:
            got = await try_acquire(vault, kind, purpose)
            if isinstance(got, Lock):
                return got
            if time.monotonic() >= deadline:
                raise LockedError(
                    f"the vault is locked ({got.kind}) by {got.holder} for {got.purpose!r} "
                    f"until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(got.expires))} "
                    "UTC; if that holder is gone, run 'siterecovery unlock'")
            if kind == "exclusive" and intent is None:
                intent = await _announce(vault, purpose)
            log.info("vault_locked_waiting", holder=got.holder, kind=got.kind)
            await asyncio.sleep(min(backoff.next(), max(0.0, deadline - time.monotonic())))
    finally:
        if intent is not None:
            await asyncio.shield(_withdraw(intent))


async def _announce(vault: Vault, purpose: str) -> Lock:
    """Write and keep refreshing an intent: an exclusive contender waits."""
    lock_id = names.random_id()
    await vault.store.put(names.LOCKS + lock_id,
                          _encode(vault, lock_id, INTENT, purpose, time.time()))
    intent = Lock(vault, lock_id, INTENT, purpose)
    intent.start_refresh()
    return intent


async def _withdraw(intent: Lock) -> None:
    try:
        await intent.release()
    except Exception as e:  # it expires within INTENT_TTL
        log.warning("vault_lock_intent_left", error=str(e), error_type=type(e).__name__,
                    hint=f"it expires within {INTENT_TTL:.0f} s")


async def exclusive_waiting(vault: Vault) -> LockInfo | None:
    """A live exclusive lock or intent (an exclusive contender waits), if any: holders of
    shared locks let theirs go at their next pause."""
    locks, _bad = await list_locks(vault)
    now = time.time()
    return next((lk for lk in locks if lk.kind in ("exclusive", INTENT)
                 and not lk.stale(now)), None)


@contextlib.asynccontextmanager
async def locked(vault: Vault, kind: str, purpose: str, *, wait: float = 0.0
                 ) -> AsyncIterator[Lock]:
    """Hold a ``shared`` or ``exclusive`` lock for the block; wait up to ``wait`` seconds."""
    got = await acquire(vault, kind, purpose, wait=wait)
    try:
        yield got
    finally:
        await got.release()


# -- leases: what a cycle in progress has in the vault ---------------------------------------
#
# A writer that lets its shared lock go between writes (a process server waiting for a
# cycle's next segment) leaves blocks in the vault that no point references yet: blocks
# its packs hold, and blocks already stored that it found there instead of storing them
# again. A prune must keep both. Each checkpoint of such a cycle writes, under the
# shared lock, one *lease part* ``leases/<lease id>/<random part id>`` (sealed, type 8):
# a JSON header line ``{"machine", "cycle", "base", "created", "expires"}`` then the
# block ids its changes reference, 32 bytes each. The lease id is derived from the
# machine and cycle (``lease_id``), so a restarted writer finds its parts again. A lease
# is live while any of its parts has not expired (each part extends it); prune keeps
# the blocks and the base point of every live lease and deletes expired ones. The
# writer deletes its lease once the cycle's point is written or the cycle is dropped.

LEASES = "leases/"
LEASE_TTL = 24 * 3600.0
MAX_LEASE_PART = 64 << 20


def lease_id(vault: Vault, machine: str, cycle: str) -> str:
    """The id of the lease of ``machine``'s ``cycle`` (the same in every run)."""
    return vault.keyring.name_for("lease", machine, cycle)


async def put_lease_part(vault: Vault, machine: str, cycle: str, base: str | None,
                         blocks: Iterable[bytes], *, now: float | None = None) -> str:
    """Write one part of the lease of ``machine``'s ``cycle`` (built on point ``base``),
    holding ``blocks``, live for ``LEASE_TTL`` from ``now``; return its name."""
    now = time.time() if now is None else now
    name = f"{LEASES}{lease_id(vault, machine, cycle)}/{names.random_id()}"
    header = json.dumps({"machine": machine, "cycle": cycle, "base": base, "created": now,
                         "expires": now + LEASE_TTL}).encode()
    body = header + b"\n" + b"".join(blocks)
    await vault.store.put(name, seal(vault.keyring.aead(ObjectType.LEASE, name),
                                     ObjectType.LEASE, name, body))
    return name


async def delete_lease(vault: Vault, machine: str, cycle: str) -> int:
    """Delete every part of the lease of ``machine``'s ``cycle``; return how many."""
    prefix = f"{LEASES}{lease_id(vault, machine, cycle)}/"
    gone = [info.name async for info in vault.store.list(prefix)]
    for name in gone:
        await vault.store.delete(name)
    return len(gone)


@dataclass
class Leases:
    """What the live leases of a vault hold: the base points a prune keeps, and the parts
    whose blocks it keeps (read again a part at a time by ``leased_blocks``: a lease of
    a long cycle holds 32 bytes a block, never gathered whole)."""

    cycles: set[tuple[str, str]] = field(default_factory=set)  # (machine, cycle)
    bases: set[str] = field(default_factory=set)
    live: list[str] = field(default_factory=list)  # names of the parts of live leases
    blocks: int = 0  # how many block ids the live parts hold (some may be in several)
    expired: list[str] = field(default_factory=list)  # names of the parts of dead leases
    bad: list[str] = field(default_factory=list)  # parts that fail to authenticate


class LeaseChangedError(VaultError):
    """A live lease's part vanished or changed between two reads of a prune."""


async def _read_part(vault: Vault, name: str) -> _Part:
    """One lease part, unsealed and parsed; ``NotFoundError`` if it is gone, ``IntegrityError``
    or ``ValueError`` (and the like) if it is not a lease part."""
    raw = await vault.store.get(name)
    plain = unseal(vault.keyring.aead(ObjectType.LEASE, name), ObjectType.LEASE, name, raw,
                   max_size=MAX_LEASE_PART)
    del raw  # a part is up to 1.3 MB: held once, not three times (sealed, plain, ids)
    nl = plain.find(b"\n")
    doc = json.loads(plain[:nl] if nl >= 0 else plain)
    ids = memoryview(plain)[nl + 1:] if nl >= 0 else memoryview(b"")
    if len(ids) % 32:
        raise ValueError("lease part: block ids are 32 bytes each")
    return _Part(name, str(doc["machine"]), str(doc["cycle"]),
                 str(doc["base"]) if doc["base"] else None, float(doc["expires"]), ids)


_BAD_PART = (IntegrityError, ValueError, KeyError, TypeError)


async def read_leases(vault: Vault, now: float | None = None) -> Leases:
    """Every lease of the vault: the live ones' cycles, bases and parts, the expired ones'
    parts. A part that fails to authenticate is listed in ``bad`` and keeps nothing.
    Holds one part at a time (at most ``MAX_LEASE_PART``), not their blocks."""
    now = time.time() if now is None else now
    parts: dict[str, list[tuple[_Part, int]]] = {}  # by lease: (part, its block count)
    out = Leases()
    async for info in vault.store.list(LEASES):
        lid = info.name[len(LEASES):].split("/", 1)[0]
        try:
            part = await _read_part(vault, info.name)
            count = len(part.ids) // 32
            part = dataclasses.replace(part, ids=b"")
        except NotFoundError:
            continue  # deleted while we listed
        except _BAD_PART:
            out.bad.append(info.name)
            continue
        parts.setdefault(lid, []).append((part, count))
    for lease in parts.values():
        if max(p.expires for p, _n in lease) < now:
            out.expired += [p.name for p, _n in lease]
            continue
        for p, n in lease:
            out.cycles.add((p.machine, p.cycle))
            if p.base is not None:
                out.bases.add(p.base)
            out.live.append(p.name)
            out.blocks += n
    return out


async def leased_blocks(vault: Vault, leases: Leases) -> AsyncIterator[list[bytes]]:
    """The block ids of the live leases, a part's at a time. A prune reads them under the
    vault's exclusive lock, when no writer changes a lease: a part gone or damaged since
    ``read_leases`` raises ``LeaseChangedError`` rather than keep too little."""
    for name in leases.live:
        try:
            ids = bytes((await _read_part(vault, name)).ids)  # the part goes: one copy held
        except NotFoundError:
            raise LeaseChangedError(f"lease part {name} vanished while a prune read the "
                                    "leases; run the prune again") from None
        except _BAD_PART as e:
            raise LeaseChangedError(f"lease part {name} changed while a prune read the "
                                    f"leases ({e}); run the prune again") from None
        yield [ids[i:i + 32] for i in range(0, len(ids), 32)]


@dataclass(frozen=True)
class _Part:
    name: str
    machine: str
    cycle: str
    base: str | None
    expires: float
    ids: bytes | memoryview  # of the part's plaintext
