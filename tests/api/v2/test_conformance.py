"""Every Comfy API v2 response of the flows below, from a real server running
real ComfyUI, validated against the official spec's schemas
(tests/api/v2/conformance.py; the spec comes from the package index: conformance.spec_path).
The last test checks that the flows reached every operation of the spec and
of the SDKs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from blake3 import blake3
from comfy_sdk import Comfy
from openapi_spec_validator import validate as validate_spec

from tests.api.v2.conformance import SDK_ONLY, Conformance, spec_path
from tests.api.v2.recorder import Exchange, RecordingProxy
from tests.api.v2.sdkflows import (
    LOAD,
    SAVE,
    invert_graph,
    is_inverted,
    long_graph,
    png_bytes,
    random_color,
    wait_until,
)
from tests.conftest import image_only, text_to_image
from tests.servers import Server

KEY = "v2-conf-key-" + "d" * 24
OTHER_KEY = "v2-conf-key-" + "e" * 24
TERMINAL = {"succeeded", "failed", "canceled", "expired"}
LIMIT = 300_000  # COMFY_EMBED_ASSET_MAX_BYTES of the server


@pytest.fixture(scope="module")
def conf() -> Conformance:
    return Conformance()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("v2conf"), api_keys=f"{KEY},{OTHER_KEY}", max_queue=1,
               asset_max_bytes=LIMIT)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


class Api:
    """Raw HTTP against /api/v2 as a client writes it; every answer checked."""

    def __init__(self, server: Server, conf: Conformance, key: str | None = KEY) -> None:
        self.base, self.conf = server.url + "/api/v2", conf
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def __call__(self, method: str, path: str, headers: dict[str, str] | None = None,
                 **kw: Any) -> requests.Response:
        url = path if path.startswith("http") else self.base + path
        r = requests.request(method, url, headers={**self.headers, **(headers or {})},
                             timeout=60, allow_redirects=False, **kw)
        self.conf.check(r)
        return r

    def events(self, job_id: str, status: int = 200) -> list[tuple[str, dict[str, Any]]]:
        with requests.get(f"{self.base}/jobs/{job_id}/events", stream=True, timeout=120,
                          headers={**self.headers, "Accept": "text/event-stream"}) as r:
            assert r.status_code == status, r.text
            return self.conf.check_sse(r)

    def upload(self, data: bytes, name: str, expected: str | None = None,
               headers: dict[str, str] | None = None) -> requests.Response:
        fields: dict[str, Any] = {"content_type": (None, "image/png"), "file_path": (None, name)}
        if expected:
            fields["expected_hash"] = (None, expected)
        fields["file"] = (name, data, "image/png")
        return self("POST", "/assets", files=fields, headers=headers)

    def finish(self, job_id: str) -> dict[str, Any]:
        box: dict[str, Any] = {}

        def done() -> bool:
            box.update(self("GET", f"/jobs/{job_id}").json())
            return box["status"] in TERMINAL
        wait_until(done, f"job {job_id} to end")
        return box


@pytest.fixture(scope="module")
def api(server: Server, conf: Conformance) -> Api:
    return Api(server, conf)


def b3(data: bytes) -> str:
    return "blake3:" + blake3(data).hexdigest()


def test_the_official_spec_is_valid_openapi(conf: Conformance) -> None:
    validate_spec(conf.spec)
    assert conf.spec["info"]["title"] == "Comfy API v2"


def test_the_served_openapi_describes_the_official_operations(server: Server,
                                                               conf: Conformance) -> None:
    """/openapi.json has every operation of the official spec, and its v2
    schemas require and describe at least what the official ones do."""
    doc = requests.get(server.url + "/openapi.json", timeout=30).json()
    for path, ops in conf.spec["paths"].items():
        for method, op in ops.items():
            if method in ("get", "post", "head", "delete"):
                served = doc["paths"][path][method]["responses"]
                main = next(c for c in op["responses"] if c.startswith("2"))  # the first listed
                assert main in served, (method, path, main, sorted(served))
    schemas = doc["components"]["schemas"]
    for name in ("Job", "Output", "Asset", "Progress"):
        official = conf.spec["components"]["schemas"][name]
        mine = next(schemas[n] for n in (name, "V2" + name) if n in schemas)
        assert set(official["required"]) <= set(mine["required"]), name
        assert set(official["properties"]) <= set(mine["properties"]), name


def test_the_validator_refuses_what_the_sdk_cannot_read(conf: Conformance) -> None:
    output = {"node_id": "3", "name": "a.png", "type": "image", "content_type": "image/png",
              "size_bytes": 3, "id": "x", "hash": None,
              "url": "http://127.0.0.1:1/api/v2/assets/x/content",
              "url_expires_at": "2026-01-01T00:00:00Z"}
    conf.validate(output, conf.schema("Output"), "a good output")
    for field, value in [("url", "/api/v2/assets/x/content"), ("type", "png"),
                         ("url_expires_at", "2026-01-01T00:00:00"), ("size_bytes", "3")]:
        with pytest.raises(AssertionError):
            conf.validate({**output, field: value}, conf.schema("Output"), field)
    with pytest.raises(AssertionError):
        conf.validate({k: v for k, v in output.items() if k != "hash"},
                      conf.schema("Output"), "no hash key")


def test_assets(api: Api) -> None:
    data = png_bytes(random_color())
    digest = b3(data)
    assert api("HEAD", f"/assets/by-hash/{digest}").status_code == 404
    first = api.upload(data, "photo.png", expected=digest, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert first.status_code == 201, first.text
    asset = first.json()
    assert asset["hash"] == digest and asset["size_bytes"] == len(data) and asset["created_new"]
    assert api("HEAD", f"/assets/by-hash/{digest}").status_code == 200
    assert api("HEAD", f"/assets/by-hash/{digest.replace(':', '%3A')}").status_code == 200
    minted = api("POST", "/assets/from-hash", json={"hash": digest, "file_path": "again.png"})
    assert minted.status_code in (200, 201) and minted.json()["hash"] == digest
    assert minted.json().get("created_new") in (False, None)
    dup = api.upload(data, "dup.png")
    assert dup.status_code == 200 and dup.json()["created_new"] is False

    assert api("GET", f"/assets/{asset['id']}").json()["id"] == asset["id"]
    assert api("GET", f"/assets/{asset['id']}/content").content == data
    part = api("GET", f"/assets/{asset['id']}/content", headers={"Range": "bytes=1-4"})
    assert part.status_code == 206 and part.content == data[1:5]
    far = api("GET", f"/assets/{asset['id']}/content",
              headers={"Range": f"bytes={len(data) + 10}-{len(data) + 20}"})
    assert far.status_code == 416

    wrong = api.upload(png_bytes(random_color()), "wrong.png", expected=digest)
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "hash_mismatch"
    no_file = api("POST", "/assets", files={"content_type": (None, "image/png"),
                                            "file_path": (None, "x.png")})
    assert no_file.status_code == 422, no_file.text
    huge = png_bytes(random_color()) + bytes(LIMIT)
    too_big = api.upload(huge, "huge.png")
    assert too_big.status_code in (413, 422), too_big.text
    assert api("HEAD", f"/assets/by-hash/{b3(huge)}").status_code == 404  # nothing kept
    unknown = api("POST", "/assets/from-hash", json={"hash": b3(b"never uploaded")})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "blob_not_found"
    assert api("GET", f"/assets/{uuid.uuid4()}").status_code == 404
    assert api("GET", f"/assets/{uuid.uuid4()}/content").status_code == 404

    gone = api("POST", "/assets/from-hash", json={"hash": digest, "file_path": "gone.png"}).json()
    assert api("DELETE", f"/assets/{gone['id']}").status_code == 204
    assert api("DELETE", f"/assets/{gone['id']}").status_code == 404
    assert api("GET", f"/assets/{asset['id']}/content").content == data  # others keep the blob


def test_job_flow(api: Api, server: Server, conf: Conformance) -> None:
    color = random_color()
    asset = api.upload(png_bytes(color), "in.png").json()
    graph = invert_graph("v2conf")
    graph[LOAD]["inputs"]["image"] = {"__type": "core/ASSET", "info": {"id": asset["id"]}}
    tag = uuid.uuid4().hex[:10]
    created = api("POST", "/jobs", json={"workflow": graph, "metadata": {"suite": tag}})
    assert created.status_code == 201, created.text
    job = created.json()
    frames = api.events(job["id"])
    # The current status first, unless the job ended before the stream
    # connected: then its progress and outputs, and the terminal status last.
    assert frames[0][0] in ("status", "progress"), frames
    assert frames[-1] == ("status", {"status": "succeeded", "queue_position": None}), frames
    done = api.finish(job["id"])
    (out,) = [o for o in done["outputs"] if o["node_id"] == SAVE]
    assert is_inverted(api("GET", f"/assets/{out['id']}/content").content, color)
    assert api("GET", f"/assets/{out['id']}").json()["id"] == out["id"]
    assert api("POST", f"/jobs/{job['id']}/cancel").json()["status"] == "succeeded"
    behind = api("GET", f"/jobs/{job['id']}/workflow").json()
    assert behind["format"] == "api" and behind["workflow"][SAVE]["class_type"] == "SaveImage"
    later = api("POST", "/jobs", json={"workflow": image_only(batch=1, color=5),
                                       "metadata": {"suite": tag}}).json()
    listed = api("GET", "/jobs", params={"metadata[suite]": tag}).json()
    assert [j["id"] for j in listed["jobs"]] == [later["id"], job["id"]]
    page = api("GET", "/jobs", params={"metadata[suite]": tag, "limit": 1}).json()
    assert [j["id"] for j in page["jobs"]] == [later["id"]] and page["next_cursor"]
    rest = api("GET", "/jobs", params={"metadata[suite]": tag, "limit": 1,
                                       "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["jobs"]] == [job["id"]] and not rest.get("next_cursor")
    api.finish(later["id"])
    assert api("GET", "/jobs", params={"cursor": "not-a-cursor"}).status_code in (400, 422)

    hidden = Api(server, conf, OTHER_KEY)
    assert hidden("GET", f"/jobs/{job['id']}").status_code == 404
    assert hidden("GET", f"/assets/{out['id']}/content").status_code == 404
    assert Api(server, conf, None)("GET", f"/jobs/{job['id']}").status_code == 401
    for path in (f"/jobs/{uuid.uuid4()}", f"/jobs/{uuid.uuid4()}/workflow"):
        assert api("GET", path).json()["error"]["code"] == "not_found"
    assert api("POST", f"/jobs/{uuid.uuid4()}/cancel").status_code == 404
    assert api.events(str(uuid.uuid4()), status=404) == []


def test_stream_of_a_finished_job_ends_with_its_status(api: Api) -> None:
    """The spec: the snapshot on connect, and the stream ends after the
    terminal status event (nothing after it)."""
    job = api("POST", "/jobs", json={"workflow": image_only(batch=1, color=7)}).json()
    api.finish(job["id"])
    frames = api.events(job["id"])
    assert frames[-1] == ("status", {"status": "succeeded", "queue_position": None}), frames
    assert [name for name, _ in frames].count("status") == 1, frames


def test_progress_frames_carry_node_and_step_detail(api: Api) -> None:
    job = api("POST", "/jobs", json={"workflow": text_to_image(steps=6, size=64, seed=61)}).json()
    frames = api.events(job["id"])  # every frame validated against the catalogue
    steps = [d for n, d in frames if n == "progress" and d.get("step")]
    assert steps and all(d["current_node_class"] == "KSampler" and d["steps"] == 6 for d in steps)
    values = [d["value"] for n, d in frames if n == "progress"]
    assert values == sorted(values) and values[-1] == 1.0
    assert frames[-1] == ("status", {"status": "succeeded", "queue_position": None})
    done = api.finish(job["id"])
    assert done["progress"]["value"] == 1.0 and done["outputs"]
    assert set(done["metrics"]) >= {"queue_ms", "execution_ms"}


def test_an_fc_task_is_a_v2_job(api: Api, server: Server) -> None:
    """One id space: a task run through the FC API reads as a v2 job, in order."""
    task_id = f"fc-{uuid.uuid4().hex}"
    r = server.run(image_only(batch=1, color=0x0F0F0F), headers={
        "X-Task-Id": task_id, "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    job = api("GET", f"/jobs/{task_id}").json()
    assert job["id"] == task_id and job["status"] == "succeeded"
    assert job["created_at"] <= job["started_at"] <= job["completed_at"] < job["expires_at"]
    (out,) = job["outputs"]
    assert api("GET", f"/assets/{out['id']}/content").content.startswith(b"\x89PNG")


def test_refusals(api: Api) -> None:
    ui = api("POST", "/jobs", json={"workflow": {"nodes": [], "links": [], "last_node_id": 0}})
    assert ui.status_code == 422 and ui.json()["error"]["code"] == "workflow_format_ui"
    broken = image_only(batch=1)
    del broken["3"]["inputs"]["images"]
    bad = api("POST", "/jobs", json={"workflow": broken})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_workflow"
    assert "3" in bad.json()["error"]["details"]["node_errors"]
    ghost = invert_graph()
    ghost[LOAD]["inputs"]["image"] = {"__type": "core/ASSET", "info": {"id": str(uuid.uuid4())}}
    missing = api("POST", "/jobs", json={"workflow": ghost})
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_asset"


def test_idempotency_and_queue_full(api: Api) -> None:
    key = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"workflow": image_only(batch=1, color=0x123456)}
    first = api("POST", "/jobs", json=body, headers=key)
    again = api("POST", "/jobs", json=body, headers=key)
    assert again.status_code == 201 and again.headers.get("Idempotency-Replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    other = api("POST", "/jobs", json={"workflow": image_only(batch=1, color=1)}, headers=key)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reuse"
    api.finish(first.json()["id"])

    long = api("POST", "/jobs", json={"workflow": long_graph(seed=41)}).json()
    wait_until(lambda: api("GET", f"/jobs/{long['id']}").json()["status"] == "running",
               "the long job to run")
    answers = [api("POST", "/jobs", json={"workflow": image_only(batch=1, color=i)})
               for i in range(3)]
    full = [r for r in answers if r.status_code == 429]
    assert full and full[0].json()["error"]["code"] == "queue_full"
    waiting = [r.json() for r in answers if r.status_code == 201]
    assert waiting, "the queue took nothing while the long job ran"
    for job in waiting:
        seen = api("GET", f"/jobs/{job['id']}").json()
        assert seen["status"] == "queued" and isinstance(seen["queue_position"], int), seen
        assert seen["started_at"] is None
    canceling = api("POST", f"/jobs/{long['id']}/cancel").json()
    assert canceling["status"] in ("canceling", "canceled")
    assert api.finish(long["id"])["status"] == "canceled"
    for r in answers:
        if r.status_code == 201:
            api.finish(r.json()["id"])


def test_the_python_sdk_flow_conforms(server: Server, conf: Conformance, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """comfy-sdk's own flow, through a recording proxy: every answer it got."""
    color = random_color()
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(color))
    with RecordingProxy(server.url) as proxy:
        monkeypatch.setenv("COMFY_BASE_URL", proxy.url)
        with Comfy(api_key=KEY) as client:
            wf = client.workflows.from_json(invert_graph("v2conf-sdk"))
            wf.set_input(LOAD, "image", client.assets.from_file(photo))
            job = client.submit(wf, metadata={"via": "proxy"})
            list(job.events())
            (out,) = job.wait(timeout=120).get_outputs(SAVE)
            assert is_inverted(out.to_bytes(), color) and len(out.to_bytes(range=(0, 3))) == 4
            again = client.assets.from_file(photo)
            again.commit()
            assert again.created_new is False
            assert client.jobs.get(job.id).get_workflow().format == "api"
            assert job.id in [s.id for s in client.list_jobs(metadata={"via": "proxy"})]
            long = client.submit(client.workflows.from_json(long_graph(seed=53)))
            long.cancel()
            assert long.wait(timeout=120).status == "canceled"
            client.assets.delete(again.commit())
        reached = conf.check_recorded(proxy.v2())
    assert {"POST /api/v2/jobs", "GET /api/v2/jobs/{id}/events", "POST /api/v2/assets",
            "HEAD /api/v2/assets/by-hash/{hash}", "POST /api/v2/assets/from-hash",
            "GET /api/v2/assets/{id}/content", "GET /api/v2/jobs/{id}/workflow", "GET /api/v2/jobs",
            "POST /api/v2/jobs/{id}/cancel", "DELETE /api/v2/assets/{id}"} <= reached, reached


def test_malformed_uploads_answer_the_spec_envelope(api: Api) -> None:
    """A body that is no multipart, or not multipart at all, is refused with
    the spec's ErrorEnvelope: 422 (declared) or 400 invalid_request (the
    envelope catalogue's code for a malformed request); Conformance checks it."""
    garbage = api("POST", "/assets", data=b"--x\r\nnot a part at all",
                  headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert garbage.status_code in (400, 422) and garbage.json()["error"]["code"], garbage.text
    not_form = api("POST", "/assets", data=b"hello", headers={"Content-Type": "application/json"})
    assert not_form.status_code in (400, 422) and not_form.json()["error"]["code"], not_form.text


def test_schemathesis_fuzzing_of_the_official_spec(server: Server, conf: Conformance,
                                                   tmp_path: Path) -> None:
    """schemathesis drives the official spec (fixed seed) against the server:
    no 5xx, and every answer it got (its HAR report) passes the validator."""
    har = tmp_path / "fuzz.har"
    cmd = [str(Path(sys.executable).parent / "st"), "run", str(spec_path()), "--url", server.url,
           "--header", f"Authorization: Bearer {KEY}", "--checks", "not_a_server_error",
           "--max-examples", "5", "--seed", "1", "--workers", "1", "--request-timeout", "60",
           "--phases", "examples,coverage,fuzzing", "--report", "har",
           "--report-har-path", str(har)]
    # cwd: schemathesis keeps a cache folder where it runs.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    assert len(entries) > 50
    failures = []
    for entry in entries:
        exchange = har_exchange(entry)
        try:
            conf.route(exchange.request.method, exchange.request.url)
        except AssertionError:  # a method the spec has not there: 405, or the envelope
            if exchange.status_code != 405:
                conf.validate(exchange.json(), conf.schema("ErrorEnvelope"), repr(exchange))
            continue
        try:
            conf.check(exchange)  # type: ignore[arg-type]
        except AssertionError as e:
            failures.append(f"{str(e).splitlines()[0]}: {entry['response']['content'].get('text', '')[:200]}")
    assert not failures, "\n".join(sorted(set(failures)))


def har_exchange(entry: dict[str, Any]) -> Exchange:
    content = entry["response"]["content"]
    body = content.get("text", "") or ""
    raw = base64.b64decode(body) if content.get("encoding") == "base64" else body.encode()
    headers = {h["name"]: h["value"] for h in entry["response"]["headers"]}
    return Exchange(entry["request"]["method"], entry["request"]["url"],
                    entry["response"]["status"], headers, raw)


def test_every_operation_was_reached(conf: Conformance) -> None:
    """Runs last: the tests above, together, reach every operation."""
    if not conf.checked:
        pytest.skip("checks what the other tests of this module reached: run them with it")
    reached = {w.rsplit(" -> ", 1)[0] for w in conf.checked}
    spec_ops = {f"{m.upper()} {p}" for p, ops in conf.spec["paths"].items() for m in ops
                if m in ("get", "post", "head", "delete")}
    assert spec_ops | {f"{m} {p}" for m, p in SDK_ONLY} <= reached, sorted(reached)
