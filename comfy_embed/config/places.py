"""Where comfy-embed looks by default, from a source checkout or from an
installed wheel, and the ComfyUI it is tested with.

A checkout has ComfyUI as its ``vendor/ComfyUI`` submodule and keeps its data
in ``<checkout>/data``. An installed wheel bundles no ComfyUI: ``comfy-embed
install-comfyui`` checks the pinned commit out into the cache folder, where
the default ``comfyui_dir`` points, and data goes to ``./data`` (the folder
the program was started in).
"""

from __future__ import annotations

import os
from pathlib import Path

from comfy_embed.config.rules import PROJECT_ROOT

#: True when the package runs from a source checkout (editable install or
#: PYTHONPATH), False when it was installed from a wheel or an sdist.
CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file()
#: The default of ``COMFY_EMBED_CACHE_DIR``: the tiny checkpoint, ComfyUI installed.
CACHE_DIR = Path(os.path.expanduser("~/.cache/comfy-embed"))
#: ComfyUI's repository and the commit comfy-embed is tested with: the
#: ``vendor/ComfyUI`` submodule's (tests/test_config.py checks they agree).
COMFYUI_REPOSITORY = "https://github.com/Comfy-Org/ComfyUI.git"
COMFYUI_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"
#: What ``comfy-embed install-comfyui`` and the error for a missing ComfyUI call it.
INSTALL_COMMAND = "comfy-embed install-comfyui"


def installed_comfyui(cache_dir: Path = CACHE_DIR) -> Path:
    """The folder ``comfy-embed install-comfyui`` checks ComfyUI out into."""
    return cache_dir / "ComfyUI"


def default_comfyui_dir() -> Path:
    """The default ``comfyui_dir``: the checkout's submodule, else the installed one."""
    return PROJECT_ROOT / "vendor" / "ComfyUI" if CHECKOUT else installed_comfyui()


def default_base_dir() -> Path:
    """The default ``base_dir``: ``<checkout>/data``, else ``./data`` (the
    working folder when comfy-embed is imported)."""
    return PROJECT_ROOT / "data" if CHECKOUT else Path.cwd() / "data"
