"""Pure graph handling: parsing errors, seeds, image inputs, isolation."""

from __future__ import annotations

from typing import Any

import pytest

from comfy_embed.errors import WorkflowInvalid
from comfy_embed.prepare.graph import (
    image_inputs,
    isolate_outputs,
    node_order,
    parse_workflow,
    randomize_seeds,
    valid_task_id,
)

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


# --- safety (issue 9) ---------------------------------------------------------
from comfy_embed.prepare.graph import check_nodes  # noqa: E402


@pytest.mark.parametrize("body, needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    ('{"1": {"class_type": "X", "inputs": {"a": ' + "[" * 70 + "]" * 70 + "}}}", "nested too deep"),
    ('{"1": {"class_type": "X", "inputs": {"a": ' + "9" * 5000 + "}}}", "malformed JSON"),
    ('{"1": {"class_type": "X", "inputs": {"a": NaN}}}', "NaN"),
    ('{"1": {"class_type": "X", "inputs": {"a": -Infinity}}}', "Infinity"),
])
def test_parse_refuses_costly_json(body: Any, needle: str) -> None:
    with pytest.raises(WorkflowInvalid) as info:
        parse_workflow(body)
    assert needle in info.value.message and info.value.type == "invalid_json"


def test_parse_depth_applies_to_dicts_too() -> None:
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(WorkflowInvalid, match="nested too deep"):
        parse_workflow({"1": {"class_type": "X", "inputs": {"a": deep}}})
    parse_workflow({"1": {"class_type": "X", "inputs": {"a": deep}}}, max_depth=200)


def test_check_nodes_limit_and_denylist() -> None:
    g = {str(i): {"class_type": "EmptyImage", "inputs": {}} for i in range(5)}
    check_nodes(g, max_nodes=5)
    with pytest.raises(WorkflowInvalid) as info:
        check_nodes(g, max_nodes=4)
    assert info.value.type == "too_many_nodes" and "5 nodes" in info.value.message
    g["9"] = {"class_type": "VAESave", "inputs": {}}
    with pytest.raises(WorkflowInvalid) as info:
        check_nodes(g, max_nodes=10, denylist=("VAESave", "CheckpointSave"))
    assert info.value.type == "node_denied" and "node 9 (VAESave)" in info.value.message
    assert info.value.node_errors["9"]["class_type"] == "VAESave"


@pytest.mark.parametrize("prefix, needle", [
    ("../victim/x", "'..'"), ("a/../../x", "'..'"), ("/etc/x", "relative"),
    (["5", 0], "literal string"), ("a\x00b", "NUL"), ("x" * 201, "over 200 bytes"),
    ("y" * 2000, "over 1024"), (".", "names no file"), ("./", "names no file"),
    ("x/..", "'..'"), ("a/./..", "'..'"), ("/", "relative"), ("./.", "names no file"),
])
def test_isolate_outputs_refuses_escapes(prefix: Any, needle: str) -> None:
    g = {"2": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix}}}
    with pytest.raises(WorkflowInvalid) as info:
        isolate_outputs(g, "task1")
    assert needle in info.value.message and "node 2 (SaveImage)" in info.value.message
    assert info.value.node_errors["2"]["errors"][0]["extra_info"]["input_name"] == "filename_prefix"


def test_isolate_outputs_keeps_plain_subfolders() -> None:
    g = {"2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a/./b..c/x"}},
         "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": ""}}}
    isolate_outputs(g, "t")
    assert g["2"]["inputs"]["filename_prefix"] == "t/a/./b..c/x"
    assert g["3"]["inputs"]["filename_prefix"] == "t/ComfyUI"


@pytest.mark.parametrize("prefix", ["", "x/./.", "a/", "./x", "%width%x", ".x", "...", "ComfyUI"])
def test_isolate_outputs_every_kept_prefix_lands_in_the_task_folder(prefix: str) -> None:
    # Issue 25 (6): what ComfyUI's get_save_image_path makes of the prefix
    # (dirname of the normalised path) must be the task's folder or below it.
    import posixpath
    g = {"2": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix}}}
    isolate_outputs(g, "ComfyUI")
    joined = posixpath.normpath(g["2"]["inputs"]["filename_prefix"])
    folder = posixpath.dirname(joined)
    assert folder == "ComfyUI" or folder.startswith("ComfyUI/"), joined
    assert posixpath.basename(joined) not in ("", ".", "..")


def test_isolate_outputs_refuses_a_task_id_that_is_no_folder_name() -> None:
    g = {"2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    for bad in (".", "..", "a/b", ""):
        with pytest.raises(WorkflowInvalid):
            isolate_outputs(g, bad)


def test_valid_task_id_bounds() -> None:
    assert valid_task_id("a" * 128) and not valid_task_id("a" * 129)
    assert not valid_task_id("a\n") and not valid_task_id("..") and not valid_task_id("a/b")


def test_one_task_id_rule_everywhere() -> None:
    """The engine, the task log, the API and retention ask the same rule."""
    from comfy_embed.api.body import task_id_param
    from comfy_embed.errors import InvalidParameter
    from comfy_embed.taskid import TASK_ID_RULE, check_task_id
    from comfy_embed.tasklog.log import TaskLog

    for good in ("abc-DEF_1.2", "x" * 128):
        assert valid_task_id(good) and TaskLog.valid_task_id(good)
        assert check_task_id(good) == good == task_id_param(good)
    for bad in ("", ".", "..", "a/b", "a b", "x" * 129, "é", "../x"):
        assert not valid_task_id(bad) and not TaskLog.valid_task_id(bad)
        with pytest.raises(WorkflowInvalid, match=TASK_ID_RULE) as info:
            check_task_id(bad)
        assert info.value.type == "invalid_task_id"
        if bad:
            with pytest.raises(InvalidParameter, match=TASK_ID_RULE):
                task_id_param(bad)


# ------------------------------------------------------------------ issue 25 (3)
from comfy_embed.prepare.graph import check_output_bytes, drop_unknown_constants  # noqa: E402


def test_drop_unknown_constants_keeps_declared_inputs_and_links() -> None:
    prompt = {"1": {"class_type": "Known", "inputs": {"width": 8, "junk": "x" * 100,
                                                      "extra_link": ["2", 0], "hidden_id": "h"}},
              "2": {"class_type": "Unknown", "inputs": {"anything": 1}}}
    names = {"Known": frozenset({"width", "hidden_id"})}
    removed = drop_unknown_constants(prompt, names.get)
    assert removed == {"1": ["junk"]}
    assert prompt["1"]["inputs"] == {"width": 8, "extra_link": ["2", 0], "hidden_id": "h"}
    assert prompt["2"]["inputs"] == {"anything": 1}  # unknown class: left to validation


def test_check_output_bytes_multiplies_sizes_and_metadata() -> None:
    def graph(**inputs: Any) -> dict[str, Any]:
        return {"5": {"class_type": "EmptyLatentImage", "inputs": inputs}}

    asked: list[int] = []

    def metadata() -> int:
        asked.append(1)
        return 1000

    check_output_bytes({"1": {"class_type": "X", "inputs": {"text": "t"}}},
                       metadata_bytes=metadata, limit=1)
    assert asked == []  # no node states a size: the prompt is not measured
    check_output_bytes(graph(width=64, height=64, batch_size=2), metadata_bytes=metadata,
                       limit=2 * (3 * 64 * 64 + 1000))
    with pytest.raises(WorkflowInvalid) as info:
        check_output_bytes(graph(width=64, height=64, batch_size=3), metadata_bytes=metadata,
                           limit=2 * (3 * 64 * 64 + 1000))
    assert info.value.type == "output_too_large"
    entry = info.value.node_errors["5"]["errors"][0]
    assert entry["extra_info"]["input_name"] == "batch_size" and entry["type"] == "output_too_large"
    with pytest.raises(WorkflowInvalid, match="length 10 x 8x8"):
        check_output_bytes(graph(width=8, height=8, length=10), metadata_bytes=lambda: 0,
                           limit=1000)
    # Nodes add up: each within the limit, together over it.
    two = {**graph(width=64, height=64, batch_size=2),
           "6": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}}}
    with pytest.raises(WorkflowInvalid, match="the workflow would write about") as info:
        check_output_bytes(two, metadata_bytes=metadata, limit=3 * (3 * 64 * 64 + 1000))
    assert set(info.value.node_errors) == {"5", "6"}
    # Links and booleans are not sizes.
    check_output_bytes(graph(width=["1", 0], height=True, batch_size=4096),
                       metadata_bytes=metadata, limit=1)
