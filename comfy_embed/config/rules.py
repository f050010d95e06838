"""The checks of settings beyond their types, and what they share: the
variable prefix, the error, the storage backends, the webhook secret's form."""

from __future__ import annotations

import base64
import binascii
import math
import pkgutil
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx
from pydantic.fields import FieldInfo

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
PREFIX = "COMFY_EMBED_"


class SettingsError(ValueError):
    """A setting has a bad value; the message names its ``COMFY_EMBED_`` variable."""


#: Modules of the storage package that are not backends.
_NOT_BACKENDS = frozenset({"base", "credentials"})
_WEBHOOK_SECRETPREFIX = "whsec_"


def storage_backends(folders: Iterable[str] | None = None) -> tuple[str, ...]:
    """The storage backends: the public modules of ``comfy_embed/storage/``
    (or of ``folders``) but its interface and credentials. Listed, not
    imported, so this module imports nothing of the package."""
    folders = [str(Path(__file__).resolve().parents[1] / "storage")] if folders is None else folders
    return tuple(sorted(m.name for m in pkgutil.iter_modules(list(folders))
                        if not m.name.startswith("_") and m.name not in _NOT_BACKENDS))


def webhook_secret_key(secret: str) -> bytes:
    """The HMAC key of ``COMFY_EMBED_WEBHOOK_SECRET``: ``whsec_<base64>`` is
    decoded as Standard Webhooks libraries do; any other value is its UTF-8
    bytes. Raises ValueError for an empty secret or bad base64."""
    if secret.startswith(_WEBHOOK_SECRETPREFIX):
        try:
            key = base64.b64decode(secret[len(_WEBHOOK_SECRETPREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be whsec_ followed by base64") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


_Rule = tuple[Callable[[Any], bool], str]
#: One ``COMFY_EMBED_KEY_QUOTAS`` entry (comfy_embed/scheduling.py reads them).
_KEY_QUOTA = re.compile(r"[0-9a-fA-F]{8,64}\s*=\s*0*[1-9][0-9]*\s*/\s*0*[1-9][0-9]*")


def _number(low: float, high: float = math.inf, closed: bool = True) -> _Rule:
    """A number in [low, high] (or (low, high] when not ``closed``)."""
    text = f"a number {'>=' if closed else '>'} {low:g}" + (
        f" and <= {high:g}" if high != math.inf else "")
    return (lambda v: (v >= low if closed else v > low) and v <= high), text


def _one_of(*choices: str) -> _Rule:
    return (lambda v: v in choices), ", ".join(choices[:-1]) + " or " + choices[-1]


def _http_url(value: str) -> bool:
    try:
        return httpx.URL(value).scheme in ("http", "https")
    except (httpx.InvalidURL, ValueError):
        return False


def _webhook_secret(value: str) -> bool:
    try:
        webhook_secret_key(value)
    except ValueError:
        return False
    return True


#: Every check of a value beyond its type, in one table: flat name -> (test,
#: what is allowed). None, where a field allows it, always passes: it means
#: "not set". Values that are false (an empty URL) skip the URL and secret checks.
RULES: dict[str, _Rule] = {
    "max_queue": _number(1), "run_timeout": _number(0, closed=False),
    "eta_window": _number(1, 10_000), "eta_history": _number(0, 100_000),
    "eta_fallback": _one_of("median", "none"),
    "stall_seconds": _number(0, closed=False), "port": _number(1, 65535),
    "key_queue": _number(1), "key_running": _number(1),
    "key_quotas": ((lambda v: all(_KEY_QUOTA.fullmatch(e.strip()) for e in v if e.strip())),
                   ("<key id>=<queue>/<running> entries: 8-64 hex digits of the key's hash, "
                    "bounds >= 1")),
    "max_body_bytes": _number(1), "lease_seconds": _number(0, closed=False),
    "task_max_attempts": _number(1), "max_variants": _number(1),
    # Zero would write keep-alive comments in a tight loop.
    "sse_keepalive": _number(0, closed=False),
    "max_image_bytes": _number(1), "max_image_pixels": _number(1),
    "fetch_timeout": _number(0, closed=False), "max_redirects": _number(0, 100),
    "max_url_inputs": _number(0), "max_request_input_bytes": _number(1),
    "fetch_concurrency": _number(1, 1024),
    "oss_link_expire": _number(1), "s3_link_expire": _number(1),
    "device": _one_of("auto", "cuda", "cpu"),
    "cache": ((lambda v: v in ("classic", "none") or (v.startswith("lru:") and v[4:].isdigit())),
              "classic, none or lru:<N>"),
    "preview": _one_of("none", "latent2rgb"),
    "lock_drift": _one_of("report", "unready"),
    "storage": ((lambda v: v in storage_backends()), " or ".join(storage_backends())),
    "log_format": _one_of("text", "json"),
    "max_rss_bytes": ((lambda v: v > 0), "a positive number of bytes"),
    "max_vram_bytes": ((lambda v: v > 0), "a positive number of bytes"),
    "oom_recycle_after": ((lambda v: v >= 0), "0 or more"),
    "gc_interval": ((lambda v: v >= 0), "0 or more seconds"),
    "heap_keep_bytes": ((lambda v: 0 <= v < 2**31), "0 to 2147483647 bytes"),
    "max_media_seconds": ((lambda v: v > 0), "a positive number"),
    "model_lock_seconds": ((lambda v: v >= 1), "at least 1"),
    "model_fetch_timeout": ((lambda v: v > 0), "a positive number"),
    "model_max_bytes": _number(1), "model_retry_seconds": _number(0),
    "models_fetch": _one_of("startup", "first_use"),
    "task_log_flush_seconds": ((lambda v: 0 <= v <= 60), "0 to 60"),
    "task_log_sync_seconds": ((lambda v: 0 <= v <= 5), "0 to 5"),
    "task_log_inline_seconds": ((lambda v: 0 <= v <= 0.1), "0 to 0.1"),
    "progress_interval": ((lambda v: 0 <= v <= 60), "0 to 60"),
    "encode_workers": ((lambda v: 0 <= v <= 64), "0 to 64"),
    "encode_backlog": ((lambda v: 1 <= v <= 4096), "1 to 4096"),
    "max_task_events": ((lambda v: 10 <= v <= 10_000_000), "10 to 10000000"),
    "max_nodes": ((lambda v: v >= 1), "at least 1"),
    "max_output_bytes": _number(1),
    "max_json_depth": ((lambda v: 8 <= v <= 500), "8-500"),
    "drain_seconds": ((lambda v: v >= 0), "0 or more seconds"),
    "admin_key": ((lambda v: not v or len(v) >= 16), "at least 16 characters"),
    "retention_hours": ((lambda v: v >= 0), "hours >= 0, or none"),
    "asset_max_bytes": _number(1),
    "idempotency_hours": ((lambda v: 0 < v <= 720), "0 to 720 hours (not 0)"),
    "max_ttl": ((lambda v: v >= 0), "seconds >= 0, or none"),
    "keep": _one_of("all", "nothing"),
    "webhook_url": ((lambda v: not v or _http_url(v)), "an http(s) URL"),
    "webhook_secret": ((lambda v: _webhook_secret(v)),
                       "any text, or whsec_ followed by base64 (not empty)"),
    "webhook_max_attempts": ((lambda v: v >= 1), "a positive number"),
    "webhook_max_age": ((lambda v: v > 0), "a positive number"),
    "webhook_backoff": ((lambda v: v > 0), "a positive number"),
    "webhook_backoff_max": ((lambda v: v > 0), "a positive number"),
    "webhook_timeout": ((lambda v: v > 0), "a positive number"),
    "webhook_progress_interval": ((lambda v: v >= 0), "0 or more"),
}


def flat_name(name: str, field: FieldInfo) -> str:
    """A group field's flat name: its alias where it has one, else its name."""
    return field.alias or name
