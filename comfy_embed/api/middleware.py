"""The app's own pure ASGI middleware, and the shape they share.

- :class:`HttpMiddleware`: HTTP requests go to :meth:`~HttpMiddleware.http`;
  WebSockets and lifespan messages pass through untouched.
- :class:`InternalErrors`: whatever escapes a route answers 500 in the
  contract's shape, logged once.
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfy_embed.api.serverless.runs import task_id_from
from comfy_embed.errors import ExecutionFailed
from comfy_embed.events import dumps_bytes, final_event

__all__ = ["HttpMiddleware", "InternalErrors"]

log = logging.getLogger(__name__)


class HttpMiddleware:
    """Pure ASGI middleware that acts on HTTP requests only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one HTTP request (the default passes it on)."""
        await self.app(scope, receive, send)


class InternalErrors(HttpMiddleware):
    """Whatever escapes a route still answers in the contract's shape: 500
    with a generic message, logged once here with its traceback and path.

    The answer quotes nothing of the exception (it may carry paths, keys or
    a request's content). The exception is not raised on: Starlette's
    outermost middleware and then the server would each log it again.
    """

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if started:  # a stream that already began: it just ends
                return
            task_id = task_id_from(Headers(scope=scope))
            error = ExecutionFailed("internal error; the server log has the details")
            if str(scope.get("path", "")).startswith("/api/v2/"):  # Comfy API v2's envelope
                body = dumps_bytes({"error": {"code": "internal_error", "message": error.message,
                                              "details": None}})
            else:
                body = dumps_bytes(final_event(task_id, None, {}, error=error.to_dict()))
            await Response(body, 500, media_type="application/json")(scope, receive, send)
