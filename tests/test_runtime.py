"""The engine with real ComfyUI on CPU: results, events, seeds, errors,
cancel, isolation."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image

from comfy_embed import ExecutionFailed, TaskCancelled, WorkflowInvalid
from comfy_embed.executor import Job, Outcome
from comfy_embed.runtime import Engine, RunOptions, Task

from tests.conftest import image_only, text_to_image

pytestmark = pytest.mark.anyio


#: The engine's output folder: what a result's ``comfy.dir`` is relative to.
_OUTPUT: list[Path] = []


@pytest.fixture(autouse=True)
def _output_root(settings: Any) -> None:
    _OUTPUT[:] = [settings.comfy.output_path]


def files_of(final: dict[str, Any]) -> list[Path]:
    out = []
    for r in final["data"]["results"]:
        c = r["output"]["comfy"]
        assert not Path(c["dir"]).is_absolute(), c  # no server path for clients
        out.append(_OUTPUT[0] / c["dir"] / c["subfolder"] / c["filename"])
    return out


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


async def collect(task: Task) -> list[dict[str, Any]]:
    return [ev async for _, ev in task.stream(coalesce=False)]


async def test_image_only_batch_two(engine: Engine) -> None:
    final = await engine.run(image_only(batch=2, color=0x00FF00), RunOptions(output_base64=True))
    data = final["data"]
    assert final["type"] == "serverless_api" and data["status"] == "success"
    assert [(r["node_id"], r["index"]) for r in data["results"]] == [("3", 0), ("3", 1)]
    for path in files_of(final):
        # EmptyImage green inverted is magenta.
        assert pixels(path)[0, 0].tolist() == [255, 0, 255]
    assert all(r["output"]["base64"]["data"].startswith("iVBORw0KGgo") for r in data["results"])
    assert data["results"][0]["output"]["comfy"]["type"] == "output"


async def test_load_image_from_input_folder(engine: Engine, settings: Any) -> None:
    sub = settings.comfy.input_path / "sub"
    sub.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(sub / "x.png")
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "sub/x.png [input]"}},
             "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
             "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": "li", "images": ["2", 0]}}}
    final = await engine.run(graph)
    (path,) = files_of(final)
    assert pixels(path).shape == (6, 8, 3)
    assert pixels(path)[0, 0].tolist() == [245, 235, 225]


async def test_text_to_image_events_and_progress(engine: Engine) -> None:
    task = await engine.submit(text_to_image(steps=3))
    events = await collect(task)
    types = [e["type"] for e in events]
    assert types[0] == "status"
    assert types[1:3] == ["execution_start", "execution_cached"]
    assert types[-3:] == ["execution_success", "executing", "serverless_api"]
    assert events[-2]["data"]["node"] is None
    progress = [e["data"] for e in events if e["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 3, "3"), (2, 3, "3"), (3, 3, "3")]
    assert all(p["prompt_id"] == task.prompt_id for p in progress)
    # executing for the sampler precedes its progress; executed for SaveImage follows.
    assert types.index("progress") > [i for i, e in enumerate(events)
                                       if e["type"] == "executing" and e["data"]["node"] == "3"][0]
    executed = [e for e in events if e["type"] == "executed"]
    assert executed and executed[-1]["data"]["node"] == "9"
    assert events[-1]["data"]["prompt_id"] == task.prompt_id
    assert files_of(events[-1])[0].exists()


async def test_random_seed_reported_and_fixed_seed_reproduces(engine: Engine) -> None:
    g = text_to_image(steps=2)
    g["3"]["inputs"]["seed"] = -1
    first = await engine.run(g)
    seed = first["data"]["seeds"]["3"]
    assert 0 <= seed <= 0xFFFFFFFFFFFFFFFF and seed != -1
    again = await engine.run(text_to_image(steps=2, seed=seed))
    other = await engine.run(text_to_image(steps=2, seed=seed + 1))
    repeat = await engine.run(text_to_image(steps=2, seed=seed))
    a, b, c, d = (pixels(files_of(x)[0]) for x in (first, again, other, repeat))
    assert np.array_equal(a, b) and np.array_equal(a, d)
    assert not np.array_equal(a, c)


def _bad(node: str, **inputs: Any) -> dict[str, Any]:
    g = text_to_image()
    g[node]["inputs"].update(inputs)
    return g


@pytest.mark.parametrize("mutate, node, needle", [
    (lambda g: g["3"].update(class_type="NoSuchSampler"), "3", "NoSuchSampler"),
    (lambda g: g["3"]["inputs"].update(model=["99", 0]), "3", "model"),
    (lambda g: g["3"]["inputs"].update(model=["4", 2]), "3", "model"),          # VAE into MODEL
    (lambda g: g["3"]["inputs"].update(steps="many"), "3", "steps"),
    (lambda g: g["3"]["inputs"].update(steps=0), "3", "steps"),
    (lambda g: g["3"]["inputs"].update(sampler_name="nope"), "3", "sampler_name"),
    (lambda g: g["3"]["inputs"].pop("positive"), "3", "positive"),
    (lambda g: g.pop("9"), None, "no outputs"),
])
async def test_invalid_graphs_name_node_and_input(engine: Engine, mutate: Any, node: str | None,
                                                   needle: str) -> None:
    g = text_to_image()
    mutate(g)
    with pytest.raises(WorkflowInvalid) as info:
        await engine.submit(g)
    err = info.value
    assert needle in err.message
    if node is not None:
        entry = err.to_dict()["node_errors"].get(node) if err.node_errors else None
        assert entry is not None, err.to_dict()
        if needle == "NoSuchSampler":  # an unknown node type is named under its node id
            assert entry["class_type"] == "NoSuchSampler"
            assert [e["extra_info"].get("input_name") for e in entry["errors"]] == ["class_type"]
        else:
            names = [e["extra_info"].get("input_name") for e in entry["errors"]]
            assert needle in names
        assert f"node {node}" in err.message or f"#{node}" in str(err.to_dict())


async def test_large_graphs_validate_in_a_worker_thread_with_the_same_answers(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small graphs are validated on the loop, larger ones in a worker
    thread: both run, and both name a bad input the same way."""
    from comfy_embed.prepare import pipeline

    big = {"1": {"class_type": "EmptyImage",
                 "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x0000FF}}}
    for i in range(2, pipeline.INLINE_VALIDATION_NODES + 2):
        big[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [str(i - 1), 0]}}
    last = str(pipeline.INLINE_VALIDATION_NODES + 1)
    big["999"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "big", "images": [last, 0]}}
    assert len(big) > pipeline.INLINE_VALIDATION_NODES
    final = await engine.run(big)
    assert final["data"]["status"] == "success", final
    (path,) = files_of(final)
    assert pixels(path)[0, 0].tolist() == [0, 0, 255]  # blue, inverted an even number of times

    answers = []
    for limit in (pipeline.INLINE_VALIDATION_NODES, 0):  # on the loop, then in a thread
        monkeypatch.setattr(pipeline, "INLINE_VALIDATION_NODES", limit)
        with pytest.raises(WorkflowInvalid) as info:
            await engine.submit(_bad("3", steps="many"))
        answers.append((info.value.message, info.value.to_dict()))
    assert answers[0] == answers[1] and "steps" in answers[0][0]


async def test_partially_invalid_graph_is_refused(engine: Engine) -> None:
    g = image_only()
    g["4"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["5", 0]}}
    g["5"] = {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bogus",
                                                      "width": 8, "height": 8, "crop": "disabled"}}
    with pytest.raises(WorkflowInvalid) as info:
        await engine.submit(g)
    assert "5" in info.value.node_errors
    assert "upscale_method" in info.value.message


async def test_cancel_queued_and_running(engine: Engine) -> None:
    long = await engine.submit(text_to_image(steps=400, seed=7))
    queued = await engine.submit(image_only(color=0x123456))
    async for _, ev in long.stream():
        if ev["type"] == "progress":
            break
    assert queued.cancel()
    with pytest.raises(TaskCancelled):
        await queued.result()
    assert long.cancel()
    with anyio.fail_after(30):
        with pytest.raises(TaskCancelled):
            await long.result()
    types = [e["type"] for e in long.events]
    assert "execution_interrupted" in types and types[-1] == "serverless_api"
    progress = [e["data"]["value"] for e in long.events if e["type"] == "progress"]
    assert max(progress) < 400  # stopped mid-sampling
    # The executor goes on.
    ok = await engine.run(image_only(color=0x654321))
    assert ok["data"]["status"] == "success"


@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "all-cached"])
async def test_cancel_between_dequeue_and_execute_is_not_lost(engine: Engine, cached: bool) -> None:
    """Real ComfyUI clears its interrupt flag when a prompt starts: a cancel
    landing after dequeue but before that (here: from the job's on_start, on
    the executor thread) must still end the job interrupted, even when every
    node is cached (ComfyUI never checks the flag for a cached node)."""
    graph = image_only(batch=1, color=0x0A0B0C if cached else 0x0C0B0A)
    if cached:
        assert (await engine.run(graph))["data"]["status"] == "success"
    prompt_id = f"race-{uuid.uuid4().hex}"
    checked, outputs = await anyio.to_thread.run_sync(engine.comfy.validate, graph, prompt_id)
    events: list[str] = []
    outcomes: list[Outcome] = []
    finished = threading.Event()
    job = Job(prompt_id=prompt_id, prompt=checked, outputs=outputs,
              emit=lambda kind, data: events.append(kind),
              on_done=lambda o: (outcomes.append(o), finished.set()),
              on_start=lambda: engine.executor.cancel(prompt_id))
    engine.executor.submit(job)
    assert await anyio.to_thread.run_sync(finished.wait, 60)
    (outcome,) = outcomes
    assert outcome.interrupted and not outcome.success, outcome
    assert outcome.error is not None and outcome.error["reason"] == "cancelled"
    assert "execution_interrupted" in events and "executed" not in events
    assert "execution_success" not in events
    # The interrupt does not leak into the next prompt.
    ok = await engine.run(image_only(batch=1, color=0x0D0E0F))
    assert ok["data"]["status"] == "success"


async def test_failing_node_then_success(engine: Engine, settings: Any) -> None:
    (settings.comfy.input_path / "broken.png").write_bytes(b"not a png at all")
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "broken.png"}},
             "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "b", "images": ["1", 0]}}}
    with pytest.raises(ExecutionFailed) as info:
        await engine.run(graph)
    assert "node 1 (LoadImage)" in info.value.message
    assert "1" in info.value.node_errors
    ok = await engine.run(image_only(color=0x0000FF))
    assert ok["data"]["status"] == "success"


async def test_two_tasks_at_once_keep_their_own_files(engine: Engine) -> None:
    results: dict[str, dict[str, Any]] = {}

    async def one(name: str, color: int) -> None:
        results[name] = await engine.run(image_only(batch=2, color=color), task_id=name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, "twin-a", 0xFF0000)
        tg.start_soon(one, "twin-b", 0x00FF00)
    a, b = files_of(results["twin-a"]), files_of(results["twin-b"])
    assert len(a) == len(b) == 2 and not set(a) & set(b)
    assert all(p.exists() and p.parent.name == "twin-a" for p in a)
    assert all(p.exists() and p.parent.name == "twin-b" for p in b)
    assert pixels(a[0])[0, 0].tolist() == [0, 255, 255]
    assert pixels(b[0])[0, 0].tolist() == [255, 0, 255]


async def test_identical_resubmit_still_reports_existing_files(engine: Engine) -> None:
    g = image_only(color=0xABCDEF)
    first = await engine.run(g)
    second = await engine.run(g)
    assert files_of(first) != files_of(second)
    assert all(p.exists() for p in files_of(first) + files_of(second))


async def test_nodes_importing_prompt_server_work(engine: Engine) -> None:
    # GetImageSize does `from server import PromptServer` and reports text
    # through it; ImageCrop lives in the same module.
    graph = image_only(batch=1, size=32)
    graph["4"] = {"class_type": "ImageCrop", "inputs": {"image": ["1", 0], "width": 8, "height": 4,
                                                        "x": 0, "y": 0}}
    graph["5"] = {"class_type": "GetImageSize", "inputs": {"image": ["4", 0]}}
    graph["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
    graph["7"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "crop", "images": ["4", 0]}}
    final = await engine.run(graph)
    crop = [p for p in files_of(final) if p.name.startswith("crop")]
    assert pixels(crop[0]).shape == (4, 8, 3)


async def test_png_metadata_and_animated_output(engine: Engine) -> None:
    graph = image_only(batch=3, size=16)
    graph["4"] = {"class_type": "SaveAnimatedWEBP",
                  "inputs": {"images": ["2", 0], "filename_prefix": "anim", "fps": 6.0,
                             "lossless": False, "quality": 80, "method": "default"}}
    final = await engine.run(graph)
    by_node = {r["node_id"]: r for r in final["data"]["results"]}
    assert by_node["4"]["output"]["media_type"] == "image/webp"
    png = files_of(final)[0]
    with Image.open(png) as im:
        assert "prompt" in im.info  # the workflow, as native ComfyUI embeds it
    webp = [p for p in files_of(final) if p.suffix == ".webp"][0]
    with Image.open(webp) as im:
        assert im.format == "WEBP" and im.size == (16, 16)


def test_run_workflow_blocking(engine: Engine) -> None:
    from comfy_embed import run_workflow

    result = run_workflow(image_only(batch=1, color=0x102030), output_base64=True)
    assert result["type"] == "serverless_api" and result["data"]["status"] == "success"
    assert result["data"]["results"][0]["output"]["base64"]["data"]
    with pytest.raises(WorkflowInvalid):
        run_workflow({"1": {"class_type": "Nope", "inputs": {}}})
