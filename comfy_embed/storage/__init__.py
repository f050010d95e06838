"""Object storage behind one interface: the only package that imports a
storage SDK (oss2, boto3).

- :mod:`.base`: the :class:`Store` Protocol (check, upload, get_object,
  result_key) every backend satisfies.
- :mod:`.credentials`: access keys from request headers or the environment,
  with no SDK import (the API reads them on every request).
- :class:`Readers`: input objects read by URL, one reader per scheme
  (``http``, ``https``, ``oss``, ``s3``; :func:`input_readers` builds them).
- one module per backend (:mod:`.oss`, :mod:`.s3`), each naming its store
  class ``BACKEND``. Adding a backend (Azure, GCS, HTTP PUT) is adding one
  such module: :func:`open_store` finds it by its module name, which is
  also the value of ``COMFY_EMBED_STORAGE`` that selects it.

Backends are imported on first use, so importing this package imports no SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Mapping

from comfy_embed.config import storage_backends
from comfy_embed.errors import StorageError
from comfy_embed.storage._readers import Reader, Readers, input_readers
from comfy_embed.storage.base import Store, read_capped
from comfy_embed.storage.credentials import (
    Credentials,
    credentials_from_env,
    credentials_from_headers,
)

if TYPE_CHECKING:
    from comfy_embed.config import Settings
    from comfy_embed.storage.oss import OssStore
    from comfy_embed.storage.s3 import S3Store

__all__ = ["Store", "Credentials", "credentials_from_headers", "credentials_from_env",
           "read_capped", "backends", "open_store", "OssStore", "S3Store",
           "Reader", "Readers", "input_readers"]

#: Public names served lazily from their backend module (``from comfy_embed.storage import OssStore``).
_LAZY = {"OssStore": "oss", "S3Store": "s3"}


def backends() -> tuple[str, ...]:
    """The names of the storage backends this package holds (``oss``, ``s3``, ...)."""
    return storage_backends(__path__)


def open_store(name: str, settings: "Settings", env: Mapping[str, str] | None = None) -> Store:
    """A new store of backend ``name`` (a module of this package)."""
    if name not in backends():
        raise StorageError(f"unknown storage backend {name!r}: expected one of "
                           f"{', '.join(backends())}")
    module = importlib.import_module(f"{__name__}.{name}")
    store: Store = module.BACKEND(settings, env=env)
    return store


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
