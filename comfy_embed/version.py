"""The version of comfy-embed: the one place it is written (pyproject.toml
reads it from here; CHANGELOG.md says what each version changed)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.3.0.dev0"
