"""The process server's compression and vault-lock metrics, with a real vault (and a real
agent and server for compression).

``siterecovery_procserver_stored_logical_bytes_total`` counts the block bytes sealed
into the packs uploaded (before compression), next to ``uploaded_bytes_total`` (the
pack bytes); ``compression_ratio`` is the one over the other since the process started.
Also: a compressed unit is held to its size cap when it is opened again.
"""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import aiohttp
import pytest
import zstandard
from prometheus_client.parser import text_string_to_metric_families

from procserver.metrics import ProcMetrics
from procserver.server import ProcServer
from procserver.vaultaccess import VaultAccess
from procserver.vaultlock import SharedVaultLock
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
from vault.keyslots import KeyMaterial, read_keyfile
from vault.locks import Lock, list_locks, try_acquire
from vault.store.local import LocalStore

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


def lock_samples(metrics: ProcMetrics) -> dict[str, float]:
    return {s.name: s.value for fam in metrics.registry.collect() for s in fam.samples
            if "vault_lock" in s.name and "le" not in s.labels
            and s.labels.get("mode", "shared") == "shared"}


async def test_one_shared_lock_for_every_upload_and_its_waits_in_the_metrics(
        tmp_path: Path, vault_at: tuple[str, Path]) -> None:
    """procserver/vaultlock.py on a real vault: concurrent holds share one lock object,
    taken once and deleted when the last lets go (a cancelled one too); a wait for it
    (a prune holds the vault) is observed by mode."""
    _url, key = vault_at
    vaults = VaultAccess(LocalStore(tmp_path / "vault"),
                         KeyMaterial(keyfile=read_keyfile(key)))
    await vaults.open()
    metrics = ProcMetrics()
    shared = SharedVaultLock(vaults, metrics, wait=60)
    try:
        async with shared.hold("upload a"), shared.hold("upload b"):
            locks, _bad = await list_locks(vaults.vault)
            assert [lk.kind for lk in locks] == ["shared"]
        assert await list_locks(vaults.vault) == ([], [])
        m = lock_samples(metrics)
        assert m[P + "vault_lock_acquisitions_total"] == 1
        assert m[P + "vault_lock_wait_seconds_count"] == 1

        entered = asyncio.Event()

        async def upload() -> None:
            async with shared.hold("upload c"):
                entered.set()
                await asyncio.Event().wait()  # until cancelled

        prune = await try_acquire(vaults.vault, "exclusive", "prune")
        assert isinstance(prune, Lock)
        task = asyncio.create_task(upload())
        try:
            async with asyncio.timeout(30):
                while True:  # nothing announces the wait: look every 10 ms
                    if lock_samples(metrics)[P + "vault_lock_waiting"] == 1:
                        break
                    await asyncio.sleep(0.01)
            assert not entered.is_set()
        finally:
            await prune.release()
        async with asyncio.timeout(30):
            await entered.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await list_locks(vaults.vault) == ([], [])  # let go though cancelled
        m = lock_samples(metrics)
        assert m[P + "vault_lock_acquisitions_total"] == 2
        assert m[P + "vault_lock_wait_seconds_count"] == 2
        assert m[P + "vault_lock_waiting"] == 0
        assert m[P + "vault_lock_wait_seconds_sum"] > 0.01  # it waited for the prune
    finally:
        await vaults.close()
