"""The point manifests a process has opened, by vault and store name, at the version the
store listed them (``BlobInfo.version``); ``Vault.scan_points`` reads again only a
manifest whose version changed.

Each vault object has a cache of its own unless it is given one to share: the
configuration server gives its recovery jobs one, so the drills and failovers of a
plan's items — each its own job, each with a vault object of its own, all selecting
their points at once — read each manifest once between them: a read in flight is
shared too. A cache is keyed by the store's URL and the vault's id, so vault objects of
other vaults never see each other's points. What is cached was authenticated by the
vault's key when it was read; a manifest written again (a rebase, a tampering) has
another version and is read, and opened, again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vault import names
from vault.crypto import Keyring
from vault.errors import IntegrityError, NotFoundError
from vault.point import Point, open_point
from vault.store.protocol import BlobInfo, BlobStore

MANIFEST_READS = 32  # manifests read at once by ``scan_points``

#: what a read of one manifest gives: its point, the error that it does not
#: authenticate, or None when it was deleted since the listing
Opened = Point | Exception | None


@dataclass
class PointScan:
    """What ``Vault.scan_points`` found: the intact points, oldest first, and the
    manifests that failed to authenticate, as ``(store name, error)``."""

    points: list[Point] = field(default_factory=list)
    damaged: list[tuple[str, IntegrityError]] = field(default_factory=list)


class ManifestCache:
    def __init__(self) -> None:
        self._opened: dict[str, dict[str, tuple[str, Point]]] = {}
        self._reading: dict[tuple[str, str, str], asyncio.Future[Opened]] = {}

    def of(self, vault: str) -> dict[str, tuple[str, Point]]:
        """The manifests opened of ``vault`` (store URL and vault id): store name →
        (version, point)."""
        return self._opened.setdefault(vault, {})

    def known(self, vault: str, info: BlobInfo) -> Point | None:
        """The point of the manifest ``info`` names, if opened before at its version."""
        got = self._opened.get(vault, {}).get(info.name)
        return got[1] if got is not None and info.version and got[0] == info.version \
            else None

    async def read(self, vault: str, info: BlobInfo,
                   read: Callable[[], Awaitable[Opened]]) -> Opened:
        """The manifest ``info`` names: opened before at this version, or being read
        (the same vault, name and version), or ``read()`` now — and kept once opened,
        before the scans waiting for it go on: one request a manifest however many
        scans want it."""
        if not info.version:
            return await read()
        if (point := self.known(vault, info)) is not None:
            return point  # opened by another scan since this one listed
        opened = self.of(vault)
        key = (vault, info.name, info.version)
        while (reading := self._reading.get(key)) is not None:
            try:  # another scan reads it: its result
                return await asyncio.shield(reading)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not reading.cancelled() or (task is not None and task.cancelling()):
                    raise
                # that scan was cancelled, not this one: read it here
        mine: asyncio.Future[Opened] = asyncio.get_running_loop().create_future()
        self._reading[key] = mine
        try:
            got = await read()
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                mine.cancel()
            else:
                mine.set_exception(e)
                mine.exception()  # retrieved: each scan that waited raises it
            raise
        finally:
            del self._reading[key]
        if isinstance(got, Point):  # this version, or a newer one
            opened[info.name] = (info.version, got)
        else:
            opened.pop(info.name, None)
        mine.set_result(got)
        return got


async def scan_points(store: BlobStore, keyring: Keyring, cache: ManifestCache,
                  vault: str, machine: str | None = None) -> PointScan:
    """``Vault.scan_points``: the manifests of ``vault`` (its store's URL and its id) in
    ``store``, opened with ``keyring``, through ``cache``."""
    scan = PointScan()
    opened = cache.of(vault)

    async def open_one(name: str) -> Opened:
        try:
            return open_point(keyring, name[len(names.POINTS):], await store.get(name))
        except NotFoundError:
            return None  # deleted since the listing (a prune forgot it)
        except IntegrityError as e:
            return e

    async def read(info: BlobInfo) -> None:
        got = await cache.read(vault, info, lambda: open_one(info.name))
        if isinstance(got, Point):
            found(got)
        elif isinstance(got, IntegrityError):
            scan.damaged.append((info.name, got))

    def found(p: Point) -> None:
        if machine is None or p.machine == machine:
            scan.points.append(p)

    listed = [info async for info in store.list(names.POINTS)]
    unread: list[BlobInfo] = []
    for info in listed:
        if (point := cache.known(vault, info)) is not None:
            found(point)
        else:
            unread.append(info)
    # Forget what is no longer listed: the cache holds at most the vault's points.
    if len(opened) > len(listed) - len(unread):
        names_listed = {info.name for info in listed}
        for gone in [n for n in opened if n not in names_listed]:
            del opened[gone]
    # A few manifests in flight at a time: one after the other, a vault of many
    # points on a remote store takes a round trip per point (README "Manifests").
    for i in range(0, len(unread), MANIFEST_READS):
        await asyncio.gather(*(read(info) for info in unread[i:i + MANIFEST_READS]))
    scan.points.sort(key=lambda p: (p.created, p.id))
    scan.damaged.sort(key=lambda d: d[0])
    return scan
