"""Who may call the lifecycle hooks (issue 25, item 5): api/hooks.py, in
process (the real-server cases: tests/api/serverless/test_hooks.py)."""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from comfy_embed.api.hooks import HOOK_PATHS, LifecycleGuard, hook_caller

ADMIN = "a" * 24
ENV = {"ALIBABA_CLOUD_ACCESS_KEY_SECRET": "role-secret"}


def scope(client: str = "203.0.113.9", **headers: str) -> dict[str, Any]:
    return {"type": "http", "path": "/pre-stop", "client": (client, 1234),
            "headers": [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]}


def test_function_compute_is_known_by_its_role_secret_not_by_header_names() -> None:
    fc = {"x_fc_request_id": "r1", "x_fc_access_key_id": "id"}
    assert hook_caller(scope(**fc, x_fc_access_key_secret="role-secret"), None, ENV) == "function compute"
    # Anyone can send x-fc-* headers; only FC knows the role's secret.
    assert hook_caller(scope(**fc, x_fc_access_key_secret="guess"), None, ENV) is None
    assert hook_caller(scope(**fc), None, ENV) is None
    # No role credentials in the environment: no secret matches, not even an empty one.
    assert hook_caller(scope(**fc, x_fc_access_key_secret=""), None, {}) is None
    assert hook_caller(scope(**fc, x_fc_access_key_secret="role-secret"), None, {}) is None


def test_admin_key_and_direct_loopback() -> None:
    assert hook_caller(scope(x_admin_key=ADMIN), ADMIN, {}) == "admin key"
    assert hook_caller(scope(x_admin_key="wrong"), ADMIN, {}) is None
    assert hook_caller(scope(x_admin_key=""), None, {}) is None
    # An API key is no admin key.
    assert hook_caller(scope(x_api_key=ADMIN, authorization=f"Bearer {ADMIN}"), ADMIN, {}) is None
    assert hook_caller(scope("127.0.0.1"), None, {}) == "loopback"
    assert hook_caller(scope("::1"), None, {}) == "loopback"
    assert hook_caller(scope("10.0.0.5"), None, {}) is None
    assert hook_caller(scope("testclient"), None, {}) is None
    # Relayed through a proxy or FC's gateway on the same host: not local.
    for relay in ({"x_forwarded_for": "203.0.113.9"}, {"forwarded": "for=203.0.113.9"},
                  {"x_real_ip": "203.0.113.9"}, {"x_fc_request_id": "r1"}):
        assert hook_caller(scope("127.0.0.1", **relay), None, {}) is None, relay


def test_the_guard_refuses_hooks_only() -> None:
    async def ok(request: Request) -> Response:
        return JSONResponse({"ok": True})

    paths = sorted(HOOK_PATHS) + ["/health", "/api/serverless/status"]
    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in paths])
    guarded = LifecycleGuard(app, admin_key=ADMIN, environ={})
    with TestClient(guarded) as remote:
        for path in sorted(HOOK_PATHS):
            r = remote.get(path)
            assert r.status_code == 403, path
            assert r.json()["data"]["error"]["type"] == "forbidden"
            assert remote.get(path, headers={"X-Admin-Key": ADMIN}).status_code == 200
        assert remote.get("/health").status_code == 200
        assert remote.get("/api/serverless/status").status_code == 200
    with TestClient(guarded, client=("127.0.0.1", 5)) as local:
        assert local.get("/pre-stop").status_code == 200
