"""Saved (editor, "UI") workflows converted to the API format on the server.

A workflow saved from ComfyUI's editor holds ``nodes`` (each with its
``widgets_values``: the widget values by position, not by name), ``links``,
``extra`` and ``definitions.subgraphs``. ComfyUI's frontend turns it into the
API format (``app.graphToPrompt()``) with the node definitions the server
sends it; :func:`convert_ui_workflow` does the same with this instance's node
definitions, so a saved workflow can be posted as it is.

What it follows, as the frontend does (``tests/prepare/test_ui_format_browser.py``
compares both on the corpus, input by input):

- widget values map to the node's widget inputs in the order of its input
  spec (required, then optional); ``forceInput`` inputs have no widget; a
  seed-like INT (``control_after_generate``, or named ``seed`` /
  ``noise_seed``) is followed by its ``control_after_generate`` value, and an
  upload combo (``image_upload``...) by its upload button's: both are skipped;
- links, legacy ``Reroute`` nodes and ``PrimitiveNode`` (its value becomes
  the constant of every input it feeds) are resolved; frontend-only nodes
  (Note, MarkdownNote) dropped;
- a muted node (mode 2) is left out with every input it fed; a bypassed one
  (mode 4) passes, for each link through it, the first input of a
  compatible type (the same slot first);
- subgraphs (``definitions.subgraphs``) are flattened, their nodes named
  ``<instance id>:<inner id>``; a subgraph input left unlinked takes the
  instance's promoted widget value;
- a list value is sent as ``{"__value__": [...]}`` (a bare list is a link).

Legacy group nodes (``extra.groupNodes``) are refused with a clear error:
the editor converts them to subgraphs. Errors name the editor's node id and
title.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from comfy_embed.errors import WorkflowInvalid, node_error

__all__ = [
    "FRONTEND_ONLY",
    "NodeDefinitions",
    "convert_ui_workflow",
    "is_ui_workflow",
    "widget_names",
]

#: Nodes that exist only in the editor (never sent to the server).
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
#: Input types the editor shows as a widget (unless ``forceInput``).
_WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "AUDIO_RECORD", "WEBCAM",
                           "LOAD_3D", "LOAD_3D_ANIMATION"})
#: Values of the ``control_after_generate`` widget that follows a seed.
_CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize"})
#: Upload flags of a combo that add an upload button widget after it.
_UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload",
                 "mesh_upload", "file_upload")
_MUTED, _BYPASS = 2, 4
#: Ids of a subgraph's input and output nodes in its links.
_SUBGRAPH_IN, _SUBGRAPH_OUT = -10, -20


def is_ui_workflow(body: Any) -> bool:
    """Whether a decoded body is a saved (editor) workflow: ``nodes`` is a
    list, as no API-format graph's is."""
    return isinstance(body, dict) and isinstance(body.get("nodes"), list) and \
        "class_type" not in body


@dataclass(frozen=True)
class _Widget:
    name: str
    #: False for the editor's helper widgets (seed control, upload button).
    sent: bool
    kind: str = ""
    opts: dict[str, Any] = field(default_factory=dict)

    def default(self, class_type: str, defs: NodeDefinitions) -> Any:
        """The value the editor gives a widget the saved workflow has no value
        for (a combo's choices are asked only then: listing them may read a
        folder, as LoadImage's do)."""
        if "default" in self.opts:
            return self.opts["default"]
        if self.kind == "COMBO":
            choices = defs.input_options(class_type).get(self.name)
            return choices[0] if choices else None
        return {"INT": 0, "FLOAT": 0, "STRING": "", "BOOLEAN": False}.get(self.kind, "")


class NodeDefinitions(Protocol):
    """What converting asks of this instance's node definitions (the booted
    ``Comfy`` object is one)."""

    def input_specs(self, class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
        """``{input_name: (type, options)}`` in the node's order ({} if unknown)."""
        ...

    def input_options(self, class_type: str) -> dict[str, list[Any]]:
        """``{input_name: choices}`` of the node's combo inputs."""
        ...


def widget_names(class_type: str, defs: NodeDefinitions) -> list[_Widget]:
    """The widgets the editor builds for a node class, in order."""
    out: list[_Widget] = []
    for name, (kind, opts) in defs.input_specs(class_type).items():
        if kind not in _WIDGET_TYPES or opts.get("forceInput"):
            continue
        out.append(_Widget(name, True, kind, opts))
        if opts.get("control_after_generate") or (
                kind == "INT" and name in ("seed", "noise_seed")
                and opts.get("control_after_generate") is not False):
            out.append(_Widget("control_after_generate", False))
        if kind == "COMBO" and any(opts.get(flag) for flag in _UPLOAD_FLAGS):
            out.append(_Widget("upload", False))
    return out


def _valid_connection(a: Any, b: Any) -> bool:
    """LiteGraph's type match: equal, either any (``*``/empty), or lists
    (``A,B``) that share a type; case-insensitive."""
    a = "" if a in (None, "*", 0) else str(a)
    b = "" if b in (None, "*", 0) else str(b)
    if not a or not b or a == b:
        return True
    la, lb = a.lower().split(","), b.lower().split(",")
    return any(x == y for x in la for y in lb)


@dataclass
class _Link:
    origin_id: Any
    origin_slot: int
    target_id: Any
    target_slot: int
    type: Any


def _links(raw: Any) -> dict[int, _Link]:
    """Links by id, from the array form ``[id, origin, slot, target, slot,
    type]`` or the object form (subgraphs, schema 1)."""
    out: dict[int, _Link] = {}
    for item in raw or []:
        if isinstance(item, list) and len(item) >= 5:
            out[item[0]] = _Link(item[1], int(item[2]), item[3], int(item[4]),
                                 item[5] if len(item) > 5 else None)
        elif isinstance(item, dict) and "id" in item:
            out[item["id"]] = _Link(item.get("origin_id"), int(item.get("origin_slot", 0)),
                                    item.get("target_id"), int(item.get("target_slot", 0)),
                                    item.get("type"))
    return out


@dataclass
class _Graph:
    """One level: the root workflow or a subgraph's definition."""

    nodes: dict[str, dict[str, Any]]
    links: dict[int, _Link]
    #: A subgraph definition's ``inputs`` (each with its ``linkIds``).
    inputs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Dto:
    """A node as it executes: its path through subgraph instances, its graph,
    and the instance it sits in (None at the root)."""

    id: str
    node: dict[str, Any]
    graph: _Graph
    path: tuple[str, ...]
    instance: _Dto | None

    @property
    def type(self) -> str:
        return str(self.node.get("type"))

    @property
    def mode(self) -> int:
        return int(self.node.get("mode") or 0)


#: A resolved input: ``(origin execution id, slot)``, ``("value", v)``, or None.
_Resolved = tuple[str, Any] | None


class _Converter:
    def __init__(self, workflow: dict[str, Any], defs: NodeDefinitions,
                 max_nodes: int) -> None:
        self.defs = defs
        self.max_nodes = max_nodes
        subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
        self.subgraphs: dict[str, _Graph] = {}
        for sg in subgraphs:
            if isinstance(sg, dict) and isinstance(sg.get("id"), str):
                self.subgraphs[sg["id"]] = _Graph(self._nodes(sg.get("nodes")),
                                                  _links(sg.get("links")),
                                                  list(sg.get("inputs") or []))
        self.root = _Graph(self._nodes(workflow.get("nodes")), _links(workflow.get("links")))
        self.dtos: dict[str, _Dto] = {}
        self._count = 0  # nodes that will be sent (not notes, reroutes, instances)
        self._widgets: dict[str, dict[str, Any]] = {}
        self._flatten(self.root, (), None, depth=0)

    @staticmethod
    def _nodes(raw: Any) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for n in raw or []:
            if not isinstance(n, dict) or "id" not in n:
                raise WorkflowInvalid("a saved workflow's node has no id", type="invalid_prompt")
            out[str(n["id"])] = n
        return out

    def _flatten(self, graph: _Graph, path: tuple[str, ...], instance: _Dto | None,
                 depth: int) -> None:
        if depth > 32:
            raise WorkflowInvalid("subgraphs are nested more than 32 deep", type="invalid_prompt")
        for nid, node in graph.nodes.items():
            dto = _Dto(":".join((*path, nid)), node, graph, path, instance)
            self.dtos[dto.id] = dto
            if dto.type not in FRONTEND_ONLY and dto.type not in self.subgraphs:
                self._count += 1
            if self._count > self.max_nodes:
                # Checked while expanding: nested subgraph instances multiply.
                raise WorkflowInvalid(f"the saved workflow expands to more than "
                                      f"{self.max_nodes} nodes (COMFY_EMBED_MAX_NODES)",
                                      type="too_many_nodes")
            inner = self.subgraphs.get(dto.type)
            if inner is not None:
                self._flatten(inner, (*path, nid), dto, depth + 1)

    # ----------------------------------------------------------- widgets
    def widget_values(self, dto: _Dto) -> dict[str, Any]:
        """``{widget name: value}`` of a node, from its ``widgets_values``."""
        cached = self._widgets.get(dto.id)
        if cached is not None:
            return cached
        values = dto.node.get("widgets_values")
        out: dict[str, Any] = {}
        if dto.type in self.subgraphs:
            out = self._promoted(dto)
        elif isinstance(values, dict):  # some packs save widgets by name
            names = {w.name for w in widget_names(dto.type, self.defs)}
            out = {k: v for k, v in values.items() if k in names}
        else:  # by position, as the editor assigns them; missing ones take defaults
            pending = list(values) if isinstance(values, list) else []
            for w in widget_names(dto.type, self.defs):
                value = pending.pop(0) if pending else w.default(dto.type, self.defs)
                if w.sent:
                    out[w.name] = value
        self._widgets[dto.id] = out
        return out

    def _promoted(self, dto: _Dto) -> dict[str, Any]:
        """A subgraph instance's widgets: one per subgraph input that feeds an
        inner widget (its value first the inner widget's, then the
        instance's ``widgets_values`` by position), keyed by input index."""
        graph = self.subgraphs[dto.type]
        found: list[tuple[int, Any]] = []
        for k, sg_input in enumerate(graph.inputs):
            for link_id in sg_input.get("linkIds") or []:
                link = graph.links.get(link_id)
                target = graph.nodes.get(str(link.target_id)) if link else None
                if link is None or target is None:
                    continue
                # The saved input that holds this link (its index need not be
                # target_slot: the editor may save inputs in another order).
                slot = next((i for i in target.get("inputs") or []
                             if isinstance(i, dict) and i.get("link") == link_id), {})
                wname = (slot.get("widget") or {}).get("name")
                if not wname:
                    continue
                inner = self.dtos.get(f"{dto.id}:{link.target_id}")
                value = self.widget_values(inner).get(wname) if inner else None
                found.append((k, value))
                break
        saved = dto.node.get("widgets_values")
        if isinstance(saved, list):
            found = [(k, saved[i] if i < len(saved) else v) for i, (k, v) in enumerate(found)]
        return {str(k): v for k, v in found}

    # ------------------------------------------------------------- links
    def resolve_input(self, dto: _Dto, slot: int, seen: set[str]) -> _Resolved:
        key = f"{dto.id}[I]{slot}"
        if key in seen:
            raise self._error(dto, f"input {slot}", "its links form a loop")
        seen.add(key)
        inputs = dto.node.get("inputs") or []
        if slot >= len(inputs):
            return None
        link_id = inputs[slot].get("link")
        if link_id is None:
            return None
        link = dto.graph.links.get(link_id)
        if link is None:
            return None  # the editor drops a dangling link too
        if dto.instance is not None and link.origin_id == _SUBGRAPH_IN:
            inst = dto.instance
            index = self._instance_slot(inst, link.origin_slot)
            inst_inputs = inst.node.get("inputs") or []
            if index is None or inst_inputs[index].get("link") is None:
                promoted = self.widget_values(inst)
                key_k = str(link.origin_slot)
                return ("value", promoted[key_k]) if key_k in promoted else None
            return self.resolve_input(inst, index, seen)
        origin = self.dtos.get(":".join((*dto.path, str(link.origin_id))))
        if origin is None:
            return None
        return self.resolve_output(origin, link.origin_slot, inputs[slot].get("type"), seen)

    def _instance_slot(self, inst: _Dto, k: int) -> int | None:
        """The saved input of a subgraph instance that is its definition's
        input ``k``: matched by name (a saved instance may list fewer
        inputs, in another order), else by position."""
        graph = self.subgraphs[inst.type]
        inputs = inst.node.get("inputs") or []
        name = graph.inputs[k].get("name") if k < len(graph.inputs) else None
        for i, slot in enumerate(inputs):
            if name is not None and slot.get("name") == name:
                return i
        return k if k < len(inputs) and name is None else None

    def resolve_output(self, dto: _Dto, slot: int, type_: Any, seen: set[str]) -> _Resolved:
        key = f"{dto.id}[O]{slot}"
        if key in seen:
            raise self._error(dto, f"output {slot}", "its links form a loop")
        seen.add(key)
        if dto.mode == _BYPASS:
            index = self._bypass_slot(dto, slot, type_)
            return None if index < 0 else self.resolve_input(dto, index, seen)
        if dto.type in self.subgraphs:
            graph = self.subgraphs[dto.type]
            for link in graph.links.values():
                if link.target_id == _SUBGRAPH_OUT and link.target_slot == slot:
                    inner = self.dtos.get(f"{dto.id}:{link.origin_id}")
                    if inner is None:
                        return None
                    return self.resolve_output(inner, link.origin_slot, type_, seen)
            return None
        if dto.type in FRONTEND_ONLY:
            if dto.type == "Reroute" or slot < len(dto.node.get("inputs") or []):
                return self.resolve_input(dto, slot, seen) if dto.type != "Reroute" \
                    else self.resolve_input(dto, 0, seen)
            return None
        return (dto.id, slot)

    @staticmethod
    def _bypass_slot(dto: _Dto, slot: int, type_: Any) -> int:
        inputs = dto.node.get("inputs") or []
        outputs = dto.node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if type_ in ("*", "", None):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs):
            t = inputs[slot].get("type")
            if _valid_connection(t, out_type) and _valid_connection(t, type_):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == type_:
                return i
        for i, inp in enumerate(inputs):
            if _valid_connection(inp.get("type"), out_type) and \
                    _valid_connection(inp.get("type"), type_):
                return i
        return -1

    # ------------------------------------------------------------ output
    def executable(self) -> Iterator[_Dto]:
        for dto in self.dtos.values():
            if dto.type in FRONTEND_ONLY or dto.type in self.subgraphs:
                continue
            if dto.mode in (_MUTED, _BYPASS):
                continue
            yield dto

    def convert(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for dto in self.executable():
            inputs: dict[str, Any] = {}
            for name, value in self.widget_values(dto).items():
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            for i, slot in enumerate(dto.node.get("inputs") or []):
                resolved = self.resolve_input(dto, i, set())
                name = slot.get("name")
                if resolved is None or not isinstance(name, str):
                    continue
                if resolved[0] == "value":
                    v = resolved[1]
                    inputs[name] = {"__value__": v} if isinstance(v, list) else v
                else:
                    inputs[name] = [resolved[0], resolved[1]]
            self._primitive_values(dto, inputs)
            title = dto.node.get("title")
            out[dto.id] = {"inputs": inputs, "class_type": dto.type,
                           "_meta": {"title": title if isinstance(title, str) else dto.type}}
        for node in out.values():  # inputs fed by nodes left out (muted) go too
            for name, value in list(node["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in out:
                    del node["inputs"][name]
        return out

    def _primitive_values(self, dto: _Dto, inputs: dict[str, Any]) -> None:
        """A PrimitiveNode (the editor's, not the core's PrimitiveInt...)
        writes its value into every widget it feeds."""
        for slot in dto.node.get("inputs") or []:
            wname = (slot.get("widget") or {}).get("name")
            link = dto.graph.links.get(slot.get("link")) if slot.get("link") is not None else None
            if not wname or link is None:
                continue
            origin = self.dtos.get(":".join((*dto.path, str(link.origin_id))))
            if origin is None or origin.type != "PrimitiveNode":
                continue
            values = origin.node.get("widgets_values")
            if isinstance(values, list) and values:
                v = values[0]
                inputs[wname] = {"__value__": v} if isinstance(v, list) else v

    @staticmethod
    def _error(dto: _Dto, where: str, message: str) -> WorkflowInvalid:
        title = dto.node.get("title") or dto.type
        text = f"saved workflow: node {dto.id} ({title}) {where}: {message}"
        return WorkflowInvalid(text, type="invalid_prompt",
                               node_errors=node_error(dto.id, dto.type, where, message))


def convert_ui_workflow(workflow: dict[str, Any], defs: NodeDefinitions,
                        max_nodes: int = 10_000) -> dict[str, Any]:
    """The API-format graph of a saved workflow (see the module's notes).

    ``defs`` are this instance's node definitions. Raises WorkflowInvalid
    naming the editor's node id and title; ``too_many_nodes`` as soon as the
    expansion (nested subgraph instances multiply) passes ``max_nodes``.
    """
    group_nodes = (workflow.get("extra") or {}).get("groupNodes")
    if group_nodes:
        names = ", ".join(sorted(str(k) for k in group_nodes))
        raise WorkflowInvalid(f"saved workflow uses legacy group nodes ({names}): open it in "
                              "the editor and convert them to subgraphs", type="invalid_prompt")
    try:
        return _Converter(workflow, defs, max_nodes).convert()
    except RecursionError:  # a chain of thousands of reroutes or bypassed nodes
        raise WorkflowInvalid("the saved workflow's links chain too deep to resolve",
                              type="invalid_prompt") from None
