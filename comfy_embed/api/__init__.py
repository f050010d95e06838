"""The HTTP API: the only package that imports Starlette."""

from __future__ import annotations

from comfy_embed.api.app import create_app

__all__ = ["create_app"]
