"""Structured logs: task ids on every record made while a task runs."""

from __future__ import annotations

import io
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

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


# Issue 25, item 9, against a real server (the formatter's unit tests:
# test_log_format.py).

@pytest.mark.server
def test_no_request_forges_a_log_line(tmp_path: Path) -> None:
    """A newline in a URL path (keys on: refused; and uvicorn's access line)
    and in a workflow value stay inside their record."""
    server = Server(tmp_path, api_keys="k1")
    try:
        server.wait_ready(headers={"X-Api-Key": "k1"})
        forged = "2026-01-01%2000:00:00,000%20WARNING%20comfy_embed%20[-]%20FORGED"
        for path in (f"/api/serverless/status%0a{forged}", f"/nothing%0d%0a{forged}"):
            requests.get(server.url + path, timeout=10)
            requests.get(server.url + path, headers={"X-Api-Key": "k1"}, timeout=10)
        graph = text_to_image(steps=1, seed=3)
        for node in graph.values():
            if "ckpt_name" in node["inputs"]:
                node["inputs"]["ckpt_name"] = "x.safetensors\n2026-01-01 00:00:00,000 WARNING y FORGED"
        server.run(graph, headers={"X-Api-Key": "k1"})
    finally:
        server.stop()
    text = server.log_path.read_text()
    assert "FORGED" in text  # the requests were logged ...
    assert not [x for x in text.splitlines() if x.startswith("2026-01-01")], text[-3000:]
