"""Who may call ``/pre-stop``, the one lifecycle hook that changes an
instance for good (it drains it, then the server exits): an ASGI middleware
in front of it, independent of the API keys (a key holder is a client, not
an operator). ``/initialize`` (waits until warm) and ``/pre-freeze``
(flushes the task log) change nothing, and Function Compute's initializer
must never be refused (an instance whose initializer fails never starts),
so they stay open as before.

A hook call is allowed when it comes

* from Function Compute itself: its ``x-fc-access-key-secret`` header (the
  function role's credentials, which FC sends with its calls) equals the
  ``ALIBABA_CLOUD_ACCESS_KEY_SECRET`` it gave the instance. A client cannot
  know the role's secret, while anyone can set ``x-fc-*`` names;
* with the operator key, ``X-Admin-Key: <COMFY_EMBED_ADMIN_KEY>``;
* over a direct loopback connection (a Kubernetes ``exec`` hook, the
  container's own shell): client address 127.0.0.0/8 or ::1 and no sign of a
  proxy in between (``Forwarded``, ``X-Forwarded-For``, ``X-Real-Ip``, or
  FC's ``x-fc-request-id``, which FC's gateway sets on every call it relays).

Anything else is 403 ``forbidden`` and the hook does nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
from typing import Any, Awaitable, Callable, Mapping, MutableMapping

from comfy_embed.events import final_event

__all__ = ["HOOK_PATHS", "LifecycleGuard", "hook_caller"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]

#: The lifecycle hooks only the platform or the operator may call.
HOOK_PATHS: frozenset[str] = frozenset({"/pre-stop"})

#: Headers that say a proxy or FC's gateway relayed the request: its peer
#: address is then the relay's, not the caller's.
_RELAYED = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip", b"x-fc-request-id"})


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same(presented: str | None, expected: str | None) -> bool:
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


def hook_caller(scope: Scope, admin_key: str | None,
                environ: Mapping[str, str] | None = None) -> str | None:
    """How this request may call a hook (``function compute``, ``admin key``,
    ``loopback``), or None: it may not."""
    headers: dict[bytes, str] = {}
    for name, value in scope.get("headers") or ():
        headers.setdefault(name.lower(), value.decode("latin-1").strip())
    env = os.environ if environ is None else environ
    if _same(headers.get(b"x-fc-access-key-secret"), env.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")):
        return "function compute"
    if _same(headers.get(b"x-admin-key"), admin_key):
        return "admin key"
    client = scope.get("client")
    if client and _loopback(client[0]) and not _RELAYED.intersection(headers):
        return "loopback"
    return None


class LifecycleGuard:
    """403 for a hook call that :func:`hook_caller` does not allow; every
    other path passes untouched."""

    def __init__(self, app: ASGIApp, admin_key: str | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.admin_key = admin_key or None
        self.environ = environ

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("path") not in HOOK_PATHS:
            await self.app(scope, receive, send)
            return
        caller = hook_caller(scope, self.admin_key, self.environ)
        if caller is not None:
            log.info("lifecycle hook %s called (%s)", scope["path"], caller)
            await self.app(scope, receive, send)
            return
        log.warning("refused lifecycle hook %s from %s", scope["path"],
                    (scope.get("client") or ("?",))[0])
        error = {"type": "forbidden", "node_errors": {},
                 "message": "lifecycle hooks are for the platform: Function Compute's own "
                            "calls, a direct loopback connection, or X-Admin-Key"}
        body = json.dumps(final_event("", None, {}, error=error)).encode()
        await send({"type": "http.response.start", "status": 403, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
