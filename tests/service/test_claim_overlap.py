"""The claim in the task log runs while the engine parses and validates
(service.start's ``before_writes`` gate): it must still decide as if it had
run first. Fast tier: fake ComfyUI behind the real app (TestClient)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from comfy_embed.tasklog.log import TaskLog

from tests.fakes.comfy_backend import fake_graph
from tests.api.serverless.test_inprocess import App, final_of, open_app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    yield from open_app(tmp_path)


def _png_data_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (1, 2, 3)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _graph_with_image() -> dict:
    return {**fake_graph("FakeImage"),
            "9": {"class_type": "LoadImage", "inputs": {"image": _png_data_uri()}}}


def _other_instance_owns(app: App, task_id: str) -> Path:
    """Claim ``task_id`` as another instance sharing the log, with inputs of
    its own in this instance's (shared) input folder; returns one of them."""
    s = app.engine.settings
    other = TaskLog(s.task_log_path, "other-instance", s.tasklog.lease_seconds)
    assert other.claim(task_id)
    theirs = s.comfy.input_path / "serverless" / task_id / "theirs.png"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"the other instance's input")
    return theirs


def test_known_task_with_image_input_leaves_the_owners_inputs(app: App) -> None:
    theirs = _other_instance_owns(app, "shared-id-1")
    r = app.run(_graph_with_image(), headers={"X-Fc-Invocation-Type": "Async",
                                              "X-Task-Id": "shared-id-1"})
    assert r.status_code == 202, r.text  # attached to the known task, not run here
    assert theirs.read_bytes() == b"the other instance's input"
    assert sorted(p.name for p in theirs.parent.iterdir()) == ["theirs.png"]
    assert app.engine.get("shared-id-1") is None  # nothing queued on this instance


def test_known_task_with_invalid_graph_is_answered_from_the_log(app: App) -> None:
    # The engine refuses the graph while the claim runs; the claim (known
    # task) decides, as when it ran first: no 400, nothing discarded.
    _other_instance_owns(app, "shared-id-2")
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    r = app.run(bad, headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": "shared-id-2"})
    assert r.status_code == 202, r.text
    assert (app.engine.settings.task_log_path / "shared-id-2" / "owner.json").exists()


def test_new_task_with_image_input_runs_and_its_inputs_go(app: App) -> None:
    r = app.run(_graph_with_image(), headers={"X-Task-Id": "fresh-id"})
    assert r.status_code == 200, r.text
    assert final_of(r)["status"] == "success"
    assert not (app.engine.settings.comfy.input_path / "serverless" / "fresh-id").exists()


def test_refused_graph_leaves_no_claim(app: App) -> None:
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    r = app.run(bad, headers={"X-Task-Id": "refused-id"})
    assert r.status_code == 400, r.text
    assert "NoSuchNode" in r.text
    assert not (app.engine.settings.task_log_path / "refused-id").exists()
    # A corrected retry with the same id runs.
    r = app.run(fake_graph("FakeImage"), headers={"X-Task-Id": "refused-id"})
    assert r.status_code == 200, r.text
    assert final_of(r)["status"] == "success"
