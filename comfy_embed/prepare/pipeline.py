"""From a request body to a runnable graph: the steps a run and the dry run share.

:class:`Preparer` walks them in order: parse (limits, custom-node packs'
on-prompt handlers), random seeds, per-task output folders, media inputs
materialised into the input folder, models fetched on first use, and
ComfyUI's validation. ``Engine.submit`` calls :meth:`Preparer.prepare`; the
dry run (``POST /validate``) calls :meth:`Preparer.parse` and
:meth:`Preparer.materialise` itself, since it reports every problem instead
of stopping at the first.

This package sits below ComfyUI's boundary and the input fetchers, so both
come in as parameters: ComfyUI's node definitions and validation as a
:class:`NodeCatalog` (the booted ``Comfy`` object is one), media inputs
through an :class:`InputFetcher` (``inputs.fetch.ImageFetcher`` is one).
"""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Container, Iterable, Protocol

import anyio

from comfy_embed.config import Settings
from comfy_embed.errors import ImageInputError, WorkflowInvalid, node_error
from comfy_embed.assets.store import AssetStore
from comfy_embed.observe.report import TaskReport, loader_nodes
from comfy_embed.prepare.assetrefs import asset_refs, resolve_assets
from comfy_embed.prepare.graph import (
    WorkflowRequest,
    check_nodes,
    check_output_bytes,
    drop_unknown_constants,
    isolate_outputs,
    media_inputs,
    parse_request,
    randomize_seeds,
)
from comfy_embed.prepare.shape import workflow_shape
from comfy_embed.prepare.ui_format import convert_ui_workflow, is_ui_workflow
from comfy_embed.storage.credentials import Credentials

__all__ = ["INLINE_VALIDATION_NODES", "InputBudget", "InputFetcher", "NodeCatalog", "Prepared",
           "Preparer", "WriteGate"]

#: Schemes of URL inputs (what a fetcher reads over the network or from a store).
_URL_SCHEMES = ("http://", "https://", "oss://", "s3://")

#: Graphs up to this many nodes are validated on the event loop, as native
#: ComfyUI validates every graph. ComfyUI's check is pure Python (tens of
#: microseconds a node) and holds the GIL wherever it runs: a worker thread
#: gives it no parallelism and costs two thread hand-offs per request. Larger
#: graphs go to a worker thread, where the loop can run while the check waits
#: on the files some nodes list (models, inputs).
INLINE_VALIDATION_NODES = 64

#: ``(checked copy of the graph, output node ids)``: ComfyUI's validation answer.
Validated = tuple[dict[str, Any], list[str]]
#: ``(node_id, class_type, input_name, value, kind)`` of one media input.
MediaRef = tuple[str, str, str, str, str]


def _metadata_bytes(request: WorkflowRequest, written: bool) -> int:
    """Bytes each output PNG embeds: the prompt and ``extra_pnginfo`` as JSON."""
    if not written:
        return 0
    return (len(json.dumps(request.prompt))
            + len(json.dumps(request.extra_data.get("extra_pnginfo") or {})))


class NodeCatalog(Protocol):
    """What preparing asks of ComfyUI: node definitions and validation."""

    def input_specs(self, class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
        """``{input_name: (type, options)}`` of a node class ({} if unknown)."""
        ...

    def input_names(self, class_type: str) -> Container[str] | None:
        """The input names the class declares, as ComfyUI asks them
        (``name in ...``); None: unknown class."""
        ...

    def input_options(self, class_type: str) -> dict[str, list[Any]]:
        """``{input_name: choices}`` of a node class's combo inputs (a saved
        workflow's missing widget values take the first)."""
        ...

    def is_loader(self, class_type: str) -> bool:
        """Whether a node class loads a model (for the task's report)."""
        ...

    def validate(self, prompt: dict[str, Any], prompt_id: str,
                 targets: list[str] | None = None) -> Validated:
        """ComfyUI's validation, blocking (run in a worker thread);
        WorkflowInvalid naming the failing nodes."""
        ...

    async def validate_here(self, prompt: dict[str, Any], prompt_id: str,
                            targets: list[str] | None = None) -> Validated:
        """:meth:`validate` on the running event loop."""
        ...


class InputBudget:
    """The bytes one request's inputs may bring in all, charged as they
    arrive; over it, ImageInputError (every input of the request shares one)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, size: int) -> None:
        """Count ``size`` more bytes; ImageInputError once over the limit."""
        self.used += size
        if self.used > self.limit:
            raise ImageInputError(f"the request's inputs are over {self.limit} bytes in all "
                                  "(COMFY_EMBED_MAX_REQUEST_INPUT_BYTES)")


class InputFetcher(Protocol):
    """Turns a media input's value (URL, ``oss://``, base64, file name) into
    a checked file name in the input folder; ImageInputError when it cannot.
    The bytes it brings are charged to ``budget``."""

    async def materialise(self, value: str, credentials: Credentials | None = None,
                          kind: str = "image", folder: str | None = None,
                          budget: InputBudget | None = None) -> str: ...


class WriteGate:
    """``before_writes`` awaited at most once, before the first thing is
    written under a task id (its inputs) or the task is queued.

    The service claims the task id in the shared log meanwhile; raising
    there refuses the task. ``passed`` tells whether writes were allowed,
    hence whether a refused request's inputs are its own to delete.
    """

    def __init__(self, before_writes: Callable[[], Awaitable[None]] | None = None) -> None:
        self._before = before_writes

    @property
    def passed(self) -> bool:
        """True once awaited without raising (or when there was nothing to await)."""
        return self._before is None

    async def open(self) -> None:
        """Await ``before_writes`` unless it was already passed."""
        if self._before is not None:
            await self._before()
            self._before = None


@dataclass
class Prepared:
    """A request made runnable: what the engine queues."""

    request: WorkflowRequest
    #: ComfyUI's prompt id of the run.
    prompt_id: str
    #: ``{node_id: seed}`` of every seed the run uses.
    seeds: dict[str, int]
    #: The validated copy of the graph (ComfyUI cast its values): the one to execute.
    checked: dict[str, Any]
    #: The output nodes to execute.
    outputs: list[str]
    #: The graph's shape (prepare/shape.py), taken as it was parsed: what the ETA learns by.
    shape: str = ""


class Preparer:
    """The preparation steps over one booted ComfyUI.

    ``fetcher`` is called for the input fetcher only when a request has
    media inputs (making one opens storage clients). ``on_inputs(folder)``
    is told before inputs are written under ``serverless/<folder>/``, so
    whoever deletes them later knows the folder exists. ``on_prompt`` runs
    custom-node packs' on-prompt handlers over the request, as native
    ``POST /prompt`` does; ``fetch_models`` downloads the models a graph
    names (the manifest's ``first_use`` policy), before validation.
    """

    def __init__(self, settings: Settings, nodes: NodeCatalog,
                 fetcher: Callable[[], InputFetcher], *,
                 on_inputs: Callable[[str], None] | None = None,
                 on_prompt: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 fetch_models: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.nodes = nodes
        self._fetcher = fetcher
        self._on_inputs = on_inputs
        self._on_prompt = on_prompt
        self._fetch_models = fetch_models

    def parse(self, body: Any, *, handlers: bool = True) -> WorkflowRequest:
        """The request (bare graph or native envelope) within the configured
        limits (nesting, node count, denied node classes, output bytes),
        without the constant inputs its nodes do not declare; WorkflowInvalid.

        The caller's dict is copied, never rewritten. ``handlers=False``
        skips the packs' on-prompt handlers (the dry run: no side effects).
        """
        body = copy.deepcopy(body) if isinstance(body, dict) else body
        s = self.settings
        request = parse_request(body, self._saved_workflows(handlers),
                                max_depth=s.safety.max_json_depth)
        check_nodes(request.prompt, max_nodes=s.safety.max_nodes, denylist=s.safety.node_denylist)
        drop_unknown_constants(request.prompt, self.nodes.input_names)
        check_output_bytes(request.prompt, limit=s.safety.max_output_bytes,
                           metadata_bytes=lambda: _metadata_bytes(request, s.comfy.write_metadata))
        return request

    def _saved_workflows(self, handlers: bool
                         ) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """The on-prompt step: a saved (editor) workflow, bare or as the
        envelope's ``prompt``, converted to the API format first (kept as
        ``extra_pnginfo.workflow``, as the editor sends it, unless the
        caller set one), then the packs' handlers (when ``handlers``)."""
        on_prompt = self._on_prompt if handlers else None

        def step(envelope: dict[str, Any]) -> dict[str, Any]:
            saved = envelope.get("prompt")
            if isinstance(saved, dict) and is_ui_workflow(saved):
                envelope["prompt"] = convert_ui_workflow(saved, self.nodes,
                                                         self.settings.safety.max_nodes)
                extra = envelope.get("extra_data")
                if isinstance(extra, dict) or extra is None:
                    extra = dict(extra or {})
                    info = extra.setdefault("extra_pnginfo", {})
                    if isinstance(info, dict):
                        info.setdefault("workflow", saved)
                    envelope["extra_data"] = extra
            return on_prompt(envelope) if on_prompt is not None else envelope
        return step

    async def prepare(self, body: Any, task_id: str, credentials: Credentials | None = None,
                      gate: WriteGate | None = None, report: TaskReport | None = None,
                      asset_owner: str | None = None) -> Prepared:
        """Every step, in order, for a run of ``task_id``: its outputs go to
        the folder ``task_id``, its inputs to ``serverless/<task_id>/``.

        ``gate`` is opened before the first input is written; the caller
        opens it (if still closed) before queueing. Raises WorkflowInvalid,
        ImageInputError, ModelDownloadError, or what the gate raises.
        """
        request = self.parse(body)
        prompt = request.prompt
        specs = self.nodes.input_specs
        shape = workflow_shape(prompt, specs)
        seeds = randomize_seeds(prompt, specs)
        isolate_outputs(prompt, task_id)
        refs = list(media_inputs(prompt, specs))
        if refs:
            if gate is not None:
                await gate.open()  # inputs are about to be written under this id
            await self.materialise(prompt, credentials, task_id, refs)
        assets = list(asset_refs(prompt))  # Comfy API v2's core/ASSET references
        if assets:
            if gate is not None:
                await gate.open()
            if self._on_inputs is not None:
                self._on_inputs(task_id)
            s = self.settings
            await anyio.to_thread.run_sync(resolve_assets, prompt, assets,
                                           AssetStore(s.task_log_path), asset_owner,
                                           s.comfy.input_path, task_id)
        if self._fetch_models is not None:
            await self._fetch_models(prompt)
        prompt_id = str(uuid.uuid4())
        if report is not None:
            report.mark_prepared()
        checked, outputs = await self.validate(prompt, prompt_id, request.targets)
        if report is not None:
            report.mark_validated(checked, loader_nodes(checked, self.nodes.is_loader))
        return Prepared(request, prompt_id, seeds, checked, outputs, shape)

    async def materialise(self, prompt: dict[str, Any], credentials: Credentials | None,
                          folder: str, refs: Iterable[MediaRef] | None = None) -> None:
        """Turn upload-type inputs (image, audio, video) given as URLs,
        ``oss://``/``s3://`` or base64 into checked files under
        ``serverless/<folder>/`` (one caller's inputs out of another's
        reach), rewriting the graph's inputs to their names. Every refused
        input is named in one ImageInputError."""
        refs = list(media_inputs(prompt, self.nodes.input_specs) if refs is None else refs)
        if not refs:
            return
        self._check_url_count(refs)
        if self._on_inputs is not None:
            self._on_inputs(folder)
        fetcher = self._fetcher()
        errors: list[ImageInputError] = []
        budget = InputBudget(self.settings.inputs.max_request_input_bytes)

        async def one(node_id: str, class_type: str, name: str, value: str, kind: str) -> None:
            try:
                prompt[node_id]["inputs"][name] = await fetcher.materialise(
                    value, credentials, kind=kind, folder=folder, budget=budget)
            except ImageInputError as e:
                errors.append(e.at(node_id, class_type, name, value))

        async with anyio.create_task_group() as tg:
            for ref in refs:
                tg.start_soon(one, *ref)
        if errors:
            first = errors[0]
            for other in errors[1:]:
                first.node_errors.update(other.node_errors)
            raise first

    def _check_url_count(self, refs: list[MediaRef]) -> None:
        """Refuse, before anything is fetched, a request naming more URL
        inputs than ``max_url_inputs`` (each may bring up to the input cap)."""
        limit = self.settings.inputs.max_url_inputs
        urls = [ref for ref in refs if ref[3][:8].lower().startswith(_URL_SCHEMES)]
        if len(urls) <= limit:
            return
        errors: dict[str, Any] = {}
        for node_id, class_type, name, value, _ in urls:
            errors.update(node_error(node_id, class_type, name, "one of too many URL inputs",
                                     value[:200], type="too_many_url_inputs"))
        raise WorkflowInvalid(f"the workflow names {len(urls)} URL inputs; the limit is {limit} "
                              "(COMFY_EMBED_MAX_URL_INPUTS)", type="too_many_url_inputs",
                              node_errors=errors)

    async def validate(self, prompt: dict[str, Any], prompt_id: str,
                       targets: list[str] | None = None) -> Validated:
        """ComfyUI's validation: on the loop for small graphs (see
        :data:`INLINE_VALIDATION_NODES`), in a worker thread for larger ones."""
        if len(prompt) <= INLINE_VALIDATION_NODES:
            return await self.nodes.validate_here(prompt, prompt_id, targets)
        return await anyio.to_thread.run_sync(self.nodes.validate, prompt, prompt_id, targets)
