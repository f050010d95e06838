"""A real server with COMFY_EMBED_LOCK: /ready and each task's report say
whether the instance is what its lock says (packs by git commit and import,
models by SHA-256), and each report carries the run record."""

from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import requests

from comfy_embed.environment.drift import differences
from comfy_embed.environment.lockfile import Lock, ModelPin, PackPin, dump_lock
from tests.environment.test_apply import git, make_pack
from tests.servers import ROOT, Server

GRAPH = json.loads(resources.files("comfy_embed.examples").joinpath("text_to_image.json").read_text())
GRAPH["5"]["inputs"].update(width=64, height=64)
GRAPH["3"]["inputs"].update(steps=2, seed=7)


def ready_answer(server: Server, timeout: float = 180) -> requests.Response:
    """/ready's first answer that is not 'starting'."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.log()}")
        try:
            r = requests.get(server.url + "/ready", timeout=2)
            if r.json().get("status") != "starting":
                return r
        except requests.RequestException:
            pass
        time.sleep(0.1)  # polling a booting process, bounded by the deadline
    raise TimeoutError(server.log())


def report_of(server: Server) -> dict[str, Any]:
    r = server.run(GRAPH)
    assert r.status_code == 200, r.text
    return r.json()["data"]["report"]


def test_drift_in_ready_and_in_the_report(tmp_path: Path) -> None:
    pack, commits = make_pack(tmp_path / "src" / "lock_pack", "")
    broken, broken_commits = make_pack(tmp_path / "src" / "lock_broken", "")
    (broken / "__init__.py").write_text('raise ImportError("lock_broken needs a thing")\n')
    (broken / "nodes.py").write_text('NODE_CLASS_MAPPINGS = {"LockBrokenNode": object}\n')
    git("add", ".", cwd=broken)
    git("commit", "--quiet", "-m", "break", cwd=broken)
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    git("clone", "--quiet", str(pack), "lock_pack", cwd=nodes)
    base = tmp_path / "base"
    model = base / "models" / "vae" / "lock-test.bin"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights" * 100)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    comfyui = git("rev-parse", "HEAD", cwd=ROOT / "vendor" / "ComfyUI")
    lock_file = tmp_path / "comfy-embed.lock"
    (tmp_path / "warmup.json").write_text(json.dumps(GRAPH))
    lock_file.write_text(dump_lock(Lock(
        comfyui, None, (PackPin("lock_pack", str(pack), commits[1]),),
        models=(ModelPin("vae", "lock-test.bin", sha),), warmup="warmup.json")))
    lock_hash = "sha256:" + hashlib.sha256(lock_file.read_bytes()).hexdigest()

    server = Server(base, custom_nodes=1, custom_nodes_dirs=nodes, lock=lock_file)
    try:
        body = ready_answer(server).json()
        assert body["status"] == "ready"
        assert body["lock"] == {"hash": lock_hash, "drifted": False,
                                "drift": {"packs": {}, "models": {}}}
        env = report_of(server)["environment"]
        assert "warm-up workflow done" in server.log_path.read_text()  # the lock's [warmup]
    finally:
        server.stop()
    tiny = Path.home() / ".cache" / "comfy-embed" / "tiny-sd15.safetensors"  # tests/servers.py
    assert env == {"comfy_embed": env["comfy_embed"], "comfyui": comfyui,
                   "packs": {"lock_pack": commits[1]},
                   "models": {"checkpoints/tiny-sd15.safetensors":
                              hashlib.sha256(tiny.read_bytes()).hexdigest()},
                   "torch": env["torch"], "device": "cpu", "lock": lock_hash,
                   "drift": {"packs": {}, "models": {}}}
    assert env["torch"] and env["comfy_embed"]

    # The pack moved to its first commit, a locked pack that fails to import,
    # the model file altered, an unlocked pack: named in /ready (503 with
    # lock_drift=unready) and in the report; the server still runs tasks.
    git("-c", "advice.detachedHead=false", "checkout", "--quiet", commits[0],
        cwd=nodes / "lock_pack")
    git("clone", "--quiet", str(broken), "lock_broken", cwd=nodes)
    git("clone", "--quiet", str(pack), "stray_pack", cwd=nodes)
    broken_head = git("rev-parse", "HEAD", cwd=nodes / "lock_broken")
    assert broken_head not in broken_commits
    lock_file.write_text(dump_lock(Lock(
        comfyui, None, (PackPin("lock_pack", str(pack), commits[1]),
                        PackPin("lock_broken", str(broken), broken_head)),
        models=(ModelPin("vae", "lock-test.bin", sha),))))
    model.write_bytes(b"other" * 100)
    altered = hashlib.sha256(model.read_bytes()).hexdigest()
    server = Server(base, custom_nodes=1, custom_nodes_dirs=nodes, lock=lock_file,
                    lock_drift="unready")
    try:
        r = ready_answer(server)
        drift = {"packs": {"lock_pack": f"at {commits[0]}, the lock says {commits[1]}",
                           "lock_broken": "failed to import: ImportError: lock_broken needs a thing",
                           "stray_pack": "not in the lock"},
                 "models": {"vae/lock-test.bin": f"sha256 {altered}, the lock says {sha}"}}
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "drifted"
        assert r.json()["lock"]["drift"] == drift and r.json()["lock"]["drifted"] is True
        env2 = report_of(server)["environment"]
        # /validate names the pack a missing node comes from, and why it is missing.
        v = requests.post(server.url + "/api/serverless/validate", timeout=60,
                          json={"1": {"class_type": "LockBrokenNode", "inputs": {}},
                                "2": {"class_type": "NoPackHasThis", "inputs": {}}}).json()
        assert v["missing_nodes"] == [
            {"node_id": "1", "class_type": "LockBrokenNode",
             "pack": {"name": "lock_broken", "url": str(broken), "commit": broken_head,
                      "state": drift["packs"]["lock_broken"]}},
            {"node_id": "2", "class_type": "NoPackHasThis"}]
    finally:
        server.stop()
    assert env2["drift"] == drift
    assert differences(env, env2)["packs"] == {
        "lock_pack": {"recorded": commits[1], "now": commits[0]},
        "lock_broken": {"recorded": None, "now": broken_head},
        "stray_pack": {"recorded": None, "now": commits[1]}}
    assert "lock" in differences(env, env2)


def test_a_lock_that_cannot_be_read_fails_the_boot_naming_the_entry(tmp_path: Path) -> None:
    lock_file = tmp_path / "comfy-embed.lock"
    lock_file.write_text('[[packs]]\nname = "p"\nurl = "/x"\ncommit = "main"\n')
    server = Server(tmp_path / "base", lock=lock_file)
    try:
        r = ready_answer(server)
        assert r.status_code == 500
        assert "pack p: commit must be 40 hex digits, not 'main'" in r.json()["error"]
    finally:
        server.stop()


def test_the_locks_models_are_fetched_at_boot(tmp_path: Path) -> None:
    """A lock's model with a URL is downloaded (verified) before /ready, as a
    manifest's; then there is no drift."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "served"
    served.mkdir()
    (served / "m.bin").write_bytes(b"model bytes" * 1000)
    sha = hashlib.sha256((served / "m.bin").read_bytes()).hexdigest()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        SimpleHTTPRequestHandler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    lock_file = tmp_path / "comfy-embed.lock"
    url = f"http://127.0.0.1:{httpd.server_address[1]}/m.bin"
    lock_file.write_text(dump_lock(Lock(models=(ModelPin("vae", "m.bin", sha, url),))))
    base = tmp_path / "base"
    server = Server(base, lock=lock_file, url_allowlist="127.0.0.1")
    try:
        body = ready_answer(server).json()
        assert body["status"] == "ready", body
        assert body["lock"]["drift"] == {"packs": {}, "models": {}}
        assert (base / "models" / "vae" / "m.bin").read_bytes() == (served / "m.bin").read_bytes()
    finally:
        server.stop()
        httpd.shutdown()
        httpd.server_close()
