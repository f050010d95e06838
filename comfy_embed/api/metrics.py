"""GET /metrics (Prometheus text format), the ``X-Queue-Depth`` and
``X-Loaded-Models`` headers.

The headers are on every HTTP answer, so a router can steer away from a busy
instance, or towards one with the model loaded, using any response it
already gets (``/ready`` included).
"""

from __future__ import annotations

from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from comfy_embed.api.middleware import HttpMiddleware
from comfy_embed.observe.metrics import CONTENT_TYPE

__all__ = ["metrics", "QueueDepthHeader", "loaded_models_header", "queue_depth"]


async def metrics(request: Request) -> Response:
    """Scrape target for Prometheus (and anything that reads its format)."""
    body = request.app.state.engine.metrics.render_text()
    return Response(body, media_type=CONTENT_TYPE)


def queue_depth(app: object) -> int | None:
    """Tasks queued plus running on this instance (ComfyUI's
    ``queue_remaining``); None before the app started."""
    engine = getattr(getattr(app, "state", None), "engine", None)
    return None if engine is None else engine.executor.queue_remaining


_encoded: tuple[tuple[str, ...], bytes] = ((), b"")


def loaded_models_header(loaded: tuple[str, ...]) -> bytes:
    """``X-Loaded-Models``: the names comma-separated, each percent-encoded
    as a URL path is (``/`` kept), so a name with a comma or non-ASCII
    letters stays one item. Encoded once per change of the tuple (the
    executor replaces it after a run that changed it), not per answer."""
    global _encoded
    last, value = _encoded
    if loaded is not last:
        value = ",".join(quote(name, safe="/") for name in loaded).encode("ascii")
        _encoded = (loaded, value)
    return value


class QueueDepthHeader(HttpMiddleware):
    """Pure ASGI middleware: adds ``X-Queue-Depth`` and ``X-Loaded-Models``
    (once ComfyUI is booted) to every HTTP response."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_depth(message: Message) -> None:
            if message["type"] == "http.response.start":
                depth = queue_depth(scope.get("app"))
                if depth is not None:
                    headers = list(message.get("headers", []))
                    headers.append((b"x-queue-depth", str(depth).encode()))
                    engine = scope["app"].state.engine
                    if engine.ready:
                        headers.append((b"x-loaded-models",
                                        loaded_models_header(engine.loaded_models)))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_depth)
