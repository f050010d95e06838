"""The ComfyUI boundary's one object: :class:`Comfy`, ComfyUI booted in this
process.

It boots ComfyUI headless (the steps are in :mod:`.boot`), owns the one
PromptExecutor and its persistent event loop, and answers questions about
node definitions (seed ranges, image-upload inputs). Everything here that
executes a graph must be called from the executor thread; ``validate`` and the
node look-ups are read-only and may be called from any thread.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Container

from comfy_embed._comfy import boot
from comfy_embed._comfy.file_names import granted_folders, granting
from comfy_embed._comfy.packs import PackStatus
from comfy_embed._comfy.progress import ProgressRelay
from comfy_embed._comfy.warm import KeptModels
from comfy_embed._comfy.writes import OutputWriter
from comfy_embed.config import Settings
from comfy_embed.errors import WorkflowInvalid, node_error
from comfy_embed.outcome import Outcome, PendingWrite, Sink
from comfy_embed.prepare.graph import media_inputs

log = logging.getLogger(__name__)

__all__ = ["Comfy", "PackStatus"]

#: The client id ComfyUI sees; with it set, the executor sends every message.
_CLIENT_ID = "comfy-embed"


def _trim(value: Any, limit: int = 300) -> Any:
    """Tensor reprs in ``current_inputs`` can be megabytes: cut them."""
    if isinstance(value, dict):
        return {k: _trim(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v, limit) for v in value[:16]]
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


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
        self._names: dict[str, _Declared] = {}
        self._progress = ProgressRelay(self.server)
        #: Encodes output images off the executor thread (None: on it, as native).
        self.writer: OutputWriter | None = None
        #: COMFY_EMBED_KEEP_LOADED's pins, and the models loaded after each run.
        self.kept = KeptModels(settings.comfy.keep_loaded)

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
        boot.put_on_path(s.comfy.comfyui_dir)
        # Start reading the checkpoints to preload while the imports run.
        c = s.comfy
        boot.warm_page_cache([d / name for name in c.preload
                              for d in (c.models_path / "checkpoints", Path(c.cache_dir))])
        self.deferred_modules = boot.defer_imports(s)
        self.device = boot.configure_args(s)
        boot.use_stand_in_server()
        self.boot_seconds["torch"] = time.perf_counter() - t0

        folder_paths = boot.set_folders(s)
        execution, nodes, self.packs = boot.import_nodes(s, folder_paths, self.loop,
                                                         self.boot_seconds)
        boot.quiet_output()
        import comfy.model_management
        self._execution, self._nodes, self._mm = execution, nodes, comfy.model_management
        self._folder_paths = folder_paths
        self._progress.install(execution, s.comfy.progress_interval)
        self.executor = boot.new_executor(execution, self.server)
        self.server.loop = self.loop
        if s.comfy.encode_workers > 0:
            self.writer = OutputWriter(s.comfy.encode_workers, s.comfy.encode_backlog,
                                       lambda: [self.directory_of("output"),
                                                self.directory_of("temp")],
                                       processes=s.comfy.encode_processes)
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

    def input_names(self, class_type: str) -> Container[str] | None:
        """The input names the node's INPUT_TYPES declares (required,
        optional, hidden), asked as ComfyUI's ``get_input_info`` asks them:
        ``name in section``, so a pack's section that admits any name (a
        dict whose ``__contains__`` says yes, as rgthree's flexible inputs
        are) admits it here too. None for an unknown class or one whose
        INPUT_TYPES fails (validation answers for those)."""
        cached = self._names.get(class_type)
        if cached is not None:
            return cached
        cls = self._nodes.NODE_CLASS_MAPPINGS.get(class_type)
        if cls is None:
            return None
        try:
            spec = cls.INPUT_TYPES()
        except Exception:  # logged by input_specs; validation reports the node
            return None
        # Not ``or {}``: a section that admits any name may be an empty dict.
        names = _Declared([spec[section] for section in ("required", "optional", "hidden")
                           if spec.get(section) is not None])
        self._names[class_type] = names
        return names

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
        with granting(self._grants(prompt)):
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
        with self._validate_lock, granting(self._grants(prompt)):
            # Its own loop: the executor thread's loop is busy running graphs.
            if self._validate_loop is None:
                self._validate_loop = asyncio.new_event_loop()
            ok, error, outputs, node_errors = self._validate_loop.run_until_complete(
                self._execution.validate_prompt(prompt_id, checked, targets))
        return checked, bool(ok), error, list(outputs or []), dict(node_errors or {})

    def _grants(self, prompt: dict[str, Any]) -> frozenset[str]:
        """The ``serverless/`` folders this graph's own materialised inputs
        are in: the only ones its file-name inputs may read (file_names)."""
        return granted_folders(value for *_, value, _kind in media_inputs(prompt, self.input_specs))

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
        sink = self._progress.flushing(sink)
        writer = self.writer
        if writer is not None:
            sink = writer.watch(sink, prompt)
        srv.sink = sink if stop is None else _stop_at_start(sink, stop)
        srv.number += 1
        item = (srv.number, prompt_id, prompt, extra, outputs)
        srv.prompt_queue.started(item)
        ex = self.executor
        outcome: Outcome | None = None
        try:
            try:
                with granting(self._grants(prompt)):
                    self.loop.run_until_complete(
                        ex.execute_async(prompt, prompt_id, extra, outputs))
                self._after_run(prompt)
            except _StoppedAtStart:
                data: dict[str, Any] = {"prompt_id": prompt_id, "node_id": None,
                                        "node_type": None, "executed": [],
                                        "timestamp": int(time.time() * 1000)}
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
            if writer is not None and outcome is not None:
                outcome.writes = writer.finish()
            elif writer is not None:  # an exception: the files are waited for all the same
                _wait_quietly(writer.finish())
            srv.prompt_queue.finished(item, outcome.outputs if outcome else {}, {
                "status_str": "success" if outcome and outcome.success else "error",
                "completed": bool(outcome and outcome.success),
                "messages": [list(m) for m in (outcome.messages if outcome else [])]})
            # Native ComfyUI's worker loop sends this after every prompt;
            # clients wait for it as the "done" signal.
            sink("executing", {"node": None, "prompt_id": prompt_id})
            srv.sink = None
            self._progress.handler = None

    def _after_run(self, prompt: dict[str, Any]) -> None:
        """Pin the kept models this run loaded; note what is loaded now."""
        try:
            self.kept.after_run(self.executor.caches.outputs, prompt, self.is_loader)
        except Exception:  # a hint is never worth failing a run
            log.exception("noting the loaded models failed")

    @property
    def loaded_models(self) -> tuple[str, ...]:
        """The models whose loader outputs are cached now (as of the last
        run's end), sorted; any thread."""
        return self.kept.loaded

    def release_kept(self, reason: str) -> list[str]:
        """Let the kept models go (real memory pressure; executor thread)."""
        return self.kept.release(reason)

    def free_memory(self) -> None:
        """Give cached accelerator memory back, as native does between prompts
        (executor thread)."""
        self._mm.soft_empty_cache()

    def interrupt(self) -> None:
        """Ask the running prompt to stop at its next check (any thread)."""
        self._nodes.interrupt_processing(True)

    def preload(self, checkpoint: str, loader: str = "CheckpointLoaderSimple",
                inputs: dict[str, Any] | None = None) -> None:
        """Load a model into the node cache, as a first prompt would."""
        node = "preload"
        prompt = {node: {"class_type": loader, "inputs": inputs or {"ckpt_name": checkpoint}}}
        outcome = self.execute(prompt, "preload-" + uuid.uuid4().hex, [node], lambda e, d: None)
        if not outcome.success:
            raise RuntimeError(f"preloading {checkpoint} failed: {outcome.error}")

    def keep_warm(self) -> list[str]:
        """Load the COMFY_EMBED_KEEP_LOADED models a loader can load alone
        (checkpoints, VAEs, diffusion models), so they are kept from the
        start; the others (LoRAs, text encoders: their loaders need more
        than a name) are kept from their first use. The names loaded."""
        if not self.kept.names:
            return []  # no folder listing on the cold start's path
        files = self.model_files()
        done = []
        for name in sorted(self.kept.names):
            for folder, loader, key, extra in _WARM_LOADERS:
                if name in files.get(folder, ()) and self.has_node(loader):
                    self.preload(name, loader, {key: name, **extra})
                    done.append(name)
                    break
            else:
                known = any(name in names for names in files.values())
                log.log(logging.INFO if known else logging.WARNING,
                        "kept model %s is kept from its first use (%s)", name,
                        "no loader loads it alone" if known else "in no model folder now")
        return done


#: (folder, loader, its name input, its other inputs) that load a model alone.
_WARM_LOADERS: tuple[tuple[str, str, str, dict[str, Any]], ...] = (
    ("checkpoints", "CheckpointLoaderSimple", "ckpt_name", {}),
    ("vae", "VAELoader", "vae_name", {}),
    ("diffusion_models", "UNETLoader", "unet_name", {"weight_dtype": "default"}),
)


class _Declared:
    """A node's declared input names: in it when one of its INPUT_TYPES
    sections says so (``name in section``, the section's own test)."""

    def __init__(self, sections: list[Any]) -> None:
        self._sections = sections

    def __contains__(self, name: object) -> bool:
        return any(name in section for section in self._sections)


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


def _wait_quietly(writes: list[PendingWrite]) -> None:
    """Wait for the files of a run that raised (its error is what counts)."""
    for w in writes:
        try:
            w.future.result()
        except Exception:
            log.warning("writing %s failed after its run failed", w.path.name)


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
