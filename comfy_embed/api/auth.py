"""Optional API-key authentication (``COMFY_EMBED_API_KEYS``), as one small
ASGI middleware in front of every route, WebSocket included.

A key is presented as ``Authorization: Bearer <key>`` or ``X-Api-Key: <key>``.
Only a hash of the key travels further (``scope["state"]``): the service
stores it with each task so that a task is readable and cancellable only with
the key that created it. Keys are never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any, Awaitable, Callable, MutableMapping

from comfy_embed.errors import Unauthorized
from comfy_embed.events import final_event

__all__ = ["ApiKeyAuth", "PUBLIC_PATHS", "PUBLIC_PREFIXES", "is_public", "key_hash_of",
           "hash_key"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]

#: The one list of paths that need no key: liveness and readiness for load
#: balancers and orchestrators, the platform's lifecycle hooks (/initialize,
#: /pre-stop, /pre-freeze: an API key does not open them; api/hooks.py lets
#: only the platform, loopback or the operator key through), the playground
#: page (api/page.py) and the API docs (api/openapi.py): static documents;
#: the API calls they make need a key.
PUBLIC_PATHS: frozenset[str] = frozenset({"/health", "/ready", "/initialize", "/pre-freeze",
                                          "/pre-stop",
                                          "/", "/playground", "/playground/examples",
                                          "/openapi.json", "/docs"})
#: Path prefixes that need no key (static assets of the page and the docs).
PUBLIC_PREFIXES: tuple[str, ...] = ("/static/", "/docs/")

_STATE_KEY = "comfy_embed.api_key_hash"


def is_public(path: str) -> bool:
    """Whether ``path`` is served without a key."""
    return path in PUBLIC_PATHS or (bool(PUBLIC_PREFIXES) and path.startswith(PUBLIC_PREFIXES))


def hash_key(key: str) -> str:
    """The stored form of a key: a one-way hash, safe to write beside a task."""
    return hashlib.sha256(b"comfy-embed-api-key:" + key.encode("utf-8", "surrogatepass")).hexdigest()


def key_hash_of(scope: Scope) -> str | None:
    """The hash of the key that authenticated this request (None: auth off)."""
    state = scope.get("state") or {}
    value = state.get(_STATE_KEY)
    return value if isinstance(value, str) else None


def _presented(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None


class ApiKeyAuth:
    """Refuse requests without a configured key (401; WebSocket: the final
    error event, then close code 1008), except :data:`PUBLIC_PATHS`."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]) -> None:
        self.app = app
        self._hashes = tuple(hash_key(k) for k in keys if k)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] not in ("http", "websocket") or not self._hashes:
            await self.app(scope, receive, send)
            return
        presented = _presented(scope)
        matched = None
        if presented is not None:
            digest = hash_key(presented)
            # Compare with every key, in constant time: no timing hint of which matched.
            for h in self._hashes:
                if hmac.compare_digest(digest, h):
                    matched = h
        if matched is not None:
            scope.setdefault("state", {})[_STATE_KEY] = matched
            await self.app(scope, receive, send)
            return
        if is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        error = Unauthorized("an API key is required: send 'Authorization: Bearer <key>' or "
                             "'X-Api-Key: <key>'" if presented is None else "the API key is not valid")
        log.info("refused %s %s: %s", scope["type"], scope.get("path"), error.message)
        if str(scope.get("path", "")).startswith("/api/v2/"):  # Comfy API v2's envelope
            body = json.dumps({"error": {"code": error.type, "message": error.message,
                                         "details": None}}).encode()
        elif str(scope.get("path", "")).startswith("/v1/"):  # OpenAI's error object
            body = json.dumps({"error": {"message": error.message, "type": "invalid_request_error",
                                         "param": None, "code": "invalid_api_key"}}).encode()
        else:
            body = json.dumps(final_event("", None, {}, error=error.to_dict())).encode()
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.send", "text": body.decode()})
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="comfy-embed"')]})
        await send({"type": "http.response.body", "body": body})
