"""The tiny random-weights checkpoint used by the demo and the tests.

No model can be downloaded here, so the project builds one from ComfyUI's own
model classes (through the ComfyUI boundary) into a cache folder, once.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path

from comfy_embed._comfy.comfy import Comfy
from comfy_embed.config import Settings

log = logging.getLogger(__name__)

__all__ = ["TINY_CHECKPOINT", "ensure_tiny_checkpoint"]

#: File name under ``Settings.cache_dir``; workflows name it in ckpt_name.
TINY_CHECKPOINT = "tiny-sd15.safetensors"


#: Present in builds that carry every VAE key ComfyUI expects; older cached
#: builds lack it and are rebuilt once.
_COMPLETE_KEY = "first_stage_model.vae_scale"


def _keys(path: Path) -> set[str]:
    """Tensor names from a safetensors header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            return set(json.loads(f.read(size)))
    except (OSError, ValueError, struct.error):
        return set()


def ensure_tiny_checkpoint(comfy: Comfy, settings: Settings) -> Path:
    """Build the checkpoint unless the cache already has it (~2 s, ~290 MB)."""
    path = Path(settings.cache_dir) / TINY_CHECKPOINT
    if not path.exists() or _COMPLETE_KEY not in _keys(path):
        t = time.perf_counter()
        comfy.build_tiny_checkpoint(path)
        log.info("built %s in %.1fs", path, time.perf_counter() - t)
    return path
