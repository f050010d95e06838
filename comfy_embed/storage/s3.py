"""Object storage on S3-compatible services (AWS S3, Cloudflare R2, MinIO) via boto3.

Another :class:`~comfy_embed.storage.base.Store`, like :mod:`.oss`: either
can upload outputs and read image inputs. boto3 is an optional extra (``pip install comfy-embed[s3]``);
it is imported only when a store is used, so comfy-embed imports without it.

Credentials are resolved on every call, like OssStore's: rotated keys in the
environment take effect without a restart. boto3 is blocking, so every boto3
call runs in a worker thread; boto3 retries transient failures itself.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from comfy_embed.config import Settings
from comfy_embed.errors import StorageError
from comfy_embed.storage.base import allowed_endpoint, read_capped
from comfy_embed.storage.credentials import Credentials

__all__ = ["S3Store", "BACKEND", "MAX_PRESIGN_SECONDS"]

logger = logging.getLogger(__name__)

#: SigV4 presigned URLs live at most seven days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
_ATTEMPTS = 3  # boto3 "standard" retry mode, initial try included
_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_MAX_CLIENTS = 8  # one per distinct key set; rotation adds one now and then
_T = TypeVar("_T")


def _sdk() -> tuple[ModuleType, ModuleType, ModuleType]:
    """(boto3, botocore.config, botocore.exceptions), or StorageError if absent."""
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise StorageError("S3 storage needs boto3: install comfy-embed[s3]") from None
    return boto3, botocore.config, botocore.exceptions


class S3Store:
    """Uploads outputs to, and reads ``s3://`` inputs from, an S3-compatible bucket.

    Credentials, first complete set wins: ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``) in ``env``
    (``os.environ`` by default, read on every call); boto3's default chain
    (shared config files, container and instance roles); the per-request
    ``credentials``.
    """

    #: The key of this store's entry in a result's ``output``.
    result_key = "s3"

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._lock = threading.Lock()  # boto3 Sessions are not thread-safe
        self._session: Any = None
        self._clients: dict[tuple[str | None, ...], Any] = {}

    # --- configuration --------------------------------------------------------
    def check(self) -> None:
        """Raise StorageError naming the missing setting (or the missing extra)."""
        _sdk()
        if not self.settings.store.s3_bucket:
            raise StorageError("S3 bucket is not configured: set COMFY_EMBED_S3_BUCKET")
        if self.settings.store.s3_endpoint:
            _checked_endpoint(self.settings.store.s3_endpoint, "COMFY_EMBED_S3_ENDPOINT")

    def _bucket_name(self) -> str:
        if not self.settings.store.s3_bucket:
            raise StorageError("S3 bucket is not configured: set COMFY_EMBED_S3_BUCKET")
        return self.settings.store.s3_bucket

    def _endpoint_for(self, endpoint: str | None) -> str | None:
        """The endpoint URL to talk to: the configured one (None: AWS's own),
        or an allowlisted one (:func:`~comfy_embed.storage.base.allowed_endpoint`)."""
        configured = self.settings.store.s3_endpoint
        if configured:
            _checked_endpoint(configured, "COMFY_EMBED_S3_ENDPOINT")
        return allowed_endpoint(endpoint, configured, self.settings.store.s3_endpoint_allowlist,
                                "COMFY_EMBED_S3_ENDPOINT_ALLOWLIST")

    # --- clients ----------------------------------------------------------------
    def _client(self, endpoint: str | None, credentials: Credentials | None) -> Any:
        """A boto3 client for ``endpoint`` (blocking: call it in a worker thread)."""
        boto3, bconfig, _ = _sdk()
        key_id: str | None = self._env.get(_ENV_VARS[0], "").strip()
        secret: str | None = self._env.get(_ENV_VARS[1], "").strip()
        token: str | None = self._env.get(_ENV_VARS[2], "").strip() or None
        with self._lock:
            if self._session is None:
                self._session = boto3.session.Session(botocore_session=_botocore_session())
            session = self._session
            if not (key_id and secret):
                key_id = secret = token = None
                # boto3's own chain; it caches and refreshes role credentials.
                if session.get_credentials() is None:
                    if credentials is None:
                        raise StorageError(
                            "no S3 credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            "(or configure a profile or role boto3 can find)")
                    key_id, secret = credentials.access_key_id, credentials.access_key_secret
                    token = credentials.security_token
            cache_key = (endpoint, key_id, secret, token)
            client = self._clients.get(cache_key)
            if client is None:
                if len(self._clients) >= _MAX_CLIENTS:
                    self._clients.clear()
                # Path-style for custom endpoints: MinIO and most self-hosted
                # services have no per-bucket DNS names.
                config = bconfig.Config(
                    signature_version="s3v4",
                    retries={"mode": "standard", "total_max_attempts": _ATTEMPTS},
                    connect_timeout=self.settings.inputs.fetch_timeout,
                    read_timeout=max(self.settings.inputs.fetch_timeout, 60.0),
                    s3={"addressing_style": "path" if endpoint else "auto"},
                    # Newer botocore adds CRC checksums that many S3-compatible
                    # services reject; send them only where S3 requires them.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
                client = session.client(
                    "s3", region_name=self.settings.store.s3_region, endpoint_url=endpoint,
                    aws_access_key_id=key_id, aws_secret_access_key=secret,
                    aws_session_token=token, config=config)
                self._clients[cache_key] = client
            return client

    # --- operations -----------------------------------------------------------
    async def upload(self, path: Path, content_type: str | None = None,
                     credentials: Credentials | None = None) -> dict[str, Any]:
        """Put a file at ``<prefix>/<uuid4 hex>.<ext>``.

        Returns ``{"region", "bucket", "object"}``, plus a presigned GET
        ``url`` and its ``expire`` time (ISO-8601 UTC) when a link lifetime is set.
        """
        s = self.settings.store
        _sdk()
        bucket = self._bucket_name()
        endpoint = self._endpoint_for(None)
        key = f"{s.s3_prefix.strip('/')}/{uuid.uuid4().hex}{path.suffix.lower()}".lstrip("/")
        ctype = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        where = f"s3://{bucket}/{key}"

        def put() -> Any:
            client = self._client(endpoint, credentials)
            with open(path, "rb") as body:  # seekable, so boto3 can rewind on retry
                client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ctype)
            return client

        client = await self._call(where, put)
        logger.info("uploaded %s to %s", path.name, where)
        out: dict[str, Any] = {"region": s.s3_region or client.meta.region_name,
                               "bucket": bucket, "object": key}
        if s.s3_link_expire:
            seconds = min(s.s3_link_expire, MAX_PRESIGN_SECONDS)
            if credentials is not None and credentials.expiration is not None:
                # A link signed with a temporary key dies with the key.
                left = int((credentials.expiration - datetime.now(timezone.utc)).total_seconds())
                seconds = min(seconds, left)
            if seconds <= 0:
                raise StorageError(f"{where}: cannot sign a link: the security token has expired")
            url = await self._call(f"{where}: signing the link", lambda: client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds))
            expire = datetime.now(timezone.utc) + timedelta(seconds=seconds)
            out["url"] = url
            out["expire"] = expire.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out

    async def sign(self, bucket: str, key: str, credentials: Credentials | None = None
                   ) -> str | None:
        """A fresh presigned GET URL of an object this store uploaded (None
        when no link lifetime is configured). Comfy API v2 redirects there."""
        s = self.settings.store
        if not s.s3_link_expire:
            return None
        _sdk()
        url = self._endpoint_for(None)
        seconds = min(s.s3_link_expire, MAX_PRESIGN_SECONDS)
        return str(await self._call(f"s3://{bucket}/{key}: signing a link", lambda: self._client(
            url, credentials).generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds)))

    async def get_object(self, bucket: str, endpoint: str | None, key: str,
                         credentials: Credentials | None = None,
                         max_bytes: int | None = None) -> bytes:
        """Read one object (``endpoint`` None: the configured one; any other
        must be in ``s3_endpoint_allowlist``).

        Refuses objects over ``max_bytes``, checking the declared length first
        and the bytes read while streaming.
        """
        _sdk()
        url = self._endpoint_for(endpoint)
        where = f"s3://{bucket}/{key}"

        def read() -> bytes:
            response = self._client(url, credentials).get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                return read_capped(body.read, response.get("ContentLength"), max_bytes, where)
            finally:
                body.close()

        return await self._call(where, read)

    async def delete(self, bucket: str, key: str, credentials: Credentials | None = None) -> None:
        """Delete one object this store uploaded (deleting a missing one is no
        error); a link signed for it then answers 404. Only the configured
        endpoint is used: an upload never went elsewhere."""
        _sdk()
        url = self._endpoint_for(None)
        await self._call(f"s3://{bucket}/{key}", lambda: self._client(url, credentials)
                         .delete_object(Bucket=bucket, Key=key))

    async def _call(self, where: str, fn: Callable[[], _T]) -> _T:
        """Run a blocking boto3 call in a thread; turn its failures into StorageError."""
        _, _, exc = _sdk()
        try:
            return await anyio.to_thread.run_sync(fn)
        except StorageError:
            raise
        except exc.ClientError as e:
            raise StorageError(f"{where}: {_describe(e)}") from e
        except exc.BotoCoreError as e:  # unreachable endpoint, timeout, bad parameter
            raise StorageError(f"{where}: {e}") from e
        except OSError as e:  # reading the local file
            raise StorageError(f"{where}: {e}") from e


_loader_lock = threading.Lock()
_loader: Any = None


def _botocore_session() -> Any:
    """A fresh botocore session (its own credential chain) that shares one
    loader of botocore's service model files with every other: loading them
    takes about 0.2 s of CPU per session, the files never change."""
    import botocore.loaders
    import botocore.session

    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        session = botocore.session.get_session()
        session.register_component("data_loader", _loader)
        return session


def _checked_endpoint(url: str, name: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise StorageError(f"{name} must be an http(s) URL such as https://host:port, not {url!r}")
    return url


def _describe(e: Any) -> str:
    """``NoSuchKey: The specified key does not exist. (HTTP 404)`` from a ClientError."""
    err = e.response.get("Error", {})
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    text = ": ".join(x for x in (err.get("Code"), err.get("Message")) if x) or str(e)
    return f"{text} (HTTP {status})" if status else text


#: This module's :class:`~comfy_embed.storage.base.Store` (``COMFY_EMBED_STORAGE=s3``).
BACKEND = S3Store
