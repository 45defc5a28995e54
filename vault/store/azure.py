"""Azure Blob backend (block blobs) through ``azure-storage-blob``'s async client.

URL: ``azure://CONTAINER[/PREFIX]`` with credentials, never in the URL itself, from

- ``?connection_string_file=PATH`` (a file holding a connection string: account
  key, SAS or the Azurite emulator), else
- ``?account_url=https://ACCOUNT.blob.core.windows.net`` with ``&sas_file=PATH`` or
  ``&key_file=PATH``, else
- the environment: ``SITERECOVERY_AZURE_CONNECTION_STRING`` or
  ``AZURE_STORAGE_CONNECTION_STRING``.

Objects above ``SINGLE_PUT_BYTES`` are staged in blocks and committed in one
``Put Block List``, so an interrupted put is never visible. Every request body
carries a transactional MD5 the service checks. The SDK's own retries are off:
retries are the ``RetryStore`` wrapper's job, so there is one retry policy.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from vault.errors import NotFoundError, PermanentStoreError, StoreError, TransientStoreError
from vault.store.protocol import BlobInfo, check_name, read_file_part

# Above 1 MiB, the SDK's single upload hands aiohttp the body as raw bytes (sent on
# the event loop); staged blocks stream. So larger objects are always staged.
SINGLE_PUT_BYTES = 1 << 20
STAGE_BYTES = 4 << 20
_ENV = ("SITERECOVERY_AZURE_CONNECTION_STRING", "AZURE_STORAGE_CONNECTION_STRING")


def _read_secret(path: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8").strip()
    except OSError as e:
        raise PermanentStoreError(f"cannot read Azure credentials file {path!r}: "
                                  f"{e.strerror}") from None
    except UnicodeDecodeError:
        raise PermanentStoreError(f"Azure credentials file {path!r} is not UTF-8 text (a "
                                  "connection string, SAS token or account key)") from None


def _map_error(e: AzureError, what: str) -> StoreError:
    if isinstance(e, ResourceNotFoundError):
        return NotFoundError(f"{what}: not found")
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        return TransientStoreError(f"{what}: {type(e).__name__}: {e.message}")
    status = getattr(e, "status_code", None)
    if isinstance(e, HttpResponseError) and (status in (408, 429) or (status or 0) >= 500):
        return TransientStoreError(f"{what}: HTTP {status} {e.reason}")
    code = getattr(e, "error_code", None) or status
    return PermanentStoreError(f"{what}: {code}: {e.reason if hasattr(e, 'reason') else e}")


def is_transient(e: AzureError) -> bool:
    """Whether ``e`` is worth retrying (network, 408, 429, 5xx): the one classification
    of Azure failures, for users of Azure Blob beside the store (page blobs)."""
    return isinstance(_map_error(e, ""), TransientStoreError)


class AzureBlobStore:
    def __init__(self, service: BlobServiceClient, container: str, prefix: str,
                 display: str) -> None:
        self._svc = service
        self._c: ContainerClient = service.get_container_client(container)
        self._prefix = prefix
        self.url = display

    def __repr__(self) -> str:
        return f"AzureBlobStore({self.url})"  # never the credentials

    @property
    def container(self) -> ContainerClient:
        """The container's client, built with the URL's credentials; closed by ``close``
        (for users that need more than the protocol, such as page blobs)."""
        return self._c

    @property
    def prefix(self) -> str:
        """The URL's path inside the container: ``""`` or ``"PATH/"``."""
        return self._prefix

    @classmethod
    def from_url(cls, url: str) -> AzureBlobStore:
        p = urlparse(url)
        q = {k: v[-1] for k, v in parse_qs(p.query).items()}
        container = p.netloc
        prefix = p.path.strip("/")
        if not container:
            raise PermanentStoreError(f"{url!r} names no container: use azure://CONTAINER/PREFIX")
        opts: dict[str, Any] = {"retry_total": 0, "connection_timeout": 20, "read_timeout": 60}
        if "connection_string_file" in q:
            svc = BlobServiceClient.from_connection_string(
                _read_secret(q["connection_string_file"]), **opts)
        elif "account_url" in q:
            if "sas_file" in q:
                cred: Any = _read_secret(q["sas_file"])
            elif "key_file" in q:
                account = urlparse(q["account_url"]).netloc.split(".")[0]
                cred = {"account_name": account, "account_key": _read_secret(q["key_file"])}
            else:
                raise PermanentStoreError("account_url needs sas_file or key_file")
            svc = BlobServiceClient(q["account_url"], credential=cred, **opts)
        else:
            conn = next((os.environ[k] for k in _ENV if os.environ.get(k)), None)
            if conn is None:
                raise PermanentStoreError(
                    f"no Azure credentials for {url!r}: set SITERECOVERY_AZURE_CONNECTION_STRING "
                    "or add ?connection_string_file=PATH")
            svc = BlobServiceClient.from_connection_string(conn, **opts)
        display = f"azure://{container}/{prefix}".rstrip("/")
        return cls(svc, container, f"{prefix}/" if prefix else "", display)

    async def setup(self) -> None:
        try:
            await self._c.create_container()
        except ResourceExistsError:
            pass
        except AzureError as e:
            raise _map_error(e, f"create container of {self.url}") from None

    def _key(self, name: str) -> str:
        return self._prefix + check_name(name)

    async def put(self, name: str, data: bytes | bytearray) -> None:
        view = memoryview(data)

        async def part(off: int, length: int) -> bytes:
            if isinstance(data, bytes) and length == len(data):
                return data  # whole: no copy
            return bytes(view[off:off + length])

        await self._put_parts(name, len(data), part)

    async def put_file(self, name: str, fd: int, length: int) -> None:
        async def part(off: int, n: int) -> bytes:
            return await asyncio.to_thread(read_file_part, fd, off, n)

        await self._put_parts(name, length, part)

    async def _put_parts(self, name: str, length: int,
                         part: Callable[[int, int], Awaitable[bytes]]) -> None:
        """Put an object of ``length`` bytes whose bytes from ``off`` ``part(off, n)``
        gives: in one request up to ``SINGLE_PUT_BYTES``, else staged a block at a time
        (one held at once) and committed in one list."""
        blob = self._c.get_blob_client(self._key(name))
        try:
            if length <= SINGLE_PUT_BYTES:
                data = await part(0, length)
                # A stream, not raw bytes: aiohttp would send a large bytes body on the loop.
                await blob.upload_blob(io.BytesIO(data), length=length, overwrite=True,
                                       validate_content=True)
                return
            ids = []
            for i, off in enumerate(range(0, length, STAGE_BYTES)):
                bid = base64.b64encode(f"{i:08d}".encode()).decode()
                chunk = await part(off, min(STAGE_BYTES, length - off))
                await blob.stage_block(bid, io.BytesIO(chunk), length=len(chunk),
                                       validate_content=True)
                ids.append(bid)
            await blob.commit_block_list(ids)  # type: ignore[arg-type]
        except ResourceNotFoundError:
            raise PermanentStoreError(f"container of {self.url} does not exist; create the vault "
                                      "with 'siterecovery vault init'") from None
        except AzureError as e:
            raise _map_error(e, f"put {name!r} to {self.url}") from None

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise PermanentStoreError(f"invalid range {offset}+{length} for {name!r}")
        if length == 0:
            await self.stat(name)
            return b""
        blob = self._c.get_blob_client(self._key(name))
        try:
            stream = await blob.download_blob(offset=offset, length=length)
            data = await stream.readall()
        except HttpResponseError as e:
            if e.status_code == 416:
                raise PermanentStoreError(
                    f"range {offset}+{length} outside object {name!r}") from None
            raise _map_error(e, f"get {name!r} from {self.url}") from None
        except AzureError as e:
            raise _map_error(e, f"get {name!r} from {self.url}") from None
        if length is not None and len(data) != length:
            raise PermanentStoreError(f"range {offset}+{length} outside object {name!r} "
                                      f"(got {len(data)} bytes)")
        return bytes(data)

    async def stat(self, name: str) -> BlobInfo:
        try:
            props = await self._c.get_blob_client(self._key(name)).get_blob_properties()
        except AzureError as e:
            raise _map_error(e, f"stat {name!r} in {self.url}") from None
        return BlobInfo(name, int(props.size), _etag(props.etag))

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        cut = len(self._prefix)
        try:
            async for b in self._c.list_blobs(name_starts_with=self._prefix + prefix):
                yield BlobInfo(b.name[cut:], int(b.size), _etag(b.etag))
        except ResourceNotFoundError:
            return
        except AzureError as e:
            raise _map_error(e, f"list {prefix!r} in {self.url}") from None

    async def delete(self, name: str) -> None:
        try:
            await self._c.get_blob_client(self._key(name)).delete_blob()
        except ResourceNotFoundError:
            pass
        except AzureError as e:
            raise _map_error(e, f"delete {name!r} from {self.url}") from None

    async def server_time(self) -> float | None:
        """The service's clock: the ``Date`` header of a Get Container Properties.

        Every answer carries ``Date``, an error too (a missing container, a SAS without
        the right permission), so any answer tells the time; only no answer fails."""
        seen: list[str] = []

        def hook(response: Any) -> None:
            date = response.http_response.headers.get("Date")
            if date:
                seen.append(date)

        try:
            await self._c.get_container_properties(raw_response_hook=hook)
        except AzureError as e:
            if not seen:
                raise _map_error(e, f"read the clock of {self.url}") from None
        if not seen:
            raise PermanentStoreError(f"{self.url} answered without a Date header")
        try:
            return email.utils.parsedate_to_datetime(seen[-1]).timestamp()
        except (TypeError, ValueError):
            raise PermanentStoreError(f"{self.url} sent an unreadable Date header "
                                      f"{seen[-1]!r}") from None

    async def close(self) -> None:
        # The container client shares the service client's transport: close both.
        await self._c.close()
        await self._svc.close()


def _etag(etag: str | None) -> str:
    """A blob's ETag as its version: the listing quotes it, the properties do not."""
    return (etag or "").strip('"')
