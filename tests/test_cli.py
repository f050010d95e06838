"""The command line, as a user runs it (a separate process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import image_only

pytestmark = pytest.mark.server  # runs the CLI, which boots real ComfyUI

ROOT = Path(__file__).resolve().parent.parent


def test_cli_run_writes_images(tmp_path: Path) -> None:
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(image_only(batch=2)))
    env = {"COMFY_EMBED_BASE_DIR": str(tmp_path / "data"), "COMFY_EMBED_DEVICE": "cpu",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "comfy_embed.cli", "run", str(wf), "--out",
                          str(tmp_path / "out"), "--progress"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["data"]["status"] == "success"
    copied = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in copied] == ["inverted_00001_.png", "inverted_00002_.png"]
    assert "running node 3" in out.stderr

    bad = tmp_path / "bad.json"
    bad.write_text('{"1": {"class_type": "Nope", "inputs": {}}}')
    fail = subprocess.run([sys.executable, "-m", "comfy_embed.cli", "run", str(bad)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert fail.returncode == 1
    assert "Nope" in json.loads(fail.stdout)["data"]["error"]["message"]
