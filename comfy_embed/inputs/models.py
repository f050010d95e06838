"""Models by URL: a manifest of ``{url, sha256, folder, name, size?}`` entries fetched
into the models folder at start-up, once, even when many instances share that
folder (a NAS).

Per model file, on the shared folder:

- ``<name>`` appears only by an atomic rename of a fully downloaded, verified
  file (readers never see a partial model);
- ``.<name>.lock`` is a lease (tasklog.leases), taken exclusively by the one instance that
  downloads; it renews the lock's mtime while it works. Others wait for the
  file; a lock not renewed for ``model_lock_seconds`` (a crashed downloader)
  is taken over by renaming it away, which exactly one waiter wins;
- ``.<name>.<owner>.part`` is the download in progress, hashed as it streams;
  a SHA-256 mismatch deletes it and fails with the model named. It never
  grows past the entry's ``size`` (else ``model_max_bytes``): a declared
  ``Content-Length`` over it is refused before the body is read, a body
  that streams past it is cut there and deleted;
- ``.<name>.sha256`` records the verified hash, size and mtime, so a restart
  does not hash gigabytes again.

URLs obey the image-input address rules (private, loopback and metadata
addresses need ``url_allowlist``) on every redirect, and ``model_hosts``, when
set, on every hop too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import httpx

from comfy_embed.config import Settings
from comfy_embed.errors import ModelDownloadError, node_error
from comfy_embed.net import AddressPolicy, follow, new_client
from comfy_embed.tasklog.leases import Leases

log = logging.getLogger(__name__)

__all__ = ["ModelEntry", "ModelDownloadError", "load_manifest", "ensure_models", "FirstUse"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ModelEntry:
    """One manifest entry: ``<models>/<folder>/<name>`` from ``url``."""

    url: str
    sha256: str
    folder: str
    name: str
    #: The file's size in bytes when the manifest says it (the download must
    #: be exactly this long), else None (bounded by ``model_max_bytes``).
    size: int | None = None

    @property
    def label(self) -> str:
        return f"{self.folder}/{self.name}"


def load_manifest(path: Path) -> list[ModelEntry]:
    """Read and check the manifest (a JSON list, or ``{"models": [...]}``).
    Raises ValueError naming the entry at fault."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"models manifest {path}: {e}") from None
    items = raw.get("models") if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise ValueError(f"models manifest {path}: expected a list of models")
    entries: list[ModelEntry] = []
    for i, item in enumerate(items):
        where = f"models manifest {path}, entry {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object with url, sha256, folder, name")
        url, sha, folder, name = (item.get(k) for k in ("url", "sha256", "folder", "name"))
        if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"{where}: url must be an http(s) URL")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha.lower()):
            raise ValueError(f"{where}: sha256 must be 64 hex digits")
        if not isinstance(folder, str) or not _FOLDER.fullmatch(folder) or folder in (".", ".."):
            raise ValueError(f"{where}: folder must be a plain folder name such as checkpoints")
        if not isinstance(name, str) or not _safe_name(name):
            raise ValueError(f"{where}: name must be a relative file name without '..'")
        size = item.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{where}: size must be a positive number of bytes")
        entries.append(ModelEntry(url, sha.lower(), folder, name, size))
    return entries


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return (bool(name) and "\\" not in name and "\x00" not in name and not p.is_absolute()
            and all(part not in ("", ".", "..") and not part.startswith(".") for part in p.parts))


def ensure_models(settings: Settings) -> list[Path]:
    """Fetch every manifest model that is not in the models folder yet (blocking;
    called at boot). Raises ModelDownloadError for the first that fails."""
    assert settings.models.manifest is not None
    try:
        entries = load_manifest(settings.models.manifest)
    except ValueError as e:
        raise ModelDownloadError(str(e)) from None
    owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return [_ensure(settings, entry, owner) for entry in entries]


class FirstUse:
    """Models fetched when a workflow first names them (``first_use``), for
    one engine.

    In this process one download per model runs at a time, in a worker
    thread of its own limiter (at most ``_DOWNLOADERS`` at once): requests
    naming a model being downloaded wait on an event, holding no thread, so
    the threads that answer ``/status`` and the task log stay free. A
    download that failed (sha256, size, network) is answered from memory for
    ``model_retry_seconds``, not downloaded again by every request.
    """

    def __init__(self, settings: Settings, entries: list[ModelEntry]) -> None:
        self.settings = settings
        self._owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._by_name: dict[str, list[ModelEntry]] = {}
        for entry in entries:
            self._by_name.setdefault(entry.name, []).append(entry)
        #: label -> (monotonic time, error) of the last failed download.
        self._failed: dict[str, tuple[float, ModelDownloadError]] = {}
        #: Per event loop (run_workflow runs one per call): the downloads
        #: running (label -> set when it ends) and the downloaders' limiter.
        self._running: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, anyio.Event]] = weakref.WeakKeyDictionary()
        self._limiters: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()

    async def ensure(self, prompt: dict[str, Any]) -> None:
        """Every manifest model ``prompt`` names, present and verified; a
        failure is a ModelDownloadError naming the node and input too."""
        for node_id, node in prompt.items():
            for input_name, value in (node.get("inputs") or {}).items():
                for entry in self._by_name.get(value, []) if isinstance(value, str) else []:
                    try:
                        await self._one(entry)
                    except ModelDownloadError as e:
                        raise ModelDownloadError(
                            f"node {node_id} ({node.get('class_type')}) input '{input_name}': {e}",
                            node_errors=node_error(node_id, str(node.get("class_type")),
                                                   input_name, str(e), value,
                                                   type="model_download_error")) from None

    async def _one(self, entry: ModelEntry) -> None:
        loop = asyncio.get_running_loop()
        running = self._running.setdefault(loop, {})
        while True:
            failed = self._failed.get(entry.label)
            if failed is not None:
                ago = time.monotonic() - failed[0]
                if ago < self.settings.models.retry_seconds:
                    raise ModelDownloadError(
                        f"{failed[1].message} (failed {ago:.0f}s ago; not tried again for "
                        f"COMFY_EMBED_MODEL_RETRY_SECONDS={self.settings.models.retry_seconds:g})")
                del self._failed[entry.label]
            other = running.get(entry.label)
            if other is None:
                break
            await other.wait()  # another request's download: wait without a thread
        done = running[entry.label] = anyio.Event()
        limiter = self._limiters.get(loop)
        if limiter is None:
            limiter = self._limiters[loop] = anyio.CapacityLimiter(_DOWNLOADERS)
        try:
            await anyio.to_thread.run_sync(_ensure, self.settings, entry, self._owner,
                                           limiter=limiter)
        except ModelDownloadError as e:
            self._failed[entry.label] = (time.monotonic(), e)
            raise
        finally:
            del running[entry.label]
            done.set()


#: Downloads of first-use models running at once in a process (threads).
_DOWNLOADERS = 4


def _ensure(settings: Settings, entry: ModelEntry, owner: str) -> Path:
    final = settings.comfy.models_path / entry.folder / entry.name
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.parent / f".{final.name}.lock"
    leases = Leases(owner, settings.models.lock_seconds)
    deadline = time.monotonic() + settings.models.fetch_timeout
    waited = False
    while True:
        if final.exists():
            _verify_existing(final, entry)
            if waited:
                log.info("model %s: downloaded by another instance", entry.label)
            return final
        if leases.take(lock):
            try:
                if final.exists():  # finished between our look and our lock
                    continue
                _download(settings, entry, final, lock, leases)
                return final
            finally:
                leases.drop(lock)
        if lock.exists() and not leases.live(lock):
            holder = leases.break_expired(lock)
            if holder is not None:
                log.warning("model %s: taking over from a downloader that stopped (lock held "
                            "by %s)", entry.label, holder)
            continue
        if time.monotonic() > deadline:
            raise ModelDownloadError(f"model {entry.label}: another instance holds {lock} "
                                     f"for longer than {settings.models.fetch_timeout:g}s")
        if not waited:
            log.info("model %s: another instance is downloading it; waiting", entry.label)
            waited = True
        time.sleep(0.5)  # polling a shared folder: no cross-host notification exists


# --- the lock ---------------------------------------------------------------
# A download lock is a lease (comfy_embed/tasklog/leases.py): taken
# exclusively, renewed while the download runs, dropped when it ends, and
# broken by a waiter once its holder has not renewed it for lock_seconds.
class _Renewer:
    """Renews the lock while the download runs, so waiters see it alive."""

    def __init__(self, lock: Path, leases: Leases, every: float) -> None:
        self.lock, self.leases, self.every = lock, leases, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-lock", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if self.leases.holder(self.lock) == self.leases.instance_id:
                self.leases.renew(self.lock)

    def __enter__(self) -> "_Renewer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# --- download and verification ----------------------------------------------
def _download(settings: Settings, entry: ModelEntry, final: Path, lock: Path,
              leases: Leases) -> None:
    part = final.parent / f".{final.name}.{leases.instance_id}.part"
    log.info("model %s: downloading %s", entry.label, entry.url)
    t0 = time.monotonic()
    try:
        with _Renewer(lock, leases, max(settings.models.lock_seconds / 4, 0.25)):
            digest, size = anyio.run(_fetch, settings, entry, part)
        if digest != entry.sha256:
            raise ModelDownloadError(f"model {entry.label} from {entry.url}: sha256 {digest} "
                                     f"does not match the manifest's {entry.sha256}; refused")
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    _write_marker(final, entry.sha256)
    log.info("model %s: %d bytes verified in %.1fs", entry.label, size, time.monotonic() - t0)


async def _fetch(settings: Settings, entry: ModelEntry, part: Path) -> tuple[str, int]:
    """Download ``entry`` into ``part``: the digest and size. Each download
    runs in a loop of its own (``anyio.run`` from a thread), so its client
    is its own too, with the process's one TLS context."""
    policy = AddressPolicy(settings.inputs.url_allowlist)

    def refused(message: str) -> ModelDownloadError:
        return ModelDownloadError(f"model {entry.label}: {message}")

    def check_hop(url: str, host: str) -> None:
        if not _host_allowed(host, settings.models.hosts):
            raise refused(f"{url}: host {host} is not in COMFY_EMBED_MODEL_HOSTS")

    try:
        with anyio.fail_after(settings.models.fetch_timeout):
            async with new_client(settings.inputs.fetch_timeout) as client, follow(
                    client, policy, entry.url, max_redirects=settings.inputs.max_redirects,
                    error=refused, check_hop=check_hop) as (_, response):
                return await _stream_to(response, part, entry,
                                        entry.size or settings.models.max_bytes)
    except TimeoutError:
        raise refused(f"{entry.url}: timed out after {settings.models.fetch_timeout:g}s") from None
    except httpx.HTTPError as e:
        raise refused(f"{entry.url}: {e or type(e).__name__}") from None


async def _stream_to(response: httpx.Response, part: Path, entry: ModelEntry,
                     bound: int) -> tuple[str, int]:
    declared = response.headers.get("content-length", "")
    total = int(declared) if declared.isdigit() else 0
    what = "the manifest's size" if entry.size is not None else "COMFY_EMBED_MODEL_MAX_BYTES"
    if total > bound or (entry.size is not None and declared.isdigit() and total != entry.size):
        raise ModelDownloadError(f"model {entry.label} from {entry.url}: Content-Length {total} "
                                 f"does not fit {what} ({bound} bytes); refused before reading")
    digest = hashlib.sha256()
    size = 0
    last_log = time.monotonic()
    with open(part, "wb") as f:
        async for chunk in response.aiter_bytes(_CHUNK):
            size += len(chunk)
            if size > bound:
                raise ModelDownloadError(f"model {entry.label} from {entry.url}: over {what} "
                                         f"({bound} bytes); stopped and deleted")
            digest.update(chunk)
            await anyio.to_thread.run_sync(f.write, chunk)
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                pct = f" ({100 * size // total}%)" if total else ""
                log.info("model %s: %d bytes%s", entry.label, size, pct)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest(), size


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def _marker(final: Path) -> Path:
    return final.parent / f".{final.name}.sha256"


def _write_marker(final: Path, sha: str) -> None:
    st = final.stat()
    tmp = final.parent / f".{final.name}.sha256.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, _marker(final))


def _verify_existing(final: Path, entry: ModelEntry) -> None:
    """A file already there must be the manifest's: trusted through its
    marker, else hashed once (a file placed by hand)."""
    st = final.stat()
    try:
        mark = json.loads(_marker(final).read_text())
        if (mark.get("sha256") == entry.sha256 and mark.get("size") == st.st_size
                and mark.get("mtime_ns") == st.st_mtime_ns):
            return
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with open(final, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    if digest.hexdigest() != entry.sha256:
        raise ModelDownloadError(f"model {entry.label}: {final} exists with sha256 "
                                 f"{digest.hexdigest()}, not the manifest's {entry.sha256}; "
                                 "not overwritten")
    _write_marker(final, entry.sha256)
