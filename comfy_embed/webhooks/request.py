"""The webhook a run asks for, and what is sent: pure functions, no I/O.

A run names its webhook with ``?webhook=URL`` (``&webhook_events=``,
``&webhook_base64=``) or ``extra_data.webhook`` in ComfyUI's envelope; the
body is the final ``serverless_api`` message, signed the Standard Webhooks
way (``webhook-signature: v1,<base64 HMAC-SHA256>``). Delivering it is
:mod:`comfy_embed.webhooks.delivery`'s job.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Mapping

import httpx

from comfy_embed.config import Settings
from comfy_embed.config import webhook_secret_key as secret_key
from comfy_embed.errors import WebhookRefused
from comfy_embed.events import FINAL

__all__ = ["WebhookRequest", "webhook_request", "envelope_webhook", "secret_key", "sign",
           "payload_body", "dumps", "redact", "EVENTS"]

#: Event names of ``?webhook_events=``: the final event as ``completed`` or
#: ``failed``, and ComfyUI's ``progress`` messages.
EVENTS = ("completed", "failed", "progress")
_FINAL_EVENTS = frozenset({"completed", "failed"})
_TRUE = ("1", "true", "yes", "on")


# ------------------------------------------------------------------ the request
@dataclass(frozen=True)
class WebhookRequest:
    """Where a run's webhook goes and what it carries."""

    url: str
    #: Subset of :data:`EVENTS`.
    events: frozenset[str] = _FINAL_EVENTS
    #: Keep ``output.base64`` in the payload (dropped by default: OSS links only).
    include_base64: bool = False

    def to_record(self) -> dict[str, Any]:
        return {"url": self.url, "events": sorted(self.events), "base64": self.include_base64}


def webhook_request(query: Mapping[str, str], envelope_url: str | None,
                    settings: Settings) -> WebhookRequest | None:
    """The run's webhook from ``?webhook=`` (first), the envelope's
    ``extra_data.webhook``, or the server default; None without any.

    ``?webhook_events=`` is a comma list of :data:`EVENTS`; the final events
    not listed are not sent, unless only ``progress`` is listed (then it
    adds to the default ``completed,failed``). ``?webhook_base64=1`` keeps
    base64 outputs in the payload. Raises WebhookRefused on unknown events.
    """
    url = query.get("webhook") or envelope_url or settings.webhooks.url
    raw = query.get("webhook_events")
    if not url:
        if raw is not None:
            raise WebhookRefused("webhook_events was given but no webhook URL "
                                 "(?webhook=, extra_data.webhook or COMFY_EMBED_WEBHOOK_URL)")
        return None
    events = set(_FINAL_EVENTS)
    if raw is not None:
        names = {x.strip().lower() for x in raw.split(",") if x.strip()}
        unknown = names - set(EVENTS)
        if unknown:
            raise WebhookRefused(f"webhook_events: unknown event {sorted(unknown)[0]!r} "
                                 f"(expected a comma list of {', '.join(EVENTS)})")
        events = names if names & _FINAL_EVENTS else names | _FINAL_EVENTS
    return WebhookRequest(url=url, events=frozenset(events),
                          include_base64=(query.get("webhook_base64") or "").lower() in _TRUE)


def envelope_webhook(body: Any) -> tuple[Any, str | None]:
    """``extra_data.webhook`` of a ComfyUI envelope (``{"prompt": ...,
    "extra_data": {...}}``), read before the workflow is parsed.

    Returns the body to parse (decoded, when it had to be decoded to look)
    and the URL or None. A body that is not an envelope is returned as it
    came, so the workflow parser reports its errors unchanged.
    """
    needle = b'"extra_data"' if isinstance(body, (bytes, bytearray)) else '"extra_data"'
    if isinstance(body, (bytes, bytearray, str)):
        if needle not in body:  # type: ignore[operator]
            return body, None
        try:
            decoded = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return body, None  # the workflow parser reports it (nesting: 400)
        if not isinstance(decoded, dict):
            return body, None
        body = decoded
    if (not isinstance(body, dict) or not isinstance(body.get("prompt"), dict)
            or not isinstance(body.get("extra_data"), dict)):
        return body, None  # not an envelope (a bare graph may have a node "extra_data")
    url = body["extra_data"].get("webhook")
    if url is not None and not isinstance(url, str):
        raise WebhookRefused("extra_data.webhook must be a URL string")
    return body, url or None


# ------------------------------------------------------------ signing, payload
def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of
    ``{id}.{timestamp}.{body}``."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def payload_body(final: dict[str, Any], include_base64: bool = False) -> bytes:
    """The JSON body of a final webhook: the ``serverless_api`` message, with
    each ``output.base64`` dropped unless ``include_base64``."""
    data = dict(final.get("data") or {})
    if not include_base64 and data.get("results"):
        results = []
        for item in data["results"]:
            output = item.get("output") if isinstance(item, dict) else None
            if isinstance(output, dict) and "base64" in output:
                item = {**item, "output": {k: v for k, v in output.items() if k != "base64"}}
            results.append(item)
        data["results"] = results
    return dumps({"type": final.get("type", FINAL), "data": data})


def dumps(value: Any) -> bytes:
    # ASCII JSON: the signed bytes and the text a verifier decodes are the same.
    return json.dumps(value, default=str, separators=(",", ":")).encode("ascii")


def redact(url: str) -> str:
    """The URL without userinfo and query string (they may hold tokens)."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        return "<invalid URL>"
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}{u.path}"
