"""The one error -> status table (comfy_embed.api.errors): the same error
answers the same status live and when its final event is read back from
the task log, for every error class and every ``type=`` the package raises
(found in the source, so a new one cannot slip past the table)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from comfy_embed import errors
from comfy_embed.api.errors import status_for, status_for_event, status_for_type
from comfy_embed.errors import ComfyEmbedError, WorkflowInvalid
from comfy_embed.events import dumps, final_event, loads

PACKAGE = Path(__file__).resolve().parents[2] / "comfy_embed"

#: Every error class of the hierarchy (all live in comfy_embed/errors.py).
CLASSES: dict[str, type[ComfyEmbedError]] = {
    name: obj for name in errors.__all__
    if isinstance(obj := getattr(errors, name), type) and issubclass(obj, ComfyEmbedError)}


def _calls_with_type() -> set[tuple[str, str]]:
    """``(class name, type)`` of every ``SomeError(..., type="...")`` in the package."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name not in CLASSES:
                continue
            for kw in node.keywords:
                if kw.arg == "type" and isinstance(kw.value, ast.Constant):
                    found.add((str(name), str(kw.value.value)))
    return found


RAISED = sorted(_calls_with_type())
#: The top-level types ComfyUI's validate_prompt answers with (``Comfy._answer``
#: raises WorkflowInvalid with them).
COMFYUI_TYPES = ["invalid_prompt", "prompt_no_outputs", "prompt_outputs_failed_validation"]


def _replayed(error: ComfyEmbedError) -> int:
    """The status of the error's final event, as read back from the task log."""
    final = loads(dumps(final_event("task-1", None, {}, error=error.to_dict())))
    return status_for_event(final)


def test_the_scan_finds_what_the_package_raises() -> None:
    assert ("WorkflowInvalid", "invalid_output_format") in RAISED
    assert ("WorkflowInvalid", "invalid_json") in RAISED
    assert {name for name, _ in RAISED} <= set(CLASSES)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_class_answers_the_same_live_and_replayed(name: str) -> None:
    error = CLASSES[name]("something failed")
    assert status_for(error) == _replayed(error) == status_for_type(error.type)


@pytest.mark.parametrize("name, error_type", RAISED + [("WorkflowInvalid", t) for t in COMFYUI_TYPES])
def test_every_raised_type_answers_the_same_live_and_replayed(name: str, error_type: str) -> None:
    error = CLASSES[name]("something failed", type=error_type)  # type: ignore[call-arg]
    assert error.type == error_type
    assert status_for(error) == _replayed(error)
    if name == "WorkflowInvalid":
        assert error_type in WorkflowInvalid.TYPES  # the table's vocabulary


def test_every_error_class_lives_in_the_one_hierarchy_module() -> None:
    """A ComfyEmbedError subclass elsewhere could be missed by the table."""
    outside = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", None)) in CLASSES for b in node.bases):
                outside.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert not outside


@pytest.mark.parametrize("error_type, status", [
    ("invalid_json", 400), ("invalid_prompt", 400), ("invalid_task_id", 400),
    ("invalid_output_format", 400), ("invalid_parameter", 400), ("too_many_nodes", 400),
    ("node_denied", 400), ("prompt_outputs_failed_validation", 400), ("invalid_input_path", 400),
    ("webhook_refused", 400), ("unauthorized", 401), ("task_id_conflict", 409),
    ("execution_interrupted", 409), ("payload_too_large", 413), ("image_input_error", 422),
    ("queue_full", 429), ("execution_error", 500), ("out_of_memory", 500), ("task_lost", 500),
    ("storage_error", 502), ("model_download_error", 502), ("not_accepting", 503),
    ("storage_unavailable", 503), ("run_timeout", 504),
    ("prompt_some_new_comfyui_type", 400), ("something_unknown", 500),
])
def test_statuses_by_type_follow_the_spec(error_type: str, status: int) -> None:
    assert status_for_type(error_type) == status


def test_a_success_is_200() -> None:
    assert status_for_event(final_event("t", "p", {}, results=[])) == 200
