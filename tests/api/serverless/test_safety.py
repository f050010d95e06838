"""Issue 9, "safe to expose": each numbered case reproduced against a real
server (real uvicorn, real ComfyUI on CPU, real HTTP/WebSocket clients)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import websocket

from comfy_embed.tasklog.log import TaskLog
from tests.fakes.web_server import make_png

from tests.conftest import image_only, text_to_image
from tests.servers import Server

API = "/api/serverless"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("safety"), max_nodes=50)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def task_log_dir(server: Server) -> Path:
    return Path(server.log_path).parent / "output" / "serverless_api"


def log_folders(server: Server) -> set[str]:
    d = task_log_dir(server)
    return set(os.listdir(d)) if d.is_dir() else set()


def error_of(r: requests.Response) -> dict[str, Any]:
    body = r.json()
    assert body["type"] == "serverless_api" and body["data"]["status"] == "error", body
    return body["data"]["error"]


def load_image_graph(name: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}}


def assert_serves(server: Server, session: requests.Session | None = None) -> None:
    r = (session or requests).post(f"{server.url}{API}/run", json=image_only(batch=1), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "success"


# ------------------------------------------------------------------ case 2
def test_2_file_name_checks_are_bounded(server: Server) -> None:
    # 800 KB of "abcdefg/" took 6 s (quadratic path resolution): now refused
    # by its length before any filesystem call.
    r = server.run(load_image_graph("abcdefg/" * 100_000))
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert "1" in err["node_errors"] and "byte limit" in err["message"]
    # A 300-byte component used to fail in the filesystem (500).
    r = server.run(load_image_graph("a" * 300 + ".png"))
    assert r.status_code == 400, r.text
    assert "over 255 bytes" in error_of(r)["message"]
    assert_serves(server)


# ------------------------------------------------------------------ case 3
def test_3_callers_cannot_read_each_others_inputs(server: Server) -> None:
    inline = base64.b64encode(make_png((24, 24), "blue")).decode()
    r = server.run(load_image_graph(inline), "?output_base64=1", {"X-Task-Id": "victim-3"})
    assert r.status_code == 200, r.text
    input_dir = Path(server.log_path).parent / "input"
    # Materialised images served their own run only: gone once it ended.
    assert not (input_dir / "serverless" / "victim-3").exists()

    folder_reader = {"1": {"class_type": "LoadImageSetFromFolderNode",
                           "inputs": {"folder": "serverless"}},
                     "2": {"class_type": "SaveImage",
                           "inputs": {"filename_prefix": "x", "images": ["1", 0]}}}
    r = server.run(folder_reader, "?output_base64=1")
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "node_denied" and "LoadImageSetFromFolderNode" in err["message"]
    assert err["node_errors"]["1"]["class_type"] == "LoadImageSetFromFolderNode"

    # Naming a materialised file directly is refused too.
    r = server.run(load_image_graph("serverless/victim-3/x.png"))
    assert r.status_code == 400 and "reserved" in error_of(r)["message"]

    # Model writers are denied (VAESave used to write model files).
    vae_save = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
                "2": {"class_type": "VAESave", "inputs": {"vae": ["1", 0], "filename_prefix": "v"}}}
    r = server.run(vae_save)
    assert r.status_code == 400 and "VAESave" in error_of(r)["message"]

    # Nodes per graph are bounded (this server: 50).
    big = {str(i): {"class_type": "EmptyImage", "inputs": {}} for i in range(51)}
    r = server.run(big)
    assert r.status_code == 400 and error_of(r)["type"] == "too_many_nodes"


# ------------------------------------------------------------------ case 4
@pytest.mark.parametrize("prefix", ["../victim-4/x", "../serverless_api/t4/x", "/tmp/x",
                                    "a/../../x", ["10", 0]])
def test_4_filename_prefix_cannot_escape(server: Server, prefix: Any) -> None:
    g = image_only(batch=1)
    # Node 3 is the SaveImage (node 2, ImageInvert, declares no filename_prefix:
    # one given to it is dropped before validation, as ComfyUI ignores it).
    g["3"]["inputs"]["filename_prefix"] = prefix
    if isinstance(prefix, list):
        g["10"] = {"class_type": "PrimitiveString", "inputs": {"value": "../victim-4/x"}}
    before = log_folders(server)
    r = server.run(g, headers={"X-Task-Id": "t4"})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert "filename_prefix" in err["message"] and "node 3" in err["message"]
    assert err["node_errors"]["3"]["errors"][0]["extra_info"]["input_name"] == "filename_prefix"
    assert log_folders(server) == before  # nothing planted in the task log
    out = Path(server.log_path).parent / "output"
    assert not (out / "victim-4").exists() and not (out / "serverless_api" / "t4" / "x").exists()


def test_4_task_id_then_runs_normally(server: Server) -> None:
    r = server.run(image_only(batch=1), headers={"X-Task-Id": "t4"})
    assert r.status_code == 200 and r.json()["data"]["status"] == "success", r.text


# ------------------------------------------------------------------ issue 25 (6)
@pytest.mark.parametrize("prefix", [".", "./", "./.", "x/..", "/"])
def test_25_6_prefix_normalising_to_nothing_is_refused(server: Server, prefix: str) -> None:
    # "." used to put "<task_id>_00001_.png" in the output root (ComfyUI takes
    # dirname(normpath("<task>/."))), where retention never looks.
    # With X-Task-Id: ComfyUI and batch 3 it overwrote ComfyUI_0000{1,2,3}_.png.
    out = Path(server.log_path).parent / "output"
    planted = {f"ComfyUI_0000{i}_.png": f"victim {i}".encode() for i in (1, 2, 3)}
    for name, data in planted.items():
        (out / name).write_bytes(data)
    before = set(os.listdir(out))
    g = image_only(batch=3)
    g["3"]["inputs"]["filename_prefix"] = prefix
    r = server.run(g, headers={"X-Task-Id": "ComfyUI"})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert "node 3" in err["message"] and "filename_prefix" in err["message"]
    assert err["node_errors"]["3"]["errors"][0]["extra_info"]["input_name"] == "filename_prefix"
    assert set(os.listdir(out)) == before
    for name, data in planted.items():
        assert (out / name).read_bytes() == data


def test_25_6_task_id_never_leaves_its_folder(server: Server) -> None:
    # X-Task-Id: ComfyUI with batch 3 overwrote ComfyUI_0000{1,2,3}_.png in
    # the output root; now every output is below <output>/<task_id>/.
    out = Path(server.log_path).parent / "output"
    planted = {f"ComfyUI_0000{i}_.png": f"victim {i}".encode() for i in (1, 2, 3)}
    for name, data in planted.items():
        (out / name).write_bytes(data)
    for prefix in ("", "x/./.", "a/", "ComfyUI"):
        g = image_only(batch=3)
        g["3"]["inputs"]["filename_prefix"] = prefix
        r = server.run(g, headers={"X-Task-Id": "ComfyUI"})
        assert r.status_code == 200, (prefix, r.text)
        for item in r.json()["data"]["results"]:
            c = item["output"]["comfy"]
            assert c["subfolder"] == "ComfyUI" or c["subfolder"].startswith("ComfyUI/"), c
            assert (out / c["subfolder"] / c["filename"]).is_file()
    for name, data in planted.items():
        assert (out / name).read_bytes() == data


# ------------------------------------------------------------------ case 8
def test_8_malformed_parameters_are_400(server: Server) -> None:
    with requests.Session() as s:  # one keep-alive connection throughout
        _malformed(server, s)


def _malformed(server: Server, s: requests.Session) -> None:
    bad_bodies = {
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "deep-object": b'{"1": {"class_type": "X", "inputs": {"a": ' + b"[" * 200 + b"]" * 200 + b"}}}",
        "bigint": b'{"1": {"class_type": "EmptyImage", "inputs": {"width": ' + b"9" * 5000 + b"}}}",
        "nan": b'{"1": {"class_type": "EmptyImage", "inputs": {"width": NaN}}}',
    }
    for name, body in bad_bodies.items():
        r = s.post(f"{server.url}{API}/run", data=body, headers={"X-Task-Id": f"bad-{name}"},
                   timeout=60)
        assert r.status_code == 400, (name, r.text[:300])
        assert error_of(r)["type"] == "invalid_json", name
    g = image_only(batch=1)
    for query in ("quality=%C2%B2", "quality=" + "9" * 5000, "quality=0", "quality=abc"):
        task = f"q-{uuid.uuid4().hex[:8]}"
        r = s.post(f"{server.url}{API}/run?{query}", json=g, headers={"X-Task-Id": task}, timeout=60)
        assert r.status_code == 400 and "quality" in error_of(r)["message"], (query, r.text[:300])
        assert task not in log_folders(server)  # the task did not run
    r = s.post(f"{server.url}{API}/run?stream=1", json=g, headers={"Last-Event-ID": "²"}, timeout=60)
    assert r.status_code == 400 and "Last-Event-ID" in r.text
    for since in ("²", "9" * 5000, "-1"):
        r = s.get(f"{server.url}{API}/status", params={"task_id": "x", "since": since}, timeout=10)
        assert r.status_code == 400 and "since" in error_of(r)["message"], since
    for task_id in ("../../etc", "a/b", "x" * 129, ""):
        r = s.get(f"{server.url}{API}/status", params={"task_id": task_id}, timeout=10)
        assert r.status_code == 400 and "task_id" in error_of(r)["message"], task_id
        r = s.post(f"{server.url}{API}/cancel", params={"task_id": task_id}, timeout=10)
        assert r.status_code == 400, task_id
    r = s.post(f"{server.url}{API}/run", json=g, headers={"X-Task-Id": "../x"}, timeout=10)
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_task_id"
    assert_serves(server, s)


@pytest.mark.parametrize("query", ["task_id=../../etc", "task_id=ok&since=%C2%B2",
                                   "quality=" + "9" * 5000])
def test_8_websocket_bad_parameters_close_properly(server: Server, query: str) -> None:
    ws = websocket.create_connection(f"{server.ws_url}?{query}", timeout=30)
    try:
        ev = json.loads(ws.recv())
        assert ev["type"] == "serverless_api" and ev["data"]["status"] == "error"
        assert ev["data"]["error"]["type"] == "invalid_parameter"
        opcode, frame = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(frame[:2], "big") == 1008
    finally:
        ws.shutdown()  # the server closed it: just release the socket


# ------------------------------------------------------------------ case 9
def test_9_rejections_log_one_line_and_leave_no_folder(server: Server) -> None:
    before_folders = log_folders(server)
    before_log = Path(server.log_path).read_text(errors="replace")
    bad = [b"[" * 50_000, b"{bad", json.dumps(load_image_graph("../etc/passwd")).encode(),
           json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}).encode()]
    for body in bad:
        r = requests.post(f"{server.url}{API}/run", data=body, timeout=60)
        assert r.status_code == 400, r.text[:200]
    assert_serves(server)
    new = Path(server.log_path).read_text(errors="replace")[len(before_log):]
    assert "Traceback" not in new
    refused = [line for line in new.splitlines() if "refused run" in line]
    assert len(refused) == len(bad)
    assert all(len(line) < 1000 for line in new.splitlines())
    # Only the successful run left a task-log folder.
    assert len(log_folders(server) - before_folders) == 1


def test_9_retention_deletes_only_recorded_tasks(tmp_path: Path) -> None:
    s = Server(tmp_path / "ret", retention_hours=0.001)  # 3.6 s
    try:
        s.wait_ready()
        user = tmp_path / "ret" / "output" / "my_portraits"
        user.mkdir(parents=True)
        (user / "me.png").write_bytes(b"mine")
        old = 1_000_000_000
        os.utime(user, (old, old))
        # A task id may not take over a folder it did not make.
        r = s.run(image_only(batch=1), headers={"X-Task-Id": "my_portraits"})
        assert r.status_code == 409, r.text
        r = s.run(image_only(batch=1), headers={"X-Task-Id": "ret-1"})
        assert r.status_code == 200, r.text
        out = tmp_path / "ret" / "output"
        assert (out / "ret-1").is_dir()
        logs = out / "serverless_api"
        deadline = 60.0
        import time
        start = time.monotonic()
        while (logs / "ret-1").exists() and time.monotonic() - start < deadline:
            time.sleep(0.2)
        assert not (logs / "ret-1").exists() and not (out / "ret-1").exists()
        assert (user / "me.png").read_bytes() == b"mine"
    finally:
        s.stop()


# ------------------------------------------------------------------ case 5
def _wait_running(s: Server, task_id: str) -> None:
    import time
    start = time.monotonic()
    while time.monotonic() - start < 120:
        if any(ev["type"] == "progress" for ev in s.status(task_id)):
            return
        time.sleep(0.05)
    raise TimeoutError("the task never started")


@pytest.mark.parametrize("grace, expect", [(60, "success"), (0.5, "error")])
def test_5_sigterm_drains(tmp_path: Path, grace: float, expect: str) -> None:
    base = tmp_path / "drain"
    s = Server(base, drain_seconds=grace)
    try:
        s.wait_ready()
        steps = 6 if expect == "success" else 150  # finishes within the grace, or not
        r = s.run(text_to_image(steps=steps, size=64), headers={
            "X-Fc-Invocation-Type": "Async", "X-Task-Id": "drain-1"})
        assert r.status_code == 202, r.text
        _wait_running(s, "drain-1")
        os.killpg(s.proc.pid, signal.SIGTERM)
        s.proc.wait(120)
    finally:
        s.stop()
    events = TaskLog(base / "output" / "serverless_api", "reader").read("drain-1")
    final = events[-1][1]
    assert final["type"] == "serverless_api", events[-3:]
    assert final["data"]["status"] == expect, final
    if expect == "error":
        assert "shut down" in final["data"]["error"]["message"]


# ------------------------------------------------------------------ case 6
@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte. Unbuffered: a
    buffered file would raise ENOSPC again when closed, with what it kept."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (b"\0" * 65536, b"\0"):
            try:
                while os.write(fd, chunk):
                    pass
            except OSError:  # ENOSPC: on to smaller writes, then done
                pass
    finally:
        os.close(fd)
    return filler


def test_6_full_disk(tmp_path: Path, tiny_disk: Path) -> None:
    import time
    s = Server(tmp_path / "disk", output_dir=tiny_disk, lease_seconds=2)
    try:
        s.wait_ready()
        got: list[dict[str, Any]] = []
        filled = threading.Event()

        def client() -> None:
            with requests.post(f"{s.url}{API}/run?stream=1", json=text_to_image(steps=10, size=64),
                               headers={"X-Task-Id": "full-1"}, stream=True, timeout=300) as r:
                for line in r.iter_lines(decode_unicode=True):
                    if line and line.startswith("data: "):
                        ev = json.loads(line[6:])
                        got.append(ev)
                        if ev["type"] == "progress" and not filled.is_set():
                            fill(tiny_disk)
                            filled.set()

        t = threading.Thread(target=client)
        t.start()
        t.join(600)
        assert filled.is_set() and got, got
        final = got[-1]
        # The client still gets the final event, an error (the image could not be saved).
        assert final["type"] == "serverless_api" and final["data"]["status"] == "error", final
        # /ready probes the folders at most every 2 s: allow it one more probe.
        deadline = time.monotonic() + 10
        while (r := requests.get(f"{s.url}/ready", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline, "/ready never reported the full disk"
            time.sleep(0.2)
        assert r.status_code == 503 and r.json()["status"] == "unhealthy"
        assert "No space left" in r.json()["reason"], r.json()
        r = s.run(image_only(batch=1))
        assert r.status_code in (500, 503), r.text
        assert error_of(r)["type"] in ("storage_unavailable", "execution_error")
        assert "serverless_api" not in r.text or r.status_code == 503

        for f in tiny_disk.glob("filler*"):
            f.unlink()
        start = time.monotonic()
        while requests.get(f"{s.url}/ready", timeout=10).status_code != 200:
            assert time.monotonic() - start < 30, "never became ready again"
            time.sleep(0.2)
        assert_serves(s)
        # The final event that could not be written is written once space
        # returned: the log says what the client was told (not task_lost).
        events = s.wait_final("full-1", timeout=60)
        assert events[-1]["data"]["status"] == "error"
        assert events[-1]["data"]["error"] == final["data"]["error"], (events[-1], final)
    finally:
        s.stop()
        shutil.rmtree(tmp_path / "disk", ignore_errors=True)


# ------------------------------------------------------------------ case 7
@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("keyed"), api_keys="key-one,key-two")
    try:
        # /ready is public (probes carry no key); the key is sent all the same.
        import time
        start = time.monotonic()
        while True:
            try:
                if requests.get(s.url + "/ready", headers={"X-Api-Key": "key-one"},
                                timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert s.proc.poll() is None and time.monotonic() - start < 180, s.log()
            time.sleep(0.1)
        yield s
    finally:
        s.stop()


def test_7_api_keys(keyed: Server) -> None:
    one, two = {"X-Api-Key": "key-one"}, {"Authorization": "Bearer key-two"}
    assert requests.get(f"{keyed.url}/health", timeout=10).status_code == 200
    # Probes carry no key: /ready answers without one.
    assert requests.get(f"{keyed.url}/ready", timeout=10).status_code == 200
    for method, path in (("get", "/metrics"), ("post", f"{API}/run"), ("get", f"{API}/status?task_id=x"),
                         ("post", f"{API}/cancel?task_id=x")):
        r = requests.request(method, keyed.url + path, timeout=10)
        assert r.status_code == 401, (path, r.text)
        assert error_of(r)["type"] == "unauthorized"
        r = requests.request(method, keyed.url + path, headers={"X-Api-Key": "wrong"}, timeout=10)
        assert r.status_code == 401, path
    # The lifecycle hooks are the platform's: a valid API key does not open
    # /pre-stop to a remote caller (issue 25: tests/api/serverless/test_hooks.py).
    r = requests.get(f"{keyed.url}/pre-stop", headers={**one, "X-Forwarded-For": "203.0.113.9"},
                     timeout=10)
    assert r.status_code == 403 and error_of(r)["type"] == "forbidden", r.text
    r = keyed.run(image_only(batch=1), headers={**one, "X-Task-Id": "owned-1"})
    assert r.status_code == 200, r.text
    # The creator reads it; another key sees nothing and cannot cancel or attach.
    r = requests.get(f"{keyed.url}{API}/status", params={"task_id": "owned-1"}, headers=one, timeout=10)
    assert r.json()[-1]["type"] == "serverless_api"
    r = requests.get(f"{keyed.url}{API}/status", params={"task_id": "owned-1"}, headers=two, timeout=10)
    assert r.status_code == 200 and r.json() == []
    r = requests.post(f"{keyed.url}{API}/cancel", params={"task_id": "owned-1"}, headers=two, timeout=10)
    assert r.status_code == 404
    r = keyed.run(image_only(batch=1), headers={**two, "X-Task-Id": "owned-1"})
    assert r.status_code == 409 and error_of(r)["type"] == "task_id_conflict"
    # Issue 25 (11): the answer says the id is taken, not that another key
    # owns it: the same words as an id taken by a folder of the output folder.
    taken = error_of(r)["message"]
    assert "key" not in taken.lower() and taken == "task id owned-1 is already in use; choose another task id"
    (Path(keyed.log_path).parent / "output" / "folder-11").mkdir()
    r = keyed.run(image_only(batch=1), headers={**two, "X-Task-Id": "folder-11"})
    assert r.status_code == 409
    assert error_of(r)["message"] == taken.replace("owned-1", "folder-11")
    # The owner's own retry still attaches to its task.
    r = keyed.run(image_only(batch=1), headers={**one, "X-Task-Id": "owned-1"})
    assert r.status_code == 200 and r.json()["data"]["status"] == "success"
    r = keyed.run(image_only(batch=1), headers=two)
    assert r.status_code == 200
    # Only a hash of the key is stored with the task.
    folder = Path(keyed.log_path).parent / "output" / "serverless_api" / "owned-1"
    stored = b"".join(p.read_bytes() for p in folder.iterdir() if p.is_file())
    assert b"key-one" not in stored and (folder / "owner_key").read_text()

    ws = websocket.create_connection(keyed.ws_url, timeout=30)
    try:
        ev = json.loads(ws.recv())
        assert ev["data"]["error"]["type"] == "unauthorized"
        opcode, frame = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(frame[:2], "big") == 1008
    finally:
        ws.shutdown()
    ws = websocket.create_connection(keyed.ws_url, header=["X-Api-Key: key-two"], timeout=60)
    try:
        ws.send(json.dumps(image_only(batch=1)))
        while True:
            ev = json.loads(ws.recv())
            if ev["type"] == "serverless_api":
                break
        assert ev["data"]["status"] == "success", ev
    finally:
        ws.close()


# ------------------------------------------------------------------ issue 25 (12, 14)
@pytest.fixture
def unwritable_output(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """A ready server whose output folder then stops taking files. Root
    ignores permissions, so the folder is replaced by a plain file."""
    out = tmp_path / "out"
    s = Server(tmp_path / "ro", output_dir=out, task_log_dir=tmp_path / "logs")
    try:
        s.wait_ready()
        shutil.rmtree(out)
        out.write_bytes(b"not a folder")
        yield s, out
    finally:
        s.stop()


def test_25_12_unwritable_output_folder_is_503(unwritable_output: tuple[Server, Path]) -> None:
    import time
    s, out = unwritable_output
    deadline = time.monotonic() + 30  # the probe's verdict is cached 2 s
    while (r := requests.get(f"{s.url}/ready", timeout=10)).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert r.status_code == 503 and r.json()["status"] == "unhealthy", r.text
    # 14: the public reason names the folder by its role, not its path.
    assert "output folder" in r.json()["reason"] and str(out) not in r.text, r.text
    for params, headers in (("", {"X-Task-Id": "ro-1"}), ("?stream=1", {"X-Task-Id": "ro-2"}),
                            ("", {"X-Task-Id": "ro-3", "X-Fc-Invocation-Type": "Async"})):
        r = s.run(image_only(batch=1), params=params, headers=headers)
        assert r.status_code == 503, (params, r.text)
        assert "Retry-After" in r.headers
        final = (json.loads(r.text.strip().removeprefix("data: ")) if params else r.json())
        assert final["data"]["error"]["type"] == "storage_unavailable", r.text
        assert str(tmp_root(s)) not in r.text, r.text  # 14: no absolute path
    out.unlink()
    out.mkdir()
    deadline = time.monotonic() + 30
    while requests.get(f"{s.url}/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert_serves(s)


def tmp_root(s: Server) -> Path:
    return Path(s.log_path).parent.parent


def test_25_12_write_failure_in_a_run_is_503(unwritable_output: tuple[Server, Path]) -> None:
    # No /ready since the folder broke: the run itself meets the OSError
    # (it used to be 500 with "[Errno 17] File exists: '/abs/path/...'").
    s, out = unwritable_output
    r = s.run(image_only(batch=1), headers={"X-Task-Id": "ro-run"})
    assert r.status_code == 503, r.text
    assert r.headers.get("Retry-After"), r.headers
    err = error_of(r)
    assert err["type"] == "storage_unavailable" and "output folder" in err["message"], err
    assert str(tmp_root(s)) not in r.text, r.text
    # The next run is refused before it is queued, and the status reads the same.
    r = s.run(image_only(batch=1), headers={"X-Task-Id": "ro-run-2"})
    assert r.status_code == 503 and error_of(r)["type"] == "storage_unavailable", r.text
    final = s.wait_final("ro-run")[-1]
    assert final["data"]["error"]["type"] == "storage_unavailable"
