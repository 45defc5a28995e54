"""The process server's compression metrics, through a real agent, server and vault.

``siterecovery_procserver_stored_logical_bytes_total`` counts the block bytes sealed
into the packs uploaded (before compression), next to ``uploaded_bytes_total`` (the
pack bytes); ``compression_ratio`` is the one over the other since the process started.
Also: a compressed unit is held to its size cap when it is opened again.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import aiohttp
import pytest
import zstandard
from prometheus_client.parser import text_string_to_metric_families

from procserver.server import ProcServer
from tests.helpers import (
    BLOCK,
    Pki,
    agent_config,
    make_agent,
    proc_config,
    running_procserver,
)
from vault.crypto import Keyring, ObjectType, seal, unseal
from vault.errors import IntegrityError

P = "siterecovery_procserver_"
WORDS = [f"{w}{i}" for i, w in enumerate(("alpha", "beta", "gamma", "delta", "omega") * 40)]


async def scrape(ps: ProcServer) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{ps.metrics_port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {sample.name: sample.value for fam in text_string_to_metric_families(text)
            for sample in fam.samples if sample.name.startswith(P) and not sample.labels}


def text_block(rng: random.Random) -> bytes:
    """64 KiB of log-like lines: compressible, and different every time."""
    out = bytearray()
    while len(out) < BLOCK:
        out += (f"{rng.randrange(10**9):09d} " + " ".join(rng.choices(WORDS, k=8))
                + "\n").encode()
    return bytes(out[:BLOCK])


def pack_bytes(vault_dir: Path) -> int:
    return sum(p.stat().st_size for p in (vault_dir / "packs").rglob("*") if p.is_file())


async def replicate(tmp_path: Path, pki: Pki, ps: ProcServer, blocks: list[bytes]) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"".join(blocks))
    agent = make_agent(agent_config(tmp_path, pki, "web01", ps.port, {"sda": disk}))
    try:
        r = await agent.replicate_once()
    finally:
        agent.close()
    await ps.wait_point(r.cycle)


async def test_compressible_blocks_give_a_ratio_above_one(
        tmp_path: Path, pki: Pki, vault_at: tuple[str, Path]) -> None:
    # 1 MiB segments and a cache of four: the cycle is uploaded in many checkpoints,
    # some overlapping the next segment, while the agent waits for cache space.
    cfg = proc_config(tmp_path, pki, *vault_at, segment_bytes=1 << 20,
                      cache_quota_bytes=4 << 20)
    async with running_procserver(cfg) as ps:
        before = await scrape(ps)
        assert math.isnan(before[P + "compression_ratio"])  # no pack yet: no ratio
        assert before[P + "stored_logical_bytes_total"] == 0
        rng = random.Random(5)
        unique = [text_block(rng) for _ in range(96)]
        # Each block twice (in a later segment) and some zero blocks: only distinct,
        # non-zero blocks are stored, each once.
        await replicate(tmp_path, pki, ps, unique + [bytes(BLOCK)] * 8 + unique)
        m = await scrape(ps)
    logical = m[P + "stored_logical_bytes_total"]
    uploaded = m[P + "uploaded_bytes_total"]
    assert logical == len(unique) * BLOCK
    assert uploaded == pack_bytes(tmp_path / "vault")
    assert m[P + "compression_ratio"] == logical / uploaded
    assert m[P + "compression_ratio"] > 2
    # One index object per checkpoint that stored blocks: there were several.
    assert len(list((tmp_path / "vault" / "index").iterdir())) > 1


async def test_incompressible_blocks_give_a_ratio_of_about_one(
        tmp_path: Path, pki: Pki, procserver: ProcServer) -> None:
    rng = random.Random(6)
    blocks = [rng.randbytes(BLOCK) for _ in range(96)]
    await replicate(tmp_path, pki, procserver, blocks)

    m = await scrape(procserver)
    logical = m[P + "stored_logical_bytes_total"]
    uploaded = m[P + "uploaded_bytes_total"]
    assert logical == len(blocks) * BLOCK
    assert uploaded == pack_bytes(tmp_path / "vault")
    # Stored as they are: only the per-block and per-pack overhead is added.
    assert 0.99 < m[P + "compression_ratio"] <= 1.0


@pytest.mark.parametrize("content_size", [True, False])
def test_a_compressed_unit_over_its_size_cap_is_refused(content_size: bool) -> None:
    # zstd ignores max_output_size for a frame that declares its size: unseal must not.
    keyring = Keyring(bytes(range(64)))
    aead = keyring.aead(ObjectType.BLOCK, "p" * 64)
    compressor = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
    sealed = seal(aead, ObjectType.BLOCK, "p" * 64, b"x" * (2 * BLOCK), compressor=compressor)
    assert unseal(aead, ObjectType.BLOCK, "p" * 64, sealed, max_size=2 * BLOCK) == (
        b"x" * (2 * BLOCK))
    with pytest.raises(IntegrityError):
        unseal(aead, ObjectType.BLOCK, "p" * 64, sealed, max_size=BLOCK)
