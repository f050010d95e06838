"""comfy-embed lock from a ComfyUI-Manager snapshot, with real git."""

from __future__ import annotations

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
    assert said == ["registry pack comfyui-impact-pack 8.8.1: the snapshot gives no git URL and "
                    "commit; add it to the lock as [[packs]] with url and commit"]
    assert parse_lock(dump_lock(lock)) == lock


def test_a_snapshot_commit_the_repository_lacks_is_named(tmp_path: Path) -> None:
    pack, _ = make_pack(tmp_path / "P", "")
    snapshot = tmp_path / "s.json"
    snapshot.write_text(json.dumps({"git_custom_nodes": {str(pack): {"hash": "e" * 40}}}))
    with pytest.raises(InstallError, match=f"pack P \\({pack}\\): commit {'e' * 40} is not in"):
        lock_from_snapshot(snapshot, say=lambda _: None)
