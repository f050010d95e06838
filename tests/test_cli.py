"""The command line, as a user runs it (a separate process)."""

from __future__ import annotations

import json
import os
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


def test_version_is_the_package_version() -> None:
    from comfy_embed import __version__
    out = subprocess.run([sys.executable, "-m", "comfy_embed.cli", "--version"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"comfy-embed {__version__}"


def test_install_comfyui_then_run_on_it(tmp_path: Path) -> None:
    """ComfyUI installed by the CLI (from the submodule, as from a mirror) into
    the cache folder, found there once named, and a workflow run on it; a
    missing one is refused naming both ways out."""
    # The user's git settings apply (a mirror's clone template, say).
    env = {**os.environ, "COMFY_EMBED_CACHE_DIR": str(tmp_path / "cache")}
    inst = subprocess.run([sys.executable, "-m", "comfy_embed.cli", "install-comfyui", "--from",
                           str(ROOT / "vendor" / "ComfyUI")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr
    folder = tmp_path / "cache" / "ComfyUI"
    assert f"ComfyUI a125cd84b054a57729b5eecab930ca9408719832 is in {folder}" in inst.stdout
    assert "left out: comfyui-frontend-package (the web UI" in inst.stdout
    # From this checkout the default is the submodule: the CLI says how to use this one.
    assert f"set COMFY_EMBED_COMFYUI_DIR={folder}" in inst.stdout

    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(image_only(batch=1)))
    run_env = {**env, "COMFY_EMBED_BASE_DIR": str(tmp_path / "data"),
               "COMFY_EMBED_DEVICE": "cpu", "COMFY_EMBED_COMFYUI_DIR": str(folder)}
    out = subprocess.run([sys.executable, "-m", "comfy_embed.cli", "run", str(wf)], cwd=tmp_path,
                         env=run_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["data"]["status"] == "success"

    run_env["COMFY_EMBED_COMFYUI_DIR"] = str(tmp_path / "none")
    missing = subprocess.run([sys.executable, "-m", "comfy_embed.cli", "run", str(wf)],
                             cwd=tmp_path, env=run_env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 1
    message = json.loads(missing.stdout)["data"]["error"]["message"]
    assert f"no ComfyUI at {tmp_path / 'none'}" in message
    assert "COMFY_EMBED_COMFYUI_DIR" in message and "comfy-embed install-comfyui" in message
