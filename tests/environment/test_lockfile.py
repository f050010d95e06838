"""The lock file's format: every entry checked and named, written canonically."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_embed.environment.lockfile import (
    Lock,
    ModelPin,
    PackPin,
    conflicts,
    dump_lock,
    lock_hash,
    parse_lock,
    read_lock,
)
from comfy_embed.errors import InstallError

C1, C2 = "a" * 40, "b" * 40
SHA = "c" * 64


def test_dump_then_parse_is_the_same_lock_and_the_same_text(tmp_path: Path) -> None:
    lock = Lock(C1, "https://github.com/comfyanonymous/ComfyUI",
                (PackPin("z-pack", "file:///srv/z", C2, ("b==1", "A==2")),
                 PackPin("a-pack", "https://example.com/a.git", C1, (), "a-pack", "1.0.0")),
                ("numpy==1.26.4",), (ModelPin("checkpoints", "x/y.safetensors", SHA, None, 5),),
                "warmup.json")
    text = dump_lock(lock)
    back = parse_lock(text)
    assert [p.name for p in back.packs] == ["a-pack", "z-pack"]  # sorted
    assert back.packs[1].requirements == ("A==2", "b==1")
    assert back.models == lock.models and back.pip == lock.pip and back.warmup == "warmup.json"
    assert dump_lock(back) == text
    (tmp_path / "l").write_text(text)
    assert read_lock(tmp_path / "l").pack("z-pack") == back.packs[1]
    assert lock_hash(tmp_path / "l").startswith("sha256:") and len(lock_hash(tmp_path / "l")) == 71


@pytest.mark.parametrize("text, message", [
    ("version = 2", "version 2 is not 1"),
    ("[comfyui]\ncommit = 'abc'", "comfyui.commit must be 40 hex digits"),
    (f"[[packs]]\nname = 'p'\nurl = 'ftp://x/p'\ncommit = '{C1}'", "pack p: url 'ftp://x/p' is not a git URL"),
    ("[[packs]]\nname = 'p'\nurl = '/x'\ncommit = 'main'", "pack p: commit must be 40 hex digits, not 'main'"),
    ("[[packs]]\nname = '../p'\nurl = '/x'", r"packs\[0\]: name must be a plain folder name"),
    (f"[[packs]]\nname = 'p'\nurl = '/x'\ncommit = '{C1}'\nrequirements = ['a=>1']",
     "pack p: cannot read requirement 'a=>1'"),
    (f"[[packs]]\nname = 'p'\nurl = '/x'\ncommit = '{C1}'\n" * 2, "pack p is listed twice"),
    ("[[models]]\nfolder = 'checkpoints'\nname = 'm'\nsha256 = 'x'", "model checkpoints/m: sha256 must be"),
    (f"[[models]]\nfolder = 'checkpoints'\nname = '../m'\nsha256 = '{SHA}'", "name must be a relative"),
    (f"[[models]]\nfolder = 'c'\nname = 'm'\nsha256 = '{SHA}'\nurl = 'file:///m'", "model c/m: url must be"),
    ("packs = 3", r"packs must be an array of tables"),
    ("not toml [", "not TOML"),
])
def test_a_bad_entry_is_refused_by_name(text: str, message: str) -> None:
    with pytest.raises(InstallError, match=message):
        parse_lock(text)


def test_conflicting_pins_are_named_with_their_packs() -> None:
    lock = Lock(packs=(PackPin("a", "/a", C1, ("numpy==1.26.4", "six")),
                       PackPin("b", "/b", C2, ("NumPy==2.0.0", "six==1.16.0")),
                       PackPin("c", "/c", C2, ("torch==0.1; sys_platform == 'nowhere'",))),
                pip=("six>=1.10", "torch==2.0"))
    assert conflicts(lock) == [
        "numpy: pack a wants numpy==1.26.4, pack b wants NumPy==2.0.0"]
    assert conflicts(Lock(packs=(PackPin("a", "/a", C1, ("six<1.0",)),), pip=("six==1.16.0",))) == [
        "six: pack a wants six<1.0, [pip] wants six==1.16.0"]
