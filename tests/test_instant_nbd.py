"""instant/: a recovery point's disk served over NBD from the vault, proved with real NBD
clients (qemu-img, nbdinfo, nbdcopy) against the point restored to a raw file, and with
a raw protocol client for writes and malformed input."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import struct
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.digest import digest_of_fingerprint_map, fingerprint
from instant import protocol as p
from instant.hydrate import HydrationProgress, hydrate
from instant.overlay import Overlay, OverlayBusy, OverlayHeader, OverlayMismatch
from instant.pointdisk import PointDisk
from instant.server import NbdServer, SocketInUse
from tests.helpers import BLOCK, make_vault, open_vault, write_full_point
from vault.point import Point
from vault.restore import restore_point
from vault.writer import CycleWriter, DiskSpec

NBLOCKS = 48
SIZE = NBLOCKS * BLOCK + 12 * 1024  # a short last block


def zero_block(n: int) -> bool:
    return n % 5 == 0 and n != NBLOCKS  # the short last block holds data


def make_data(seed: int = 19) -> bytes:
    rng = random.Random(seed)
    blocks = []
    for n in range(NBLOCKS + 1):
        ln = BLOCK if n < NBLOCKS else SIZE - NBLOCKS * BLOCK
        if zero_block(n):
            blocks.append(bytes(ln))
        elif n == 7:
            blocks.append(blocks[3])  # stored once, at two block numbers
        else:
            blocks.append(rng.randbytes(ln // 2) + bytes(ln // 4) + rng.randbytes(ln - ln // 2
                                                                                 - ln // 4))
    return b"".join(blocks)


@dataclass
class Site:
    root: Path
    vault_dir: Path
    key: Path
    point: Point
    reference: Path  # the point restored to a raw file
    data: bytes


def _blocks(data: bytes) -> list[bytes]:
    return [data[n * BLOCK:(n + 1) * BLOCK] for n in range(NBLOCKS + 1)]


def _build(root: Path) -> Site:
    """A vault whose newest point is a delta on a full one: the served disk's map is
    resolved through the chain (a block turned zero, one turned data, one changed)."""
    async def go() -> Site:
        _url, key = await make_vault(root)
        v = await open_vault(root / "vault", key)
        # Frames of two blocks (a writer's hold 16): fetches, read-ahead and hydration
        # still see many frames on this small disk, and take a frame's blocks together.
        v.frame_target = 2 * BLOCK
        try:
            data = make_data()
            old = _blocks(data)
            old[10], old[11], old[12] = b"\x01" * BLOCK, bytes(BLOCK), b"\x02" * BLOCK
            base = await write_full_point(v, b"".join(old), machine="web1")
            new = _blocks(data)
            changed = [n for n in range(NBLOCKS + 1) if old[n] != new[n]]
            assert changed == [10, 11, 12]
            with ThreadPoolExecutor(2) as ex:
                w = CycleWriter(v, await v.load_index(), ex, machine="web1", cycle="c2",
                                disks=[DiskSpec("sda", SIZE, BLOCK)], full=False, base=base)
                await w.add([(0, n, None if zero_block(n) else new[n]) for n in changed])
                fps = b"".join(fingerprint(b) for b in new)
                point = await w.finish({"sda": digest_of_fingerprint_map(fps)}, "crash")
            assert point.base == base.id
            (r,) = await restore_point(v, point, root / "restored")
        finally:
            await v.close()
        return Site(root, root / "vault", key, point, Path(r.path), data)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    s = _build(tmp_path_factory.mktemp("instant"))
    assert s.reference.read_bytes() == s.data
    return s


def tree_digest(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(d.rglob("*")) if f.is_file()}


@asynccontextmanager
async def served(site: Site, overlay: Path, sock: Path, *, handshake_timeout: float = 30.0
                 ) -> AsyncIterator[tuple[PointDisk, NbdServer]]:
    v = await open_vault(site.vault_dir, site.key)
    try:
        with ThreadPoolExecutor(2) as ex:
            disk = await PointDisk.open(v, site.point, "sda", str(overlay), executor=ex)
            server = NbdServer({"": disk, "sda": disk}, socket_path=str(sock),
                               handshake_timeout=handshake_timeout)
            try:
                await server.start()
                yield disk, server
            finally:
                await server.stop()
                await disk.close()
    finally:
        await v.close()


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {err.decode()}"
    return out.decode()


# -- a raw protocol client -------------------------------------------------------------
class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer
        self.structured = False
        self.size = self.flags = 0

    @classmethod
    async def connect(cls, sock: Path, cflags: int = p.FLAG_C_FIXED_NEWSTYLE
                      | p.FLAG_C_NO_ZEROES) -> Client:
        r, w = await asyncio.open_unix_connection(str(sock))
        c = cls(r, w)
        greet = await r.readexactly(18)
        assert greet[:8] == p.NBDMAGIC and struct.unpack(">QH", greet[8:]) == (
            p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)
        w.write(struct.pack(">I", cflags))
        return c

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; the replies up to the final one (ACK or an error)."""
        self.w.write(p.OPTION_HEAD.pack(p.IHAVEOPT, opt, len(data)) + data)
        out = []
        while True:
            magic, o, kind, ln = p.OPTION_REPLY_HEAD.unpack(
                await self.r.readexactly(p.OPTION_REPLY_HEAD.size))
            assert magic == p.OPT_REPLY_MAGIC and o == opt
            out.append((kind, await self.r.readexactly(ln)))
            if kind == p.REP_ACK or kind & p.REP_FLAG_ERROR:
                return out

    async def go(self, name: str = "", *, structured: bool = True) -> None:
        if structured:
            assert (await self.option(p.OPT_STRUCTURED_REPLY))[-1][0] == p.REP_ACK
            q = p.META_BASE_ALLOCATION.encode()
            reps = await self.option(p.OPT_SET_META_CONTEXT, struct.pack(">I", len(name))
                                     + name.encode() + struct.pack(">II", 1, len(q)) + q)
            assert [k for k, _ in reps] == [p.REP_META_CONTEXT, p.REP_ACK]
            self.structured = True
        raw = name.encode()
        reps = await self.option(p.OPT_GO, struct.pack(">I", len(raw)) + raw
                                 + struct.pack(">H", 0))
        assert reps[-1][0] == p.REP_ACK, reps
        info = next(d for k, d in reps if k == p.REP_INFO and d[:2] == b"\0\0")
        self.size, self.flags = struct.unpack(">QH", info[2:12])

    async def cmd(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"",
                  flags: int = 0, cookie: int = 7) -> tuple[int, bytes | list[int]]:
        """One request; (error, read data or block-status words)."""
        self.w.write(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset,
                                    len(data) if data else length) + data)
        magic = struct.unpack(">I", await self.r.readexactly(4))[0]
        if magic == p.SIMPLE_REPLY_MAGIC:
            err, ck = struct.unpack(">IQ", await self.r.readexactly(12))
            assert ck == cookie
            body = await self.r.readexactly(length) if cmd == p.CMD_READ and not err else b""
            return err, body
        assert magic == p.STRUCTURED_REPLY_MAGIC and self.structured
        rflags, kind, ck, ln = struct.unpack(">HHQI", await self.r.readexactly(16))
        payload = await self.r.readexactly(ln)
        assert ck == cookie and rflags & p.REPLY_FLAG_DONE
        if kind == p.REPLY_TYPE_ERROR:
            return struct.unpack(">I", payload[:4])[0], b""
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            assert struct.unpack(">Q", payload[:8])[0] == offset
            return 0, payload[8:]
        assert kind == p.REPLY_TYPE_BLOCK_STATUS
        return 0, list(struct.unpack(f">{ln // 4}I", payload))[1:]

    async def closed(self) -> bool:
        """Whether the server closed the connection (reads EOF)."""
        return await asyncio.wait_for(self.r.read(1), 30) == b""

    async def close(self) -> None:
        self.w.close()
        await self.w.wait_closed()


# -- tests -----------------------------------------------------------------------------
@pytest.fixture
def tools() -> Iterator[None]:
    missing = [t for t in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy")
               if shutil.which(t) is None]
    assert not missing, f"{missing} not installed: tests/run.sh installs them"
    yield


async def test_real_clients_read_the_point_and_see_its_holes(site: Site, tmp_path: Path,
                                                              tools: None) -> None:
    sock = tmp_path / "nbd.sock"
    async with served(site, tmp_path / "ov", sock) as (disk, server):
        uri = server.uri
        before = disk.overlay.present_count
        assert before == sum(zero_block(n) for n in range(NBLOCKS + 1))

        def check(extents: list[tuple[int, int, bool]]) -> None:
            """(start, length, reads as a hole of zeros): the zero blocks, and only them."""
            assert sum(ln for _, ln, _ in extents) == SIZE
            for n in range(NBLOCKS + 1):
                at = n * BLOCK
                (e,) = [e for e in extents if e[0] <= at < e[0] + e[1]]
                assert e[2] is zero_block(n), (n, e)

        async def holes_are_the_zero_blocks() -> None:
            doc = json.loads(await run("qemu-img", "map", "--output=json", "-f", "raw", uri))
            assert all(e["zero"] is not e["data"] for e in doc)
            check([(e["start"], e["length"], e["zero"]) for e in doc])
            doc = json.loads(await run("nbdinfo", "--map", "--json", uri))
            assert {e["type"] for e in doc} == {0, p.STATE_HOLE | p.STATE_ZERO}
            check([(e["offset"], e["length"], e["type"] != 0) for e in doc])

        # qemu-img map and nbdinfo --map ask for block status only: nothing is fetched.
        await holes_are_the_zero_blocks()
        assert disk.fetched_bytes == 0

        info = json.loads(await run("nbdinfo", "--json", uri))
        (export,) = info["exports"]
        assert export["export-size"] == SIZE and "base:allocation" in export["contexts"]

        await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(site.reference), uri)
        assert disk.fetched_bytes > 0

        out = tmp_path / "copy.img"
        await run("nbdcopy", uri, str(out))
        assert out.read_bytes() == site.data
        await holes_are_the_zero_blocks()  # now from the overlay's own holes

        # Everything read went through the overlay: it holds what it marked present.
        img = disk.overlay.image_path.read_bytes()
        for n in range(NBLOCKS + 1):
            if disk.overlay.present(n):
                assert img[n * BLOCK:(n + 1) * BLOCK] == site.data[n * BLOCK:(n + 1) * BLOCK]


async def test_writes_land_in_the_overlay_never_the_vault(site: Site, tmp_path: Path,
                                                           tools: None) -> None:
    vault_before = tree_digest(site.vault_dir)
    sock, ov = tmp_path / "nbd.sock", tmp_path / "ov"
    expect = bytearray(site.data)
    patch = b"guest wrote this" * 300  # 4800 bytes, inside block 2 (not fetched yet)
    async with served(site, ov, sock) as (disk, _server):
        c = await Client.connect(sock)
        await c.go()
        assert c.size == SIZE and c.flags & p.FLAG_SEND_DF and not c.flags & p.FLAG_READ_ONLY
        off = 2 * BLOCK + 1000
        assert await c.cmd(p.CMD_WRITE, off, data=patch) == (0, b"")
        expect[off:off + len(patch)] = patch
        # A whole block (4) written without a fetch, and zeros over blocks 8-9 + a bit.
        whole = bytes(range(256)) * (BLOCK // 256)
        assert (await c.cmd(p.CMD_WRITE, 4 * BLOCK, data=whole, flags=p.CMD_FLAG_FUA))[0] == 0
        expect[4 * BLOCK:5 * BLOCK] = whole
        zlo, zlen = 8 * BLOCK, 2 * BLOCK + 512
        assert (await c.cmd(p.CMD_WRITE_ZEROES, zlo, zlen))[0] == 0
        expect[zlo:zlo + zlen] = bytes(zlen)
        # TRIM of blocks 20-21 and part of 22: the whole blocks become holes.
        assert (await c.cmd(p.CMD_TRIM, 20 * BLOCK, 2 * BLOCK + 4096))[0] == 0
        expect[20 * BLOCK:22 * BLOCK] = bytes(2 * BLOCK)
        assert (await c.cmd(p.CMD_FLUSH))[0] == 0
        err, words = await c.cmd(p.CMD_BLOCK_STATUS, 20 * BLOCK, 3 * BLOCK)
        assert err == 0 and words == [2 * BLOCK, p.STATE_HOLE | p.STATE_ZERO, BLOCK, 0]
        assert await c.cmd(p.CMD_READ, 0, SIZE // 2) == (0, bytes(expect[:SIZE // 2]))
        # The zeroed whole blocks read as holes now; block 4 as data.
        err, words = await c.cmd(p.CMD_BLOCK_STATUS, 8 * BLOCK, 2 * BLOCK)
        assert err == 0 and words == [2 * BLOCK, p.STATE_HOLE | p.STATE_ZERO]
        err, words = await c.cmd(p.CMD_BLOCK_STATUS, 4 * BLOCK, BLOCK, flags=p.CMD_FLAG_REQ_ONE)
        assert err == 0 and words == [BLOCK, 0]
        # No part of a pack was read twice (a fetch takes every block of the bytes it
        # read: in format 3 the blocks of a frame come together, written ones skipped).
        packs = sum(f.stat().st_size for f in (site.vault_dir / "packs").rglob("*")
                    if f.is_file())
        assert 0 < disk.fetched_bytes <= packs, (disk.fetched_bytes, packs)
        await c.close()
    # After a restart, the writes are there, hydration fills the rest around them.
    async with served(site, ov, sock) as (disk, _server):
        seen: list[HydrationProgress] = []
        await hydrate(disk, progress=seen.append)
        assert seen[-1].complete and seen[0].done < seen[-1].done
        assert disk.overlay.image_path.read_bytes() == bytes(expect)
        # QEMU's own client writes (FUA, zeros with unmap) through the same server.
        await run("qemu-io", "-f", "raw", "-c", f"write -f -P 0xab {30 * BLOCK + 7} 5000",
                  "-c", f"write -z -u {31 * BLOCK} {BLOCK}", "-c", "flush",
                  f"nbd+unix:///?socket={sock}")
        expect[30 * BLOCK + 7:30 * BLOCK + 5007] = b"\xab" * 5000
        expect[31 * BLOCK:32 * BLOCK] = bytes(BLOCK)
        assert disk.overlay.image_path.read_bytes() == bytes(expect)
    assert tree_digest(site.vault_dir) == vault_before


async def test_bad_input_gets_protocol_errors_and_others_are_served(site: Site,
                                                                    tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    async with served(site, tmp_path / "ov", sock, handshake_timeout=1.0):
        good = await Client.connect(sock)
        await good.go("sda")

        # A client silent in the handshake is dropped after the timeout.
        silent = await Client.connect(sock)
        assert await silent.closed()
        await silent.close()

        # Handshake: unknown client flags drop that connection only.
        c = await Client.connect(sock, cflags=1 << 7)
        assert await c.closed()
        await c.close()

        c = await Client.connect(sock)
        assert (await c.option(p.OPT_STARTTLS))[-1][0] == p.REP_ERR_UNSUP
        assert (await c.option(99))[-1][0] == p.REP_ERR_UNSUP
        assert (await c.option(p.OPT_LIST, b"x"))[-1][0] == p.REP_ERR_INVALID
        assert (await c.option(p.OPT_GO, b"\0\0\0\x09ab"))[-1][0] == p.REP_ERR_INVALID
        assert (await c.option(p.OPT_SET_META_CONTEXT, bytes(8)))[-1][0] == p.REP_ERR_INVALID
        assert (await c.option(p.OPT_INFO, b"\0\0\0\x02no\0\0"))[-1][0] == p.REP_ERR_UNKNOWN
        assert (await c.option(p.OPT_GO, bytes(p.MAX_OPTION + 1)))[-1][0] == p.REP_ERR_TOO_BIG
        names = await c.option(p.OPT_LIST)
        assert sorted(d[4:] for k, d in names if k == p.REP_SERVER) == [b"", b"sda"]
        # ... and the same connection still gets its export.
        await c.go(structured=False)
        assert c.size == SIZE and not c.flags & p.FLAG_SEND_DF

        # Transmission: errors the protocol defines, the connection goes on.
        assert (await c.cmd(42, 0, 512))[0] == p.EINVAL
        assert (await c.cmd(p.CMD_READ, SIZE - 512, 1024))[0] == p.EINVAL
        assert (await c.cmd(p.CMD_READ, 0, 512, flags=1 << 9))[0] == p.EINVAL
        assert (await c.cmd(p.CMD_WRITE, SIZE, data=b"x"))[0] == p.ENOSPC
        assert (await c.cmd(p.CMD_BLOCK_STATUS, 0, 4096))[0] == p.EINVAL  # no context set
        assert (await c.cmd(p.CMD_FLUSH, 1, 0))[0] == p.EINVAL
        assert (await c.cmd(p.CMD_WRITE_ZEROES, 0, 512, flags=p.CMD_FLAG_FAST_ZERO))[0] \
            == p.ENOTSUP
        assert await c.cmd(p.CMD_READ, BLOCK, 4096) == (0, site.data[BLOCK:BLOCK + 4096])
        # A write over the payload limit: its data is skipped, the reply is EOVERFLOW.
        big = bytes(p.MAX_PAYLOAD + 1)
        assert (await c.cmd(p.CMD_WRITE, 0, data=big))[0] == p.EOVERFLOW
        assert (await c.cmd(p.CMD_READ, 0, p.MAX_PAYLOAD + 1))[0] == p.EINVAL
        assert await c.cmd(p.CMD_READ, BLOCK, 4096) == (0, site.data[BLOCK:BLOCK + 4096])
        # A structured client gets its errors as ERROR chunks.
        assert (await good.cmd(p.CMD_READ, SIZE, 1))[0] == p.EINVAL
        assert (await good.cmd(p.CMD_BLOCK_STATUS, 0, 0))[0] == p.EINVAL

        # A request with a bad magic cannot be answered: that connection is dropped...
        c.w.write(p.REQUEST.pack(0xDEADBEEF, 0, p.CMD_READ, 1, 0, 512))
        assert await c.closed()
        await c.close()
        # ... while the others go on.
        assert await good.cmd(p.CMD_READ, 3 * BLOCK, BLOCK) == (
            0, site.data[3 * BLOCK:4 * BLOCK])
        err, words = await good.cmd(p.CMD_BLOCK_STATUS, 0, 2 * BLOCK)
        assert err == 0 and words == [BLOCK, p.STATE_HOLE | p.STATE_ZERO, BLOCK, 0]
        good.w.write(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 9, 0, 0))
        assert await good.closed()
        await good.close()


async def test_overlay_of_another_point_is_refused(site: Site, tmp_path: Path) -> None:
    ov = tmp_path / "ov"
    async with served(site, ov, tmp_path / "a.sock"):
        with pytest.raises(OverlayBusy, match="in use by another process"):
            async with served(site, ov, tmp_path / "b.sock"):
                pass
        with pytest.raises(SocketInUse, match="already listens"):
            async with served(site, tmp_path / "ov2", tmp_path / "a.sock"):
                pass
        assert (tmp_path / "a.sock").exists()  # the first server's socket is left alone
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(SocketInUse, match="not a socket"):
        async with served(site, tmp_path / "ov2", tmp_path / "file"):
            pass
    assert (tmp_path / "file").read_text() == "not a socket"
    other = OverlayHeader("f" * 64, "sda", SIZE, BLOCK)
    with ThreadPoolExecutor(1) as ex, pytest.raises(OverlayMismatch, match="not of point"):
        Overlay.open(ov, other, [], ex)
