"""comfy-embed lock and install with real git and real pip: packs are local
git repositories (a lock names them by path or file:// URL), ComfyUI is
cloned from this checkout's submodule, requirements come from PyPI into a
fresh virtual environment (never the project's)."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from comfy_embed.environment.apply import install_lock
from comfy_embed.environment.lockfile import PackPin, dump_lock, parse_lock, read_lock
from comfy_embed.environment.make import (
    installed_versions,
    lock_from_folder,
    pin_requirements,
)
from comfy_embed.errors import InstallError

ROOT = Path(__file__).resolve().parents[2]
SUBMODULE = ROOT / "vendor" / "ComfyUI"
PACK_SOURCE = ROOT / "tests" / "custom_nodes" / "embed_test_pack"
#: Local mirrors of public packs (the repository's `fetch` tool puts them here).
MIRRORS = Path(os.environ.get("COMFY_EMBED_TEST_MIRRORS", "/work/.mirror"))


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout.strip()


def make_pack(where: Path, requirements: str) -> tuple[Path, list[str]]:
    """A pack repository with two commits; ``(path, [first, second])``."""
    where.mkdir(parents=True)
    git("init", "--quiet", "-b", "main", cwd=where)
    git("config", "user.email", "t@example.com", cwd=where)
    git("config", "user.name", "t", cwd=where)
    (where / "__init__.py").write_text((PACK_SOURCE / "__init__.py").read_text())
    (where / "requirements.txt").write_text(requirements)
    git("add", ".", cwd=where)
    git("commit", "--quiet", "-m", "one", cwd=where)
    first = git("rev-parse", "HEAD", cwd=where)
    (where / "NOTES").write_text("two\n")
    git("add", ".", cwd=where)
    git("commit", "--quiet", "-m", "two", cwd=where)
    return where, [first, git("rev-parse", "HEAD", cwd=where)]


def comfyui(where: Path) -> Path:
    git("clone", "--quiet", "--no-checkout", str(SUBMODULE), str(where), cwd=where.parent)
    (where / "custom_nodes").mkdir()
    return where


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "comfy_embed.cli", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_round_trip_lock_install_into_a_fresh_environment_lock_again(tmp_path: Path) -> None:
    """lock from a folder, install into a fresh environment, lock again: the same file."""
    pack, commits = make_pack(tmp_path / "src" / "embed_pack", "packaging>=20\n# a comment\n")
    first = comfyui(tmp_path / "first")
    git("clone", "--quiet", str(pack), "embed_pack", cwd=first / "custom_nodes")
    have = installed_versions()["packaging"]
    lock_file = tmp_path / "comfy-embed.lock"
    made = cli("lock", "--comfyui", str(first), "--models", str(tmp_path / "no-models"),
               "-o", str(lock_file))
    assert made.returncode == 0, made.stderr
    lock = read_lock(lock_file)
    assert lock.comfyui_commit == git("rev-parse", "HEAD", cwd=SUBMODULE)
    assert lock.packs == (PackPin("embed_pack", str(pack), commits[1], (f"packaging=={have}",),
                                  nodes=("EmbedTestDeafWait", "EmbedTestEcho",
                                         "EmbedTestFailOnSeed", "EmbedTestFlexible",
                                         "EmbedTestSilentWait")),)

    # A fresh environment (no packaging) and a fresh ComfyUI folder.
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env)
    python = str(env / "bin" / "python")
    assert "packaging" not in installed_versions(python)
    second = comfyui(tmp_path / "second")
    done = cli("install", str(lock_file), "--comfyui", str(second), "--python", python)
    assert done.returncode == 0, done.stderr
    assert "1 packs checked out, 0 already at their commit, 1 requirements installed" in done.stdout
    assert installed_versions(python)["packaging"] == have
    assert git("rev-parse", "HEAD", cwd=second / "custom_nodes" / "embed_pack") == commits[1]
    assert not [p for p in (second / "custom_nodes").iterdir() if p.name.startswith(".")]

    again = cli("lock", "--comfyui", str(second), "--models", str(tmp_path / "no-models"),
                "--python", python, "-o", "-")
    assert again.returncode == 0, again.stderr
    assert again.stdout == lock_file.read_text()

    # Idempotent: a second install changes nothing.
    twice = cli("install", str(lock_file), "--comfyui", str(second), "--python", python)
    assert twice.returncode == 0, twice.stderr
    assert "0 packs checked out, 1 already at their commit, 0 requirements installed" in twice.stdout


def test_a_pack_at_another_commit_is_moved_to_the_locks(tmp_path: Path) -> None:
    pack, commits = make_pack(tmp_path / "src" / "p", "")
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    git("clone", "--quiet", str(pack), "p", cwd=nodes)
    (nodes / "p" / "user-config.json").write_text("{}")  # untracked, the pack's own
    lock = parse_lock(dump_lock(parse_lock(
        f'[[packs]]\nname = "p"\nurl = "file://{pack}"\ncommit = "{commits[0]}"\n')))
    done = install_lock(lock, nodes, say=lambda _: None)
    assert done.packs == ["p"] and done.installed == []
    assert git("rev-parse", "HEAD", cwd=nodes / "p") == commits[0]
    assert sorted(p.name for p in nodes.iterdir()) == ["p"]


def lock_text(*packs: tuple[str, str, str, list[str]]) -> str:
    return "".join(f'[[packs]]\nname = "{n}"\nurl = "{u}"\ncommit = "{c}"\nrequirements = {r!r}\n'
                   .replace("'", '"') for n, u, c, r in packs)


@pytest.mark.parametrize("case", ["conflict", "unknown commit", "bad url", "pip fails"])
def test_refused_with_the_entry_named_and_nothing_half_installed(tmp_path: Path, case: str) -> None:
    """A bad lock changes nothing: custom_nodes and the environment stay as they were."""
    a, ca = make_pack(tmp_path / "src" / "a", "")
    b, cb = make_pack(tmp_path / "src" / "b", "")
    nodes = tmp_path / "custom_nodes"
    nodes.mkdir()
    git("clone", "--quiet", str(b), "b", cwd=nodes)  # b at its second commit
    good_a, good_b = ("a", str(a), ca[0], []), ("b", str(b), cb[0], [])
    cases = {
        "conflict": (lock_text(("a", str(a), ca[0], ["packaging==24.2"]),
                               ("b", str(b), cb[0], ["Packaging==23.0"])),
                     (r"conflicting pins, nothing installed: packaging: pack a wants "
                      r"packaging==24.2, pack b wants Packaging==23.0")),
        "unknown commit": (lock_text(good_b, ("a", str(a), "1" * 40, [])),
                           f"pack a: commit {'1' * 40} is not in {a}"),
        "bad url": (lock_text(good_b, ("a", str(tmp_path / "nowhere"), ca[0], [])),
                    "pack a: git clone failed"),
        "pip fails": (lock_text(good_a, ("b", str(b), cb[0], ["comfy-embed-no-such-package==1.0"])),
                      r"pip install comfy-embed-no-such-package==1.0 failed .*: no pack installed"),
    }
    text, message = cases[case]
    with pytest.raises(InstallError, match=message):
        install_lock(parse_lock(text), nodes, say=lambda _: None)
    assert sorted(p.name for p in nodes.iterdir()) == ["b"]  # no staging left, a not added
    assert git("rev-parse", "HEAD", cwd=nodes / "b") == cb[1]  # b not moved


def test_lock_refuses_a_pack_nobody_could_install_again(tmp_path: Path) -> None:
    pack, _ = make_pack(tmp_path / "src" / "p", "")
    folder = comfyui(tmp_path / "c")
    git("clone", "--quiet", str(pack), "p", cwd=folder / "custom_nodes")
    (folder / "custom_nodes" / "p" / "__init__.py").write_text("# edited\n")
    with pytest.raises(InstallError, match=r"pack p has local changes \(__init__.py\)"):
        lock_from_folder(folder, say=lambda _: None)
    with pytest.raises(InstallError, match="pack p: requirement 'comfy-embed-absent' is not installed"):
        pin_requirements("comfy-embed-absent\n", installed_versions(), "pack p")


@pytest.mark.skipif(not (MIRRORS / "Kosinkadink+ComfyUI-VideoHelperSuite" / "repo").is_dir()
                    or not (MIRRORS / "cubiq+ComfyUI_essentials" / "repo").is_dir(),
                    reason="no local mirrors of the public packs")
def test_real_packs_from_local_mirrors(tmp_path: Path) -> None:
    """VideoHelperSuite and essentials by file:// URL: checked out at their
    commits, the registry id read from VideoHelperSuite's pyproject.toml."""
    vhs = MIRRORS / "Kosinkadink+ComfyUI-VideoHelperSuite" / "repo"
    ess = MIRRORS / "cubiq+ComfyUI_essentials" / "repo"
    heads = {n: git("rev-parse", "HEAD", cwd=m) for n, m in (("vhs", vhs), ("ess", ess))}
    text = (f'[[packs]]\nname = "ComfyUI-VideoHelperSuite"\nurl = "file://{vhs}"\n'
            f'commit = "{heads["vhs"]}"\nrequirements = ["opencv-python", "imageio-ffmpeg"]\n'
            f'[[packs]]\nname = "ComfyUI_essentials"\nurl = "file://{ess}"\n'
            f'commit = "{heads["ess"]}"\n')
    folder = comfyui(tmp_path / "c")
    done = install_lock(parse_lock(text), folder / "custom_nodes", requirements=False,
                        say=lambda _: None)
    assert sorted(done.packs) == ["ComfyUI-VideoHelperSuite", "ComfyUI_essentials"]
    versions = {"opencv-python": "4.12.0.88", "imageio-ffmpeg": "0.6.0", "numba": "0.62.1",
                "colour-science": "0.4.6", "rembg": "2.0.67", "pixeloe": "0.1.4",
                "transparent-background": "1.3.4"}
    lock = lock_from_folder(folder, versions=versions, say=lambda _: None)
    vhs_pin, ess_pin = lock.packs
    assert (vhs_pin.name, vhs_pin.commit, vhs_pin.url) == (
        "ComfyUI-VideoHelperSuite", heads["vhs"], f"file://{vhs}")
    assert vhs_pin.registry_id == "comfyui-videohelpersuite" and vhs_pin.registry_version
    assert vhs_pin.requirements == ("imageio-ffmpeg==0.6.0", "opencv-python==4.12.0.88")
    assert "numba==0.62.1" in ess_pin.requirements and ess_pin.commit == heads["ess"]
    # The node classes each declares (the README's table counts 40 and 85 loaded).
    assert len(vhs_pin.nodes) == 40 and "VHS_VideoCombine" in vhs_pin.nodes
    assert len(ess_pin.nodes) == 85 and "SimpleMath+" in ess_pin.nodes


def test_install_models_names_a_missing_model_without_url(tmp_path: Path) -> None:
    from comfy_embed.config import Settings
    from comfy_embed.environment.apply import fetch_models

    lock = parse_lock(f'[[models]]\nfolder = "vae"\nname = "absent.bin"\nsha256 = "{"0" * 64}"\n')
    settings = Settings(base_dir=tmp_path)
    with pytest.raises(InstallError, match="model vae/absent.bin is not in .* and the lock gives no url"):
        fetch_models(settings, lock)
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "absent.bin").write_bytes(b"x")
    assert fetch_models(settings, lock) == []  # there: nothing to fetch (drift checks its hash)


def test_install_models_refuses_a_hash_mismatch_and_leaves_nothing(tmp_path: Path) -> None:
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from comfy_embed.config import Settings
    from comfy_embed.environment.apply import fetch_models

    served = tmp_path / "served"
    served.mkdir()
    (served / "m.bin").write_bytes(b"not what the lock says")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        SimpleHTTPRequestHandler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/m.bin"
        lock = parse_lock(f'[[models]]\nfolder = "vae"\nname = "m.bin"\nsha256 = "{"1" * 64}"\n'
                          f'url = "{url}"\n')
        settings = Settings(base_dir=tmp_path / "base", url_allowlist=("127.0.0.1",))
        with pytest.raises(InstallError, match="vae/m.bin"):
            fetch_models(settings, lock)
        folder = tmp_path / "base" / "models" / "vae"
        assert not folder.exists() or not [p for p in folder.iterdir() if not p.name.endswith(".lock")]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_cli_says_what_failed_and_exits_1(tmp_path: Path) -> None:
    pack, _ = make_pack(tmp_path / "src" / "p", "")
    folder = comfyui(tmp_path / "c")
    git("clone", "--quiet", str(pack), "p", cwd=folder / "custom_nodes")
    (folder / "custom_nodes" / "p" / "__init__.py").write_text("# edited\n")
    made = cli("lock", "--comfyui", str(folder), "-o", str(tmp_path / "x.lock"))
    assert made.returncode == 1 and not (tmp_path / "x.lock").exists()
    assert "comfy-embed lock: pack p has local changes (__init__.py)" in made.stderr
    (tmp_path / "bad.lock").write_text('[[packs]]\nname = "p"\nurl = "ftp://x"\n')
    done = cli("install", str(tmp_path / "bad.lock"), "--comfyui", str(folder))
    assert done.returncode == 1
    assert "comfy-embed install: lock " in done.stderr and "pack p: url 'ftp://x' is not a git URL" in done.stderr
