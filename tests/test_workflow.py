"""Pure graph handling: parsing errors, seeds, image inputs, isolation."""

from __future__ import annotations

from typing import Any

import pytest

from comfy_embed.errors import WorkflowInvalid
from comfy_embed.workflow import (image_inputs, isolate_outputs, node_order, parse_workflow,
                                  randomize_seeds, valid_task_id)

SPECS: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {
    "KSampler": {"seed": ("INT", {"min": 0, "max": 100})},
    "RandomNoise": {"noise_seed": ("INT", {"min": 5, "max": 5})},
    "LoadImage": {"image": (["a.png"], {"image_upload": True})},
}


def specs(c: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    return SPECS.get(c, {})


@pytest.mark.parametrize("body, needle", [
    (b"{bad", "malformed JSON"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe", "UTF-8"),
    ('{"nodes": [], "links": []}', "Export (API)"),
    ('{"1": 5}', "node 1"),
    ('{"1": {"inputs": {}}}', "class_type"),
    ('{"1": {"class_type": "X", "inputs": {"a": ["7", 0]}}}', "node 7"),
])
def test_parse_errors(body: Any, needle: str) -> None:
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(body)
    assert needle in info.value.message


def test_parse_accepts_native_prompt_wrapper() -> None:
    g = parse_workflow('{"prompt": {"1": {"class_type": "X", "inputs": {}}}, "client_id": "c"}')
    assert list(g) == ["1"]


def test_seeds() -> None:
    g = {"1": {"class_type": "KSampler", "inputs": {"seed": -1}},
         "2": {"class_type": "RandomNoise", "inputs": {"noise_seed": -1}},
         "3": {"class_type": "KSampler", "inputs": {"seed": 42}},
         "4": {"class_type": "KSampler", "inputs": {"seed": ["1", 0]}}}
    seeds = randomize_seeds(g, specs)
    assert 0 <= seeds["1"] <= 100 and g["1"]["inputs"]["seed"] == seeds["1"]
    assert seeds["2"] == 5 and seeds["3"] == 42 and "4" not in seeds


def test_image_inputs_and_isolation() -> None:
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": "https://x/y.png"}},
         "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "out/ComfyUI"}},
         "3": {"class_type": "LoadImage", "inputs": {"image": ["9", 0]}}}
    assert list(image_inputs(g, specs)) == [("1", "LoadImage", "image", "https://x/y.png")]
    isolate_outputs(g, "task1")
    assert g["2"]["inputs"]["filename_prefix"] == "task1/out/ComfyUI"


def test_ids_and_order() -> None:
    assert sorted(["10", "9", "a", "1"], key=node_order) == ["1", "9", "10", "a"]
    assert valid_task_id("abc-1.2_3") and not valid_task_id("../x") and not valid_task_id("..")
