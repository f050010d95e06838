"""comfy-embed install-comfyui's steps, with real git: ComfyUI cloned from
this checkout's submodule (a local repository, as ``--from`` takes a mirror)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from comfy_embed.config.places import COMFYUI_COMMIT
from comfy_embed.errors import InstallError
from comfy_embed.install import NOT_NEEDED, install_comfyui, missing_requirements

ROOT = Path(__file__).resolve().parent.parent
SUBMODULE = ROOT / "vendor" / "ComfyUI"


def test_checks_out_the_pinned_commit_and_needs_no_more_requirements(tmp_path: Path) -> None:
    said: list[str] = []
    done = install_comfyui(tmp_path / "ComfyUI", source=str(SUBMODULE), say=said.append)
    assert done.folder == (tmp_path / "ComfyUI").resolve() and done.commit == COMFYUI_COMMIT
    assert (done.folder / "execution.py").is_file() and (done.folder / "nodes.py").is_file()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=done.folder, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert head == COMFYUI_COMMIT
    # This environment has everything comfy-embed needs: pip is not run.
    assert done.installed == []
    assert {"comfyui-frontend-package", "torch", "alembic"} <= set(done.left_out)
    assert said == [f"cloning {SUBMODULE} into {done.folder}"]
    # Again: nothing cloned or fetched, the commit checked out again.
    said.clear()
    (done.folder / "nodes.py").write_text("changed")
    again = install_comfyui(done.folder, source=str(SUBMODULE), say=said.append)
    assert again.commit == COMFYUI_COMMIT and said == []
    assert (done.folder / "nodes.py").read_text() != "changed"


def test_refusals_name_what_failed(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(InstallError, match="exists and is not a git checkout"):
        install_comfyui(taken, source=str(SUBMODULE), say=lambda _: None)
    with pytest.raises(InstallError, match=f"commit {'0' * 40} is not in {SUBMODULE}"):
        install_comfyui(tmp_path / "c", commit="0" * 40, source=str(SUBMODULE),
                        say=lambda _: None)
    with pytest.raises(InstallError, match="git clone .* failed"):
        install_comfyui(tmp_path / "d", source=str(tmp_path / "no-such-repo"), say=lambda _: None)


def test_requirements_met_missing_and_left_out(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("comfyui-frontend-package==1.27.10\ntorch\nnumpy>=1.25.0\n"
                   "# a comment\n\nnumpy<1.0  # too old for what is installed\n"
                   "surely-not-installed-pkg>=1\nwinonly; sys_platform == 'win32'\n")
    missing, left_out = missing_requirements(req)
    assert missing == ["numpy<1.0", "surely-not-installed-pkg>=1"]
    assert left_out == ["comfyui-frontend-package", "torch"]
    assert set(left_out) <= set(NOT_NEEDED)
    req.write_text("not a requirement !!\n")
    with pytest.raises(InstallError, match="cannot read 'not a requirement !!'"):
        missing_requirements(req)
