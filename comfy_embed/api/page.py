"""The playground page: try a workflow in the browser, no client to write.

``/`` and ``/playground`` answer the page; ``/static/`` its files (plain
HTML, CSS and JS from ``api/static/``: nothing from a CDN, no build step);
``/playground/examples`` the bundled example workflows. The page itself only
calls the public API (run with ``stream=true``, status, cancel), so it needs
no key to load (auth.py lists its paths as public); it sends the key the user
enters with those calls.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

__all__ = ["routes", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parent / "static"


async def playground(request: Request) -> Response:
    # no-cache: a redeployed server's page is picked up on the next load.
    return FileResponse(STATIC_DIR / "playground.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})


def bundled_examples() -> list[dict[str, Any]]:
    """``[{"name", "workflow"}]`` for every JSON file in comfy_embed.examples."""
    folder = resources.files("comfy_embed.examples")
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out.append({"name": entry.name[:-5], "workflow": json.loads(entry.read_text())})
    return out


async def examples(request: Request) -> Response:
    return JSONResponse({"examples": bundled_examples()})


def routes() -> list[Any]:
    """The page's routes, for the app's route list."""
    return [
        Route("/", playground, methods=["GET"]),
        Route("/playground", playground, methods=["GET"]),
        Route("/playground/examples", examples, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
