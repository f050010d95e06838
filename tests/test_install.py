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
    (done.folder / "custom_nodes" / "my_pack.py").write_text("")  # untracked: kept
    again = install_comfyui(done.folder, source=str(SUBMODULE), say=said.append)
    assert again.commit == COMFYUI_COMMIT and said == []
    assert (done.folder / "custom_nodes" / "my_pack.py").is_file()
    # Edits to ComfyUI's own files are never overwritten.
    (done.folder / "nodes.py").write_text("changed")
    with pytest.raises(InstallError, match=r"has local changes \(M nodes.py\): commit or discard"):
        install_comfyui(done.folder, source=str(SUBMODULE), say=said.append)
    assert (done.folder / "nodes.py").read_text() == "changed"


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


def test_without_git_the_error_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InstallError, match="git is not installed: comfy-embed install-comfyui"):
        install_comfyui(tmp_path / "ComfyUI", say=lambda _: None)
    assert not (tmp_path / "ComfyUI").exists()


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


def _tiny_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel (one module), written by hand: no build, no network."""
    import base64
    import hashlib
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


@pytest.mark.server  # a virtual environment and pip: seconds, the slow tier
def test_missing_requirements_are_pip_installed_into_this_python(tmp_path: Path) -> None:
    """A ComfyUI whose requirements.txt names a package the environment lacks:
    pip installs it into the Python running comfy-embed (a fresh virtual
    environment borrowing .venv's packages, so .venv is left alone), from a
    local wheel folder (PIP_NO_INDEX, PIP_FIND_LINKS: no network)."""
    import os
    import sys
    import sysconfig

    repo = tmp_path / "comfyui-fork"
    repo.mkdir()
    (repo / "execution.py").write_text("")
    (repo / "requirements.txt").write_text("comfyui-frontend-package==1.0\nnumpy\nh3tiny==1.0\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "fork"], cwd=repo, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.strip()
    _tiny_wheel(tmp_path / "wheels", "h3tiny", "1.0")

    venv = tmp_path / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)],
                   check=True, timeout=120)
    vpy = venv / "bin" / "python"
    site = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path / "wheels"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    code = ("import sys; from pathlib import Path; from comfy_embed.install import install_comfyui\n"
            f"d = install_comfyui(Path(sys.argv[1]), {commit!r}, sys.argv[2], say=print)\n"
            "print('RESULT', d.commit, d.installed, d.left_out)")
    for expected in ("['h3tiny==1.0']", "[]"):  # installed, then already there
        out = subprocess.run([vpy, "-c", code, str(tmp_path / "ComfyUI"), str(repo)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"RESULT {commit} {expected} ['comfyui-frontend-package']" in out.stdout
    where = subprocess.run([vpy, "-c", "import h3tiny; print(h3tiny.__file__, h3tiny.VALUE)"],
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site) and where.split()[1] == "42"
