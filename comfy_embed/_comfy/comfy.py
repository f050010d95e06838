"""The ComfyUI boundary: the only module that imports ComfyUI.

It boots ComfyUI headless (no web server, no ``import main``), owns the one
PromptExecutor and its persistent event loop, and answers questions about
node definitions (seed ranges, image-upload inputs). Everything here that
executes a graph must be called from the executor thread; ``validate`` and the
node look-ups are read-only and may be called from any thread.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from comfy_embed._comfy.packs import PackStatus, load_packs, run_prestartup_scripts
from comfy_embed.config import Settings
from comfy_embed.errors import WorkflowInvalid, node_error
from comfy_embed.outcome import Outcome, Sink

log = logging.getLogger(__name__)

__all__ = ["Comfy", "PackStatus"]

#: The client id ComfyUI sees; with it set, the executor sends every message.
_CLIENT_ID = "comfy-embed"
_END_OF_RUN = frozenset({"execution_success", "execution_error", "execution_interrupted"})


def _throttled_progress(base: type, interval: float,
                        register: Callable[[Any], None]) -> type:
    """A subclass of ComfyUI's WebUIProgressHandler that sends a
    ``progress_state`` at most every ``interval`` seconds, plus the latest
    one just before the run's end message.

    Each snapshot lists every node that started, and ComfyUI sends one per
    node start, step and finish: a graph of N nodes would cost the executor
    thread O(N^2) to build them and its readers O(N^2) to store them.
    """

    class ThrottledProgressHandler(base):  # type: ignore[misc, valid-type]
        def __init__(self, server_instance: Any) -> None:
            super().__init__(server_instance)
            self._last = time.monotonic()  # a run shorter than interval sends one
            self._pending: tuple[str, Any] | None = None
            register(self)

        def _send_progress_state(self, prompt_id: str, nodes: Any) -> None:
            now = time.monotonic()
            if now - self._last >= interval:
                self._last, self._pending = now, None
                super()._send_progress_state(prompt_id, nodes)
            else:
                # ``nodes`` is the registry's live dict: flushing it later
                # sends the state as of then, which is what a reader wants.
                self._pending = (prompt_id, nodes)

        def flush(self) -> None:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._last = time.monotonic()
                super()._send_progress_state(*pending)

    return ThrottledProgressHandler


class _QuietImportFailures(logging.Filter):
    """ComfyUI logs a traceback and a 'pip install' plea for every optional
    node module whose package is missing (the audio nodes without
    torchaudio). Collect those into one line instead; other records pass."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.levelno != logging.WARNING or record.name != "root":
            return True
        if "torchaudio missing" in msg:
            self.failed.add("torchaudio")
            return False
        if "No module named" in msg or "IMPORT FAILED" in msg:
            name = msg.split("IMPORT FAILED:")[-1].strip() if "IMPORT FAILED" in msg else ""
            if name:
                self.failed.add(name)
            return False
        return not any(x in msg for x in ("nodes did not import correctly", "new missing dependencies",
                                          "pip install -r requirements", "Traceback"))\
            and msg.strip() != ""

    def __enter__(self) -> "_QuietImportFailures":
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeFilter(self)


#: Python reprs of string lists, as ComfyUI prints missing / unexpected keys.
_KEY_LIST = re.compile(r"\[(?:'[^'\n]*',\s*)+'[^'\n]*'\]")


class _ShortRecords(logging.Filter):
    """ComfyUI logs whole state-dict key lists ('Missing VAE keys [...]' is
    60 names for the tiny checkpoint, thousands for a mismatched model): keep
    the first names and the count, and cap any other record from ComfyUI, so
    one log line stays readable in a terminal and a log pipeline."""

    def __init__(self, limit: int = 600, keep: int = 3) -> None:
        super().__init__()
        self.limit, self.keep = limit, keep

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root":  # ComfyUI logs through the root logger
            return True
        if getattr(record, "comfy_embed_short", False):
            return True  # another instance of this filter did it already
        record.comfy_embed_short = True
        msg = record.getMessage()
        if len(msg) <= self.limit:
            return True
        msg = _KEY_LIST.sub(self._shorten, msg)
        # Per line: a traceback stays whole, one endless line does not.
        msg = "\n".join(line if len(line) <= self.limit else
                        f"{line[:self.limit]}... ({len(line) - self.limit} more characters)"
                        for line in msg.split("\n"))
        record.msg, record.args = msg, None
        return True

    def _shorten(self, match: re.Match[str]) -> str:
        names = re.findall(r"'([^'\n]*)'", match.group(0))
        if len(names) <= self.keep:
            return match.group(0)
        return f"[{', '.join(names[:self.keep])}, ... {len(names) - self.keep} more]"


def _trim(value: Any, limit: int = 300) -> Any:
    """Tensor reprs in ``current_inputs`` can be megabytes: cut them."""
    if isinstance(value, dict):
        return {k: _trim(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v, limit) for v in value[:16]]
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def _warm_page_cache(candidates: list[Path]) -> None:
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


class Comfy:
    """ComfyUI booted in this process. Build with :meth:`boot` on the thread
    that will execute graphs (its event loop stays with that thread)."""

    _booted = False

    def __init__(self, settings: Settings) -> None:
        # Here, not at module level: the stand-in server needs aiohttp, which
        # `import comfy_embed` (the library, the CLI) should not pay for.
        from comfy_embed._comfy.server import PromptServer
        self.settings = settings
        self.server = PromptServer()
        #: Custom-node packs found at boot, loaded or not (for /ready and logs).
        self.packs: list[PackStatus] = []
        self.loop = asyncio.new_event_loop()
        self._validate_lock = threading.Lock()
        self._validate_loop: asyncio.AbstractEventLoop | None = None
        self.boot_seconds: dict[str, float] = {}
        #: Modules given deferred stand-ins at boot (see lazy_modules).
        self.deferred_modules: list[str] = []
        self.device = "cpu"
        self._specs: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {}
        #: The running prompt's progress_state sender (see _throttled_progress).
        self._progress: Any = None

    # ------------------------------------------------------------------ boot
    @classmethod
    def boot(cls, settings: Settings) -> "Comfy":
        """Import and configure ComfyUI once per process; ComfyUI's state is
        process-global, so a second boot is refused."""
        if cls._booted:
            raise RuntimeError("ComfyUI is already booted in this process")
        cls._booted = True
        self = cls(settings)
        self._boot()
        return self

    def _boot(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        root = str(Path(s.comfyui_dir).resolve())
        if not os.path.isfile(os.path.join(root, "execution.py")):
            raise RuntimeError(f"no ComfyUI at {root}: run `git submodule update --init`")
        if root not in sys.path:
            sys.path.insert(0, root)
        # Start reading the checkpoints to preload while the imports run.
        _warm_page_cache([d / name for name in s.preload
                          for d in (s.models_path / "checkpoints", Path(s.cache_dir))])
        # Custom-node packs reach into these modules in ways nobody has
        # checked against the stand-ins: with packs on, import them for real.
        if s.lazy_imports and not s.custom_nodes:
            from comfy_embed._comfy.lazy_modules import install
            self.deferred_modules = install()
        import comfy.options
        comfy.options.enable_args_parsing(False)
        if s.device != "cpu":
            _cuda_malloc_as_native()
        import comfy.options
        import torch
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import LatentPreviewMethod, args

        cuda = torch.cuda.is_available()
        if s.device == "cuda" and not cuda:
            raise RuntimeError("COMFY_EMBED_DEVICE=cuda but no CUDA device is available")
        self.device = "cuda" if (s.device in ("auto", "cuda") and cuda) else "cpu"
        args.cpu = self.device == "cpu"
        args.disable_all_custom_nodes = not s.custom_nodes
        args.disable_api_nodes = True
        args.disable_metadata = not s.write_metadata
        args.preview_method = (LatentPreviewMethod.Latent2RGB if s.preview == "latent2rgb"
                               else LatentPreviewMethod.NoPreviews)
        cache_kind, _, cache_n = s.cache.partition(":")
        args.cache_classic = cache_kind == "classic"
        args.cache_lru = int(cache_n or 0) if cache_kind == "lru" else 0
        args.cache_none = cache_kind == "none"

        # Nodes import PromptServer from a module named `server`; ComfyUI's own
        # server.py pulls in the frontend and starts a web server: give them
        # the stand-in module instead.
        from comfy_embed._comfy import server as _comfy_server
        sys.modules["server"] = _comfy_server
        self.boot_seconds["torch"] = time.perf_counter() - t0

        import folder_paths
        for path in (s.input_path, s.output_path, s.temp_path, s.models_path):
            path.mkdir(parents=True, exist_ok=True)
        folder_paths.set_input_directory(str(s.input_path))
        folder_paths.set_output_directory(str(s.output_path))
        folder_paths.set_temp_directory(str(s.temp_path))
        for name in list(folder_paths.folder_names_and_paths):
            if name in ("custom_nodes",):
                continue
            folder_paths.add_model_folder_path(name, str(s.models_path / name), is_default=True)
        if s.tiny_checkpoint:
            folder_paths.add_model_folder_path("checkpoints", str(Path(s.cache_dir)))
        for folder in s.custom_nodes_dirs:
            folder_paths.add_model_folder_path("custom_nodes", str(Path(folder).resolve()))
        # Must precede `import nodes`, which puts comfy/ first on sys.path and
        # makes `utils` resolve to comfy/utils.py.
        import utils.extra_config
        for yaml_path in s.extra_model_paths:
            utils.extra_config.load_extra_path_config(str(yaml_path))

        prestartup: dict[str, bool] = {}
        if s.custom_nodes:
            # As native main.py does before it imports nodes.
            prestartup = run_prestartup_scripts(folder_paths.get_folder_paths("custom_nodes"))

        t1 = time.perf_counter()
        with _QuietImportFailures() as quiet:
            import comfy.model_management
            import comfy.utils
            import execution
            import nodes
            self.boot_seconds["import"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            self.loop.run_until_complete(
                nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        if quiet.failed:
            log.info("optional ComfyUI node modules not loaded (missing packages): %s",
                     ", ".join(sorted(quiet.failed)))
        if s.custom_nodes:
            self.packs = load_packs(nodes, folder_paths.get_folder_paths("custom_nodes"),
                                    prestartup, self.loop)
        self.boot_seconds["nodes"] = time.perf_counter() - t2

        # Progress reaches users as events (and the CLI's own bar); ComfyUI's
        # tqdm bars would interleave with those on a terminal, fill server
        # logs with carriage returns and break up JSON log collection
        # (log_format=json). The progress hook is unaffected.
        comfy.utils.set_progress_bar_enabled(False)
        if not any(isinstance(f, _ShortRecords) for f in logging.getLogger().filters):
            logging.getLogger().addFilter(_ShortRecords())
        self._execution, self._nodes, self._mm = execution, nodes, comfy.model_management
        # execute_async builds its progress handler from this module global
        # (ComfyUI's files stay as they are).
        execution.WebUIProgressHandler = _throttled_progress(
            execution.WebUIProgressHandler, s.progress_interval, self._set_progress)
        self._folder_paths = folder_paths
        comfy.utils.set_progress_bar_global_hook(self._progress_hook)
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context
        self._get_executing_context = get_executing_context
        self._get_progress_state = get_progress_state
        if args.cache_lru > 0:
            cache_type = execution.CacheType.LRU
        elif args.cache_none:
            cache_type = execution.CacheType.DEPENDENCY_AWARE
        else:
            cache_type = execution.CacheType.CLASSIC
        self.executor = execution.PromptExecutor(self.server, cache_type=cache_type,
                                                 cache_size=args.cache_lru)
        self.server.loop = self.loop
        self.boot_seconds["total"] = time.perf_counter() - t0
        log.info("ComfyUI booted on %s in %.2fs (%s)", self.device,
                 self.boot_seconds["total"], self.boot_seconds)

    # ------------------------------------------------------------- folders
    @property
    def input_dir(self) -> Path:
        return Path(self._folder_paths.get_input_directory())

    def directory_of(self, kind: str) -> Path:
        """Absolute folder of an output ``type`` ("output", "temp", "input")."""
        d = self._folder_paths.get_directory_by_type(kind)
        if d is None:
            raise ValueError(f"unknown output type {kind!r}")
        return Path(d)

    # ------------------------------------------------------- node look-ups
    def has_node(self, class_type: str) -> bool:
        return class_type in self._nodes.NODE_CLASS_MAPPINGS

    def input_specs(self, class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
        """``{input_name: (type, options)}`` from the node's INPUT_TYPES.

        Cached per class: INPUT_TYPES can be slow (LoadImage lists the input
        folder) and requests ask for every node. Options (ranges, upload
        flags) do not change; a combo's choices do, so its type is just
        ``"COMBO"`` here (ComfyUI's validation checks the live choices).
        """
        cached = self._specs.get(class_type)
        if cached is not None:
            return cached
        cls = self._nodes.NODE_CLASS_MAPPINGS.get(class_type)
        if cls is None:
            return {}
        out: dict[str, tuple[Any, dict[str, Any]]] = {}
        try:
            spec = cls.INPUT_TYPES()
        except Exception:  # a broken custom node must not break request handling
            log.exception("INPUT_TYPES of %s failed", class_type)
            return {}
        for section in ("required", "optional"):
            for name, value in (spec.get(section) or {}).items():
                if isinstance(value, (list, tuple)) and value:
                    opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
                    kind = "COMBO" if isinstance(value[0], (list, tuple)) else value[0]
                    out[name] = (kind, opts)
        self._specs[class_type] = out
        return out

    def is_loader(self, class_type: str) -> bool:
        """Whether a node loads a model: its CATEGORY is under ``loaders``
        (``loaders``, ``advanced/loaders``), as ComfyUI's menu files them."""
        cls = self._nodes.NODE_CLASS_MAPPINGS.get(class_type)
        category = getattr(cls, "CATEGORY", "") if cls is not None else ""
        return isinstance(category, str) and "loaders" in category.split("/")

    # ---------------------------------------------------------- validation
    def validate(self, prompt: dict[str, Any], prompt_id: str,
                 targets: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        """Run ComfyUI's validate_prompt on a copy; return (that copy, outputs).

        validate_prompt casts values in place, so the copy it validated is the
        one to execute. Any node error, even with some outputs valid, is
        raised: a partial run would silently drop outputs the user asked for.
        ``targets`` (native's ``partial_execution_targets``) limits the check
        and the run to those output nodes. Blocking: call it from a worker
        thread (or use :meth:`validate_here` on the event loop).
        """
        self._check_node_types(prompt)
        return self._answer(*self.check(prompt, prompt_id, targets))

    async def validate_here(self, prompt: dict[str, Any], prompt_id: str,
                            targets: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        """:meth:`validate` on the running event loop, as native ComfyUI
        validates in its request handler (no worker-thread hand-off)."""
        self._check_node_types(prompt)
        checked = copy.deepcopy(prompt)
        ok, error, outputs, node_errors = await self._execution.validate_prompt(
            prompt_id, checked, targets)
        return self._answer(checked, bool(ok), error, list(outputs or []), dict(node_errors or {}))

    @staticmethod
    def _answer(checked: dict[str, Any], ok: bool, error: dict[str, Any] | None,
                outputs: list[str], node_errors: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """validate_prompt's answer as (checked copy, outputs), or WorkflowInvalid."""
        if not ok or node_errors:
            error = error or {"type": "prompt_outputs_failed_validation",
                              "message": "Prompt outputs failed validation", "details": ""}
            message = error["message"]
            detail = _describe(node_errors) or error.get("details") or ""
            if detail:
                message = f"{message}: {detail}"
            raise WorkflowInvalid(message, type=error.get("type"), node_errors=node_errors)
        return checked, list(outputs)

    def _check_node_types(self, prompt: dict[str, Any]) -> None:
        """Every unknown ``class_type``, each under its node id. ComfyUI stops
        at the first one with empty ``node_errors``, which names no node."""
        errors: dict[str, Any] = {}
        for node_id, node in prompt.items():
            class_type = node.get("class_type")
            if isinstance(class_type, str) and not self.has_node(class_type):
                errors.update(node_error(str(node_id), class_type, "class_type",
                                         f"node type {class_type} does not exist",
                                         class_type, type="invalid_node"))
        if errors:
            raise WorkflowInvalid("Cannot execute because " + "; ".join(
                f"node {node_id} ({entry['class_type']}) does not exist"
                for node_id, entry in errors.items())
                + " (a custom node that is not installed?)",
                type="invalid_prompt", node_errors=errors)

    def check(self, prompt: dict[str, Any], prompt_id: str, targets: list[str] | None = None
              ) -> tuple[dict[str, Any], bool, dict[str, Any] | None, list[str], dict[str, Any]]:
        """validate_prompt's answer, raising nothing: ``(checked copy, ok,
        error, outputs, node_errors)``."""
        checked = copy.deepcopy(prompt)
        with self._validate_lock:
            # Its own loop: the executor thread's loop is busy running graphs.
            if self._validate_loop is None:
                self._validate_loop = asyncio.new_event_loop()
            ok, error, outputs, node_errors = self._validate_loop.run_until_complete(
                self._execution.validate_prompt(prompt_id, checked, targets))
        return checked, bool(ok), error, list(outputs or []), dict(node_errors or {})

    def input_options(self, class_type: str) -> dict[str, list[Any]]:
        """``{input_name: choices}`` of the node's combo (list) inputs."""
        cls = self._nodes.NODE_CLASS_MAPPINGS.get(class_type)
        if cls is None:
            return {}
        try:
            spec = cls.INPUT_TYPES()
        except Exception:
            return {}
        out: dict[str, list[Any]] = {}
        for section in ("required", "optional"):
            for name, value in (spec.get(section) or {}).items():
                if isinstance(value, (list, tuple)) and value:
                    head = value[0]
                    if isinstance(head, (list, tuple)):
                        out[name] = list(head)
                    elif head == "COMBO" and len(value) > 1 and isinstance(value[1], dict):
                        out[name] = list(value[1].get("options") or [])
        return out

    def model_files(self) -> dict[str, list[str]]:
        """``{folder_name: [file names]}`` of every model folder (checkpoints,
        loras, vae...), as loader nodes list them."""
        fp = self._folder_paths
        out: dict[str, list[str]] = {}
        for name in fp.folder_names_and_paths:
            if name in ("custom_nodes", "configs"):
                continue
            try:
                out[name] = list(fp.get_filename_list(name))
            except Exception:
                continue
        return out

    def model_path(self, folder: str, name: str) -> str | None:
        """Absolute path of a model file, or None."""
        return self._folder_paths.get_full_path(folder, name)

    # ----------------------------------------------------------- execution
    def execute(self, prompt: dict[str, Any], prompt_id: str, outputs: list[str],
                sink: Sink, stop: Callable[[], bool] | None = None,
                extra_data: dict[str, Any] | None = None) -> Outcome:
        """Execute a validated prompt on this (the executor) thread.

        ``stop`` is asked once, right after ComfyUI clears its process-wide
        interrupt flag at the start of ``execute_async`` (an interrupt raised
        before that point is wiped by ComfyUI itself): when it answers True
        the prompt ends interrupted before any node runs, cached ones
        included (ComfyUI never checks the flag for a cached node).
        ``extra_data`` is native's (``extra_pnginfo``, ``client_id``...): nodes
        read it through their hidden inputs and ``prompt_queue``.
        """
        srv = self.server
        extra = dict(extra_data or {})
        client_id = str(extra.get("client_id") or _CLIENT_ID)
        extra["client_id"] = client_id
        srv.last_prompt_id = prompt_id
        srv.sockets_metadata = {client_id: {"feature_flags": {"supports_preview_metadata": True}}}
        sink = self._flushing_progress(sink)
        srv.sink = sink if stop is None else _stop_at_start(sink, stop)
        srv.number += 1
        item = (srv.number, prompt_id, prompt, extra, outputs)
        srv.prompt_queue.started(item)
        ex = self.executor
        outcome: Outcome | None = None
        try:
            try:
                self.loop.run_until_complete(
                    ex.execute_async(prompt, prompt_id, extra, outputs))
            except _StoppedAtStart:
                data = {"prompt_id": prompt_id, "node_id": None, "node_type": None,
                        "executed": [], "timestamp": int(time.time() * 1000)}
                sink("execution_interrupted", data)
                return Outcome(success=False, interrupted=True, outputs={}, error=dict(data),
                               messages=[("execution_interrupted", data)])
            last = ex.status_messages[-1][0] if ex.status_messages else None
            error = None
            for event, data in ex.status_messages:
                if event in ("execution_error", "execution_interrupted"):
                    error = _trim(dict(data))
            outcome = Outcome(success=last == "execution_success",
                              interrupted=last == "execution_interrupted",
                              outputs=dict(ex.history_result.get("outputs", {})),
                              error=error, messages=list(ex.status_messages))
            return outcome
        finally:
            srv.prompt_queue.finished(item, outcome.outputs if outcome else {}, {
                "status_str": "success" if outcome and outcome.success else "error",
                "completed": bool(outcome and outcome.success),
                "messages": [list(m) for m in (outcome.messages if outcome else [])]})
            # Native ComfyUI's worker loop sends this after every prompt;
            # clients wait for it as the "done" signal.
            sink("executing", {"node": None, "prompt_id": prompt_id})
            srv.sink = None
            self._progress = None

    def _set_progress(self, handler: Any) -> None:
        self._progress = handler

    def _flushing_progress(self, sink: Sink) -> Sink:
        """``sink``, sending the latest held-back progress_state just before
        ComfyUI's end-of-run message."""
        def send(event: str, data: dict) -> None:
            if event in _END_OF_RUN and self._progress is not None:
                self._progress.flush()
            sink(event, data)
        return send

    def free_memory(self) -> None:
        """Give cached accelerator memory back, as native does between prompts
        (executor thread)."""
        self._mm.soft_empty_cache()

    def interrupt(self) -> None:
        """Ask the running prompt to stop at its next check (any thread)."""
        self._nodes.interrupt_processing(True)

    def _progress_hook(self, value: float, total: float, preview: Any,
                       prompt_id: str | None = None, node_id: str | None = None) -> None:
        # What main.py's hook does, minus the binary preview message. Raising
        # here is how an interrupt stops a sampler mid-way.
        ctx = self._get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        self._mm.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id or self.server.last_prompt_id
        node_id = node_id or self.server.last_node_id
        self._get_progress_state().update_progress(node_id, value, total, preview)
        self.server.send_sync("progress", {"value": value, "max": total,
                                           "prompt_id": prompt_id, "node": node_id})

    def preload(self, checkpoint: str) -> None:
        """Load a checkpoint into the node cache, as a first prompt would."""
        node = "preload"
        prompt = {node: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}}
        outcome = self.execute(prompt, "preload-" + uuid.uuid4().hex, [node], lambda e, d: None)
        if not outcome.success:
            raise RuntimeError(f"preloading {checkpoint} failed: {outcome.error}")

    # --------------------------------------------------- test checkpoint
    def build_tiny_checkpoint(self, path: Path, seed: int = 0) -> Path:
        """Write a random-weights SD1.5-architecture checkpoint (see README).

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
                         transformer_depth_middle=-2, context_dim=768, num_heads=8, use_spatial_transformer=True,
                         use_linear_in_transformer=False, operations=comfy.ops.manual_cast)
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


class _StoppedAtStart(Exception):
    """Raised through ComfyUI's execute_async when ``stop`` says so at its start."""


def _stop_at_start(sink: Sink, stop: Callable[[], bool]) -> Sink:
    """A sink that asks ``stop`` on ``execution_start``: ComfyUI sends that
    message right after ``nodes.interrupt_processing(False)``, before any
    cache or node work, so raising there leaves its executor untouched."""

    def forward(kind: str, data: dict) -> None:
        sink(kind, data)
        if kind == "execution_start" and stop():
            raise _StoppedAtStart()

    return forward


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


def _describe(node_errors: dict[str, Any]) -> str:
    """One line per failing input: 'node 3 (KSampler) input seed: message'."""
    parts = []
    for node_id, entry in node_errors.items():
        for err in entry.get("errors", []):
            name = (err.get("extra_info") or {}).get("input_name")
            where = f"node {node_id} ({entry.get('class_type')})"
            if name:
                where += f" input '{name}'"
            msg = err.get("message", "")
            det = err.get("details", "")
            parts.append(f"{where}: {msg}" + (f" ({det})" if det else ""))
    return "; ".join(parts)
