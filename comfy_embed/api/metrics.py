"""GET /metrics: the engine's Prometheus metrics in the text exposition format."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ..observe import CONTENT_TYPE

__all__ = ["metrics"]


async def metrics(request: Request) -> Response:
    """Scrape target for Prometheus (and anything that reads its format)."""
    body = request.app.state.engine.metrics.render_text()
    return Response(body, media_type=CONTENT_TYPE)
