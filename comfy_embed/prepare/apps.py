"""Workflow apps: a saved workflow called by name with named, typed parameters.

An app is ``<apps dir>/<name>.json``::

    {"description": "Text to image on the tiny checkpoint",
     "workflow": {...} | "workflow": "file.json",   # either format; a file beside it
     "parameters": {
        "prompt": {"node": "6", "input": "text", "description": "what to draw"},
        "seed":   {"node": "3", "input": "seed"},
        "steps":  {"node": "3", "input": "steps", "maximum": 50}},
     "openai": {"prompt": "prompt", "n": "batch", "size": ["width", "height"],
                "image": "image", "mask": "mask"}}

A bare workflow file (either format) is an app too, its parameters declared
by titles. A parameter's type, default, bounds and choices come from the node's input
spec and the workflow's own value; the app may narrow them (``minimum``,
``maximum``, ``choices``, ``default``) and mark one ``required``. An
``image`` parameter (a combo with an upload flag, such as LoadImage's)
takes a URL, ``oss://``/``s3://``, base64 or an input file name, as any
media input does.

Parameters can also be declared in the editor, by node title: a node titled
``@prompt`` makes its first widget input the parameter ``prompt``;
``@seed:noise_seed`` names the input. Titles were chosen over node
properties because the editor shows and edits them everywhere, they survive
both export formats (``_meta.title`` in API exports) and need no extension;
``@`` marks them, since no default title starts with it. Declarations in
the app file win over titles of the same name.

The folder is read on every call (files are small; a parsed app is cached
by modification time), so adding or changing an app needs no restart.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_embed.errors import (
    AppNotFound,
    ComfyEmbedError,
    InvalidParameter,
    WorkflowInvalid,
)
from comfy_embed.prepare.graph import SEED_INPUTS
from comfy_embed.prepare.ui_format import (
    NodeDefinitions,
    convert_ui_workflow,
    is_ui_workflow,
)

__all__ = ["APP_NAME", "App", "AppNotFound", "AppParameter", "AppRegistry"]

#: An app's name: its file name without ``.json``.
APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_JSON_TYPES = {"INT": "integer", "FLOAT": "number", "STRING": "string", "BOOLEAN": "boolean",
               "COMBO": "string"}
_UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
_TITLE = re.compile(r"^@([A-Za-z_][A-Za-z0-9_]{0,63})(?::([A-Za-z0-9_ .-]+))?$")


@dataclass
class AppParameter:
    """One named parameter: where it goes and what it accepts."""

    name: str
    node: str
    input: str
    kind: str  # INT, FLOAT, STRING, BOOLEAN, COMBO, IMAGE
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: list[Any] | None = None
    description: str = ""
    required: bool = False

    def schema(self) -> dict[str, Any]:
        """This parameter's JSON Schema."""
        out: dict[str, Any] = {"type": "string" if self.kind == "IMAGE"
                               else _JSON_TYPES.get(self.kind, "string")}
        if self.kind == "IMAGE":
            out["description"] = (self.description + " " if self.description else "") + \
                "(an http(s) URL, oss:// or s3:// object, base64 data, or an input file name)"
            out["contentMediaType"] = "image/*"
        elif self.description:
            out["description"] = self.description
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.choices is not None:
            out["enum"] = list(self.choices)
        if self.default is not None and not self.required:
            out["default"] = self.default
        out["x-node"] = {"id": self.node, "input": self.input}
        return out

    def check(self, value: Any) -> Any:
        """``value`` as the node input takes it; InvalidParameter naming the
        parameter when it does not fit."""
        def bad(why: str) -> InvalidParameter:
            return InvalidParameter(f"parameter '{self.name}': {why}")

        if self.kind == "INT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    isinstance(value, float) and not value.is_integer()):
                raise bad(f"must be an integer, got {value!r:.60}")
            value = int(value)
        elif self.kind == "FLOAT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value):
                raise bad(f"must be a number, got {value!r:.60}")
        elif self.kind == "BOOLEAN":
            if not isinstance(value, bool):
                raise bad(f"must be true or false, got {value!r:.60}")
        elif not isinstance(value, str):
            raise bad(f"must be a string, got {value!r:.60}")
        elif self.kind == "IMAGE" and not value:
            raise bad("is empty")
        if self.minimum is not None and value < self.minimum:
            raise bad(f"{value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise bad(f"{value} is above the maximum {self.maximum}")
        if self.choices is not None and value not in self.choices:
            shown = ", ".join(map(str, self.choices[:20]))
            raise bad(f"{value!r:.60} is not one of: {shown}")
        return value


@dataclass
class App:
    """A loaded app: its API-format graph and its parameters."""

    name: str
    description: str
    graph: dict[str, Any]
    parameters: dict[str, AppParameter]
    #: OpenAI images mapping: which parameters take ``prompt``, ``n``, ``size``, ``image``, ``mask``.
    openai: dict[str, Any] = field(default_factory=dict)

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of a call's body."""
        return {"type": "object", "title": self.name, "description": self.description,
                "properties": {n: p.schema() for n, p in self.parameters.items()},
                "required": [n for n, p in self.parameters.items() if p.required],
                "additionalProperties": False}

    def build(self, values: Any) -> dict[str, Any]:
        """The graph with ``values`` (``{parameter: value}``) applied; the
        others keep their defaults. InvalidParameter naming the parameter."""
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise InvalidParameter(f"app '{self.name}' takes a JSON object of parameters: "
                                   f"{', '.join(self.parameters) or 'none'}")
        unknown = [k for k in values if k not in self.parameters]
        if unknown:
            raise InvalidParameter(f"parameter '{unknown[0]}' is not a parameter of app "
                                   f"'{self.name}' (it has: {', '.join(self.parameters) or 'none'})")
        graph = copy.deepcopy(self.graph)
        for name, p in self.parameters.items():
            if name in values:
                graph[p.node]["inputs"][p.input] = p.check(values[name])
            elif p.required:
                raise InvalidParameter(f"parameter '{name}' is required by app '{self.name}'")
        return graph


def _parameter(name: str, node_id: str, input_name: str | None, graph: dict[str, Any],
               defs: NodeDefinitions, decl: dict[str, Any], where: str) -> AppParameter:
    node = graph.get(node_id)
    if not isinstance(node, dict):
        raise WorkflowInvalid(f"{where}: parameter '{name}' names node {node_id}, which is not "
                              "in the workflow", type="invalid_prompt")
    class_type = str(node.get("class_type"))
    specs = defs.input_specs(class_type)
    if input_name is None:  # a title without an input: the node's first widget
        input_name = next((n for n, (k, o) in specs.items()
                           if k in _JSON_TYPES and not o.get("forceInput")), None)
    if input_name is None or input_name not in specs:
        raise WorkflowInvalid(f"{where}: parameter '{name}': node {node_id} ({class_type}) has "
                              f"no input {input_name!r}", type="invalid_prompt")
    kind, opts = specs[input_name]
    choices = defs.input_options(class_type).get(input_name)
    if kind == "COMBO" and any(opts.get(f) for f in _UPLOAD_FLAGS):
        kind, choices = "IMAGE", None
    current = node.get("inputs", {}).get(input_name)
    default = decl.get("default", current if not isinstance(current, list) else opts.get("default"))
    lo, hi = opts.get("min"), opts.get("max")
    if "minimum" in decl:
        lo = decl["minimum"] if lo is None else max(lo, decl["minimum"])
    if "maximum" in decl:
        hi = decl["maximum"] if hi is None else min(hi, decl["maximum"])
    if "choices" in decl and isinstance(decl["choices"], list):
        choices = [c for c in decl["choices"] if choices is None or c in choices]
    description = str(decl.get("description") or opts.get("tooltip") or "")
    if kind == "INT" and input_name in SEED_INPUTS:  # -1: a random seed, as in any workflow
        lo = -1 if lo is None or lo >= -1 else lo
        if "description" not in decl:
            description = (description + " " if description else "") + "(-1: a random seed)"
    numeric = kind in ("INT", "FLOAT")
    return AppParameter(name, node_id, input_name, kind, default,
                        lo if numeric else None, hi if numeric else None,
                        choices if kind == "COMBO" else None, description,
                        bool(decl.get("required", False)))


def load_app(path: Path, defs: NodeDefinitions) -> App:
    """Read and check one app file; WorkflowInvalid naming the file."""
    name, where = path.stem, f"app '{path.stem}'"
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise WorkflowInvalid(f"{where}: cannot read {path.name}: {e}", type="invalid_prompt") \
            from None
    if not isinstance(doc, dict):
        raise WorkflowInvalid(f"{where}: must be a JSON object", type="invalid_prompt")
    bare = "nodes" in doc or (bool(doc) and all(isinstance(v, dict) and "class_type" in v
                                                  for v in doc.values()))
    workflow = doc.get("workflow", doc if bare else None)  # a bare workflow: titles only
    if isinstance(workflow, str):  # a workflow file beside the app
        wf_path = (path.parent / workflow).resolve()
        if path.parent.resolve() not in wf_path.parents:
            raise WorkflowInvalid(f"{where}: workflow file must be in the apps folder",
                                  type="invalid_prompt")
        try:
            workflow = json.loads(wf_path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise WorkflowInvalid(f"{where}: cannot read {workflow}: {e}",
                                  type="invalid_prompt") from None
    if isinstance(workflow, dict) and isinstance(workflow.get("prompt"), dict) \
            and "class_type" not in workflow["prompt"]:
        workflow = workflow["prompt"]
    if not isinstance(workflow, dict):
        raise WorkflowInvalid(f"{where}: has no workflow", type="invalid_prompt")
    graph = convert_ui_workflow(workflow, defs) if is_ui_workflow(workflow) else workflow
    params: dict[str, AppParameter] = {}
    for node_id, node in graph.items():  # declared in the editor, by title
        title = ((node.get("_meta") or {}).get("title") or "") if isinstance(node, dict) else ""
        m = _TITLE.match(title.strip())
        if m:
            params[m.group(1)] = _parameter(m.group(1), node_id, m.group(2), graph, defs, {}, where)
    declared = doc.get("parameters") or {}
    if not isinstance(declared, dict):
        raise WorkflowInvalid(f"{where}: parameters must be an object", type="invalid_prompt")
    for pname, decl in declared.items():
        if not isinstance(decl, dict) or "node" not in decl:
            raise WorkflowInvalid(f"{where}: parameter '{pname}' needs a node and an input",
                                  type="invalid_prompt")
        params[pname] = _parameter(pname, str(decl["node"]), decl.get("input"), graph, defs,
                                   decl, where)
    openai = doc.get("openai") if isinstance(doc.get("openai"), dict) else {}
    return App(name, str(doc.get("description") or ""), graph, params, dict(openai or {}))


class AppRegistry:
    """The apps folder, read on each call; parsed apps cached by (mtime, size)."""

    def __init__(self, folder: Path, defs: NodeDefinitions) -> None:
        self.folder = folder
        self.defs = defs
        self._cache: dict[str, tuple[tuple[int, int], App]] = {}

    def names(self) -> list[str]:
        """The apps' names, sorted."""
        try:
            files = sorted(self.folder.glob("*.json"))
        except OSError:
            return []
        return [p.stem for p in files if APP_NAME.match(p.stem)]

    def get(self, name: str) -> App:
        """The app ``name``; AppNotFound, or WorkflowInvalid for a broken one."""
        if not APP_NAME.match(name):
            raise AppNotFound(f"no app named {name!r:.80}")
        path = self.folder / f"{name}.json"
        try:
            st = path.stat()
        except OSError:
            raise AppNotFound(f"no app named {name!r}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        app = load_app(path, self.defs)
        self._cache[name] = (stamp, app)
        return app

    def all(self) -> list[App]:
        """Every app that loads (a broken one is left out of the list; calling
        it names its problem)."""
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except ComfyEmbedError:
                continue
        return out
