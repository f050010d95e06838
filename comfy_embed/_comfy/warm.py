"""Models kept warm (``COMFY_EMBED_KEEP_LOADED``) and the loaded-models hint.

In ComfyUI a model stays in memory as long as its loader node's outputs stay
in the node cache: the ModelPatcher they hold keeps the weights (and, on a
GPU, the entry in ``model_management.current_loaded_models`` is a weak
reference to it). The classic cache drops every node the next prompt does
not share, at that prompt's start (``clean_unused``), so a workflow that
names another checkpoint unloads the first one, and the next request for it
reads the file again (ComfyUI #2503, #11930, #14618).

:class:`KeptModels` *pins* the cache entries of loader nodes whose model
name (the first ``*_name`` input: ``ckpt_name``, ``vae_name``, ``unet_name``,
...) is one of the kept names, matched exactly as ComfyUI lists the file
(relative to its folder, e.g. ``sd15/model.safetensors``): the outputs
cache's ``clean_unused`` keeps them, so a later prompt with the same loader
and inputs finds them cached, whatever ran between. Nothing else changes:
gc and ``soft_empty_cache`` between jobs never freed a referenced model, and
ComfyUI's ``free_memory`` may still move a kept model's weights off the GPU
when another model needs the room (they stay in RAM and go back without
reading the file). Only :meth:`KeptModels.release` (the memory guard, under
real pressure: an out-of-memory error, a watermark still crossed after its
soft steps) lets them go.

It also keeps the answer to "which models are loaded here" (:attr:`loaded`),
worked out on the executor thread at the end of each run (the loader nodes of
that run whose outputs are cached, plus the pinned ones) and read by any
thread as one immutable tuple: the ``/ready`` field, the ``X-Loaded-Models``
header and the ``/metrics`` gauge cost no walk of ComfyUI's state per request.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

__all__ = ["KeptModels", "model_name"]


def model_name(node: Any) -> str | None:
    """The model a loader node names: its first ``*_name`` string input."""
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return None
    return next((v for k, v in inputs.items() if k.endswith("_name") and isinstance(v, str)),
                None)


class KeptModels:
    """The pins of the kept models in one PromptExecutor's outputs cache, and
    the loaded models after each run. Executor-thread methods: :meth:`after_run`,
    :meth:`release`; :attr:`loaded` and :meth:`take_evicted` from any thread."""

    def __init__(self, names: Iterable[str], on_change: Callable[[tuple[str, ...]], None]
                 | None = None) -> None:
        self.names = frozenset(names)
        #: Cache key -> model name of each pinned loader output.
        self._pins: dict[Any, str] = {}
        self._cache: Any = None
        #: Whether ``_cache`` can keep an entry between runs (not the "none" cache).
        self._usable = False
        #: The models loaded after the last run, sorted (one immutable tuple).
        self.loaded: tuple[str, ...] = ()
        self._on_change = on_change
        self._evicted: list[str] = []
        self._lock = threading.Lock()
        #: Kept models released under memory pressure since the start.
        self.evictions = 0

    def kept(self, name: str | None) -> bool:
        return name is not None and name in self.names

    @property
    def pinned(self) -> frozenset[str]:
        """Names of the kept models whose loader outputs are pinned now."""
        return frozenset(self._pins.values())

    # ------------------------------------------------------- the cache hook
    def _install(self, cache: Any) -> None:
        """Wrap ``cache.clean_unused`` so that the pinned entries survive it
        (once per cache object: ``PromptExecutor.reset`` makes new ones)."""
        if cache is self._cache:
            return
        self._cache, self._pins, self._usable = cache, {}, False
        # The "none" cache (DependencyAwareCache) drops a node during the run,
        # once the nodes that use it have run: nothing stays to pin.
        if not isinstance(getattr(cache, "cache", None), dict) or hasattr(cache, "executed_nodes"):
            log.warning("ComfyUI's %s cache cannot keep models loaded (COMFY_EMBED_CACHE=none?): "
                        "COMFY_EMBED_KEEP_LOADED has no effect", type(cache).__name__)
            return
        self._usable = True
        clean = cache.clean_unused
        pins = self

        def clean_unused() -> None:
            kept = {k: cache.cache[k] for k in pins._pins if k in cache.cache}
            clean()
            for key, value in kept.items():
                if key not in cache.cache:
                    cache.cache[key] = value
                    used = getattr(cache, "used_generation", None)  # the LRU cache's
                    if isinstance(used, dict):
                        used[key] = cache.generation

        cache.clean_unused = clean_unused

    # -------------------------------------------------- after each run
    def after_run(self, cache: Any, prompt: dict[str, Any],
                  is_loader: Callable[[str], bool]) -> None:
        """Pin the kept loaders of the run just ended and work out
        :attr:`loaded` (executor thread, after ``execute_async``)."""
        if self.names:
            self._install(cache)
        loaded = set(self._pins.values())
        keys = getattr(cache, "cache_key_set", None)
        for node_id, node in prompt.items():
            class_type = node.get("class_type") if isinstance(node, dict) else None
            if not isinstance(class_type, str) or not is_loader(class_type):
                continue
            name = model_name(node)
            if name is None or cache.get(node_id) is None:
                continue  # failed, or never ran: nothing of it is held
            loaded.add(name)
            if self.kept(name) and self._usable and self._cache is cache and keys is not None:
                key = keys.get_data_key(node_id)
                if key is not None and key not in self._pins:
                    self._pins[key] = name
                    log.info("model %s kept loaded (COMFY_EMBED_KEEP_LOADED)", name)
        self._set_loaded(tuple(sorted(loaded)))

    def release(self, reason: str) -> list[str]:
        """Let every kept model go (real memory pressure): their entries
        leave the cache now, so gc frees them. The names released."""
        if not self._pins:
            return []
        names = sorted(set(self._pins.values()))
        cache = self._cache
        for key in self._pins:
            if cache is not None and isinstance(getattr(cache, "cache", None), dict):
                cache.cache.pop(key, None)
        self._pins = {}
        with self._lock:
            self._evicted.extend(names)
            self.evictions += len(names)
        log.warning("kept models %s released under memory pressure (%s)", ", ".join(names), reason)
        self._set_loaded(tuple(n for n in self.loaded if n not in names))
        return names

    def take_evicted(self) -> list[str]:
        """The kept models released since the last call (for the next task's report)."""
        with self._lock:
            evicted, self._evicted = self._evicted, []
        return evicted

    def _set_loaded(self, loaded: tuple[str, ...]) -> None:
        if loaded == self.loaded:
            return
        self.loaded = loaded
        if self._on_change is not None:
            try:
                self._on_change(loaded)
            except Exception:
                log.exception("telling of the loaded models failed")
