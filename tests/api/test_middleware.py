"""What escapes a route (comfy_embed.api.middleware.InternalErrors): a 500 in the
contract's shape with no exception text, logged once."""

from __future__ import annotations

import logging
from typing import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from comfy_embed.api.middleware import InternalErrors


async def boom(request: Request) -> Response:
    raise RuntimeError("secret-token-123 at /srv/private/path")


async def fine(request: Request) -> Response:
    return PlainTextResponse("ok")


async def broken_stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"data: first\n\n"
        raise RuntimeError("secret mid-stream")

    return StreamingResponse(body(), media_type="text/event-stream")


@pytest.fixture
def client() -> TestClient:
    app = Starlette(routes=[Route("/boom", boom), Route("/api/v2/boom", boom), Route("/fine", fine),
                            Route("/stream", broken_stream)],
                    middleware=[Middleware(InternalErrors)])
    # Raising server exceptions on: a re-raised error would fail the test.
    return TestClient(app, raise_server_exceptions=True)


def _error_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_unhandled_error_answers_500_without_its_text_and_is_logged_once(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        r = client.get("/boom", headers={"X-Task-Id": "t-500"})
    assert r.status_code == 500
    assert "secret" not in r.text and "RuntimeError" not in r.text
    data = r.json()["data"]
    assert r.json()["type"] == "serverless_api" and data["task_id"] == "t-500"
    assert data["status"] == "error" and data["error"]["type"] == "execution_error"
    (record,) = _error_records(caplog)
    assert "/boom" in record.getMessage() and record.exc_info is not None
    assert client.get("/fine").text == "ok"  # and the app goes on


def test_an_error_after_the_answer_began_ends_the_stream_and_is_logged_once(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        r = client.get("/stream")
    assert r.status_code == 200 and r.text.startswith("data: first")
    assert "secret" not in r.text
    (record,) = _error_records(caplog)
    assert "/stream" in record.getMessage()


def test_comfy_api_v2_paths_get_its_error_envelope(client: TestClient) -> None:
    r = client.get("/api/v2/boom")
    assert r.status_code == 500 and "secret" not in r.text
    assert r.json() == {"error": {"code": "internal_error", "details": None,
                                  "message": "internal error; the server log has the details"}}
