"""Issue 25 (1): file-name inputs without an upload marker (WebcamCapture's
``WEBCAM``, RecordAudio's ``AUDIO_RECORD``...) read other tasks' outputs and
any file on the server. Real server (uvicorn, ComfyUI on CPU), API keys on."""

from __future__ import annotations

import base64
import io
import re
import uuid
import wave
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import image_only
from tests.fakes.web_server import make_png
from tests.servers import Server

VICTIM = {"Authorization": "Bearer key-victim"}
ATTACKER = {"Authorization": "Bearer key-attacker"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("file-inputs"), api_keys="key-victim,key-attacker")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def base_dir(server: Server) -> Path:
    return Path(server.log_path).parent


def webcam(name: str) -> dict[str, Any]:
    return {"1": {"class_type": "WebcamCapture",
                  "inputs": {"image": name, "width": 0, "height": 0, "capture_on_queue": True}},
            "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}}


def refused_400(r: Any, name: str) -> str:
    """The answer is a validation 400 naming node 1's ``image`` input; its
    message with ``name`` blanked out."""
    assert r.status_code == 400, r.text
    data = r.json()["data"]
    assert data["status"] == "error" and not data.get("results"), data
    err = data["error"]
    entry = err["node_errors"]["1"]
    assert entry["class_type"] == "WebcamCapture"
    assert entry["errors"][0]["extra_info"]["input_name"] == "image"
    assert "Invalid image file" in err["message"]
    return str(err["message"]).replace(name, "<name>")


def victim_output(server: Server) -> tuple[str, Path]:
    task = "victim-" + uuid.uuid4().hex[:8]
    r = server.run(image_only(batch=1), headers={**VICTIM, "X-Task-Id": task})
    assert r.status_code == 200, r.text
    c = r.json()["data"]["results"][0]["output"]["comfy"]
    path = base_dir(server) / "output" / c["subfolder"] / c["filename"]
    assert path.is_file()
    return f"{c['subfolder']}/{c['filename']}", path


def test_webcam_cannot_read_another_tasks_output(server: Server) -> None:
    relative, path = victim_output(server)
    for name in (f"{relative} [output]", f"{relative}[output]", str(path),
                 f"../output/{relative}", f"{relative} [temp]"):
        r = server.run(webcam(name), "?output_base64=1", headers=ATTACKER)
        refused_400(r, name)


def test_webcam_cannot_read_files_elsewhere_and_tells_nothing(server: Server, tmp_path: Path) -> None:
    png = tmp_path / "secret.png"
    png.write_bytes(make_png())
    text = tmp_path / "secret.txt"
    text.write_text("not an image")
    missing = tmp_path / "missing.png"
    messages = set()
    for p in (png, text, missing):
        messages.add(refused_400(server.run(webcam(str(p)), "?output_base64=1",
                                            headers=ATTACKER), str(p)))
    # An existing image, a non-image and a missing file answer alike.
    assert len(messages) == 1, messages


def test_webcam_cannot_read_other_tasks_materialised_inputs(server: Server) -> None:
    # The victim sends an image inline: it is stored under serverless/<task>/.
    task = "victim-" + uuid.uuid4().hex[:8]
    data = make_png(color="blue")
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": base64.b64encode(data).decode()}},
         "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["1", 0]}}}
    r = server.run(g, headers={**VICTIM, "X-Task-Id": task})
    assert r.status_code == 200, r.text  # the task's own materialised input is readable
    folder = base_dir(server) / "input" / "serverless"
    # Plant one as if the victim's task were still running.
    planted = folder / "other-task" / ("0" * 64 + ".png")
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(data)
    name = f"serverless/other-task/{planted.name}"
    refused_400(server.run(webcam(name), headers=ATTACKER), name)


def test_webcam_still_reads_the_input_folder(server: Server) -> None:
    (base_dir(server) / "input" / "cam.png").write_bytes(make_png((16, 12)))
    r = server.run(webcam("cam.png"), headers=ATTACKER)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "success"


def wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 800)
    return buf.getvalue()


def test_record_audio_cannot_read_files_elsewhere(server: Server, tmp_path: Path) -> None:
    wav = tmp_path / "secret.wav"
    wav.write_bytes(wav_bytes())
    missing = tmp_path / "missing.wav"
    messages = set()
    for p in (wav, missing):
        g = {"1": {"class_type": "RecordAudio", "inputs": {"audio": str(p)}},
             "2": {"class_type": "SaveAudio", "inputs": {"filename_prefix": "a", "audio": ["1", 0]}}}
        r = server.run(g, "?output_base64=1", headers=ATTACKER)
        if r.status_code == 400 and "does not exist" in r.text:
            pytest.skip("RecordAudio or SaveAudio is not loaded in this ComfyUI")
        assert r.status_code in (400, 500), r.text
        data = r.json()["data"]
        assert data["status"] == "error" and not data.get("results"), data
        assert "refused" in data["error"]["message"], data["error"]
        messages.add(re.sub(re.escape(str(p)), "<name>", data["error"]["message"]))
    assert len(messages) == 1, messages
