"""Booting: a missing ComfyUI is named with both ways out."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from comfy_embed._comfy import boot


def test_a_missing_comfyui_names_the_setting_and_the_installer(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        boot.put_on_path(tmp_path / "nowhere")
    message = str(info.value)
    assert message.startswith(f"no ComfyUI at {tmp_path / 'nowhere'}: ")
    assert "COMFY_EMBED_COMFYUI_DIR" in message and "Settings(comfyui_dir=...)" in message
    assert "`comfy-embed install-comfyui`" in message
    # Run from this checkout, the submodule is the third way.
    assert "git submodule update --init vendor/ComfyUI" in message
    assert str(tmp_path / "nowhere") not in sys.path


def test_a_comfyui_folder_goes_on_the_path(tmp_path: Path) -> None:
    (tmp_path / "execution.py").write_text("")
    try:
        boot.put_on_path(tmp_path)
        assert sys.path[0] == str(tmp_path.resolve())
    finally:
        sys.path.remove(str(tmp_path.resolve()))
