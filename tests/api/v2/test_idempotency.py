"""``Idempotency-Key`` on POST /api/v2/jobs with Stripe's semantics, across
two real instances sharing one task log folder: replay, reuse, a concurrent
retry while the first request is still being prepared, refusals that keep
no record."""

from __future__ import annotations

import http.server
import io
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from PIL import Image

from tests.conftest import image_only
from tests.servers import Server

AUTH = {"Authorization": "Bearer idem-key"}


class SlowImage(http.server.BaseHTTPRequestHandler):
    """Serves a PNG once ``release`` is set; ``asked`` tells a request came."""

    asked = threading.Event()
    release = threading.Event()

    def do_GET(self) -> None:
        type(self).asked.set()
        type(self).release.wait(60)
        out = io.BytesIO()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(out, "PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(out.getvalue())))
        self.end_headers()
        self.wfile.write(out.getvalue())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/slow.png"
    finally:
        SlowImage.release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared")


def _server(base: Path, shared: Path) -> Server:
    return Server(base, api_keys="idem-key,idem-other", task_log_dir=shared / "output" / "log",
                  output_dir=shared / "output", url_allowlist="127.0.0.1")


@pytest.fixture(scope="module")
def a(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> Iterator[Server]:
    s = _server(tmp_path_factory.mktemp("a"), shared)
    try:
        yield s.wait_ready(headers=AUTH)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory, shared: Path, a: Server) -> Iterator[Server]:
    s = _server(tmp_path_factory.mktemp("b"), shared)
    try:
        yield s.wait_ready(headers=AUTH)
    finally:
        s.stop()


def post(server: Server, body: dict[str, Any], key: str,
         headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}/api/v2/jobs", json=body,
                      headers={**headers, "Idempotency-Key": key}, timeout=90)


def test_replay_on_any_instance_and_reuse(a: Server, b: Server) -> None:
    key, body = str(uuid.uuid4()), {"workflow": image_only(batch=1), "metadata": {"k": "1"}}
    first = post(a, body, key)
    assert first.status_code == 201 and "idempotency-replayed" not in first.headers
    for server in (a, b):
        again = post(server, body, key)
        assert again.status_code == 201, again.text
        assert again.headers["idempotency-replayed"] == "true"
        assert again.json() == first.json()  # the recorded answer, byte for byte
    listed = httpx.get(f"{a.url}/api/v2/jobs", params={"metadata[k]": "1"}, headers=AUTH).json()
    assert [j["id"] for j in listed["jobs"]].count(first.json()["id"]) == 1
    assert len([j for j in listed["jobs"]]) == 1  # one job, not three
    other_body = {"workflow": image_only(batch=2)}
    reuse = post(b, other_body, key)
    assert reuse.status_code == 422 and reuse.json()["error"]["code"] == "idempotency_key_reuse"
    # Keys are per API key: another caller's same key is a new request.
    mine = post(a, body, key, headers={"Authorization": "Bearer idem-other"})
    assert mine.status_code == 201 and mine.json()["id"] != first.json()["id"]


def test_concurrent_retry_is_409_until_the_first_answers(a: Server, b: Server,
                                                         image_server: str) -> None:
    key = str(uuid.uuid4())
    body = {"workflow": {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_server}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "i"}}}}
    answers: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answers.append(post(a, body, key)))
    first.start()
    try:
        # The first request is fetching its image input (before its 201).
        assert SlowImage.asked.wait(60)
        retry = post(b, body, key)
        assert retry.status_code == 409, retry.text
        assert retry.json()["error"]["code"] == "idempotency_conflict"
        assert int(retry.headers["retry-after"]) >= 1
    finally:
        SlowImage.release.set()
        first.join(90)
    assert answers[0].status_code == 201, answers[0].text
    replay = post(b, body, key)
    assert replay.status_code == 201 and replay.json()["id"] == answers[0].json()["id"]


def test_a_refused_request_keeps_no_record(a: Server) -> None:
    key = str(uuid.uuid4())
    broken = image_only(batch=1)
    del broken["2"]["inputs"]["image"]
    refused = post(a, {"workflow": broken}, key)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_workflow"
    # Corrected and retried with the same key: it runs (no reuse error).
    fixed = post(a, {"workflow": image_only(batch=1)}, key)
    assert fixed.status_code == 201, fixed.text
    assert "idempotency-replayed" not in fixed.headers


def test_extra_data_is_not_part_of_the_request_identity(a: Server) -> None:
    """A retry with another partner key replays: extra_data carries secrets,
    and nothing stored is derived from it (newer Comfy specs say the same)."""
    key = str(uuid.uuid4())
    first = post(a, {"workflow": image_only(batch=1), "extra_data": {"api_key_comfy_org": "s1"}},
                 key)
    assert first.status_code == 201
    again = post(a, {"workflow": image_only(batch=1), "extra_data": {"api_key_comfy_org": "s2"}},
                 key)
    assert again.status_code == 201 and again.headers["idempotency-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
