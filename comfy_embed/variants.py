"""N variants of one request: the graph run N times in one task, each with
its own seeds, one answer grouping every result by variant.

``?variants=N`` (or ``extra_data.variants: N``) runs the graph as sent (its
``-1`` seeds drawn as usual), then N-1 times more with a fresh seed drawn for
every seed input (``seed``, ``noise_seed``). ``extra_data.variants: [s1, s2,
...]`` runs one variant per entry: an int sets every seed input, an object
``{node_id: seed}`` sets those nodes' (the others keep the graph's).

Why one job holding N executions and not N jobs: the executions follow one
another on the executor thread with nothing in between, so ComfyUI's node
cache keeps what did not change (the checkpoint loader, the text encoders:
CLASSIC keeps what the previous prompt computed; another caller's prompt in
between would evict it). One job is also one place in the queue and in a
key's quota, one cancel (it stops the running variant and every one after
it), one run-timeout for the whole task and one final event. The executor
knows nothing of variants: :class:`VariantRun` is the job's ``run`` hook.

Each variant writes under its own folder ``<task_id>/v<k>/`` (its
``filename_prefix`` rewritten), so no file name is shared between variants,
even when two variants' seeds are the same.
"""

from __future__ import annotations

import copy
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from comfy_embed.config import Settings
from comfy_embed.errors import InvalidParameter, WorkflowInvalid
from comfy_embed.executor import Backend, Job, Outcome, Sink
from comfy_embed.prepare.graph import SEED_INPUTS, check_output_bytes
from comfy_embed.results import collect_values

__all__ = ["VARIANT_EVENT", "Variant", "VariantRun", "asked", "attach_variants", "check_variants",
           "checked_plan", "plan_variants"]

#: The event sent as each variant starts: ``{prompt_id, variant, variants, seeds}``.
VARIANT_EVENT = "variant"

#: ``{input_name: (type, options)}`` of a node class (the node catalog's look-up).
SpecLookup = Callable[[str], dict[str, tuple[Any, dict[str, Any]]]]


@dataclass
class Variant:
    """One execution of a variants task."""

    #: 1-based.
    number: int
    prompt: dict[str, Any]
    #: ``{node_id: seed}`` of every seed input this variant uses.
    seeds: dict[str, int]


def asked(option: Any, extra_data: dict[str, Any]) -> Any:
    """What the caller asked: the run option (``?variants=``) if given, else
    ``extra_data.variants``; None when neither is."""
    return option if option is not None else extra_data.get("variants")


def _range(specs: SpecLookup, class_type: str, name: str) -> tuple[int, int]:
    _, opts = specs(class_type).get(name, ("INT", {}))
    return max(int(opts.get("min", 0)), 0), int(opts.get("max", 0xFFFFFFFFFFFFFFFF))


def _seed_inputs(prompt: dict[str, Any]) -> list[tuple[str, str]]:
    """``(node_id, input_name)`` of every literal seed input."""
    found = []
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {})
        for name in SEED_INPUTS:
            value = inputs.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                found.append((node_id, name))
    return found


def _entries(value: Any, limit: int) -> list[Any]:
    """The variants asked, one entry each (None: fresh seeds); InvalidParameter
    naming ``variants`` for anything else or more than ``limit``."""
    bound = f"between 1 and {limit} (COMFY_EMBED_MAX_VARIANTS)"
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= limit:
            raise InvalidParameter(f"variants must be {bound}; got {value}")
        return [None] * value
    if not isinstance(value, (list, tuple)):
        raise InvalidParameter("variants must be a whole number or a list of seeds (an int, "
                               f"or an object of node id to seed, each); got {type(value).__name__}")
    if not 1 <= len(value) <= limit:
        raise InvalidParameter(f"variants must list {bound} seeds; got {len(value)}")
    for i, entry in enumerate(value):
        ok = (isinstance(entry, int) and not isinstance(entry, bool)) or (
            isinstance(entry, dict) and entry and all(
                isinstance(v, int) and not isinstance(v, bool) for v in entry.values()))
        if not ok:
            raise InvalidParameter(f"variants[{i}] must be an int seed or a non-empty object of "
                                   f"node id to int seed; got {str(entry)[:80]!r}")
    return list(value)


def plan_variants(value: Any, prompt: dict[str, Any], specs: SpecLookup, task_id: str,
                  limit: int) -> list[Variant]:
    """The variants ``value`` asks of the validated ``prompt`` (see the
    module docstring); InvalidParameter naming ``variants`` (and the entry,
    node and input) when they cannot be run as asked."""
    entries = _entries(value, limit)
    inputs = _seed_inputs(prompt)
    if not inputs and (len(entries) > 1 or any(e is not None for e in entries)):
        raise InvalidParameter("variants needs a seed input (a literal seed or noise_seed) in the "
                               "workflow: without one every variant would be the same run")
    planned = []
    for number, entry in enumerate(entries, start=1):
        graph = copy.deepcopy(prompt)
        if entry is not None or number > 1:
            _set_seeds(graph, inputs, entry, number, specs)
        _own_folder(graph, task_id, number)
        seeds = {node_id: graph[node_id]["inputs"][name] for node_id, name in inputs}
        planned.append(Variant(number, graph, seeds))
    return planned


def _set_seeds(graph: dict[str, Any], inputs: list[tuple[str, str]], entry: Any,
               number: int, specs: SpecLookup) -> None:
    """Variant ``number``'s seeds into ``graph``: fresh (``entry`` None), one
    for all (an int) or per node (an object)."""
    where = f"variants[{number - 1}]"
    if isinstance(entry, dict):
        seeded = {node_id for node_id, _ in inputs}
        unknown = [str(k) for k in entry if str(k) not in seeded]
        if unknown:
            raise InvalidParameter(f"{where} names node {unknown[0]}, which has no seed input "
                                   f"(nodes with one: {', '.join(sorted(seeded)) or 'none'})")
        entry = {str(k): v for k, v in entry.items()}
    for node_id, name in inputs:
        class_type = graph[node_id].get("class_type", "")
        low, high = _range(specs, class_type, name)
        if entry is None:
            seed = low + secrets.randbelow(high - low + 1)
        elif isinstance(entry, dict):
            if node_id not in entry:
                continue
            seed = entry[node_id]
        else:
            seed = entry
        if not low <= seed <= high:
            raise InvalidParameter(f"{where}: seed {seed} is out of range for node {node_id} "
                                   f"({class_type}) input '{name}' ({low}-{high})")
        graph[node_id]["inputs"][name] = seed


def _own_folder(graph: dict[str, Any], task_id: str, number: int) -> None:
    """Every ``<task_id>/...`` filename prefix moved to ``<task_id>/v<number>/...``."""
    head = f"{task_id}/"
    for node in graph.values():
        inputs = node.get("inputs", {})
        prefix = inputs.get("filename_prefix")
        if isinstance(prefix, str) and prefix.startswith(head):
            inputs["filename_prefix"] = f"{head}v{number}/{prefix[len(head):]}"


def _merge(merged: dict[str, Any], owners: dict[tuple[str, str], list[int]],
           outputs: dict[str, Any], number: int) -> None:
    """Add one variant's UI outputs to ``merged``: lists concatenated in
    variant order (so a node's files keep one index sequence across
    variants), other values replaced; ``owners`` tells each item's variant."""
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            merged[node_id] = ui
            continue
        into = merged.setdefault(node_id, {})
        for key, value in ui.items():
            if isinstance(value, list):
                into[key] = list(into.get(key) or []) + value
                owners.setdefault((node_id, key), []).extend([number] * len(value))
            else:
                into[key] = value


def _tagged(emit: Sink, number: int, n: int, held: list[tuple[str, dict]]) -> Sink:
    """Variant ``number``'s messages, tagged ``variant``/``variants``; its
    ``executing`` with no node (native clients' "prompt done") held back, to
    go out only after the last variant (or the one that ends the run)."""
    def sink(kind: str, data: dict) -> None:
        data = {**data, "variant": number, "variants": n}
        if kind == "executing" and data.get("node") is None:
            held.append((kind, data))
            return
        emit(kind, data)
    return sink


@dataclass(eq=False)
class VariantRun:
    """A variants job's ``run`` hook (executor thread): each variant executed
    in turn, its events tagged ``variant``/``variants``; one Outcome merging
    them, or the first failure, naming its variant."""

    variants: list[Variant]
    prompt_id: str
    outputs: list[str]
    extra_data: dict[str, Any]
    #: Each executed variant's UI outputs, in order (read after the job ended).
    executed: list[dict[str, Any]] = field(default_factory=list)
    #: Every executed variant's UI outputs merged (lists concatenated in variant order).
    merged: dict[str, Any] = field(default_factory=dict)
    #: The merged outputs' list items by owner: ``(node_id, key) -> [variant, ...]``.
    owners: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, backend: Backend, emit: Sink, stop: Callable[[], bool]) -> Outcome:
        n = len(self.variants)
        messages: list[tuple[str, dict]] = []
        writes: list[Any] = []
        for v in self.variants:
            held: list[tuple[str, dict]] = []
            emit(VARIANT_EVENT, {"prompt_id": self.prompt_id, "variant": v.number,
                                 "variants": n, "seeds": dict(v.seeds)})
            out = backend.execute(v.prompt, self.prompt_id, self.outputs,
                                  _tagged(emit, v.number, n, held), stop=stop,
                                  extra_data=self.extra_data)
            messages.extend(out.messages)
            writes.extend(out.writes)
            if not out.success:
                for kind, data in held:  # the run ends here: native's "done" goes out
                    emit(kind, data)
                error = dict(out.error or {})
                error["variant"] = v.number
                return Outcome(success=False, interrupted=out.interrupted, outputs={},
                               error=error, messages=messages, writes=writes)
            with self._lock:
                self.executed.append(out.outputs)
                _merge(self.merged, self.owners, out.outputs, v.number)
            if v.number == n:
                for kind, data in held:
                    emit(kind, data)
        return Outcome(success=True, interrupted=False, outputs=dict(self.merged),
                       messages=messages, writes=writes)

    # ------------------------------------------------ the answer (event loop)
    def variant_of(self, node_id: str, index: int) -> int | None:
        """The variant of the ``index``-th file of node ``node_id`` in the
        merged outputs (results list a node's files in that order)."""
        with self._lock:
            ui = self.merged.get(node_id)
            if not isinstance(ui, dict):
                return None
            seen = 0
            for key, items in ui.items():
                if not isinstance(items, list):
                    continue
                for item, owner in zip(items, self.owners.get((node_id, key), []), strict=False):
                    if isinstance(item, dict) and "filename" in item:
                        if seen == index:
                            return owner
                        seen += 1
        return None

    def group(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Tag each result with its ``variant``; the answer's ``variants``:
        ``[{variant, seeds, outputs, result_indexes}]`` in variant order."""
        indexes: list[list[int]] = [[] for _ in self.variants]
        for i, r in enumerate(results):
            number = self.variant_of(str(r.get("node_id")), int(r.get("index", 0)))
            if number is None:
                continue
            r["variant"] = number
            indexes[number - 1].append(i)
        groups: list[dict[str, Any]] = [
            {"variant": v.number, "seeds": dict(v.seeds), "outputs": {},
             "result_indexes": indexes[v.number - 1]} for v in self.variants]
        with self._lock:
            for number, outputs in enumerate(self.executed, start=1):
                groups[number - 1]["outputs"] = collect_values(outputs)
        return groups

    def name_error(self, error: Any) -> None:
        """A failed variant's error (a ComfyEmbedError) names it first."""
        details = getattr(error, "details", None)
        number = details.get("variant") if isinstance(details, dict) else None
        if isinstance(number, int):
            error.message = f"variant {number} of {len(self.variants)}: {error.message}"


def check_variants(value: Any, limit: int) -> None:
    """Refuse a malformed ``variants`` option (or over ``limit``) before
    anything is prepared (InvalidParameter naming it)."""
    _entries(value, limit)


def attach_variants(job: Job, option: Any, specs: SpecLookup, settings: Settings
                    ) -> VariantRun | None:
    """Make ``job`` (validated, not yet queued) run the variants its caller
    asked (the ``option``, else ``extra_data.variants``): the run hook, which
    the task reads to group its answer. None when none were asked."""
    value = asked(option, job.extra_data)
    if value is None:
        return None
    planned = checked_plan(value, job.prompt, specs, job.task_id, settings)
    run = VariantRun(planned, job.prompt_id, job.outputs, job.extra_data)
    job.prompt = planned[0].prompt
    job.run = run
    return run


def checked_plan(value: Any, prompt: dict[str, Any], specs: SpecLookup, task_id: str,
                 settings: Settings) -> list[Variant]:
    """:func:`plan_variants` within the settings' bounds (COMFY_EMBED_MAX_VARIANTS,
    and COMFY_EMBED_MAX_OUTPUT_BYTES for all variants together): what a run
    and the dry run check."""
    planned = plan_variants(value, prompt, specs, task_id, settings.jobs.max_variants)
    _check_output_bytes(prompt, len(planned), settings.safety.max_output_bytes)
    return planned


def _check_output_bytes(prompt: dict[str, Any], n: int, limit: int) -> None:
    """COMFY_EMBED_MAX_OUTPUT_BYTES holds for the N variants together (the
    graph alone was checked as it was parsed)."""
    if n < 2:
        return
    try:
        check_output_bytes(prompt, metadata_bytes=lambda: 0, limit=limit // n)
    except WorkflowInvalid as e:
        raise WorkflowInvalid(f"variants: {n} variants would write over the output limit of "
                              f"{limit} bytes in all (at most {limit // n} each): {e.message}",
                              type="output_too_large", node_errors=e.node_errors) from None
