"""The tiny random-weights checkpoint used by the demo and the tests.

No model can be downloaded here, so the project builds one from ComfyUI's own
model classes (through the ComfyUI boundary) into a cache folder, once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ._comfy import Comfy
from .config import Settings

log = logging.getLogger(__name__)

__all__ = ["TINY_CHECKPOINT", "ensure_tiny_checkpoint"]

#: File name under ``Settings.cache_dir``; workflows name it in ckpt_name.
TINY_CHECKPOINT = "tiny-sd15.safetensors"


def ensure_tiny_checkpoint(comfy: Comfy, settings: Settings) -> Path:
    """Build the checkpoint unless the cache already has it (~2 s, ~290 MB)."""
    path = Path(settings.cache_dir) / TINY_CHECKPOINT
    if not path.exists():
        t = time.perf_counter()
        comfy.build_tiny_checkpoint(path)
        log.info("built %s in %.1fs", path, time.perf_counter() - t)
    return path
