"""comfy-embed lock from a ComfyUI-Manager snapshot, with real git."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from comfy_embed.environment.lockfile import dump_lock, parse_lock
from comfy_embed.environment.make import lock_from_snapshot
from comfy_embed.errors import InstallError
from tests.environment.test_apply import make_pack


def test_a_snapshot_becomes_a_lock_pinned_by_its_pips(tmp_path: Path) -> None:
    pack, commits = make_pack(tmp_path / "ComfyUI-Thing", "packaging\ncomfy-embed-absent>=1\n")
    off, off_commits = make_pack(tmp_path / "Off", "")
    snapshot = tmp_path / "snapshot.json"
    snapshot.write_text(json.dumps({
        "comfyui": "d" * 40,
        "git_custom_nodes": {f"file://{pack}/": {"hash": commits[0], "disabled": False},
                             f"file://{off}": {"hash": off_commits[0], "disabled": True}},
        "cnr_custom_nodes": {"comfyui-impact-pack": "8.8.1"},
        "file_custom_nodes": [],
        "pips": {"packaging==24.2": "", "comfy-embed-absent==1.5": "", "torch==2.5.1": ""}}))
    said: list[str] = []
    lock = lock_from_snapshot(snapshot, say=said.append)
    assert lock.comfyui_commit == "d" * 40 and lock.pip == ()  # torch is not copied in
    (pin,) = lock.packs
    assert (pin.name, pin.commit) == ("ComfyUI-Thing", commits[0])
    assert pin.requirements == ("comfy-embed-absent==1.5", "packaging==24.2")
    assert said == [("registry pack comfyui-impact-pack 8.8.1: the snapshot gives no git URL and "
                     "commit; add it to the lock as [[packs]] with url and commit")]
    assert parse_lock(dump_lock(lock)) == lock


def test_a_snapshot_commit_the_repository_lacks_is_named(tmp_path: Path) -> None:
    pack, _ = make_pack(tmp_path / "P", "")
    snapshot = tmp_path / "s.json"
    snapshot.write_text(json.dumps({"git_custom_nodes": {str(pack): {"hash": "e" * 40}}}))
    with pytest.raises(InstallError, match=f"pack P \\({pack}\\): commit {'e' * 40} is not in"):
        lock_from_snapshot(snapshot, say=lambda _: None)


def test_lock_pins_the_models_a_workflow_names(tmp_path: Path) -> None:
    from comfy_embed.environment.lockfile import ModelPin
    from comfy_embed.environment.make import lock_from_folder
    from tests.environment.test_apply import comfyui

    folder = comfyui(tmp_path / "c")
    models = tmp_path / "models"
    (models / "checkpoints" / "sub").mkdir(parents=True)
    (models / "loras").mkdir()
    (models / "checkpoints" / "sub" / "a.safetensors").write_bytes(b"a" * 10)
    (models / "loras" / "b.safetensors").write_bytes(b"b" * 20)
    (models / "loras" / "unused.safetensors").write_bytes(b"u")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sub/a.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "b.safetensors", "x": "../etc"}}}))
    sha_a, sha_b = (hashlib.sha256(b).hexdigest() for b in (b"a" * 10, b"b" * 20))
    manifest = [ModelPin("loras", "b.safetensors", sha_b, "https://example.com/b.safetensors")]
    lock = lock_from_folder(folder, [wf], models, manifest, say=lambda _: None)
    assert lock.models == (
        ModelPin("checkpoints", "sub/a.safetensors", sha_a, None, 10),
        ModelPin("loras", "b.safetensors", sha_b, "https://example.com/b.safetensors", 20))
