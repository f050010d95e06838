"""The preparation steps a run and the dry run share (comfy_embed.prepare.pipeline),
over a stand-in node catalog and input fetcher: the order of the steps, the
write gate, where validation runs, and errors gathered over every input.
Real ComfyUI validates in tests/test_runtime.py."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.config import Settings
from comfy_embed.errors import ImageInputError, WorkflowInvalid
from comfy_embed.observe.report import TaskReport
from comfy_embed.prepare import pipeline
from comfy_embed.prepare.options import DEFAULT_OPTIONS, RunOptions
from comfy_embed.prepare.pipeline import InputBudget, Preparer, WriteGate
from comfy_embed.storage.credentials import Credentials

pytestmark = pytest.mark.anyio

SPECS: dict[str, dict[str, tuple[Any, dict[str, Any]]]] = {
    "Sampler": {"seed": ("INT", {"min": 0, "max": 9})},
    "LoadImage": {"image": (["a.png"], {"image_upload": True})},
}


class Catalog:
    """Node definitions and validation, noting where validation ran."""

    def __init__(self) -> None:
        self.validated_on: list[str] = []

    def input_specs(self, class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
        return SPECS.get(class_type, {})

    def is_loader(self, class_type: str) -> bool:
        return class_type == "Loader"

    def input_names(self, class_type: str) -> frozenset[str] | None:
        return None  # inputs are left as sent

    def validate(self, prompt: dict[str, Any], prompt_id: str,
                 targets: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        self.validated_on.append("thread" if threading.current_thread() is not threading.main_thread()
                                 else "loop")
        return copy.deepcopy(prompt), [n for n, v in prompt.items() if v["class_type"] == "Save"]

    async def validate_here(self, prompt: dict[str, Any], prompt_id: str,
                            targets: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        return self.validate(prompt, prompt_id, targets)


class Fetcher:
    """Writes nothing: answers a name per value, refuses values starting with 'bad'."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, str, str | None]] = []

    async def materialise(self, value: str, credentials: Credentials | None = None,
                          kind: str = "image", folder: str | None = None,
                          budget: InputBudget | None = None) -> str:
        self.calls.append((value, credentials, kind, folder))
        if budget is not None:
            budget.charge(len(value))
        if value.startswith("bad"):
            raise ImageInputError(f"cannot read {value}")
        return f"serverless/{folder}/{value.rsplit('/', 1)[-1]}"


def graph(image: str | None = None) -> dict[str, Any]:
    g: dict[str, Any] = {"1": {"class_type": "Sampler", "inputs": {"seed": -1}},
                         "2": {"class_type": "Save", "inputs": {"filename_prefix": "out"}}}
    if image is not None:
        g["3"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    return g


def make(tmp_path: Path, **kw: Any) -> tuple[Preparer, Catalog, Fetcher, list[str]]:
    catalog, fetcher, folders = Catalog(), Fetcher(), list[str]()
    preparer = Preparer(Settings(base_dir=tmp_path, **kw), catalog, lambda: fetcher,
                        on_inputs=folders.append)
    return preparer, catalog, fetcher, folders


async def test_prepare_walks_every_step_and_leaves_the_callers_graph_alone(tmp_path: Path) -> None:
    preparer, catalog, fetcher, folders = make(tmp_path)
    body = graph("https://example.com/cat-1.png")
    before = copy.deepcopy(body)
    report = TaskReport()
    creds = Credentials("id", "secret")
    prepared = await preparer.prepare(body, "task-1", creds, WriteGate(), report)
    assert body == before  # parsed from a copy
    assert 0 <= prepared.seeds["1"] <= 9 and prepared.checked["1"]["inputs"]["seed"] == prepared.seeds["1"]
    assert prepared.checked["2"]["inputs"]["filename_prefix"] == "task-1/out"
    assert prepared.checked["3"]["inputs"]["image"] == "serverless/task-1/cat-1.png"
    assert fetcher.calls == [("https://example.com/cat-1.png", creds, "image", "task-1")]
    assert folders == ["task-1"] and prepared.outputs == ["2"] and catalog.validated_on == ["loop"]
    assert report.prepared is not None and report.validated is not None


async def test_the_gate_opens_before_the_first_input_is_written_and_only_then(tmp_path: Path) -> None:
    preparer, _, fetcher, _ = make(tmp_path)
    opened: list[int] = []

    async def before_writes() -> None:
        opened.append(len(fetcher.calls))

    gate = WriteGate(before_writes)
    await preparer.prepare(graph(), "no-inputs", gate=gate)
    assert opened == [] and not gate.passed  # nothing written: the caller opens it
    await preparer.prepare(graph("data:image/png;base64,AAAA"), "inputs", gate=gate)
    assert opened == [0] and gate.passed
    await gate.open()
    assert opened == [0]  # at most once


async def test_a_refusing_gate_stays_closed_and_nothing_is_written(tmp_path: Path) -> None:
    preparer, _, fetcher, folders = make(tmp_path)

    async def refuse() -> None:
        raise LookupError("claimed elsewhere")

    gate = WriteGate(refuse)
    with pytest.raises(LookupError):
        await preparer.prepare(graph("https://example.com/x.png"), "theirs", gate=gate)
    assert not gate.passed and fetcher.calls == [] and folders == []
    assert WriteGate().passed  # no gate: writes are the caller's own from the start


async def test_every_refused_input_is_named_in_one_error(tmp_path: Path) -> None:
    preparer, _, _, folders = make(tmp_path)
    body = graph("bad-one")
    body["4"] = {"class_type": "LoadImage", "inputs": {"image": "bad-two"}}
    with pytest.raises(ImageInputError) as info:
        await preparer.prepare(body, "two-bad")
    assert sorted(info.value.node_errors) == ["3", "4"] and folders == ["two-bad"]


async def test_large_graphs_validate_in_a_worker_thread(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    preparer, catalog, _, _ = make(tmp_path)
    monkeypatch.setattr(pipeline, "INLINE_VALIDATION_NODES", 1)
    await preparer.prepare(graph(), "big")
    assert catalog.validated_on == ["thread"]


async def test_parse_applies_the_limits_and_runs_handlers_only_when_asked(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def on_prompt(envelope: dict[str, Any]) -> dict[str, Any]:
        seen.append(envelope)
        return envelope

    preparer = Preparer(Settings(base_dir=tmp_path, max_nodes=2, node_denylist=("Denied",)),
                        Catalog(), Fetcher, on_prompt=on_prompt)
    preparer.parse(graph(), handlers=False)
    assert seen == []
    preparer.parse(graph())
    assert len(seen) == 1
    with pytest.raises(WorkflowInvalid) as info:
        preparer.parse(graph("x.png"))
    assert info.value.type == "too_many_nodes"
    with pytest.raises(WorkflowInvalid) as info:
        preparer.parse({"1": {"class_type": "Denied", "inputs": {}}}, handlers=False)
    assert info.value.type == "node_denied"


def test_run_options_are_frozen_and_say_when_a_result_needs_no_awaiting() -> None:
    assert DEFAULT_OPTIONS == RunOptions() and DEFAULT_OPTIONS.renders_inline
    assert RunOptions(output_base64=True).renders_inline
    assert not RunOptions(output_oss=True).renders_inline
    assert not RunOptions(output_format="jpeg").renders_inline
    with pytest.raises(AttributeError):
        DEFAULT_OPTIONS.output_base64 = True  # type: ignore[misc]
    assert "secret" not in repr(RunOptions(credentials=Credentials("id", "secret")))


def test_one_budget_for_all_of_a_requests_inputs() -> None:
    budget = InputBudget(10)
    budget.charge(6)
    budget.charge(4)
    with pytest.raises(ImageInputError, match="over 10 bytes in all"):
        budget.charge(1)
