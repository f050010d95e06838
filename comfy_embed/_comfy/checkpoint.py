"""The tiny random-weights checkpoint used by the demo and the tests.

No model can be downloaded here, so the project builds one from ComfyUI's own
model classes (through the ComfyUI boundary) into a cache folder, once.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

from comfy_embed._comfy.comfy import Comfy
from comfy_embed.config import Settings

log = logging.getLogger(__name__)

__all__ = ["TINY_CHECKPOINT", "build_tiny_checkpoint", "ensure_tiny_checkpoint"]

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
    """Build the checkpoint unless the cache already has it (~2 s, ~290 MB).

    ``comfy`` is the booted ComfyUI whose model classes build it."""
    path = Path(settings.comfy.cache_dir) / TINY_CHECKPOINT
    if not path.exists() or _COMPLETE_KEY not in _keys(path):
        t = time.perf_counter()
        build_tiny_checkpoint(path)
        log.info("built %s in %.1fs", path, time.perf_counter() - t)
    return path


def build_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a random-weights SD1.5-architecture checkpoint (see README);
    ComfyUI must be booted (its modules importable).

    One-level UNet (detected as SD1.5), full CLIP-L (ComfyUI always builds
    it from its fixed config), TAESD decoder as the VAE; fp16, ~320 MB.
    """
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    import safetensors.torch
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    gen = torch.Generator().manual_seed(seed)
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                     num_res_blocks=[1], channel_mult=(1,),
                     transformer_depth=[1], transformer_depth_output=[1, 1],
                     transformer_depth_middle=-2, context_dim=768, num_heads=8,
                     use_spatial_transformer=True, use_linear_in_transformer=False,
                     operations=comfy.ops.manual_cast)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    vae = comfy.taesd.taesd.TAESD()
    sd: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.diffusion_model.", unet),
                           ("cond_stage_model.", clip),
                           ("first_stage_model.", vae)):
        for name, tensor in module.state_dict().items():
            if prefix == "first_stage_model." and not name.startswith("taesd_decoder."):
                continue
            sd[prefix + name] = _random_like(name, tensor, gen)
    # The rest of TAESD, drawn after the decoder so that earlier builds'
    # weights (and images) stay the same: with every key ComfyUI expects
    # present, loading logs no 'Missing VAE keys' list. Scale and shift
    # keep their identity values.
    for name, tensor in vae.state_dict().items():
        key = "first_stage_model." + name
        if key not in sd:
            sd[key] = (tensor.clone().to(torch.float16) if name in ("vae_scale", "vae_shift")
                       else _random_like(name, tensor, gen))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    safetensors.torch.save_file(sd, str(tmp))
    os.replace(tmp, path)
    return path


def _random_like(name: str, tensor: Any, gen: Any) -> Any:
    """Random weights scaled by fan-in (so activations neither vanish nor
    blow up and the decoded image is visible noise); norms at 1, biases 0."""
    import torch

    if not tensor.is_floating_point() or name.endswith("position_ids"):
        return tensor.clone()
    if "norm" in name and name.endswith("weight"):
        return torch.ones(tensor.shape, dtype=torch.float16)
    if name.endswith("bias") or name.endswith("logit_scale") or tensor.ndim < 2:
        return torch.zeros(tensor.shape, dtype=torch.float16)
    fan_in = max(1, tensor[0].numel())
    return (torch.randn(tensor.shape, generator=gen) / fan_in ** 0.5).to(torch.float16)
