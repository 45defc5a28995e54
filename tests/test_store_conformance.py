"""One conformance suite for every BlobStore backend: local, memory, Azure (Azurite)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from common.pacing import Schedule, TokenBucket
from vault.errors import NotFoundError, PermanentStoreError, TransientStoreError
from vault.store.faults import FaultStore
from vault.store.instrument import StoreMetrics
from vault.store.local import LocalStore
from vault.store.memory import MemoryStore
from vault.store.open import open_backend, open_store
from vault.store.protocol import BlobStore
from vault.store.retry import RetryStore
from vault.store.wrapper import StoreWrapper

# Real Azure too when a connection string is given (never in CI: no network there).
REAL_AZURE = os.environ.get("SITERECOVERY_TEST_AZURE_CONNECTION_STRING", "")
# "wrapped": a local folder under every wrapper (faults injecting none), so each keeps
# every contract of the protocol, not only the operations it overrides.
BACKENDS = ["local", "memory", "wrapped", "azure"] + (["azure-real"] if REAL_AZURE else [])


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    s = _make(request.param, request, tmp_path)
    await s.setup()
    try:
        yield s
    finally:
        await s.close()


def _make(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if kind == "local":
        return LocalStore(tmp_path / "store")
    if kind == "memory":
        return MemoryStore()
    if kind == "wrapped":
        return open_store(f"fault+file://{tmp_path / 'store'}",
                          StoreMetrics(CollectorRegistry()),
                          upload_bucket=TokenBucket(Schedule.constant(1e12)))
    conn_file = tmp_path / "azure-conn"
    conn_file.write_text(REAL_AZURE if kind == "azure-real"
                         else request.getfixturevalue("azurite_conn"))
    conn_file.chmod(0o600)
    return open_backend(f"azure://c{secrets.token_hex(6)}/vault1?connection_string_file={conn_file}")


async def _names(store: BlobStore, prefix: str = "") -> list[str]:
    return [b.name async for b in store.list(prefix)]


async def test_put_get_overwrite(store: BlobStore) -> None:
    await store.put("config", b"one")
    assert await store.get("config") == b"one"
    await store.put("config", b"two!")
    assert await store.get("config") == b"two!"
    info = await store.stat("config")
    assert (info.name, info.size) == ("config", 4)


async def test_every_write_of_a_name_changes_its_version(store: BlobStore,
                                                         tmp_path: Path) -> None:
    """What a reader caching what it opened relies on (``Vault.scan_points``): the same
    name and version, the same bytes. Writes of the same size, back to back (within one
    tick of the kernel's clock, a new file reusing the last one's inode), a put from a
    file, and the listing showing what ``stat`` shows."""
    seen: list[str] = []
    for body in (b"one!", b"two!", b"one!", b"two!"):
        await store.put("points/p1", body)
        info = await store.stat("points/p1")
        assert info.version and info.version not in seen, (info, seen)
        seen.append(info.version)
        assert [b async for b in store.list("points/")] == [info]
    with open(tmp_path / "body", "w+b") as f:
        f.write(b"one!")
        f.flush()
        await store.put_file("points/p1", f.fileno(), 4)
    assert (await store.stat("points/p1")).version not in seen
    await store.put("points/p2", b"one!")  # another name, same bytes: its own version
    assert (await store.stat("points/p2")).version not in seen


async def test_ranged_reads(store: BlobStore) -> None:
    data = os.urandom(100_000)
    await store.put("packs/ab/abcd", data)
    assert await store.get("packs/ab/abcd", 10, 20) == data[10:30]
    assert await store.get("packs/ab/abcd", 99_990) == data[99_990:]
    assert await store.get("packs/ab/abcd", 0, 100_000) == data
    assert await store.get("packs/ab/abcd", 5, 0) == b""
    with pytest.raises(PermanentStoreError):
        await store.get("packs/ab/abcd", 99_990, 20)
    with pytest.raises(PermanentStoreError):
        await store.get("packs/ab/abcd", 200_000, 1)


async def test_large_object_roundtrip(store: BlobStore) -> None:
    data = os.urandom(9 << 20)  # above the Azure backend's single-put size: staged blocks
    await store.put("packs/00/big", data)
    assert hashlib.sha256(await store.get("packs/00/big")).digest() == \
        hashlib.sha256(data).digest()
    assert await store.get("packs/00/big", (4 << 20) - 3, 6) == data[(4 << 20) - 3:(4 << 20) + 3]


async def test_put_file_puts_the_files_first_bytes(store: BlobStore, tmp_path: Path) -> None:
    data = os.urandom((9 << 20) + 5)  # staged in blocks by the Azure backend
    with open(tmp_path / "spool", "w+b") as f:
        f.write(data + b"not this")
        f.seek(123)
        fd = f.fileno()
        await store.put_file("maps/big", fd, len(data))
        await store.put_file("maps/small", fd, 1000)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 123  # read with pread: position untouched
        assert await store.get("maps/big") == data
        assert await store.get("maps/small") == data[:1000]
        # A file shorter than the length asked for: an error, and nothing put.
        with pytest.raises(PermanentStoreError, match="ends before byte"):
            await store.put_file("maps/short", fd, len(data) + 9)
    assert await _names(store, "maps/") == ["maps/big", "maps/small"]


async def test_listing_is_sorted_and_prefixed(store: BlobStore) -> None:
    names = ["points/b2", "index/x", "packs/ff/f1", "packs/0a/a1", "points/a1", "config",
             "packs/0a/a0", "keys/k1"]
    for n in names:
        await store.put(n, n.encode())
    assert await _names(store) == sorted(names)
    assert await _names(store, "packs/") == ["packs/0a/a0", "packs/0a/a1", "packs/ff/f1"]
    assert await _names(store, "packs/0a/") == ["packs/0a/a0", "packs/0a/a1"]
    assert await _names(store, "po") == ["points/a1", "points/b2"]
    assert await _names(store, "nothing/") == []
    sizes = {b.name: b.size async for b in store.list()}
    assert sizes["points/b2"] == len(b"points/b2")


async def test_not_found(store: BlobStore) -> None:
    with pytest.raises(NotFoundError):
        await store.get("points/missing")
    with pytest.raises(NotFoundError):
        await store.get("points/missing", 0, 10)
    with pytest.raises(NotFoundError):
        await store.stat("points/missing")


async def test_delete_is_idempotent(store: BlobStore) -> None:
    await store.put("index/a", b"x")
    await store.delete("index/a")
    await store.delete("index/a")
    await store.delete("index/never")
    with pytest.raises(NotFoundError):
        await store.get("index/a")
    assert await _names(store) == []


async def test_invalid_names_are_refused(store: BlobStore) -> None:
    for bad in ["../x", "/abs", "a//b", "UPPER", "", "a/../b", "a b"]:
        with pytest.raises(PermanentStoreError):
            await store.put(bad, b"x")


async def test_cancelled_put_is_all_or_nothing(store: BlobStore) -> None:
    data = os.urandom(6 << 20)
    task = asyncio.create_task(store.put("packs/11/cancelled", data))
    await asyncio.sleep(0)  # let the put start, then interrupt it
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    try:
        got = await store.get("packs/11/cancelled")
    except NotFoundError:
        got = None
    assert got in (None, data)
    assert await _names(store, "packs/11/") in ([], ["packs/11/cancelled"])


async def test_cancellation_mid_list(store: BlobStore) -> None:
    for i in range(30):
        await store.put(f"points/{i:04d}", b"p")

    async def first_five() -> list[str]:
        out = []
        async for b in store.list("points/"):
            out.append(b.name)
            if len(out) == 5:
                await asyncio.Event().wait()  # stuck consumer, to be cancelled
        return out

    task = asyncio.create_task(first_five())
    await asyncio.sleep(0)
    for _ in range(1000):
        if task.done():
            break
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(await _names(store, "points/")) == 30  # the store still works


async def test_wrapped_stack_is_the_one_open_store_builds(tmp_path: Path) -> None:
    s = open_store(f"fault+file://{tmp_path}", StoreMetrics(CollectorRegistry()),
                   upload_bucket=TokenBucket(Schedule.constant(1e12)))
    layers = []
    while isinstance(s, StoreWrapper):
        layers.append(type(s).__name__)
        s = s.inner
    assert layers == ["ThrottleStore", "RetryStore", "LimitStore", "InstrumentedStore",
                      "FaultStore"]
    assert isinstance(s, LocalStore)


def test_store_wrapper_has_every_protocol_member() -> None:
    # runtime_checkable looks only at the wrapper's own attributes: no __getattr__ help.
    assert isinstance(StoreWrapper(MemoryStore()), BlobStore)
    assert isinstance(FaultStore(MemoryStore()), BlobStore)
    assert StoreWrapper(MemoryStore()).url == "memory://"


class _LostResponses(StoreWrapper):
    """Passes each put through, then 'loses the response' the first ``n`` times."""

    def __init__(self, inner: BlobStore, n: int) -> None:
        super().__init__(inner)
        self.n = n
        self.bodies: list[str] = []

    async def put(self, name: str, data: bytes | bytearray) -> None:
        self.bodies.append(hashlib.sha256(data).hexdigest())
        await self.inner.put(name, data)
        if self.n:
            self.n -= 1
            raise TransientStoreError("response lost")


async def test_transient_errors_retried_with_identical_body(store: BlobStore) -> None:
    flaky = _LostResponses(store, 3)
    retrying = RetryStore(flaky, base=0.001)
    data = os.urandom(300_000)
    await retrying.put("packs/22/retried", data)
    assert len(flaky.bodies) == 4 and len(set(flaky.bodies)) == 1
    assert await store.get("packs/22/retried") == data


async def test_a_file_put_is_retried_with_an_identical_body(store: BlobStore,
                                                             tmp_path: Path) -> None:
    flaky = _LostResponses(store, 2)  # overrides put only: a file put reaches it as one
    data = os.urandom(300_000)
    with open(tmp_path / "spool", "w+b") as f:
        f.write(data)
        f.flush()
        await RetryStore(flaky, base=0.001).put_file("maps/retried", f.fileno(), len(data))
    assert len(flaky.bodies) == 3 and len(set(flaky.bodies)) == 1
    assert await store.get("maps/retried") == data


async def test_retry_gives_up_after_its_attempts(store: BlobStore) -> None:
    flaky = _LostResponses(store, 100)
    with pytest.raises(TransientStoreError):
        await RetryStore(flaky, attempts=3, base=0.001).put("index/x", b"y")
    assert len(flaky.bodies) == 3


async def test_interrupted_staged_upload_is_invisible(azurite_conn: str, tmp_path: Path) -> None:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob.aio import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(azurite_conn)
    async with svc:
        container = svc.get_container_client(f"c{secrets.token_hex(6)}")
        await container.create_container()
        blob = container.get_blob_client("packs/aa/staged")
        # A crash after staging blocks, before Put Block List.
        await blob.stage_block(base64.b64encode(b"00000000").decode(), b"x" * 1000)
        names = [b.name async for b in container.list_blobs()]
        assert names == []
        with pytest.raises(ResourceNotFoundError):
            await blob.get_blob_properties()


async def test_corrupted_checksum_is_rejected(azurite_conn: str) -> None:
    from azure.core.exceptions import HttpResponseError
    from azure.storage.blob.aio import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(azurite_conn)
    async with svc:
        container = svc.get_container_client(f"c{secrets.token_hex(6)}")
        await container.create_container()
        blob = container.get_blob_client("packs/aa/bad-md5")
        body = b"payload" * 100
        wrong = hashlib.md5(b"something else").digest()
        with pytest.raises(HttpResponseError) as e:
            await blob._client.block_blob.upload(  # the raw operation, to send a bad MD5
                body=body, content_length=len(body), transactional_content_md5=wrong)
        assert e.value.status_code == 400
        names = [b.name async for b in container.list_blobs()]
        assert names == []


async def test_azure_credentials_never_in_url_or_repr(azurite_conn: str, tmp_path: Path) -> None:
    conn_file = tmp_path / "c"
    conn_file.write_text(azurite_conn)
    s = open_store(f"azure://cont/pre?connection_string_file={conn_file}")
    assert "AccountKey" not in s.url and "AccountKey" not in repr(s)
    await s.close()
    with pytest.raises(PermanentStoreError, match="cannot read Azure credentials"):
        open_backend(f"azure://cont?connection_string_file={tmp_path / 'missing'}")


async def test_azure_outage_is_transient(tmp_path: Path) -> None:
    conn_file = tmp_path / "c"
    conn_file.write_text("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                         "AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;")
    s = open_backend(f"azure://cont?connection_string_file={conn_file}")
    with pytest.raises(TransientStoreError):
        await s.get("config")
    await s.close()
