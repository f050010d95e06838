"""Models by URL: a manifest fetched into a shared models folder, once across
instances, verified, atomic; refusals named. Real HTTP from a loopback server."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from comfy_embed import Settings
from comfy_embed.errors import ModelDownloadError
from comfy_embed.inputs.models import ensure_models, load_manifest
from tests.conftest import image_only
from tests.fakes.file_server import Files, serve_files
from tests.servers import Server

MODEL = random.Random(7).randbytes(3 * 1024 * 1024)
OTHER = random.Random(8).randbytes(200_000)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def files() -> Iterator[Files]:
    with serve_files() as f:
        f.files["/model.bin"] = MODEL
        f.files["/other.bin"] = OTHER
        f.files["/moved"] = b""
        yield f


def manifest(tmp_path: Path, entries: list[dict[str, Any]]) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"models": entries}))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.suffix in (".part", ".lock", ".tmp")
                  or ".stale-" in p.name or p.name.endswith(".lock"))


# ------------------------------------------------- two real servers, one download
def test_two_servers_download_each_model_once(tmp_path: Path, files: Files) -> None:
    files.chunk_delay = 0.05  # ~2.5 s for the big file: the servers overlap
    models = tmp_path / "shared-models"
    # A lock left by a downloader that died an hour ago: taken over.
    (models / "loras").mkdir(parents=True)
    stale = models / "loras" / ".other.safetensors.lock"
    stale.write_text("dead-host-1-abc")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    path = manifest(tmp_path, [
        {"url": files.base + "/model.bin", "sha256": sha(MODEL), "folder": "checkpoints",
         "name": "manifest-model.safetensors"},
        {"url": files.base + "/other.bin", "sha256": sha(OTHER), "folder": "loras",
         "name": "other.safetensors"}])
    env = dict(models_dir=models, models_manifest=path, url_allowlist="127.0.0.1",
               model_hosts="127.0.0.1", model_lock_seconds=2, tiny_checkpoint=0)
    servers = [Server(tmp_path / name, **env) for name in ("a", "b")]  # started together
    try:
        for s in servers:
            s.wait_ready()
        assert files.count("/model.bin") == 1 and files.count("/other.bin") == 1
        assert (models / "checkpoints" / "manifest-model.safetensors").read_bytes() == MODEL
        assert (models / "loras" / "other.safetensors").read_bytes() == OTHER
        assert leftovers(models) == []
        logs = "".join(s.log_path.read_text() for s in servers)
        assert logs.count("model checkpoints/manifest-model.safetensors: downloading") == 1
        assert "taking over from a downloader that stopped" in logs
        # The dry run sees the downloaded model as one the run would load.
        graph = {"1": {"class_type": "CheckpointLoaderSimple",
                       "inputs": {"ckpt_name": "manifest-model.safetensors"}},
                 "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
        report = requests.post(servers[1].url + "/api/serverless/validate", json=graph,
                               timeout=30).json()
        assert [(m["name"], m["bytes"]) for m in report["models"]] == [
            ("manifest-model.safetensors", len(MODEL))]
    finally:
        for s in servers:
            s.stop()
    # A restart finds the files (verified through their markers): no download.
    again = Server(tmp_path / "c", **env)
    try:
        again.wait_ready()
        assert files.count("/model.bin") == 1
    finally:
        again.stop()


def test_corrupt_download_is_refused_and_named(tmp_path: Path, files: Files) -> None:
    files.files["/model.bin"] = MODEL[:-1] + b"!"  # one byte off
    models = tmp_path / "models"
    path = manifest(tmp_path, [{"url": files.base + "/model.bin", "sha256": sha(MODEL),
                                "folder": "checkpoints", "name": "m.safetensors"}])
    s = Server(tmp_path / "srv", models_dir=models, models_manifest=path,
               url_allowlist="127.0.0.1", tiny_checkpoint=0)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = requests.get(s.url + "/ready", timeout=2)
                if r.status_code != 503:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.2)  # polling a booting process, bounded by the deadline
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert "checkpoints/m.safetensors" in error and "does not match" in error
        assert not (models / "checkpoints" / "m.safetensors").exists()
        assert leftovers(models) == []
        # Nothing is queued on an instance that failed to boot.
        assert s.run({"1": {"class_type": "PreviewAny", "inputs": {"source": "x"}}}).status_code == 503
    finally:
        s.stop()


# ------------------------------------------------------------ in-process refusals
def settings_for(tmp_path: Path, path: Path, **kw: Any) -> Settings:
    return Settings(base_dir=tmp_path, models_manifest=path, **kw)


def test_host_allowlist_and_address_rules(tmp_path: Path, files: Files) -> None:
    entry = {"url": files.base + "/other.bin", "sha256": sha(OTHER), "folder": "loras",
             "name": "o.safetensors"}
    path = manifest(tmp_path, [entry])
    with pytest.raises(ModelDownloadError, match="loras/o.safetensors.*loopback"):
        ensure_models(settings_for(tmp_path, path))
    with pytest.raises(ModelDownloadError, match="not in COMFY_EMBED_MODEL_HOSTS"):
        ensure_models(settings_for(tmp_path, path, url_allowlist=("127.0.0.1",),
                                   model_hosts=("huggingface.co", "*.hf.co")))
    assert files.count("/other.bin") == 0
    (out,) = ensure_models(settings_for(tmp_path, path, url_allowlist=("127.0.0.1",),
                                        model_hosts=("127.0.0.1",)))
    assert out.read_bytes() == OTHER


def test_a_different_file_of_the_same_name_is_not_overwritten(tmp_path: Path, files: Files) -> None:
    target = tmp_path / "models" / "loras" / "o.safetensors"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"somebody else's lora")
    path = manifest(tmp_path, [{"url": files.base + "/other.bin", "sha256": sha(OTHER),
                                "folder": "loras", "name": "o.safetensors"}])
    with pytest.raises(ModelDownloadError, match="exists with sha256 .* not overwritten"):
        ensure_models(settings_for(tmp_path, path, url_allowlist=("127.0.0.1",)))
    assert target.read_bytes() == b"somebody else's lora"


@pytest.mark.parametrize("entry, message", [
    ({"url": "ftp://x/y", "sha256": "0" * 64, "folder": "loras", "name": "a"}, "url must be"),
    ({"url": "https://x/y", "sha256": "abc", "folder": "loras", "name": "a"}, "sha256 must be"),
    ({"url": "https://x/y", "sha256": "0" * 64, "folder": "../etc", "name": "a"}, "folder must be"),
    ({"url": "https://x/y", "sha256": "0" * 64, "folder": "loras", "name": "../../a"}, "name must be"),
    ({"url": "https://x/y", "sha256": "0" * 64, "folder": "loras", "name": "/etc/a"}, "name must be"),
    ({"url": "https://x/y", "sha256": "0" * 64, "folder": "loras", "name": "a", "size": 0},
     "size must be"),
    ({"url": "https://x/y", "sha256": "0" * 64, "folder": "loras", "name": "a", "size": "1 GB"},
     "size must be"),
    ({"url": "https://x/y", "sha256": "0" * 64, "folder": "loras", "name": "a", "size": True},
     "size must be"),
])
def test_bad_manifest_entries_are_named(tmp_path: Path, entry: dict[str, Any], message: str) -> None:
    path = manifest(tmp_path, [entry])
    with pytest.raises(ValueError, match=f"entry 0: {message}"):
        load_manifest(path)


def test_first_use_fetches_when_a_workflow_names_the_model(tmp_path: Path, files: Files) -> None:
    from safetensors.torch import save

    lora = save({})  # an empty LoRA: loads, changes nothing
    files.files["/lora.safetensors"] = lora
    files.files["/bad.safetensors"] = lora + b" "
    path = manifest(tmp_path, [
        {"url": files.base + "/lora.safetensors", "sha256": sha(lora), "folder": "loras",
         "name": "lazy.safetensors"},
        {"url": files.base + "/bad.safetensors", "sha256": sha(lora), "folder": "loras",
         "name": "bad.safetensors"}])
    s = Server(tmp_path / "lazy", models_manifest=path, models_fetch="first_use",
               url_allowlist="127.0.0.1")

    def graph(lora_name: str) -> dict[str, Any]:
        return {"1": {"class_type": "CheckpointLoaderSimple",
                      "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
                "2": {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}},
                "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    try:
        s.wait_ready()
        assert files.count("/lora.safetensors") == 0  # nothing fetched at start-up
        report = requests.post(s.url + "/api/serverless/validate", json=graph("lazy.safetensors"),
                               timeout=30).json()
        assert report["missing_models"][0]["manifest_url"] == files.base + "/lora.safetensors"
        r = s.run(graph("lazy.safetensors"))
        assert r.status_code == 200, r.text
        assert files.count("/lora.safetensors") == 1
        assert (tmp_path / "lazy" / "models" / "loras" / "lazy.safetensors").read_bytes() == lora
        assert s.run(graph("lazy.safetensors")).status_code == 200
        assert files.count("/lora.safetensors") == 1
        r = s.run(graph("bad.safetensors"))
        assert r.status_code == 502, r.text
        err = r.json()["data"]["error"]
        assert err["type"] == "model_download_error"
        assert "node 2 (LoraLoaderModelOnly) input 'lora_name'" in err["message"]
        assert "loras/bad.safetensors" in err["message"] and "does not match" in err["message"]
        assert err["node_errors"]["2"]["errors"][0]["extra_info"]["input_name"] == "lora_name"
    finally:
        s.stop()


# ------------------------------------------------- issue 25 (7, 13), real servers
def lora_graph(lora_name: str) -> dict[str, Any]:
    return {"1": {"class_type": "CheckpointLoaderSimple",
                  "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
            "2": {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}


def test_first_use_failures_are_remembered_and_waiters_hold_no_thread(
        tmp_path: Path, files: Files) -> None:
    from safetensors.torch import save

    lora = save({})
    files.files["/bad.safetensors"] = lora + b" " * 1_000_000
    files.files["/held.safetensors"] = lora
    release = files.holds["/held.safetensors"] = threading.Event()
    path = manifest(tmp_path, [
        {"url": files.base + "/bad.safetensors", "sha256": sha(lora), "folder": "loras",
         "name": "bad.safetensors"},
        {"url": files.base + "/held.safetensors", "sha256": sha(lora), "folder": "loras",
         "name": "held.safetensors"}])
    s = Server(tmp_path / "remember", models_manifest=path, models_fetch="first_use",
               url_allowlist="127.0.0.1")
    try:
        s.wait_ready()
        # A download that failed its sha256 used to be downloaded again, whole,
        # by every request naming it (5 requests, 5 downloads).
        for i in range(5):
            r = s.run(lora_graph("bad.safetensors"))
            assert r.status_code == 502, r.text
            message = r.json()["data"]["error"]["message"]
            assert "does not match" in message
            assert i == 0 or "not tried again for COMFY_EMBED_MODEL_RETRY_SECONDS" in message
        assert files.count("/bad.safetensors") == 1

        # 45 requests wait on one download that does not end (more than the
        # 40 worker threads that used to be held, one per waiting request)...
        done = s.run(image_only(batch=1))
        assert done.status_code == 200
        answers: list[int] = []
        waiting = [threading.Thread(target=lambda: answers.append(
            s.run(lora_graph("held.safetensors")).status_code)) for _ in range(45)]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 60
        while files.count("/held.safetensors") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)  # until the download has started
        # ... and the status of a finished task, read through a worker
        # thread, still answers meanwhile.
        events = s.status(done.headers["X-Task-Id"])
        assert events[-1]["type"] == "serverless_api" and not release.is_set()
        release.set()
        for t in waiting:
            t.join(120)
        assert answers == [200] * 45
        assert files.count("/held.safetensors") == 1
    finally:
        release.set()
        s.stop()


def test_manifest_downloads_are_bounded_in_size(tmp_path: Path, files: Files) -> None:
    # 600 MiB used to reach the disk before the sha check refused it.
    files.files["/declared.bin"] = MODEL
    files.files["/undeclared.bin"] = MODEL
    files.undeclared.add("/undeclared.bin")
    models = tmp_path / "models"
    path = manifest(tmp_path, [
        # The manifest says 1000 bytes; the server declares 3 MiB.
        {"url": files.base + "/declared.bin", "sha256": sha(MODEL), "folder": "loras",
         "name": "declared.safetensors", "size": 1000},
        # No size: COMFY_EMBED_MODEL_MAX_BYTES (1 MB) bounds the undeclared body.
        {"url": files.base + "/undeclared.bin", "sha256": sha(MODEL), "folder": "loras",
         "name": "undeclared.safetensors"}])
    s = Server(tmp_path / "bounded", models_dir=models, models_manifest=path,
               models_fetch="first_use", url_allowlist="127.0.0.1", model_max_bytes=1_000_000)
    try:
        s.wait_ready()
        r = s.run(lora_graph("declared.safetensors"))
        assert r.status_code == 502, r.text
        message = r.json()["data"]["error"]["message"]
        assert "Content-Length 3145728 does not fit the manifest's size (1000 bytes)" in message
        assert "refused before reading" in message
        r = s.run(lora_graph("undeclared.safetensors"))
        assert r.status_code == 502, r.text
        message = r.json()["data"]["error"]["message"]
        assert "over COMFY_EMBED_MODEL_MAX_BYTES (1000000 bytes); stopped" in message
        assert not list((models / "loras").glob("*.safetensors"))
        assert leftovers(models) == []
    finally:
        s.stop()
