"""The workflows people actually use, through the real HTTP API: a custom-node
pack using the server surface, native's request envelope, partial execution,
non-file outputs, audio and video in and out, and the dry run."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import av
import pytest
import requests

from tests.fakes import FakeOss
from tests.fakes.file_server import Files, serve_files
from tests.fakes.media import make_mp4, make_wav

from tests.conftest import image_only, text_to_image
from tests.servers import ROOT, Server

PACKS = ROOT / "tests" / "custom_nodes"


@pytest.fixture(scope="module")
def oss() -> Iterator[FakeOss]:
    fake = FakeOss(keys={"wf-key": "wf-secret"})
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, oss: FakeOss) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("wf"), custom_nodes=1, custom_nodes_dirs=PACKS,
               url_allowlist="127.0.0.1", fetch_timeout=5, max_media_seconds=30,
               raw_env={"OSS_ACCESS_KEY_ID": "wf-key", "OSS_ACCESS_KEY_SECRET": "wf-secret"},
               oss_bucket="test-bucket", oss_endpoint=oss.endpoint, oss_region="cn-hangzhou",
               oss_link_expire=600)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def stream(server: Server, body: Any, params: str = "") -> list[dict[str, Any]]:
    r = requests.post(f"{server.url}/api/serverless/run?stream=1{params}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


# ------------------------------------------------------------- custom-node packs
def test_ready_names_loaded_and_failing_packs(server: Server) -> None:
    body = requests.get(server.url + "/ready", timeout=5).json()
    assert body["status"] == "ready"
    assert "embed_test_pack" in body["custom_nodes"]["loaded"]
    failed = body["custom_nodes"]["failed"]
    assert "not_installed_anywhere" in failed["embed_broken_pack"]
    # The traceback is logged once, under the pack's name, and the summary names it.
    log = server.log_path.read_text()
    assert log.count('embed_broken_pack/__init__.py", line 4') == 1
    assert "FAILED: embed_broken_pack" in log


def test_pack_using_the_server_surface_runs(server: Server) -> None:
    graph = {"1": {"class_type": "EmbedTestEcho", "inputs": {"text": "REWRITE_ME"}},
             "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    r = requests.post(f"{server.url}/api/serverless/run?stream=1", timeout=120,
                      headers={"X-Task-Id": "pack-surface"},
                      json={"prompt": graph, "client_id": "my-client",
                            "extra_data": {"embed_test_marker": "m-1"}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    final = events[-1]
    assert final["type"] == "serverless_api" and final["data"]["status"] == "success", final
    # The on-prompt handler rewrote the request (the failing one was skipped).
    out = final["data"]["outputs"]["1"]
    assert out["text"] == ["rewritten"] and out["length"] == [9]
    info = out["info"][0]
    assert info["prompt_id"] == final["data"]["prompt_id"]
    assert info["running"] == 1 and info["remaining"] >= 1
    assert info["extra_marker"] == "m-1" and info["client_id"] == "my-client"
    assert info["last_node_id"] == "1" and info["number"] >= 1
    assert {"/embed_test/hello", "/embed_test/files", "/embed_test/app"} <= set(info["routes"])
    assert info["supports_web"] and info["prestartup_ran"]
    assert final["data"]["outputs"]["2"] == {"text": ["rewritten"]}
    texts = [e["data"] for e in events if e["type"] == "progress_text"]
    assert {"node": "1", "text": "echo rewritten", "prompt_id": info["prompt_id"]} in texts
    assert any(t["text"] == "binary text" for t in texts)
    assert {"node": "1", "text": "rewritten"} in [e["data"] for e in events
                                                  if e["type"] == "embed_test.echo"]
    assert "on-prompt handler failing_on_prompt failed" in server.log_path.read_text()
    # A value JSON cannot hold arrives as a string, and the task log is whole.
    assert {"node": "1", "value": "odd"} in [e["data"] for e in events
                                             if e["type"] == "embed_test.odd"]
    assert out["odd"] == ["odd"]
    logged = server.wait_final("pack-surface")
    assert logged[-1]["data"]["outputs"] == final["data"]["outputs"]
    assert "embed_test.odd" in [e["type"] for e in logged]


# ------------------------------------------------------------ non-file outputs
def test_text_outputs_in_the_non_streamed_result(server: Server) -> None:
    graph = image_only(batch=1, size=16)
    graph["4"] = {"class_type": "GetImageSize", "inputs": {"image": ["1", 0]}}
    graph["5"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}
    r = server.run(graph)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["outputs"]["5"] == {"text": ["16"]}
    assert [x["node_id"] for x in data["results"]] == ["3"]
    assert "3" not in data["outputs"]  # files are results, not outputs


# ------------------------------------------------------ native's request envelope
def test_partial_execution_targets_run_only_those_outputs(server: Server) -> None:
    graph = image_only(batch=1, size=16)
    graph["4"] = {"class_type": "SaveImage", "inputs": {"filename_prefix": "other",
                                                        "images": ["1", 0]}}
    graph["5"] = {"class_type": "PreviewAny", "inputs": {"source": "not run"}}
    r = server.run({"prompt": graph, "partial_execution_targets": ["4"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [x["node_id"] for x in data["results"]] == ["4"]
    assert data["outputs"] == {}
    r = server.run({"prompt": graph, "partial_execution_targets": ["4", "77"]})
    assert r.status_code == 400
    assert "77" in r.json()["data"]["error"]["message"]
    r = server.run({"prompt": graph, "partial_execution_targets": "4"})
    assert r.status_code == 400
    assert "partial_execution_targets" in r.json()["data"]["error"]["message"]


def test_envelope_extra_data_reaches_nodes(server: Server) -> None:
    from PIL import Image

    workflow = {"nodes": [], "links": [], "note": "from extra_pnginfo"}
    r = server.run({"prompt": image_only(batch=1, size=16), "client_id": "c",
                    "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    assert r.status_code == 200, r.text
    c = r.json()["data"]["results"][0]["output"]["comfy"]
    with Image.open(server.file_of(c)) as im:
        assert json.loads(im.info["workflow"]) == workflow  # as native SaveImage writes it


# ------------------------------------------------------------------- dry run
def validate(server: Server, body: Any) -> dict[str, Any]:
    r = requests.post(f"{server.url}/api/serverless/validate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_validate_names_missing_nodes_and_suggests_models(server: Server) -> None:
    graph = text_to_image(steps=2)
    graph["4"]["inputs"]["ckpt_name"] = "tiny-sd15.safetensor"
    graph["10"] = {"class_type": "NoSuchNode", "inputs": {}}
    report = validate(server, graph)
    assert report["valid"] is False
    assert report["missing_nodes"] == [{"node_id": "10", "class_type": "NoSuchNode"}]
    assert "node 10 (NoSuchNode) does not exist" in report["error"]["message"]
    # ComfyUI's check stops at the missing node: it is the only one named in
    # node_errors (the README's example says so), the checkpoint is under
    # missing_models, and no output is listed.
    assert list(report["node_errors"]) == ["10"] and report["outputs"] == []
    assert report["node_errors"]["10"]["class_type"] == "NoSuchNode"
    (missing,) = report["missing_models"]
    assert missing["node_id"] == "4" and missing["input"] == "ckpt_name"
    assert missing["folder"] == "checkpoints"
    assert missing["closest"][0] == "tiny-sd15.safetensors"
    # Without the missing node, ComfyUI's own validation names the input too.
    del graph["10"]
    report = validate(server, graph)
    assert report["valid"] is False and report["missing_nodes"] == []
    assert report["node_errors"]["4"]["errors"][0]["extra_info"]["input_name"] == "ckpt_name"


def test_undeclared_constants_reach_nodes_that_admit_any_name(server: Server) -> None:
    # Issue 25 (3) drops constants a node does not declare, asking as ComfyUI
    # does ("name in section"): a pack's section that admits any name (rgthree's
    # Power Lora Loader) keeps them; other nodes lose theirs.
    graph = {"1": {"class_type": "EmbedTestFlexible",
                   "inputs": {"lora_1": {"on": True, "lora": "a.safetensors"}, "extra": "v"}},
             "2": {"class_type": "EmbedTestEcho", "inputs": {"text": "t", "junk": "x" * 1000}}}
    r = server.run(graph)
    assert r.status_code == 200, r.text
    outputs = r.json()["data"]["outputs"]
    assert outputs["1"]["text"] == ["extra=v", "lora_1={'on': True, 'lora': 'a.safetensors'}"]
    assert outputs["2"]["text"] == ["t"]


def test_api_nodes_load_only_when_enabled(server: Server, tmp_path: Path) -> None:
    # Issue 25: ComfyUI's API (partner) nodes were never loaded, and nothing
    # said so; COMFY_EMBED_API_NODES=1 loads them.
    graph = {"1": {"class_type": "OpenAIDalle3", "inputs": {"prompt": "a cat"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}
    report = validate(server, graph)
    assert report["missing_nodes"] == [{"node_id": "1", "class_type": "OpenAIDalle3"}]
    with_api = Server(tmp_path / "api-nodes", api_nodes=1)
    try:
        report = validate(with_api.wait_ready(), graph)
        assert report["missing_nodes"] == [], report
        assert "1" not in report["node_errors"], report
    finally:
        with_api.stop()


def test_validate_a_runnable_workflow_runs_nothing(server: Server) -> None:
    graph = text_to_image(steps=2)
    graph["9"]["inputs"]["filename_prefix"] = "dry-run-only"
    queued = server.log_path.read_text().count("queued as prompt")
    report = validate(server, graph)
    assert report["valid"] is True and report["error"] is None, report
    assert report["outputs"] == ["9"]
    (model,) = report["models"]
    assert model["name"] == "tiny-sd15.safetensors" and model["folder"] == "checkpoints"
    # No absolute server path (issue 25, 14): the tiny checkpoint lives in
    # the cache folder, outside the server's folders, so it is named by its
    # model folder.
    assert model["path"] == "<checkpoints>/tiny-sd15.safetensors", model
    cached = Path.home() / ".cache" / "comfy-embed" / "tiny-sd15.safetensors"
    assert model["bytes"] == cached.stat().st_size
    out = Path(server.log_path).parent / "output"
    assert not list(out.rglob("dry-run-only*"))  # nothing executed
    assert server.log_path.read_text().count("queued as prompt") == queued


def test_validate_draws_random_seeds_as_a_run_does(server: Server) -> None:
    """The bundled example's seed is -1 (a run draws one): valid, not ComfyUI's 'below min'."""
    graph = text_to_image(steps=2)
    graph["3"]["inputs"]["seed"] = -1
    report = validate(server, graph)
    assert report["valid"] is True and report["error"] is None, report


def test_validate_reports_bad_json_and_bad_inputs(server: Server) -> None:
    r = requests.post(f"{server.url}/api/serverless/validate", data=b"{not json", timeout=30)
    assert r.status_code == 200 and r.json()["valid"] is False
    assert r.json()["error"]["type"] == "invalid_json"
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "no-such-file.png"}},
             "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    report = validate(server, graph)
    assert report["valid"] is False
    assert report["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == "image"


# ------------------------------------------------------------ audio and video
@pytest.fixture(scope="module")
def files() -> Iterator[Files]:
    with serve_files() as f:
        f.files["/tone.wav"] = make_wav()
        f.files["/clip.mp4"] = make_mp4()
        f.files["/long.wav"] = make_wav(seconds=31)
        f.files["/playlist.m3u8"] = b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n"
        yield f


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_graph(value: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadAudio", "inputs": {"audio": value}},
            "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "a"}},
            "3": {"class_type": "SaveAudioMP3", "inputs": {"audio": ["1", 0], "filename_prefix": "a",
                                                           "quality": "128k"}}}


def video_graph(value: str) -> dict[str, Any]:
    return {"1": {"class_type": "LoadVideo", "inputs": {"file": value}},
            "2": {"class_type": "SaveVideo", "inputs": {"video": ["1", 0], "filename_prefix": "v",
                                                        "format": "mp4", "codec": "h264"}},
            "3": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
            "4": {"class_type": "SaveWEBM", "inputs": {"images": ["3", 0], "filename_prefix": "w",
                                                       "codec": "vp9", "fps": 6.0, "crf": 40.0}},
            "5": {"class_type": "SaveAnimatedWEBP", "inputs": {
                "images": ["3", 0], "filename_prefix": "p", "fps": 6.0, "lossless": False,
                "quality": 60, "method": "default"}}}


@pytest.mark.parametrize("source", ["base64", "data_uri", "url"])
def test_audio_input_and_outputs(server: Server, files: Files, source: str) -> None:
    wav = files.files["/tone.wav"]
    value = {"base64": b64(wav), "data_uri": "data:audio/wav;base64," + b64(wav),
             "url": files.base + "/tone.wav"}[source]
    r = server.run(audio_graph(value), "?output_base64=1")
    assert r.status_code == 200, r.text
    results = r.json()["data"]["results"]
    by_node = {x["node_id"]: x["output"] for x in results}
    assert by_node["2"]["media_type"] == "audio/flac"
    assert base64.b64decode(by_node["2"]["base64"]["data"])[:4] == b"fLaC"
    assert by_node["3"]["media_type"] == "audio/mpeg"
    mp3 = base64.b64decode(by_node["3"]["base64"]["data"])
    assert mp3[:3] == b"ID3" or mp3[0] == 0xFF
    # The input was stored for this task only (under its content hash, as
    # images are: tests/inputs/test_fetch.py) and removed when the task ended (issue 9).
    stored = Path(server.log_path).parent / "input" / "serverless"
    assert not (stored / r.headers["X-Task-Id"]).exists()
    assert not list(stored.rglob(hashlib.sha256(wav).hexdigest() + ".wav"))


@pytest.mark.parametrize("source", ["base64", "url"])
def test_video_input_and_outputs(server: Server, files: Files, source: str) -> None:
    mp4 = files.files["/clip.mp4"]
    value = b64(mp4) if source == "base64" else files.base + "/clip.mp4"
    r = server.run(video_graph(value), "?output_base64=1")
    assert r.status_code == 200, r.text
    by_node = {x["node_id"]: x["output"] for x in r.json()["data"]["results"]}
    assert by_node["2"]["media_type"] == "video/mp4"
    assert base64.b64decode(by_node["2"]["base64"]["data"])[4:8] == b"ftyp"
    assert by_node["4"]["media_type"] == "video/webm"
    assert base64.b64decode(by_node["4"]["base64"]["data"])[:4] == b"\x1a\x45\xdf\xa3"
    assert by_node["5"]["media_type"] == "image/webp"
    c = by_node["2"]["comfy"]
    with av.open(str(server.file_of(c))) as box:
        assert box.streams.video[0].codec_context.width == 32
        assert sum(1 for _ in box.decode(video=0)) == 6


def test_media_outputs_upload_to_object_storage(server: Server, files: Files) -> None:
    graph = audio_graph(files.base + "/tone.wav")
    for node_id, node in video_graph(files.base + "/clip.mp4").items():
        graph["v" + node_id] = node
        node["inputs"] = {k: ["v" + v[0], v[1]] if isinstance(v, list) else v
                          for k, v in node["inputs"].items()}
    r = server.run(graph, "?output_oss=1")
    assert r.status_code == 200, r.text
    kinds = {}
    for res in r.json()["data"]["results"]:
        out = res["output"]
        got = requests.get(out["oss"]["url"], timeout=10)
        assert got.status_code == 200
        assert got.headers["Content-Type"] == out["media_type"]
        assert out["oss"]["object"].rsplit(".", 1)[1] == out["comfy"]["filename"].rsplit(".", 1)[1]
        kinds[res["node_id"]] = out["media_type"]
    assert kinds == {"2": "audio/flac", "3": "audio/mpeg", "v2": "video/mp4",
                     "v4": "video/webm", "v5": "image/webp"}


@pytest.mark.parametrize("graph, value, needle", [
    ("audio", "text", "not audio"),
    ("audio", "long", "31.0s is over the 30s limit"),
    ("audio", "playlist", "not audio"),
    ("video", "wav", "base64 video: not video"),
    ("video", "truncated", "video"),
    ("audio", "private", "refused"),
    # Issue 25: raw base64 without a known signature was read as a file name (400).
    ("audio", "raw", "base64 audio: not audio"),
    ("video", "raw", "base64 video: not video"),
])
def test_bad_media_inputs_are_named(server: Server, files: Files, graph: str, value: str,
                                    needle: str) -> None:
    v = {"text": "data:audio/wav;base64," + b64(b"hello, not audio at all" * 4),
         "long": files.base + "/long.wav",
         "playlist": files.base + "/playlist.m3u8",
         "wav": b64(files.files["/tone.wav"]),
         "truncated": b64(files.files["/clip.mp4"][:200]),
         "private": "http://10.0.0.1/x.wav",
         "raw": b64(b"plain text, base64-encoded, no audio or video signature " * 8)}[value]
    g = audio_graph(v) if graph == "audio" else video_graph(v)
    r = server.run(g)
    assert r.status_code == 422, r.text
    err = r.json()["data"]["error"]
    name = "audio" if graph == "audio" else "file"
    assert err["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"] == name
    assert needle in err["message"], err["message"]
    assert f"node 1 ({'LoadAudio' if graph == 'audio' else 'LoadVideo'}) input '{name}'" in err["message"]


def test_validate_checks_media_inputs(server: Server, files: Files) -> None:
    good = validate(server, audio_graph(b64(files.files["/tone.wav"])))
    assert good["valid"] is True, good
    assert good["outputs"] == ["2", "3"]
    bad = validate(server, video_graph(files.base + "/playlist.m3u8"))
    assert bad["valid"] is False
    assert bad["error"]["type"] == "image_input_error"
    assert "not video" in bad["node_errors"]["1"]["errors"][0]["message"]
