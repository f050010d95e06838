"""The workflow shape: same for what the caller types, different for what changes a run."""

from __future__ import annotations

import copy
from typing import Any

from comfy_embed.prepare.shape import workflow_shape
from tests.conftest import text_to_image

#: The input specs of the example's nodes, as ComfyUI declares them (enough of them).
SPECS: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {
    "KSampler": {"seed": ("INT", {}), "steps": ("INT", {}), "cfg": ("FLOAT", {}),
                 "sampler_name": (["euler", "dpmpp_2m"], {}), "scheduler": (["normal"], {}),
                 "denoise": ("FLOAT", {})},
    "CheckpointLoaderSimple": {"ckpt_name": (["tiny-sd15.safetensors", "other.safetensors"], {})},
    "EmptyLatentImage": {"width": ("INT", {}), "height": ("INT", {}), "batch_size": ("INT", {})},
    "CLIPTextEncode": {"text": ("STRING", {"multiline": True})},
    "SaveImage": {"filename_prefix": ("STRING", {})},
    "LoadImage": {"image": (["a.png", "b.png"], {"image_upload": True})},
}


def specs(class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    return SPECS.get(class_type, {})


def shape(graph: dict[str, Any]) -> str:
    return workflow_shape(graph, specs)


def test_seeds_texts_and_prefixes_do_not_count() -> None:
    a = text_to_image(steps=5, seed=1)
    b = text_to_image(steps=5, seed=987654)
    b["6"]["inputs"]["text"] = "a completely different prompt"
    b["7"]["inputs"]["text"] = ""
    b["9"]["inputs"]["filename_prefix"] = "someone/else"
    b["3"]["inputs"]["seed"] = -1
    assert shape(a) == shape(b)
    assert len(shape(a)) == 16 and int(shape(a), 16) >= 0


def test_widgets_that_change_the_run_count() -> None:
    base = shape(text_to_image(steps=5, size=64))
    assert shape(text_to_image(steps=10, size=64)) != base
    assert shape(text_to_image(steps=5, size=128)) != base
    batch = text_to_image(steps=5, size=64)
    batch["5"]["inputs"]["batch_size"] = 4
    assert shape(batch) != base
    sampler = text_to_image(steps=5, size=64)
    sampler["3"]["inputs"]["sampler_name"] = "dpmpp_2m"  # a combo choice
    assert shape(sampler) != base
    model = text_to_image(steps=5, size=64)
    model["4"]["inputs"]["ckpt_name"] = "other.safetensors"
    assert shape(model) != base


def test_links_count_and_node_ids_do_not() -> None:
    g = text_to_image(steps=5)
    swapped = copy.deepcopy(g)  # positive and negative prompts exchanged: another graph
    swapped["3"]["inputs"]["positive"], swapped["3"]["inputs"]["negative"] = ["7", 0], ["6", 0]
    # Same texts on both: only the links differ.
    for graph in (g, swapped):
        graph["6"]["inputs"]["text"] = graph["7"]["inputs"]["text"] = "x"
    assert shape(g) == shape(swapped)  # both encoders are alike: the same shape, rightly
    rewired = copy.deepcopy(g)
    rewired["8"]["inputs"]["vae"] = ["4", 1]  # another output of the loader
    assert shape(rewired) != shape(g)
    renumbered = {str(int(k) + 100): {**v, "inputs": {
        n: ([str(int(x[0]) + 100), x[1]] if isinstance(x, list) else x)
        for n, x in v["inputs"].items()}} for k, v in g.items()}
    assert shape(renumbered) == shape(g)


def test_input_files_do_not_count_but_extra_nodes_do() -> None:
    def load(name: str) -> dict[str, Any]:
        return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                            "filename_prefix": "x"}}}
    assert shape(load("a.png")) == shape(load("https://example.com/cat.png"))
    assert shape(load("a.png")) == shape(load("data:image/png;base64,iVBORw0KGgo="))
    more = load("a.png")
    more["3"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "y"}}
    assert shape(more) != shape(load("a.png"))


def test_broken_graphs_hash_without_failing() -> None:
    cycle = {"1": {"class_type": "A", "inputs": {"x": ["2", 0]}},
             "2": {"class_type": "B", "inputs": {"y": ["1", 0]}}}
    dangling = {"1": {"class_type": "A", "inputs": {"x": ["9", 0]}}}
    odd = {"1": "not a node", "2": {"class_type": "A", "inputs": {"v": {"k": [1, 2]}}}}
    assert len({shape(cycle), shape(dangling), shape(odd)}) == 3


def test_the_graph_is_not_changed() -> None:
    g = text_to_image(steps=5)
    before = copy.deepcopy(g)
    shape(g)
    assert g == before


def test_combos_as_the_booted_comfyui_declares_them() -> None:
    """comfy_embed._comfy.comfy.Comfy.input_specs gives a combo's type as
    ``"COMBO"`` (its choices change): chosen values still count, uploads not."""
    def combo_specs(class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
        return {name: ("COMBO" if isinstance(kind, list) else kind, opts)
                for name, (kind, opts) in SPECS.get(class_type, {}).items()}

    def combo_shape(graph: dict[str, Any]) -> str:
        return workflow_shape(graph, combo_specs)

    base = text_to_image(steps=5)
    model = text_to_image(steps=5)
    model["4"]["inputs"]["ckpt_name"] = "other.safetensors"
    assert combo_shape(model) != combo_shape(base)
    assert combo_shape(base) == shape(base)  # the same hash either way
    load = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}}
    other = {"1": {"class_type": "LoadImage", "inputs": {"image": "b.png"}}}
    assert combo_shape(load) == combo_shape(other)
