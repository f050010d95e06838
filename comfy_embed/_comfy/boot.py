"""Booting ComfyUI headless (no web server, no ``import main``), step by step.

:meth:`~comfy_embed._comfy.comfy.Comfy.boot` runs these steps in this order,
which matters: ComfyUI reads its ``args`` while importing (the device and
preview flags among them), the stand-in ``server`` module must be in place
before nodes import it, and ``utils.extra_config`` must be imported before
``nodes`` puts ``comfy/`` first on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from comfy_embed._comfy.log_filters import QuietImportFailures, ShortRecords
from comfy_embed._comfy.packs import PackStatus, load_packs, run_prestartup_scripts
from comfy_embed.config import Settings
from comfy_embed.config.places import CHECKOUT, INSTALL_COMMAND

log = logging.getLogger(__name__)

__all__ = ["configure_args", "defer_imports", "import_nodes", "new_executor", "put_on_path",
           "quiet_output", "set_folders", "use_stand_in_server", "warm_page_cache"]


def put_on_path(comfyui_dir: str | Path) -> None:
    """Make ComfyUI's top-level modules importable, or say where it is missing
    and both ways out: the setting, or installing it."""
    root = str(Path(comfyui_dir).resolve())
    if not os.path.isfile(os.path.join(root, "execution.py")):
        hint = (" (in this checkout: `git submodule update --init vendor/ComfyUI`)"
                if CHECKOUT else "")
        raise RuntimeError(
            f"no ComfyUI at {root}: set COMFY_EMBED_COMFYUI_DIR (Settings(comfyui_dir=...)) to a "
            f"ComfyUI folder, or run `{INSTALL_COMMAND}` to check out the ComfyUI that "
            f"comfy-embed is tested with{hint}")
    if root not in sys.path:
        sys.path.insert(0, root)


def warm_page_cache(candidates: list[Path]) -> None:
    """Read the files that exist among ``candidates`` on a background thread,
    so that loading them after the imports reads memory, not disk
    (``readinto`` releases the GIL: the imports go on meanwhile)."""
    paths = [p for p in candidates if p.is_file()]
    if not paths:
        return

    def read() -> None:
        buf = bytearray(16 << 20)
        for path in paths:
            try:
                with open(path, "rb", buffering=0) as f:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while f.readinto(buf):
                        pass
            except OSError as e:
                log.debug("page cache warm-up of %s failed: %s", path, e)

    threading.Thread(target=read, name="comfy-embed-page-cache", daemon=True).start()


def defer_imports(s: Settings) -> list[str]:
    """Give the modules an SD1.5 run never uses deferred stand-ins (see
    lazy_modules); the names deferred."""
    # Custom-node packs reach into these modules in ways nobody has
    # checked against the stand-ins: with packs on, import them for real.
    if s.comfy.lazy_imports and not s.comfy.custom_nodes:
        from comfy_embed._comfy.lazy_modules import install
        return install()
    return []


def _cuda_malloc_as_native() -> None:
    """Choose the CUDA allocator as native ComfyUI's main.py does (its own
    ``cuda_malloc`` module: ``cudaMallocAsync`` on CUDA builds of torch 2+,
    except on cards it lists as unsupported), before CUDA starts. An explicit
    ``backend`` in PYTORCH_CUDA_ALLOC_CONF wins."""
    if "backend" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return
    try:
        import cuda_malloc  # noqa: F401  (sets PYTORCH_CUDA_ALLOC_CONF on import)
    except Exception as e:  # a missing nvidia-smi and the like: keep torch's default
        log.info("CUDA allocator: keeping torch's default (%s)", e)


def configure_args(s: Settings) -> str:
    """Set ComfyUI's ``args`` from the settings, before the modules that read
    them at import time; the device chosen ("cuda" or "cpu")."""
    import comfy.options
    comfy.options.enable_args_parsing(False)
    if s.comfy.device != "cpu":
        _cuda_malloc_as_native()
    import torch
    from comfy.cli_args import LatentPreviewMethod, args

    cuda = torch.cuda.is_available()
    if s.comfy.device == "cuda" and not cuda:
        raise RuntimeError("COMFY_EMBED_DEVICE=cuda but no CUDA device is available")
    device = "cuda" if (s.comfy.device in ("auto", "cuda") and cuda) else "cpu"
    args.cpu = device == "cpu"
    args.disable_all_custom_nodes = not s.comfy.custom_nodes
    args.disable_api_nodes = not s.comfy.api_nodes
    args.disable_metadata = not s.comfy.write_metadata
    args.preview_method = (LatentPreviewMethod.Latent2RGB if s.comfy.preview == "latent2rgb"
                           else LatentPreviewMethod.NoPreviews)
    cache_kind, _, cache_n = s.comfy.cache.partition(":")
    args.cache_classic = cache_kind == "classic"
    args.cache_lru = int(cache_n or 0) if cache_kind == "lru" else 0
    args.cache_none = cache_kind == "none"
    return device


def use_stand_in_server() -> None:
    """Nodes import PromptServer from a module named ``server``; ComfyUI's own
    server.py pulls in the frontend and starts a web server: give them the
    stand-in module instead."""
    from comfy_embed._comfy import server as _comfy_server
    sys.modules["server"] = _comfy_server


def set_folders(s: Settings) -> ModuleType:
    """Point ComfyUI's input, output, temp and model folders at the
    settings', and hold every file-name input to the input folder's allowed
    part (see file_names); ComfyUI's ``folder_paths`` module."""
    import folder_paths
    for path in (s.comfy.input_path, s.comfy.output_path, s.comfy.temp_path, s.comfy.models_path):
        path.mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(s.comfy.input_path))
    folder_paths.set_output_directory(str(s.comfy.output_path))
    folder_paths.set_temp_directory(str(s.comfy.temp_path))
    for name in list(folder_paths.folder_names_and_paths):
        if name in ("custom_nodes",):
            continue
        folder_paths.add_model_folder_path(name, str(s.comfy.models_path / name), is_default=True)
    if s.comfy.tiny_checkpoint:
        folder_paths.add_model_folder_path("checkpoints", str(Path(s.comfy.cache_dir)))
    for folder in s.comfy.custom_nodes_dirs:
        folder_paths.add_model_folder_path("custom_nodes", str(Path(folder).resolve()))
    # Before any node or pack imports these functions by name.
    from comfy_embed._comfy import file_names
    file_names.install(folder_paths)
    # Must precede `import nodes`, which puts comfy/ first on sys.path and
    # makes `utils` resolve to comfy/utils.py.
    import utils.extra_config
    for yaml_path in s.comfy.extra_model_paths:
        utils.extra_config.load_extra_path_config(str(yaml_path))
    return folder_paths


def import_nodes(s: Settings, folder_paths: ModuleType, loop: asyncio.AbstractEventLoop,
                 seconds: dict[str, float]) -> tuple[ModuleType, ModuleType, list[PackStatus]]:
    """Import ComfyUI's executor and nodes, its extra nodes and the settings'
    custom-node packs: ``(execution, nodes, packs)``. Their times go into
    ``seconds`` ("import", "nodes")."""
    prestartup: dict[str, bool] = {}
    if s.comfy.custom_nodes:
        # As native main.py does before it imports nodes.
        prestartup = run_prestartup_scripts(folder_paths.get_folder_paths("custom_nodes"))

    t1 = time.perf_counter()
    with QuietImportFailures() as quiet:
        # Their import-time records pass the filter too.
        import comfy.model_management
        import comfy.utils  # noqa: F401
        import execution
        import nodes
        seconds["import"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        loop.run_until_complete(
            nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=s.comfy.api_nodes))
    if quiet.failed:
        log.info("optional ComfyUI node modules not loaded (missing packages): %s",
                 ", ".join(sorted(quiet.failed)))
    packs: list[PackStatus] = []
    if s.comfy.custom_nodes:
        packs = load_packs(nodes, folder_paths.get_folder_paths("custom_nodes"),
                           prestartup, loop)
    seconds["nodes"] = time.perf_counter() - t2
    return execution, nodes, packs


def quiet_output() -> None:
    """No tqdm bars from ComfyUI, and short log records (see ShortRecords)."""
    import comfy.utils

    # Progress reaches users as events (and the CLI's own bar); ComfyUI's
    # tqdm bars would interleave with those on a terminal, fill server
    # logs with carriage returns and break up JSON log collection
    # (log_format=json). The progress hook is unaffected.
    comfy.utils.set_progress_bar_enabled(False)
    if not any(isinstance(f, ShortRecords) for f in logging.getLogger().filters):
        logging.getLogger().addFilter(ShortRecords())


def new_executor(execution: ModuleType, server: Any) -> Any:
    """ComfyUI's PromptExecutor, with the cache ``args`` chose."""
    from comfy.cli_args import args

    if args.cache_lru > 0:
        cache_type = execution.CacheType.LRU
    elif args.cache_none:
        cache_type = execution.CacheType.DEPENDENCY_AWARE
    else:
        cache_type = execution.CacheType.CLASSIC
    return execution.PromptExecutor(server, cache_type=cache_type, cache_size=args.cache_lru)
