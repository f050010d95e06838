"""N variants: the plan (seeds per variant, own output folders, refusals
naming ``variants``) and the run hook on a stand-in backend (the executor
thread's mechanics only; real ComfyUI runs them in
tests/api/serverless/test_variants.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from comfy_embed.config import Settings
from comfy_embed.errors import InvalidParameter, WorkflowInvalid
from comfy_embed.executor import Job, Outcome, Sink
from comfy_embed.variants import VARIANT_EVENT, VariantRun, attach_variants, plan_variants


def specs(class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    if class_type == "KSampler":
        return {"seed": ("INT", {"min": 0, "max": 1000})}
    return {}


def graph() -> dict[str, Any]:
    return {"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 2}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t1/pic",
                                                        "images": ["3", 0]}}}


def test_fresh_seeds_and_own_folders() -> None:
    planned = plan_variants(3, graph(), specs, "t1", limit=4)
    assert [v.number for v in planned] == [1, 2, 3]
    assert planned[0].seeds == {"3": 5}  # the graph as sent first
    assert all(0 <= v.seeds["3"] <= 1000 for v in planned)
    assert [v.prompt["9"]["inputs"]["filename_prefix"] for v in planned] == [
        "t1/v1/pic", "t1/v2/pic", "t1/v3/pic"]
    assert [v.prompt["3"]["inputs"]["seed"] for v in planned] == [v.seeds["3"] for v in planned]


def test_given_seeds_int_or_per_node() -> None:
    planned = plan_variants([7, {"3": 8}], graph(), specs, "t1", limit=4)
    assert [v.seeds for v in planned] == [{"3": 7}, {"3": 8}]


@pytest.mark.parametrize("value, words", [
    (5, "between 1 and 4 (COMFY_EMBED_MAX_VARIANTS); got 5"),
    (0, "between 1 and 4"),
    ([1, 2, 3, 4, 5], "list between 1 and 4"),
    ([], "list between 1 and 4"),
    ("3", "whole number or a list"),
    (True, "whole number or a list"),
    ([1, "x"], "variants[1] must be an int seed"),
    ([{"9": 1}], "variants[0] names node 9, which has no seed input"),
    ([1, 2000], "variants[1]: seed 2000 is out of range for node 3 (KSampler) input 'seed'"),
])
def test_refusals_name_variants(value: Any, words: str) -> None:
    with pytest.raises(InvalidParameter) as e:
        plan_variants(value, graph(), specs, "t1", limit=4)
    assert words in e.value.message


def test_the_output_limit_counts_every_variant() -> None:
    g = graph()
    g["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                            "batch_size": 1}}
    job = Job(prompt_id="p1", prompt=g, outputs=["9"], emit=lambda k, d: None,
              on_done=lambda o: None, task_id="t1", extra_data={"variants": 3})
    settings = Settings(max_variants=4, max_output_bytes=40_000)
    hook = attach_variants(job, None, specs, settings)  # 3 x 12,288 bytes fit
    assert hook is not None and job.run is hook and job.prompt is hook.variants[0].prompt
    job.extra_data["variants"] = 4
    with pytest.raises(WorkflowInvalid) as e:
        attach_variants(job, None, specs, settings)
    assert e.value.type == "output_too_large"
    assert e.value.message.startswith("variants: 4 variants would write over the output limit")
    assert attach_variants(job, 2, specs, settings) is not None  # the option wins


def test_no_seed_input_is_refused() -> None:
    plain = {"1": {"class_type": "EmptyImage", "inputs": {}}}
    with pytest.raises(InvalidParameter, match="needs a seed input"):
        plan_variants(2, plain, specs, "t1", limit=4)
    assert len(plan_variants(1, plain, specs, "t1", limit=4)) == 1


class Stand:
    """A stand-in backend: each execute emits a node and native's 'done',
    writes one file named after the seed; fails at ``fail_seed``."""

    def __init__(self, fail_seed: int | None = None, stop_after: int | None = None) -> None:
        self.fail_seed, self.stop_after, self.runs = fail_seed, stop_after, 0

    def execute(self, prompt: dict[str, Any], prompt_id: str, outputs: list[str], sink: Sink,
                stop: Callable[[], bool] | None = None,
                extra_data: dict[str, Any] | None = None) -> Outcome:
        self.runs += 1
        seed = prompt["3"]["inputs"]["seed"]
        if stop is not None and stop():
            return Outcome(success=False, interrupted=True, outputs={}, error={"node_id": None})
        sink("executing", {"node": "3", "prompt_id": prompt_id})
        sink("executing", {"node": None, "prompt_id": prompt_id})
        if seed == self.fail_seed:
            return Outcome(success=False, interrupted=False, outputs={},
                           error={"node_id": "3", "node_type": "KSampler"})
        folder = prompt["9"]["inputs"]["filename_prefix"].rsplit("/", 1)[0]
        return Outcome(success=True, interrupted=False, outputs={
            "9": {"images": [{"filename": f"{seed}.png", "subfolder": folder, "type": "output"}]},
            "10": {"text": [f"seed {seed}"]}})

    def interrupt(self) -> None: ...

    def directory_of(self, kind: str) -> Path:
        return Path("/nowhere")


def run(value: Any, backend: Stand, stop: Callable[[], bool] = lambda: False
        ) -> tuple[VariantRun, Outcome, list[tuple[str, dict[str, Any]]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    hook = VariantRun(plan_variants(value, graph(), specs, "t1", limit=8), "p1", ["9"], {})
    outcome = hook(backend, lambda k, d: events.append((k, d)), stop)
    return hook, outcome, events


def test_run_merges_tags_and_groups() -> None:
    hook, outcome, events = run([4, 5, 6], Stand())
    assert outcome.success
    assert [i["filename"] for i in outcome.outputs["9"]["images"]] == ["4.png", "5.png", "6.png"]
    starts = [d for k, d in events if k == VARIANT_EVENT]
    assert [(d["variant"], d["variants"], d["seeds"]) for d in starts] == [
        (1, 3, {"3": 4}), (2, 3, {"3": 5}), (3, 3, {"3": 6})]
    # Every message is tagged; native's "done" goes out once, after the last variant.
    assert all("variant" in d for _, d in events)
    dones = [d for k, d in events if k == "executing" and d["node"] is None]
    assert [d["variant"] for d in dones] == [3]
    results = [{"node_id": "9", "index": i} for i in range(3)]
    groups = hook.group(results)
    assert [r["variant"] for r in results] == [1, 2, 3]
    assert [(g["variant"], g["seeds"], g["result_indexes"], g["outputs"]) for g in groups] == [
        (1, {"3": 4}, [0], {"10": {"text": ["seed 4"]}}),
        (2, {"3": 5}, [1], {"10": {"text": ["seed 5"]}}),
        (3, {"3": 6}, [2], {"10": {"text": ["seed 6"]}})]


def test_failure_names_its_variant_and_ends_the_run() -> None:
    backend = Stand(fail_seed=5)
    _, outcome, events = run([4, 5, 6], backend)
    assert not outcome.success and backend.runs == 2
    assert outcome.error == {"node_id": "3", "node_type": "KSampler", "variant": 2}
    dones = [d for k, d in events if k == "executing" and d["node"] is None]
    assert [d["variant"] for d in dones] == [2]


def test_stop_ends_the_remaining_variants() -> None:
    backend = Stand()
    asked: list[int] = []

    def stop() -> bool:
        asked.append(backend.runs)
        return backend.runs >= 2  # cancelled while variant 1 ran
    _, outcome, _ = run(3, backend, stop)
    assert outcome.interrupted and not outcome.success
    assert backend.runs == 2 and outcome.error is not None and outcome.error["variant"] == 2
