"""prepare/ui_format with this instance's real node definitions (the
session's booted ComfyUI): the rules the frontend comparison relies on, and
the errors, one case each. The frontend itself is the oracle in
test_ui_format_browser.py."""

from __future__ import annotations

from typing import Any

import pytest

from comfy_embed.errors import WorkflowInvalid
from comfy_embed.prepare.ui_format import convert_ui_workflow, is_ui_workflow
from comfy_embed.runtime import Engine


def node(id: int, type: str, inputs: list[dict[str, Any]] | None = None,
         outputs: list[dict[str, Any]] | None = None, wv: Any = None, mode: int = 0,
         title: str | None = None) -> dict[str, Any]:
    n: dict[str, Any] = {"id": id, "type": type, "mode": mode, "inputs": inputs or [],
                         "outputs": outputs or []}
    if wv is not None:
        n["widgets_values"] = wv
    if title:
        n["title"] = title
    return n


def saved(nodes: list[dict[str, Any]], links: list[list[Any]] | None = None,
          **extra: Any) -> dict[str, Any]:
    return {"nodes": nodes, "links": links or [], "extra": {}, "version": 0.4, **extra}


def test_detects_saved_workflows() -> None:
    assert is_ui_workflow({"nodes": [], "links": []})
    assert not is_ui_workflow({"3": {"class_type": "KSampler", "inputs": {}}})
    assert not is_ui_workflow({"nodes": {"class_type": "X"}})


def test_widgets_by_spec_order_with_control_values_and_defaults(engine: Engine) -> None:
    wf = saved([node(1, "KSampler", wv=[42, "fixed", 5, 7.5, "ddim", "karras", 0.5]),
                node(2, "KSampler", wv=[43, True, 6]),  # legacy boolean control, cut short
                node(3, "SaveImage")])                  # no values at all: defaults
    out = convert_ui_workflow(wf, engine.comfy)
    assert out["1"]["inputs"] == {"seed": 42, "steps": 5, "cfg": 7.5, "sampler_name": "ddim",
                                  "scheduler": "karras", "denoise": 0.5}
    assert out["2"]["inputs"]["seed"] == 43 and out["2"]["inputs"]["steps"] == 6
    assert out["2"]["inputs"]["cfg"] == 8.0  # KSampler's default
    assert out["2"]["inputs"]["sampler_name"] == engine.comfy.input_options("KSampler")[
        "sampler_name"][0]
    assert out["3"] == {"inputs": {"filename_prefix": "ComfyUI"}, "class_type": "SaveImage",
                        "_meta": {"title": "SaveImage"}}


def test_upload_widget_skipped_and_widgets_by_name(engine: Engine) -> None:
    wf = saved([node(1, "LoadImage", wv=["cat.png", "image"], title="Photo"),
                node(2, "EmptyImage", wv={"width": 32, "height": 16, "batch_size": 1,
                                          "color": 0, "bogus": 1})])
    out = convert_ui_workflow(wf, engine.comfy)
    assert out["1"]["inputs"] == {"image": "cat.png"}
    assert out["1"]["_meta"]["title"] == "Photo"
    assert out["2"]["inputs"] == {"width": 32, "height": 16, "batch_size": 1, "color": 0}


def test_bypass_passes_the_matching_input_and_mute_drops(engine: Engine) -> None:
    img = [{"name": "IMAGE", "type": "IMAGE", "links": [2]}]
    wf = saved([node(1, "EmptyImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
                     wv=[8, 8, 1, 0]),
                node(2, "ImageInvert", [{"name": "image", "type": "IMAGE", "link": 1}], img,
                     mode=4),
                node(3, "PreviewImage", [{"name": "images", "type": "IMAGE", "link": 2}]),
                node(4, "ImageInvert", [{"name": "image", "type": "IMAGE", "link": 3}],
                     [{"name": "IMAGE", "type": "IMAGE", "links": [4]}], mode=2),
                node(5, "PreviewImage", [{"name": "images", "type": "IMAGE", "link": 4}]),
                node(6, "Note", wv=["hello"])],
               [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 1, 0, 4, 0, "IMAGE"],
                [4, 4, 0, 5, 0, "IMAGE"], [9, 77, 0, 3, 0, "IMAGE"]])
    out = convert_ui_workflow(wf, engine.comfy)
    assert set(out) == {"1", "3", "5"}
    assert out["3"]["inputs"] == {"images": ["1", 0]}
    assert out["5"]["inputs"] == {}  # fed by a muted node: the input goes with it


def test_list_values_are_boxed(engine: Engine) -> None:
    wf = saved([node(1, "SaveImage", wv=[["a", "b"]])])
    assert convert_ui_workflow(wf, engine.comfy)["1"]["inputs"]["filename_prefix"] == {
        "__value__": ["a", "b"]}


def test_errors_name_the_editors_node_and_title(engine: Engine) -> None:
    with pytest.raises(WorkflowInvalid, match=r"legacy group nodes \(My group\)"):
        convert_ui_workflow(saved([], extra={"groupNodes": {"My group": {}}}), engine.comfy)
    loop = saved([node(1, "ImageInvert", [{"name": "image", "type": "IMAGE", "link": 1}],
                       [{"name": "IMAGE", "type": "IMAGE", "links": [1, 2]}], mode=4,
                       title="Round and round"),
                  node(2, "PreviewImage", [{"name": "images", "type": "IMAGE", "link": 2}])],
                 [[1, 1, 0, 1, 0, "IMAGE"], [2, 1, 0, 2, 0, "IMAGE"]])
    with pytest.raises(WorkflowInvalid) as e:
        convert_ui_workflow(loop, engine.comfy)
    assert "node 1 (Round and round)" in e.value.message and "loop" in e.value.message
    assert "1" in e.value.node_errors
    with pytest.raises(WorkflowInvalid, match="node has no id"):
        convert_ui_workflow(saved([{"type": "SaveImage"}]), engine.comfy)


@pytest.mark.anyio
async def test_preparer_converts_and_keeps_the_saved_workflow(engine: Engine) -> None:
    wf = saved([node(1, "EmptyImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
                     wv=[8, 8, 1, 0]),
                node(2, "SaveImage", [{"name": "images", "type": "IMAGE", "link": 1}], wv=["x"])],
               [[1, 1, 0, 2, 0, "IMAGE"]])
    request = engine.preparer.parse(wf)
    assert request.prompt["2"]["inputs"] == {"filename_prefix": "x", "images": ["1", 0]}
    assert request.extra_data["extra_pnginfo"]["workflow"] == wf
    envelope = engine.preparer.parse({"prompt": wf, "extra_data": {"extra_pnginfo": {
        "workflow": {"mine": True}}}})
    assert envelope.prompt == request.prompt
    assert envelope.extra_data["extra_pnginfo"]["workflow"] == {"mine": True}


def test_nested_subgraph_expansion_is_bounded(engine: Engine) -> None:
    """Ten instances of a subgraph holding ten instances of one holding ten
    nodes: 1,000 nodes from 30 saved ones, refused while expanding."""
    def sub(sid: str, inner: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": sid, "nodes": inner, "links": [], "inputs": [], "outputs": []}

    leaf = sub("leaf-0000", [node(i, "PreviewImage") for i in range(10)])
    mid = sub("mid-0000", [node(i, "leaf-0000") for i in range(10)])
    wf = saved([node(i, "mid-0000") for i in range(10)],
               definitions={"subgraphs": [mid, leaf]})
    with pytest.raises(WorkflowInvalid, match="more than 400 nodes") as e:
        convert_ui_workflow(wf, engine.comfy, max_nodes=400)
    assert e.value.type == "too_many_nodes"
    assert len(convert_ui_workflow(wf, engine.comfy, max_nodes=1000)) == 1000


def test_a_very_long_reroute_chain_is_a_clear_error(engine: Engine) -> None:
    n = 5000
    nodes = [node(1, "EmptyImage", outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
                  wv=[8, 8, 1, 0])]
    links = []
    for i in range(n):
        nodes.append(node(i + 2, "Reroute", [{"name": "", "type": "*", "link": i + 1}],
                          [{"name": "", "type": "IMAGE", "links": [i + 2]}]))
        links.append([i + 1, i + 1, 0, i + 2, 0, "IMAGE"])
    nodes.append(node(n + 2, "PreviewImage", [{"name": "images", "type": "IMAGE", "link": n + 1}]))
    links.append([n + 1, n + 1, 0, n + 2, 0, "IMAGE"])
    with pytest.raises(WorkflowInvalid, match="chain too deep"):
        convert_ui_workflow(saved(nodes, links), engine.comfy)
    short = saved(nodes[:3] + [node(n + 2, "PreviewImage",
                                    [{"name": "images", "type": "IMAGE", "link": 3}])],
                  links[:3])
    assert convert_ui_workflow(short, engine.comfy)[str(n + 2)]["inputs"] == {"images": ["1", 0]}
