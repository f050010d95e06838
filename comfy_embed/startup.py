"""What the engine's executor thread does before its first job: the models
of the manifest and the lock fetched, ComfyUI booted headless, the tiny
checkpoint built when asked for, the preload and kept models loaded.

The default ``boot`` of :class:`comfy_embed.runtime.Engine` (tests pass
their own).
"""

from __future__ import annotations

from comfy_embed._comfy.comfy import Comfy
from comfy_embed.config import Settings
from comfy_embed.observe import memory

__all__ = ["boot_comfy"]


def boot_comfy(settings: Settings) -> Comfy:
    """ComfyUI booted headless, with the tiny checkpoint built when asked
    for and the preload checkpoints loaded (on the executor thread)."""
    if settings.models.manifest:
        from comfy_embed.inputs.models import ensure_models, load_manifest
        if settings.models.fetch == "startup":
            # Before ComfyUI lists its model folders; /ready waits for this.
            ensure_models(settings)
        else:
            load_manifest(settings.models.manifest)  # a bad manifest fails the boot
    if settings.comfy.lock is not None:
        # The lock's models with a URL, fetched as the manifest's are (a
        # missing one without a URL is drift, reported after the boot).
        from comfy_embed.environment.apply import fetch_models
        from comfy_embed.environment.lockfile import read_lock
        fetch_models(settings, read_lock(settings.comfy.lock), strict=False)
    memory.keep_freed_heap(settings.observe.heap_keep_bytes)  # 0: glibc's defaults
    comfy = Comfy.boot(settings)
    if settings.comfy.tiny_checkpoint:
        from comfy_embed._comfy.checkpoint import ensure_tiny_checkpoint
        ensure_tiny_checkpoint(comfy, settings)
    for name in settings.comfy.preload:
        comfy.preload(name)
    comfy.keep_warm()  # COMFY_EMBED_KEEP_LOADED: loaded now, kept from now
    return comfy
