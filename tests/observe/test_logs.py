"""Structured logs: task ids on every record made while a task runs."""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.observe.logs import JsonFormatter, TaskIdFilter, task_context

from tests.conftest import text_to_image
from tests.servers import Server


def _handler(stream: io.StringIO, formatter: logging.Formatter) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.addFilter(TaskIdFilter())
    handler.setFormatter(formatter)
    return handler


def test_task_id_follows_the_context_not_the_logger() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("comfy_embed.test_logs")
    logger.propagate = False
    logger.addHandler(_handler(stream, JsonFormatter()))
    logger.setLevel(logging.INFO)
    try:
        logger.info("before")
        with task_context("t-1"):
            logger.info("inside %s", "t-1")
            other: list[None] = []
            # Another thread has its own context: no task there.
            t = threading.Thread(target=lambda: (logger.info("other thread"), other.append(None)))
            t.start()
            t.join()
        logger.info("after")
    finally:
        logger.handlers.clear()
        logger.propagate = True
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["message"], x.get("task_id")) for x in lines] == [
        ("before", None), ("inside t-1", "t-1"), ("other thread", None), ("after", None)]
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "comfy_embed.test_logs"


@pytest.mark.server
def test_json_log_lines_of_comfyui_carry_the_task_id(tmp_path: Path) -> None:
    server = Server(tmp_path, log_format="json")
    try:
        server.wait_ready()
        r = server.run(text_to_image(steps=2, seed=41), headers={"X-Task-Id": "log-json-1"})
        assert r.status_code == 200, r.text
    finally:
        server.stop()
    records: list[dict[str, Any]] = []
    for line in server.log_path.read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
        else:  # only stderr output of libraries that do not log (warnings)
            assert "INFO" not in line and "ERROR" not in line, line
    mine = [r for r in records if r.get("task_id") == "log-json-1"]
    # ComfyUI's own lines (root logger), our own, and uvicorn's access line
    # all go through the JSON handler.
    assert any(r["logger"] == "root" for r in mine), mine
    assert any(r["logger"].startswith("comfy_embed.") for r in mine), mine
    assert any(r["logger"] == "uvicorn.access" for r in records)
    # Nothing logged at boot (no task) claims one.
    assert records[0].get("task_id") is None


@pytest.mark.server
def test_text_log_lines_carry_the_task_id(tmp_path: Path) -> None:
    server = Server(tmp_path)
    try:
        server.wait_ready()
        r = server.run(text_to_image(steps=2, seed=42), headers={"X-Task-Id": "log-text-1"})
        assert r.status_code == 200, r.text
    finally:
        server.stop()
    tagged = [x for x in server.log_path.read_text().splitlines() if "[log-text-1]" in x]
    assert any(" root [log-text-1] " in x for x in tagged), tagged
