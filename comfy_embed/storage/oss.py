"""Alibaba Cloud OSS (via oss2): output uploads and ``oss://`` inputs.

Credentials are looked up on every call, never cached: a Function Compute role
hands out short-lived STS tokens that rotate under a running process. oss2 is
blocking, so every oss2 call runs in a worker thread.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import oss2
import oss2.credentials
import oss2.exceptions

from comfy_embed.config import Settings
from comfy_embed.errors import StorageError
from comfy_embed.storage.base import allowed_endpoint, read_capped
from comfy_embed.storage.credentials import Credentials, credentials_from_env

__all__ = ["OssStore", "BACKEND", "MAX_V4_LINK_SECONDS", "region_of"]

logger = logging.getLogger(__name__)

#: OSS refuses V4 signed URLs that live longer than seven days.
MAX_V4_LINK_SECONDS = 7 * 24 * 3600
_RETRIES = 3
_BACKOFF = 0.5  # seconds, doubled on each retry
_T = TypeVar("_T")

# (id, secret, token) variable names, in lookup order.
_ENV_CHAIN = (
    ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN"),
    ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
     "ALIBABA_CLOUD_SECURITY_TOKEN"),
)
_REGION_RE = re.compile(r"(?:^|\.)oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")


def region_of(endpoint: str) -> str | None:
    """The region id (``cn-hangzhou``) named by an endpoint such as
    ``oss-cn-hangzhou(-internal).aliyuncs.com``; None for other hosts."""
    host = urlsplit(endpoint if "://" in endpoint else "//" + endpoint).hostname or ""
    m = _REGION_RE.search(host)
    return m.group(1) if m else None


def _url(endpoint: str) -> str:
    return endpoint if "://" in endpoint else "https://" + endpoint


class _ChainProvider(oss2.credentials.CredentialsProvider):
    """An oss2 provider that resolves the credential chain each time oss2 signs."""

    def __init__(self, resolve: Callable[[], Credentials]) -> None:
        self._resolve = resolve

    def get_credentials(self) -> oss2.credentials.Credentials:
        c = self._resolve()
        return oss2.credentials.Credentials(c.access_key_id, c.access_key_secret,
                                            c.security_token or "")


class OssStore:
    """Uploads outputs to, and reads ``oss://`` inputs from, Alibaba Cloud OSS.

    ``env`` is where the credential variables are read (``os.environ`` by
    default); it is read again on every call.
    """

    #: The key of this store's entry in a result's ``output``.
    result_key = "oss"

    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._env: Mapping[str, str] = os.environ if env is None else env
        # One HTTP connection pool for all buckets; requests' Session is safe
        # to share between the worker threads for this kind of use.
        self._session = oss2.Session()

    # --- configuration --------------------------------------------------------
    def check(self) -> None:
        """Raise StorageError naming the missing setting, before any work."""
        if not self.settings.store.oss_bucket:
            raise StorageError("object storage bucket is not configured: set COMFY_EMBED_OSS_BUCKET")
        endpoint = self._endpoint()
        if self.settings.store.oss_sign_v4 and not self.region(endpoint):
            raise StorageError(f"V4 signing needs a region: set COMFY_EMBED_OSS_REGION "
                               f"(endpoint {endpoint} names none)")

    def credentials(self, credentials: Credentials | None = None) -> Credentials:
        """The first complete credentials of: ``OSS_*`` variables,
        ``ALIBABA_CLOUD_*`` variables, then the per-request ``credentials``."""
        found = credentials_from_env(self._env, _ENV_CHAIN)
        if found is not None:
            return found
        if credentials is not None:
            return credentials
        names = ", ".join(f"{i}/{s}" for i, s, _ in _ENV_CHAIN)
        raise StorageError(f"no object storage credentials: set {names} "
                           "(or call with the x-fc-access-key-* headers)")

    def region(self, endpoint: str | None = None) -> str | None:
        """The signing region: derived from ``endpoint`` when it names one,
        else ``settings.store.oss_region``, else derived from the configured endpoint."""
        derived = region_of(endpoint) if endpoint else None
        store = self.settings.store
        region = derived or store.oss_region or (
            region_of(store.oss_endpoint) if store.oss_endpoint else None)
        # Accept "oss-cn-hangzhou" as well as oss2's "cn-hangzhou".
        return region[4:] if region and region.startswith("oss-") else region

    def _endpoint(self) -> str:
        if not self.settings.store.oss_endpoint:
            raise StorageError("object storage endpoint is not configured: "
                               "set COMFY_EMBED_OSS_ENDPOINT")
        return self.settings.store.oss_endpoint

    def _bucket(self, name: str, endpoint: str, credentials: Credentials | None,
                timeout: float | None = None) -> oss2.Bucket:
        provider = _ChainProvider(lambda: self.credentials(credentials))
        region = self.region(endpoint)
        if self.settings.store.oss_sign_v4:
            if not region:
                raise StorageError(f"V4 signing needs a region: set COMFY_EMBED_OSS_REGION "
                                   f"(endpoint {endpoint} names none)")
            auth: Any = oss2.ProviderAuthV4(provider)
        else:
            auth = oss2.ProviderAuth(provider)
        kw: dict[str, Any] = {"session": self._session, "region": region}
        if timeout is not None:
            kw["connect_timeout"] = timeout
        try:
            return oss2.Bucket(auth, _url(endpoint), name, **kw)
        except oss2.exceptions.ClientError as e:  # e.g. an invalid bucket name
            raise StorageError(f"oss://{name} at {endpoint}: {_describe(e)}") from e

    # --- operations -----------------------------------------------------------
    async def upload(self, path: Path, content_type: str | None = None,
                     credentials: Credentials | None = None) -> dict[str, Any]:
        """Put a file at ``<prefix>/<uuid4 hex>.<ext>``.

        Returns ``{"region", "bucket", "object"}``, plus a signed GET ``url``
        and its ``expire`` time (ISO-8601 UTC) when a link lifetime is set.
        """
        s = self.settings.store
        if not s.oss_bucket:
            raise StorageError("object storage bucket is not configured: set COMFY_EMBED_OSS_BUCKET")
        endpoint = self._endpoint()
        creds = self.credentials(credentials)  # fail early, with the variable names
        key = f"{s.oss_prefix.strip('/')}/{uuid.uuid4().hex}{path.suffix.lower()}".lstrip("/")
        ctype = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        bucket = self._bucket(s.oss_bucket, endpoint, credentials)
        where = f"oss://{s.oss_bucket}/{key}"
        await self._call(where, lambda: bucket.put_object_from_file(
            key, str(path), headers={"Content-Type": ctype}))
        logger.info("uploaded %s to %s", path.name, where)
        region = self.region(endpoint)
        out: dict[str, Any] = {"region": f"oss-{region}" if region else None,
                               "bucket": s.oss_bucket, "object": key}
        if s.oss_link_expire:
            seconds = self._link_seconds(s.oss_link_expire, creds)
            signer = self._bucket(s.oss_bucket, s.oss_public_endpoint or endpoint, credentials)
            try:
                url = await anyio.to_thread.run_sync(
                    lambda: signer.sign_url("GET", key, seconds, slash_safe=True))
            except (oss2.exceptions.OssError, ValueError) as e:
                raise StorageError(f"{where}: signing the link failed: {e}") from e
            expire = datetime.now(timezone.utc) + timedelta(seconds=seconds)
            out["url"] = url
            out["expire"] = expire.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out

    async def sign(self, bucket: str, key: str, credentials: Credentials | None = None
                   ) -> str | None:
        """A fresh signed GET URL of an object this store uploaded (None when
        no link lifetime is configured). Comfy API v2 redirects there."""
        s = self.settings.store
        if not s.oss_link_expire:
            return None
        seconds = self._link_seconds(s.oss_link_expire, self.credentials(credentials))
        signer = self._bucket(bucket, s.oss_public_endpoint or self._endpoint(), credentials)
        try:
            return str(await anyio.to_thread.run_sync(
                lambda: signer.sign_url("GET", key, seconds, slash_safe=True)))
        except (oss2.exceptions.OssError, ValueError) as e:
            raise StorageError(f"oss://{bucket}/{key}: signing a link failed: {e}") from e

    def _link_seconds(self, wanted: int, creds: Credentials) -> int:
        seconds = wanted
        if self.settings.store.oss_sign_v4:
            seconds = min(seconds, MAX_V4_LINK_SECONDS)
        if creds.expiration is not None:
            left = (creds.expiration - datetime.now(timezone.utc)).total_seconds()
            seconds = min(seconds, int(left))
        if seconds <= 0:
            raise StorageError("cannot sign a link: the security token has expired")
        return seconds

    async def get_object(self, bucket: str, endpoint: str | None, key: str,
                         credentials: Credentials | None = None,
                         max_bytes: int | None = None) -> bytes:
        """Read one object (``endpoint`` None: the configured one; any other
        must be in ``oss_endpoint_allowlist``).

        Refuses objects over ``max_bytes``, checking the declared length first
        and the bytes read while streaming.
        """
        endpoint = allowed_endpoint(endpoint, self.settings.store.oss_endpoint,
                                    self.settings.store.oss_endpoint_allowlist,
                                    "COMFY_EMBED_OSS_ENDPOINT_ALLOWLIST") or self._endpoint()
        self.credentials(credentials)
        b = self._bucket(bucket, endpoint, credentials, timeout=self.settings.inputs.fetch_timeout)
        where = f"oss://{bucket}/{key}"

        def read() -> bytes:
            result = b.get_object(key)
            try:
                return read_capped(result.read, result.content_length, max_bytes, where)
            finally:
                result.resp.response.close()

        return await self._call(where, read)

    async def delete(self, bucket: str, key: str, credentials: Credentials | None = None) -> None:
        """Delete one object this store uploaded (deleting a missing one is no
        error); a link signed for it then answers 404. Only the configured
        endpoint is used: an upload never went elsewhere."""
        self.credentials(credentials)
        b = self._bucket(bucket, self._endpoint(), credentials)
        await self._call(f"oss://{bucket}/{key}", lambda: b.delete_object(key))

    async def _call(self, where: str, fn: Callable[[], _T]) -> _T:
        """Run a blocking oss2 call in a thread; retry transient failures."""
        delay = _BACKOFF
        for attempt in range(_RETRIES + 1):
            try:
                return await anyio.to_thread.run_sync(fn)
            except oss2.exceptions.OssError as e:
                # RequestError: connection refused/reset/timed out.
                transient = isinstance(e, oss2.exceptions.RequestError) or e.status >= 500
                if not transient or attempt == _RETRIES:
                    raise StorageError(f"{where}: {_describe(e)}") from e
                logger.warning("%s: %s; retrying in %.1fs", where, _describe(e), delay)
            except OSError as e:
                if attempt == _RETRIES:
                    raise StorageError(f"{where}: {e}") from e
                logger.warning("%s: %s; retrying in %.1fs", where, e, delay)
            await anyio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover


def _describe(e: oss2.exceptions.OssError) -> str:
    if isinstance(e, oss2.exceptions.RequestError):
        return f"cannot reach object storage ({e.exception})"
    if isinstance(e, oss2.exceptions.ClientError):
        return str(e.body)
    return f"HTTP {e.status} {e.code or ''}: {e.message or ''}".strip()


#: This module's :class:`~comfy_embed.storage.base.Store` (``COMFY_EMBED_STORAGE=oss``).
BACKEND = OssStore
