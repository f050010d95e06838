"""The one interface every object-storage backend offers.

A backend is one module of this package that defines a class satisfying
:class:`Store` and names it ``BACKEND``; ``COMFY_EMBED_STORAGE=<module>``
then selects it for ``output_oss`` uploads (see :func:`open_store`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, runtime_checkable
from urllib.parse import urlsplit

from comfy_embed.errors import StorageError
from comfy_embed.storage.credentials import Credentials

__all__ = ["Store", "read_capped", "allowed_endpoint"]


@runtime_checkable
class Store(Protocol):
    """Uploads outputs and reads input objects; errors are StorageError.

    Backends are built as ``cls(settings, env=None)``: ``env`` is where they read
    credential variables, on every call (rotated tokens work without a
    restart); ``os.environ`` when None.
    """

    #: The key of this store's entry in a result's ``output`` ("oss", "s3").
    result_key: str

    def check(self) -> None:
        """Raise StorageError naming the missing setting, before any work."""
        ...

    async def upload(self, path: Path, content_type: str | None = None,
                     credentials: Credentials | None = None) -> dict[str, Any]:
        """Put a file under a fresh unique key; the result's entry for it
        (``{"region", "bucket", "object"}`` plus ``url``/``expire`` when a
        link lifetime is configured)."""
        ...

    async def get_object(self, bucket: str, endpoint: str | None, key: str,
                         credentials: Credentials | None = None,
                         max_bytes: int | None = None) -> bytes:
        """One object's bytes (``endpoint`` None: the configured one),
        refused once over ``max_bytes``."""
        ...

    async def delete(self, bucket: str, key: str, credentials: Credentials | None = None) -> None:
        """Delete an object this store uploaded (absent: no error), so that
        links already signed for it stop working."""
        ...


def read_capped(read: Callable[[int], bytes], size: int | None, max_bytes: int | None,
                where: str) -> bytes:
    """An object's body through ``read(n)``, refused as soon as it passes
    ``max_bytes`` (by its declared ``size`` or by the bytes received)."""
    if max_bytes is not None and size is not None and size > max_bytes:
        raise StorageError(f"{where}: {size} bytes is over the {max_bytes} byte limit")
    chunks, total = [], 0
    while chunk := read(64 * 1024):
        total += len(chunk)
        if max_bytes is not None and total > max_bytes:
            raise StorageError(f"{where}: over the {max_bytes} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def allowed_endpoint(requested: str | None, configured: str | None, allowlist: Iterable[str],
                     setting: str) -> str | None:
    """The endpoint a store may send credentials to when a read names
    ``requested`` (a host or URL; None: the configured one).

    The configured endpoint when ``requested`` is it or names its host; the
    requested endpoint (``https://`` unless it names a scheme) when its host
    is in ``allowlist``; StorageError naming the ``setting`` that could admit
    it otherwise. The one rule for every backend: credentials never go to a
    host the operator did not name.
    """
    if requested is None or requested == configured:
        return configured
    url = requested if "://" in requested else "https://" + requested
    parts = urlsplit(url)
    host = parts.netloc.lower()
    if configured:
        conf = urlsplit(configured if "://" in configured else "//" + configured)
        if host and host == conf.netloc.lower():
            return configured
    if host and host in {h.strip().lower() for h in allowlist}:
        if parts.scheme not in ("http", "https"):
            raise StorageError(f"endpoint {requested} must be an http(s) URL "
                               "such as https://host:port")
        return url
    raise StorageError(f"endpoint {host or requested} is not the configured one nor in {setting}")
