"""GET /metrics (Prometheus text format) and the ``X-Queue-Depth`` header.

The header is on every HTTP answer, so a router can steer away from a busy
instance using any response it already gets (``/ready`` included).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from comfy_embed.api.middleware import HttpMiddleware
from comfy_embed.observe.metrics import CONTENT_TYPE

__all__ = ["metrics", "QueueDepthHeader", "queue_depth"]


async def metrics(request: Request) -> Response:
    """Scrape target for Prometheus (and anything that reads its format)."""
    body = request.app.state.engine.metrics.render_text()
    return Response(body, media_type=CONTENT_TYPE)


def queue_depth(app: object) -> int | None:
    """Tasks queued plus running on this instance (ComfyUI's
    ``queue_remaining``); None before the app started."""
    engine = getattr(getattr(app, "state", None), "engine", None)
    return None if engine is None else engine.executor.queue_remaining


class QueueDepthHeader(HttpMiddleware):
    """Pure ASGI middleware: adds ``X-Queue-Depth`` to every HTTP response."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_depth(message: Message) -> None:
            if message["type"] == "http.response.start":
                depth = queue_depth(scope.get("app"))
                if depth is not None:
                    headers = list(message.get("headers", []))
                    headers.append((b"x-queue-depth", str(depth).encode()))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_depth)
