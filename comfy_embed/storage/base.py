"""The one interface every object-storage backend offers.

A backend is one module of this package that defines a class satisfying
:class:`Store` and names it ``BACKEND``; ``COMFY_EMBED_STORAGE=<module>``
then selects it for ``output_oss`` uploads (see :func:`open_store`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from comfy_embed.errors import StorageError
from comfy_embed.storage.credentials import Credentials

__all__ = ["Store", "read_capped"]


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
