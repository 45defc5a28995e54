"""``siterecovery instant serve``: serve a recovery point's disk over NBD from the vault,
hydrating a local overlay in the background (instant/)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import structlog

from common.pacing import Schedule, TokenBucket
from instant.hydrate import HydrationProgress, hydrate
from instant.overlay import OverlayBusy, OverlayMismatch
from instant.pointdisk import PointDisk
from instant.server import NbdServer, SocketInUse
from siterecovery.argtypes import mbps
from siterecovery.daemon import StopSignals, port_number
from siterecovery.errors import EXIT_OK, CliError, UsageError, exit_code
from siterecovery.output import add_json_arg
from siterecovery.progress import Progress
from siterecovery.vaultopts import add_vault_args, open_vault
from vault import names
from vault.point import Point
from vault.select import SPECS, select_point

log = structlog.get_logger("siterecovery.instant")


def _disk_of(point: Point, disk: str | None) -> str:
    have = [d.disk for d in point.disks]
    if disk is None:
        if len(have) == 1:
            return have[0]
        raise UsageError(f"point {point.id[:16]} has {len(have)} disks ({', '.join(have)}): "
                         "pick one with --disk")
    if disk not in have:
        raise UsageError(f"point {point.id[:16]} has no disk {disk!r}; its disks: "
                         f"{', '.join(have)}")
    return disk


def _say(args: argparse.Namespace, doc: dict[str, object], human: str) -> None:
    print(json.dumps(doc) if args.json else human, flush=True)


async def cmd_instant_serve(args: argparse.Namespace) -> int:
    signals = StopSignals()  # first: a SIGTERM while the vault opens is a clean stop too
    v = await open_vault(args)
    executor = ThreadPoolExecutor(2, thread_name_prefix="instant")
    disk: PointDisk | None = None
    server: NbdServer | None = None
    task: asyncio.Task[None] | None = None
    failed: BaseException | None = None
    try:
        scan = await v.scan_points()
        for name, e in scan.damaged:  # as restore: a damaged manifest may be the one asked
            if args.point in SPECS or name[len(names.POINTS):].startswith(args.point):
                raise e
        point = select_point(scan.points, args.point, machine=args.machine or None)
        disk_name = _disk_of(point, args.disk)
        try:
            disk = await PointDisk.open(v, point, disk_name, args.overlay, executor=executor)
        except (OverlayMismatch, OverlayBusy) as e:
            raise CliError(str(e)) from None
        server = NbdServer({"": disk, disk_name: disk}, socket_path=args.socket,
                           tcp_port=args.tcp_port)
        try:
            await server.start()
        except SocketInUse as e:
            raise CliError(str(e)) from None
        ov = disk.overlay
        _say(args, {"event": "serving", "uri": server.uri, "socket": args.socket,
                    "tcp": server.tcp_address and list(server.tcp_address),
                    "point": point.id, "machine": point.machine, "disk": disk_name,
                    "size": disk.size, "overlay": str(ov.folder),
                    "image": str(ov.image_path), "present_blocks": ov.present_count,
                    "total_blocks": ov.nblocks},
             f"serving {point.machine}/{disk_name} at {point.created} ({point.consistency}) "
             f"as {server.uri}\noverlay {ov.folder}: {ov.present_count} of {ov.nblocks} "
             "blocks local")
        if not args.no_hydrate:
            rate = args.hydrate_rate
            bucket = TokenBucket(Schedule.from_mbps(rate, rate)) if rate else None
            bar = Progress(f"hydrate {disk_name}", quiet=args.json)
            last_pct = -1

            def progress(pr: HydrationProgress) -> None:
                nonlocal last_pct
                bar(pr.done * ov.block_size, pr.total * ov.block_size)
                pct = pr.done * 100 // max(1, pr.total)
                if args.json and pct != last_pct:  # one line per percent at most
                    last_pct = pct
                    print(json.dumps({"event": "hydrating", "present_blocks": pr.done,
                                      "total_blocks": pr.total,
                                      "fetched_bytes": pr.fetched_bytes}), flush=True)

            task = asyncio.create_task(hydrate(disk, bucket, progress=progress))
        stop = asyncio.create_task(signals.wait())
        waits: set[asyncio.Future[None]] = {stop}
        if task is not None:
            waits.add(task)
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if task is not None and task in done:
            if task.exception() is None:
                _say(args, {"event": "hydrated", "image": str(ov.image_path),
                            "total_blocks": ov.nblocks},
                     f"hydration complete: {ov.image_path} holds the whole disk; serving on "
                     "until stopped")
            else:
                failed = task.exception()
                log.error("hydration_failed", error=str(failed))
                print(f"error: hydration stopped: {failed}; still serving what can be read",
                      file=sys.stderr, flush=True)
            await stop
        stop.cancel()
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server is not None:
            await server.stop()
        if disk is not None:
            await disk.flush()
            await disk.close()
        await v.close()
        executor.shutdown()
    present = disk.overlay.present_count if disk is not None else 0
    total = disk.overlay.nblocks if disk is not None else 0
    _say(args, {"event": "stopped", "present_blocks": present, "total_blocks": total},
         f"stopped; {present} of {total} blocks local")
    if failed is not None:
        return exit_code(failed) or 1
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ip = sub.add_parser("instant", help="instant recovery: serve a recovery point's disk "
                                        "over NBD straight from the vault")
    isub = ip.add_subparsers(dest="instant_cmd", required=True)
    s = isub.add_parser(
        "serve", help="serve one disk of a recovery point over NBD while hydrating it",
        description="Serve one disk of a recovery point over the NBD protocol on a UNIX "
                    "socket, straight from the vault: a VM (QEMU/libvirt) or a tool "
                    "(qemu-img, nbdcopy) can use it at once. Blocks are fetched from the "
                    "vault on first read, authenticated, and kept in a local overlay "
                    "(OVERLAY/disk.img, sparse, with a durable present-bitmap); writes go "
                    "to the overlay only, never to the vault. In the background every other "
                    "block is copied into the overlay at --hydrate-rate; when that is done "
                    "OVERLAY/disk.img is the whole disk. Run again with the same --overlay "
                    "after a stop or a crash: it resumes from what the overlay holds. "
                    "Serves until SIGTERM/SIGINT. Needs only the vault and its key. The "
                    "disk is the default export (nbd+unix:///?socket=PATH) and the export "
                    "named DISK. With --json, stdout carries, besides the JSON log events, "
                    "one JSON line per state: event 'serving' (with the URI), 'hydrating' "
                    "(at most one a percent), 'hydrated', 'stopped'.")
    add_vault_args(s)
    s.add_argument("--machine", help="the protected machine (needed if the vault has several)")
    s.add_argument("--point", default="latest",
                   help="latest | latest-app-consistent | latest-crash-consistent | ID "
                        "(a unique prefix is enough); default: latest")
    s.add_argument("--disk", help="the disk to serve (needed if the point has several)")
    s.add_argument("--socket", required=True, metavar="PATH",
                   help="UNIX socket to listen on; the URI is nbd+unix:///?socket=PATH")
    s.add_argument("--tcp-port", type=port_number, metavar="PORT",
                   help="also listen on 127.0.0.1:PORT (loopback only; no TLS)")
    s.add_argument("--overlay", required=True, metavar="DIR",
                   help="overlay directory (created if need be; one served disk per "
                        "directory)")
    s.add_argument("--hydrate-rate", type=mbps, default=0.0, metavar="MBPS",
                   help="background copy rate from the vault in Mbit/s (0: unlimited; "
                        "the default)")
    s.add_argument("--no-hydrate", action="store_true",
                   help="fetch blocks only when they are read")
    add_json_arg(s)
    s.set_defaults(func=cmd_instant_serve, daemon=True)
