"""prepare/apps over this instance's real node definitions: parameters'
types, bounds and choices from the node specs, narrowed by the app; title
declarations; checks naming the parameter; the folder re-read per call."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.errors import AppNotFound, InvalidParameter, WorkflowInvalid
from comfy_embed.prepare.apps import AppRegistry, load_app
from comfy_embed.runtime import Engine
from tests.conftest import example


def write(folder: Path, name: str, doc: Any) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return path


def test_parameters_take_type_bounds_and_choices_from_the_spec(engine: Engine,
                                                               tmp_path: Path) -> None:
    graph = example("text_to_image")
    graph["6"]["_meta"]["title"] = "@prompt"        # declared in the editor
    graph["3"]["_meta"]["title"] = "@cfg_scale:cfg"  # with the input named
    app = load_app(write(tmp_path, "t2i", {"workflow": graph, "parameters": {
        "steps": {"node": "3", "input": "steps", "maximum": 30, "minimum": -5},
        "sampler": {"node": "3", "input": "sampler_name", "choices": ["euler", "nope"]},
        "seed": {"node": "3", "input": "seed", "required": True}}}), engine.comfy)
    props = app.schema()["properties"]
    assert props["prompt"]["type"] == "string" and props["prompt"]["default"].startswith("beauti")
    assert props["cfg_scale"]["type"] == "number" and props["cfg_scale"]["x-node"] == {
        "id": "3", "input": "cfg"}
    assert props["steps"] == {"type": "integer", "minimum": 1, "maximum": 30, "default": 8,
                              "x-node": {"id": "3", "input": "steps"},  # the node's tooltip:
                              "description": "The number of steps used in the denoising process."}
    assert props["sampler"]["enum"] == ["euler"]
    assert app.schema()["required"] == ["seed"] and "default" not in props["seed"]
    assert props["seed"]["minimum"] == -1  # -1 asks for a random seed, as in any workflow
    assert "(-1: a random seed)" in props["seed"]["description"]
    built = app.build({"prompt": "a fox", "steps": 3, "cfg_scale": 4, "seed": 9,
                       "sampler": "euler"})
    assert built["6"]["inputs"]["text"] == "a fox" and built["3"]["inputs"]["cfg"] == 4
    assert app.graph["6"]["inputs"]["text"] != "a fox"  # the app's own graph is not touched


@pytest.mark.parametrize(("values", "message"), [
    ({"steps": 31, "seed": 1}, "parameter 'steps': 31 is above the maximum 30"),
    ({"steps": 2.5, "seed": 1}, "parameter 'steps': must be an integer"),
    ({"steps": True, "seed": 1}, "parameter 'steps': must be an integer"),
    ({"seed": 1, "sampler": "ddim"}, "parameter 'sampler': 'ddim' is not one of: euler"),
    ({"seed": 1, "prompt": 5}, "parameter 'prompt': must be a string"),
    ({}, "parameter 'seed' is required"),
    ({"seed": 1, "colour": 2}, "parameter 'colour' is not a parameter of app 't2i'"),
])
def test_bad_values_name_the_parameter(engine: Engine, tmp_path: Path, values: Any,
                                       message: str) -> None:
    graph = example("text_to_image")
    graph["6"]["_meta"]["title"] = "@prompt"
    app = load_app(write(tmp_path, "t2i", {"workflow": graph, "parameters": {
        "steps": {"node": "3", "input": "steps", "maximum": 30},
        "sampler": {"node": "3", "input": "sampler_name", "choices": ["euler"]},
        "seed": {"node": "3", "input": "seed", "required": True}}}), engine.comfy)
    with pytest.raises(InvalidParameter, match=message.replace("(", r"\(")):
        app.build(values)


def test_broken_apps_are_named(engine: Engine, tmp_path: Path) -> None:
    graph = example("image_only")
    cases = [({"workflow": graph, "parameters": {"x": {"node": "99", "input": "a"}}},
              "parameter 'x' names node 99"),
             ({"workflow": graph, "parameters": {"x": {"node": "1", "input": "nope"}}},
              "node 1 \\(EmptyImage\\) has no input 'nope'"),
             ({"workflow": "../outside.json"}, "workflow file must be in the apps folder"),
             ({"description": "no workflow"}, "has no workflow")]
    for doc, message in cases:
        with pytest.raises(WorkflowInvalid, match=message):
            load_app(write(tmp_path, "broken", doc), engine.comfy)


def test_registry_reads_the_folder_on_each_call(engine: Engine, tmp_path: Path) -> None:
    apps = AppRegistry(tmp_path / "apps", engine.comfy)
    assert apps.names() == [] and apps.all() == []  # no folder yet
    folder = tmp_path / "apps"
    folder.mkdir()
    (folder / "wf.json").write_text(json.dumps(example("image_only")))
    path = write(folder, "img", {"workflow": "wf.json", "description": "one", "parameters": {
        "color": {"node": "1", "input": "color"}}})
    write(folder, "bad", {"workflow": 5})
    (folder / "not an app name.json").write_text("{}")
    assert apps.names() == ["bad", "img", "wf"]
    assert [a.name for a in apps.all()] == ["img", "wf"]  # a broken one is left out
    assert apps.get("img").description == "one"
    write(folder, "img", {"workflow": "wf.json", "description": "two, changed"})
    os.utime(path, ns=(1, 1))  # a change the clock might not show
    assert apps.get("img").description == "two, changed"
    with pytest.raises(AppNotFound):
        apps.get("missing")
    with pytest.raises(AppNotFound):
        apps.get("../etc/passwd")
    with pytest.raises(WorkflowInvalid, match="has no workflow"):
        apps.get("bad")
