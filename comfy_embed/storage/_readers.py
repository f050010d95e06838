"""Input objects read by URL: one reader per scheme, and the registry that
picks a URL's reader by its scheme.

``http(s)://`` goes out through :mod:`comfy_embed.net` (every hop's address
checked, the connection pinned, the body capped); ``oss://bucket[.endpoint]/key``
and ``s3://bucket/key`` through the store of that backend, which sends
credentials only where :func:`~comfy_embed.storage.base.allowed_endpoint`
lets it. Inline values (base64, ``data:`` URIs) name nothing to read:
:mod:`comfy_embed.inputs.fetch` decodes them, and checks file names of the
input folder, which are handed to ComfyUI as they are, never read.

A reader's failures are :class:`~comfy_embed.errors.ImageInputError`
naming the URL (an unusable input), the store's own ``StorageError`` wrapped.
"""

from __future__ import annotations

import logging
import re
from typing import Awaitable, Callable, Mapping, Protocol

import anyio
import httpx

from comfy_embed.config import Settings
from comfy_embed.errors import ImageInputError, StorageError
from comfy_embed.net import AddressPolicy, HttpClients, follow
from comfy_embed.storage.base import Store
from comfy_embed.storage.credentials import Credentials

__all__ = ["Reader", "Readers", "HttpReader", "OssReader", "S3Reader", "input_readers", "Write"]

#: Takes each chunk of a body as it arrives (may raise to stop the read).
Write = Callable[[bytes], Awaitable[None]]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
# S3's bucket naming rules; also keeps userinfo/ports/hosts out of s3:// values.
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class Reader(Protocol):
    """Reads the object a URL of one scheme names."""

    async def read(self, url: str, credentials: Credentials | None, max_bytes: int) -> bytes:
        """The object's bytes, refused once over ``max_bytes``; ImageInputError
        naming ``url`` when it cannot be read."""
        ...


class Readers:
    """The registry: a reader per URL scheme (``http``, ``oss``, ...)."""

    def __init__(self, readers: Mapping[str, Reader] | None = None) -> None:
        self._readers: dict[str, Reader] = dict(readers or {})

    def register(self, scheme: str, reader: Reader) -> None:
        """Read URLs of ``scheme`` (``scheme://...``) with ``reader``."""
        self._readers[scheme.lower()] = reader

    def scheme(self, url: str) -> str | None:
        """The registered scheme of ``url`` (lower case), or None when no
        reader reads it (a file name, inline data, an unknown scheme)."""
        head, sep, _ = url[:32].partition("://")
        scheme = head.lower()
        return scheme if sep and scheme in self._readers else None

    async def read(self, url: str, credentials: Credentials | None = None, *,
                   max_bytes: int) -> bytes:
        """The bytes ``url`` names, read by its scheme's reader."""
        scheme = self.scheme(url)
        if scheme is None:
            raise ImageInputError(f"{url}: no reader for this kind of URL")
        return await self._readers[scheme].read(url, credentials, max_bytes)

    async def read_into(self, url: str, credentials: Credentials | None = None, *,
                        max_bytes: int, write: Write) -> None:
        """The bytes ``url`` names, handed to ``write`` as they arrive (an
        HTTP body is never held whole in memory), refused once over ``max_bytes``."""
        scheme = self.scheme(url)
        if scheme is None:
            raise ImageInputError(f"{url}: no reader for this kind of URL")
        reader = self._readers[scheme]
        streaming = getattr(reader, "read_into", None)
        if streaming is not None:
            await streaming(url, credentials, max_bytes, write)
        else:
            await write(await reader.read(url, credentials, max_bytes))

    async def aclose(self) -> None:
        """Close what the readers hold for the running loop (HTTP clients)."""
        for reader in {id(r): r for r in self._readers.values()}.values():
            close = getattr(reader, "aclose", None)
            if close is not None:
                await close()


class HttpReader:
    """``http(s)://``: redirects followed, each hop's address checked before
    it is connected to; the whole read bounded by ``fetch_timeout``."""

    def __init__(self, settings: Settings) -> None:
        self.timeout = settings.inputs.fetch_timeout
        self.max_redirects = settings.inputs.max_redirects
        self._policy = AddressPolicy(settings.inputs.url_allowlist)
        self._clients = HttpClients(settings.inputs.fetch_timeout)

    async def read(self, url: str, credentials: Credentials | None, max_bytes: int) -> bytes:
        """The body of ``url``'s 200 answer (``credentials`` are not sent)."""
        chunks: list[bytes] = []

        async def collect(chunk: bytes) -> None:
            chunks.append(chunk)

        await self.read_into(url, credentials, max_bytes, collect)
        return b"".join(chunks)

    async def read_into(self, url: str, credentials: Credentials | None, max_bytes: int,
                        write: Write) -> None:
        """The body of ``url``'s 200 answer, chunk by chunk into ``write``."""
        try:
            with anyio.fail_after(self.timeout):
                async with follow(self._clients.get(), self._policy, url,
                                  max_redirects=self.max_redirects, error=ImageInputError,
                                  headers={"Accept": "image/*"}) as (final, response):
                    await _read_capped(response, final, max_bytes, write)
        except (TimeoutError, httpx.TimeoutException):
            raise ImageInputError(f"{url}: timed out after {self.timeout:g}s") from None
        except httpx.HTTPError as e:
            raise ImageInputError(f"{url}: cannot fetch: {e or type(e).__name__}") from e

    async def aclose(self) -> None:
        """Close the running loop's client."""
        await self._clients.aclose()


async def _read_capped(response: httpx.Response, url: str, cap: int, write: Write) -> None:
    # A declared length over the cap is refused before a byte of the body is read.
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ImageInputError(f"{url}: {declared} bytes is over the {cap} byte limit")
    total = 0
    async for chunk in response.aiter_bytes(_CHUNK):
        total += len(chunk)
        if total > cap:  # the body may be longer than declared, or undeclared
            raise ImageInputError(f"{url}: over the {cap} byte limit")
        await write(chunk)


class _StoreReader:
    """A scheme whose URLs name a bucket and key of a store (None: refused as
    not configured); subclasses say how a URL names them."""

    #: The storage, as "... is not configured" names it.
    what = "storage"

    def __init__(self, store: Store | None) -> None:
        self.store = store

    def locate(self, url: str) -> tuple[str, str | None, str]:
        """``(bucket, endpoint or None, key)`` of ``url``; ImageInputError if malformed."""
        raise NotImplementedError

    async def read(self, url: str, credentials: Credentials | None, max_bytes: int) -> bytes:
        """The object's bytes."""
        bucket, endpoint, key = self.locate(url)
        if self.store is None:
            raise ImageInputError(f"{url}: {self.what} is not configured")
        try:
            return await self.store.get_object(bucket, endpoint, key, credentials,
                                               max_bytes=max_bytes)
        except StorageError as e:
            raise ImageInputError(f"cannot read {url}: {e.message}") from e


class OssReader(_StoreReader):
    """``oss://bucket[.endpoint]/key``. An endpoint other than the configured
    one must be in ``oss_endpoint_allowlist``: the store checks it."""

    what = "object storage"

    def locate(self, url: str) -> tuple[str, str | None, str]:
        """The bucket, the endpoint host the URL names (if any) and the key."""
        netloc, _, key = url[len("oss://"):].partition("/")
        if not netloc or not key:
            raise ImageInputError(f"{url}: expected oss://bucket[.endpoint]/key")
        bucket, _, host = netloc.partition(".")
        return bucket, host.lower() or None, key


class S3Reader(_StoreReader):
    """``s3://bucket/key``, always from the configured endpoint."""

    what = "S3 storage"

    def locate(self, url: str) -> tuple[str, str | None, str]:
        """The bucket and the key (an s3:// URL names no endpoint)."""
        bucket, _, key = url[len("s3://"):].partition("/")
        if not bucket or not key:
            raise ImageInputError(f"{url}: expected s3://bucket/key")
        # Unlike oss://, an s3:// value never names an endpoint: credentials go
        # only to the configured one, so a bucket is only ever a bucket name.
        if not _S3_BUCKET.fullmatch(bucket):
            raise ImageInputError(f"{url}: {bucket!r} is not an S3 bucket name "
                                  "(s3:// inputs cannot name an endpoint)")
        return bucket, None, key


def input_readers(settings: Settings, oss: Store | None = None,
                  s3: Store | None = None) -> Readers:
    """The readers of input URLs: ``http``/``https`` always; ``oss`` and ``s3``
    through these stores (without one, such a URL is refused as not configured)."""
    web = HttpReader(settings)
    return Readers({"http": web, "https": web, "oss": OssReader(oss), "s3": S3Reader(s3)})
