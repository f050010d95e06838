"""Pure graph handling: parsing, random seeds, image inputs, output isolation.

Nothing here imports ComfyUI: node definitions come in as a look-up function
``specs(class_type) -> {input_name: (type, options)}``.
"""

from __future__ import annotations

import json
import posixpath
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Iterator

from comfy_embed.errors import WorkflowInvalid, node_error
from comfy_embed.taskid import valid_task_id  # re-exported: the rule lives in taskid

__all__ = ["parse_workflow", "parse_request", "WorkflowRequest", "check_nodes",
           "drop_unknown_constants", "check_output_bytes",
           "randomize_seeds", "image_inputs", "media_inputs", "media_kind", "isolate_outputs",
           "node_order", "valid_task_id", "SpecLookup"]

SpecLookup = Callable[[str], dict[str, tuple[Any, dict[str, Any]]]]

SEED_INPUTS = ("seed", "noise_seed")
#: Default bound on the nesting of a request body (a workflow needs about 4).
MAX_DEPTH = 64
#: A path component longer than this fails on most filesystems (ENAMETOOLONG);
#: ComfyUI appends ``_00001_.png`` to the last one.
_MAX_COMPONENT = 200
_MAX_PREFIX = 1024


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/dicts deeper than ``limit`` (iterative: a
    deep value must not exhaust the interpreter's stack while being measured)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


@dataclass
class WorkflowRequest:
    """A request body: the graph plus native ``POST /prompt``'s envelope fields."""

    prompt: dict[str, Any]
    client_id: str | None = None
    #: Native's ``extra_data`` (``extra_pnginfo``, ``client_id``...; other
    #: features read their own keys, e.g. ``webhook``).
    extra_data: dict[str, Any] = field(default_factory=dict)
    #: ``partial_execution_targets``: run only these output nodes.
    targets: list[str] | None = None


def parse_workflow(body: bytes | str | dict[str, Any], *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Decode an API-format workflow and check its shape (not its semantics:
    ComfyUI's validation does that). Raises WorkflowInvalid, also for JSON
    nested deeper than ``max_depth``, integers too long to convert and
    NaN/Infinity, which would otherwise fail later as server errors."""
    return parse_request(body, max_depth=max_depth).prompt


def parse_request(body: bytes | str | dict[str, Any],
                  on_prompt: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                  *, max_depth: int = MAX_DEPTH) -> WorkflowRequest:
    """A bare API-format graph, or native's envelope ``{"prompt": graph,
    "client_id"?, "extra_data"?, "partial_execution_targets"?}``.

    ``on_prompt`` sees (and may rewrite) the envelope first, as custom-node
    packs' on-prompt handlers do on native ``POST /prompt``; a bare graph is
    wrapped as ``{"prompt": graph}`` for them. Raises WorkflowInvalid.
    """
    body = _decode(body, max_depth)
    envelope = body if _is_envelope(body) else {"prompt": body}
    if on_prompt is not None:
        envelope = on_prompt(envelope)
        if not isinstance(envelope, dict) or not isinstance(envelope.get("prompt"), dict):
            raise WorkflowInvalid("an on-prompt handler of a custom-node pack returned no "
                                  "prompt", type="invalid_prompt")
    prompt = _check_graph(envelope["prompt"])
    client_id = envelope.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        raise WorkflowInvalid("client_id must be a string", type="invalid_prompt")
    extra = envelope.get("extra_data", {})
    if not isinstance(extra, dict):
        raise WorkflowInvalid("extra_data must be a JSON object", type="invalid_prompt")
    extra = dict(extra)
    if client_id:
        extra["client_id"] = client_id
    targets = envelope.get("partial_execution_targets")
    if targets is not None:
        if not isinstance(targets, list) or not all(isinstance(t, (str, int)) and
                                                    not isinstance(t, bool) for t in targets):
            raise WorkflowInvalid("partial_execution_targets must be a list of node ids",
                                  type="invalid_prompt")
        targets = [str(t) for t in targets]
        unknown = [t for t in targets if t not in prompt]
        if unknown:
            raise WorkflowInvalid("partial_execution_targets names nodes that are not in the "
                                  f"workflow: {', '.join(unknown)}", type="invalid_prompt")
        if not targets:
            raise WorkflowInvalid("partial_execution_targets is empty", type="prompt_no_outputs")
    return WorkflowRequest(prompt, client_id, extra, targets)


def _is_envelope(body: dict[str, Any]) -> bool:
    inner = body.get("prompt")
    return isinstance(inner, dict) and "class_type" not in inner and "class_type" not in body


def _decode(body: bytes | str | dict[str, Any], max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    if isinstance(body, (bytes, bytearray)):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WorkflowInvalid(f"request body is not UTF-8: {e}", type="invalid_json") from None
    if isinstance(body, str):
        if not body.strip():
            raise WorkflowInvalid("request body is empty: send the workflow JSON "
                                  "(ComfyUI's Export (API) format)", type="invalid_json")
        try:
            body = json.loads(body, parse_constant=_no_constants)
        except json.JSONDecodeError as e:
            raise WorkflowInvalid(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
                                  type="invalid_json") from None
        except RecursionError:
            raise WorkflowInvalid(f"JSON is nested too deep (the limit is {max_depth} levels)",
                                  type="invalid_json") from None
        except ValueError as e:  # an integer over 4,300 digits, NaN, Infinity
            raise WorkflowInvalid(f"malformed JSON: {e}", type="invalid_json") from None
    if _depth_over(body, max_depth):
        raise WorkflowInvalid(f"JSON is nested too deep (the limit is {max_depth} levels)",
                              type="invalid_json")
    if not isinstance(body, dict):
        raise WorkflowInvalid(f"the workflow must be a JSON object of nodes, got {type(body).__name__}",
                              type="invalid_prompt")
    return body


def _check_graph(body: dict[str, Any]) -> dict[str, Any]:
    if "nodes" in body and "links" in body:
        raise WorkflowInvalid("this is ComfyUI's UI workflow format; export the workflow "
                              "with 'Export (API)' and send that", type="invalid_prompt")
    if not body:
        raise WorkflowInvalid("the workflow has no nodes", type="invalid_prompt")
    errors: dict[str, Any] = {}
    for node_id, node in body.items():
        if not isinstance(node, dict):
            errors.update(node_error(str(node_id), "", "", "a node must be a JSON object "
                                     "with class_type and inputs", type="invalid_node"))
            continue
        if not isinstance(node.get("class_type"), str):
            errors.update(node_error(str(node_id), "", "class_type",
                                     "missing or non-string class_type", type="invalid_node"))
        if not isinstance(node.get("inputs", {}), dict):
            errors.update(node_error(str(node_id), str(node.get("class_type")), "inputs",
                                     "inputs must be a JSON object", type="invalid_node"))
    if errors:
        raise WorkflowInvalid("invalid workflow: " + "; ".join(
            f"node {k}: {v['errors'][0]['message']}" for k, v in errors.items()),
            type="invalid_prompt", node_errors=errors)
    for node in body.values():
        node.setdefault("inputs", {})
    _check_links(body)
    return body


def _check_links(prompt: dict[str, Any]) -> None:
    """A link ``[source_id, output_index]`` must name an existing node; ComfyUI
    reports a dangling one as a KeyError at the wrong node, so check first."""
    errors: dict[str, Any] = {}
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)):
                continue
            source = str(value[0])
            if source not in prompt:
                errors.update(node_error(str(node_id), node["class_type"], name,
                                         f"links to node {source}, which is not in the workflow",
                                         value, type="bad_linked_input"))
    if errors:
        raise WorkflowInvalid("invalid workflow: " + "; ".join(
            f"node {k} ({v['class_type']}) input '{v['errors'][0]['extra_info']['input_name']}' "
            f"{v['errors'][0]['message']}" for k, v in errors.items()),
            type="prompt_outputs_failed_validation", node_errors=errors)


def check_nodes(prompt: dict[str, Any], *, max_nodes: int, denylist: tuple[str, ...] = ()) -> None:
    """Refuse a workflow over ``max_nodes`` nodes, or using a denied node class
    (one that writes model files or reads whole folders), naming the nodes."""
    if len(prompt) > max_nodes:
        raise WorkflowInvalid(f"the workflow has {len(prompt)} nodes; the limit is {max_nodes} "
                              "(COMFY_EMBED_MAX_NODES)", type="too_many_nodes")
    denied = frozenset(denylist)
    errors: dict[str, Any] = {}
    for node_id, node in prompt.items():
        if node["class_type"] in denied:
            errors.update(node_error(str(node_id), node["class_type"], "class_type",
                                     f"node class {node['class_type']} is not allowed on this "
                                     "server (COMFY_EMBED_NODE_DENYLIST)",
                                     node["class_type"], type="node_denied"))
    if errors:
        raise WorkflowInvalid("invalid workflow: " + "; ".join(
            f"node {k} ({v['class_type']}) is not allowed on this server"
            for k, v in sorted(errors.items())[:10]),
            type="node_denied", node_errors=errors)


def drop_unknown_constants(prompt: dict[str, Any],
                           names: Callable[[str], Container[str] | None]) -> dict[str, list[str]]:
    """Remove every constant input a node does not declare (``names(class_type)``:
    its INPUT_TYPES' names; None: unknown class, left alone); return
    ``{node_id: [removed names]}``.

    ComfyUI hands a node only the constants its INPUT_TYPES declares and
    ignores the rest, but the whole prompt, ignored values included, goes
    into every output PNG's metadata: megabytes of unused text there cost
    disk per image and change nothing. Links are kept even when undeclared:
    ComfyUI passes them on (nodes with ``**kwargs`` read them).
    """
    removed: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        known = names(node["class_type"])
        if known is None:
            continue
        inputs = node["inputs"]
        unknown = [name for name, value in inputs.items()
                   if name not in known and not _is_link(value)]
        for name in unknown:
            del inputs[name]
        if unknown:
            removed[str(node_id)] = unknown
    return removed


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)
            and not isinstance(value[1], bool))


#: Inputs that multiply a node's ``width`` x ``height`` into more pictures
#: (images of a batch, frames of a video latent, repeats).
_COUNT_INPUTS = ("batch_size", "length", "amount")


def _literal_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_output_bytes(prompt: dict[str, Any], *, metadata_bytes: Callable[[], int],
                       limit: int) -> None:
    """Refuse a workflow whose nodes make pictures that would write more
    than ``limit`` bytes in all: for each node with literal ``width`` and
    ``height`` (and ``batch_size``, ``length``, ``amount``), pictures x (3
    bytes a pixel + ``metadata_bytes()``, what each PNG embeds; asked once,
    only when a node states a size), summed over the nodes (a chain that
    resizes is counted at each step: an estimate made before anything runs,
    on the safe side). WorkflowInvalid naming each such node and the input
    that multiplies it."""
    sized: list[tuple[str, str, str, str, int]] = []
    metadata: int | None = None
    for node_id, node in prompt.items():
        inputs = node["inputs"]
        width, height = _literal_int(inputs.get("width")), _literal_int(inputs.get("height"))
        if width is None or height is None or width <= 0 or height <= 0:
            continue
        counts = {n: c for n in _COUNT_INPUTS if (c := _literal_int(inputs.get(n))) is not None}
        pictures = 1
        for count in counts.values():
            pictures *= max(count, 1)
        if metadata is None:
            metadata = metadata_bytes()
        shape = " x ".join([f"{n} {c}" for n, c in counts.items()] + [f"{width}x{height}"])
        sized.append((str(node_id), node["class_type"], next(iter(counts), "width"), shape,
                      pictures * (3 * width * height + metadata)))
    total = sum(estimate for *_, estimate in sized)
    if total <= limit:
        return
    errors: dict[str, Any] = {}
    for node_id, class_type, name, shape, estimate in sized:
        errors.update(node_error(
            node_id, class_type, name,
            f"{shape} would write about {estimate} bytes of output (the workflow: {total}); "
            f"the limit is {limit} (COMFY_EMBED_MAX_OUTPUT_BYTES)",
            prompt[node_id]["inputs"].get(name), type="output_too_large"))
    biggest = sorted(sized, key=lambda s: -s[4])[:5]
    raise WorkflowInvalid(
        f"the workflow would write about {total} bytes of output; the limit is {limit} "
        "(COMFY_EMBED_MAX_OUTPUT_BYTES): " + "; ".join(
            f"node {n} ({c}) input '{i}': {shape}" for n, c, i, shape, _ in biggest),
        type="output_too_large", node_errors=errors)


def randomize_seeds(prompt: dict[str, Any], specs: SpecLookup) -> dict[str, int]:
    """Replace every ``seed``/``noise_seed`` input equal to -1 by a fresh
    random seed within the node's range; return ``{node_id: seed}`` of every
    seed the run uses (fixed ones too), so the run can be reproduced."""
    used: dict[str, int] = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {})
        for name in SEED_INPUTS:
            value = inputs.get(name)
            if isinstance(value, bool) or not isinstance(value, int):
                continue
            if value == -1:
                _, opts = specs(node.get("class_type", "")).get(name, ("INT", {}))
                low = max(int(opts.get("min", 0)), 0)
                high = int(opts.get("max", 0xFFFFFFFFFFFFFFFF))
                value = low + secrets.randbelow(high - low + 1)
                inputs[name] = value
            used[node_id] = value
    return used


#: Inputs that take an uploaded file by name although their spec carries no
#: upload marker (the pack's JavaScript adds the upload button).
KNOWN_MEDIA_INPUTS: dict[tuple[str, str], str] = {
    ("LoadAudio", "audio"): "audio",
    ("VHS_LoadVideo", "video"): "video",
    ("VHS_LoadVideoFFmpeg", "video"): "video",
    ("VHS_LoadAudioUpload", "audio"): "audio",
}


def media_kind(class_type: str, name: str, opts: dict[str, Any]) -> str | None:
    """"image", "audio" or "video" for an upload-type input, else None."""
    for kind in ("image", "audio", "video"):
        if opts.get(f"{kind}_upload") or opts.get("upload") in (kind, f"{kind}_upload"):
            return kind
    return KNOWN_MEDIA_INPUTS.get((class_type, name))


def media_inputs(prompt: dict[str, Any], specs: SpecLookup
                 ) -> Iterator[tuple[str, str, str, str, str]]:
    """``(node_id, class_type, input_name, value, kind)`` for every upload-type
    input given as a string (links are lists and are left alone)."""
    for node_id, node in prompt.items():
        class_type = node.get("class_type", "")
        node_specs = specs(class_type)
        for name, value in node.get("inputs", {}).items():
            if not isinstance(value, str):
                continue
            _, opts = node_specs.get(name, (None, {}))
            kind = media_kind(class_type, name, opts)
            if kind is not None:
                yield node_id, class_type, name, value, kind


def image_inputs(prompt: dict[str, Any], specs: SpecLookup) -> Iterator[tuple[str, str, str, str]]:
    """``(node_id, class_type, input_name, value)`` for every image-upload
    input given as a string (links are lists and are left alone)."""
    for node_id, class_type, name, value, kind in media_inputs(prompt, specs):
        if kind == "image":
            yield node_id, class_type, name, value


def _prefix_problem(value: Any) -> str | None:
    """Why a ``filename_prefix`` could leave the task's output folder (None: fine)."""
    if not isinstance(value, str):
        # A link is computed while the graph runs, after this check could see it.
        return "must be a literal string (a link could name any folder)"
    if len(value) > _MAX_PREFIX:
        return f"is over {_MAX_PREFIX} characters"
    if "\x00" in value or "\\" in value:
        return "may not contain NUL or backslash characters"
    if value.startswith("/"):
        return "must be relative to the output folder (no leading /)"
    parts = value.split("/")
    if ".." in parts:
        return "may not contain '..' (it would leave the task's output folder)"
    if any(len(p.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT for p in parts):
        return f"has a folder or file name over {_MAX_COMPONENT} bytes"
    if value and posixpath.normpath(value) == ".":
        # ComfyUI normalises the joined prefix: "<task>/." would become the
        # file name "<task>" in the output root, outside the task's folder.
        return "names no file (it normalises to '.'; end it with a file name such as 'ComfyUI')"
    return None


def _inside(prefix: str, subfolder: str) -> bool:
    """Whether ComfyUI's ``get_save_image_path`` (folder_paths.py: the folder
    is ``dirname(normpath(prefix))``) puts files for ``prefix`` inside
    ``subfolder``; its ``%width%``-style variables only ever insert digits."""
    folder = posixpath.dirname(posixpath.normpath(prefix))
    return folder == subfolder or folder.startswith(subfolder + "/")


def isolate_outputs(prompt: dict[str, Any], subfolder: str) -> None:
    """Prefix every ``filename_prefix`` with a per-task subfolder, so
    concurrent or repeated tasks never write into, or report, each other's
    files (ComfyUI numbers files by listing the folder, which is racy across
    processes sharing it). A prefix that could escape that folder (``..``,
    absolute, a link, one that normalises to ``.``) is refused with
    WorkflowInvalid naming node and input; ``subfolder`` must be a valid task id."""
    if not valid_task_id(subfolder):
        raise WorkflowInvalid("task id is not a plain folder name", type="invalid_task_id")
    errors: dict[str, Any] = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {})
        if "filename_prefix" not in inputs:
            continue
        value = inputs["filename_prefix"]
        problem = _prefix_problem(value)
        if problem:
            shown = value[:200] if isinstance(value, str) else value
            errors.update(node_error(str(node_id), node.get("class_type", ""), "filename_prefix",
                                     f"filename_prefix {problem}", shown))
            continue
        prefix = f"{subfolder}/{value or 'ComfyUI'}"
        if not _inside(prefix, subfolder):  # defence in depth: the checks above should catch it
            errors.update(node_error(str(node_id), node.get("class_type", ""), "filename_prefix",
                                     "filename_prefix would leave the task's output folder",
                                     value[:200]))
            continue
        inputs["filename_prefix"] = prefix
    if errors:
        raise WorkflowInvalid("invalid workflow: " + "; ".join(
            f"node {k} ({v['class_type']}) input 'filename_prefix': {v['errors'][0]['message']}"
            for k, v in sorted(errors.items())[:10]),
            type="prompt_outputs_failed_validation", node_errors=errors)


def node_order(node_id: str) -> tuple[int, int | str]:
    """Sort key: numeric ids numerically ("9" before "10"), others after."""
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)
