"""The API-key middleware on a tiny in-process app: who passes, what is
refused, what the app sees (a hash, never the key)."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from comfy_embed.api.auth import ApiKeyAuth, hash_key, is_public, key_hash_of


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"key": key_hash_of(request.scope)})


async def echo(ws: WebSocket) -> None:
    await ws.accept()
    await ws.send_json({"key": key_hash_of(ws.scope)})
    await ws.close()


def client(keys: tuple[str, ...]) -> TestClient:
    app = Starlette(routes=[Route("/health", whoami), Route("/run", whoami),
                            WebSocketRoute("/ws", echo)])
    return TestClient(ApiKeyAuth(app, keys))


def test_keys_off_passes_everything() -> None:
    with client(()) as c:
        assert c.get("/run").json() == {"key": None}


def test_keys_on() -> None:
    with client(("k1", "k2")) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/run")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["data"]["error"]["type"] == "unauthorized"
        assert c.get("/run", headers={"X-Api-Key": "k3"}).status_code == 401
        assert c.get("/run", headers={"Authorization": "Basic k1"}).status_code == 401
        r = c.get("/run", headers={"X-Api-Key": "k1"})
        assert r.status_code == 200 and r.json()["key"] == hash_key("k1") != "k1"
        r = c.get("/run", headers={"Authorization": "Bearer k2"})
        assert r.json()["key"] == hash_key("k2")
        # A key on a public path is still recognised.
        assert c.get("/health", headers={"X-Api-Key": "k1"}).json()["key"] == hash_key("k1")


def test_websocket_refused_with_final_event_and_1008() -> None:
    with client(("k1",)) as c:
        with c.websocket_connect("/ws") as ws:
            assert ws.receive_json()["data"]["error"]["type"] == "unauthorized"
            with pytest.raises(WebSocketDisconnect) as info:
                ws.receive_json()
            assert info.value.code == 1008
        with c.websocket_connect("/ws", headers={"X-Api-Key": "k1"}) as ws:
            assert ws.receive_json() == {"key": hash_key("k1")}


def test_public_paths_in_one_place() -> None:
    assert is_public("/health") and is_public("/ready") and not is_public("/health/x")
    # The lifecycle hooks need no API key: api/hooks.py guards them.
    assert is_public("/pre-stop") and not is_public("/metrics")
    assert is_public("/static/app.js") and not is_public("/api/serverless/run")
