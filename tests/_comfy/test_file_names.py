"""The rule for every file name a node resolves (comfy_embed._comfy.file_names),
on a stand-in ``folder_paths`` with ComfyUI's own resolving code."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from comfy_embed._comfy import file_names
from comfy_embed._comfy.file_names import FileNameRefused, granted_folders, granting

HASH = "a" * 64


def stand_in(tmp_path: Path) -> ModuleType:
    """ComfyUI 0.3.64's annotated_filepath, get_ and exists_annotated_filepath."""
    fp = ModuleType("folder_paths")
    dirs = {k: str(tmp_path / k) for k in ("input", "output", "temp")}
    for d in dirs.values():
        os.makedirs(d)

    def annotated_filepath(name: str) -> tuple[str, str | None]:
        if name.endswith("[output]"):
            return name[:-9], dirs["output"]
        if name.endswith("[input]"):
            return name[:-8], dirs["input"]
        if name.endswith("[temp]"):
            return name[:-7], dirs["temp"]
        return name, None

    def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
        name, base = fp.annotated_filepath(name)
        return os.path.join(base or default_dir or dirs["input"], name)

    def exists_annotated_filepath(name: str) -> bool:
        name, base = fp.annotated_filepath(name)
        return os.path.exists(os.path.join(base or dirs["input"], name))

    fp.annotated_filepath = annotated_filepath  # type: ignore[attr-defined]
    fp.get_annotated_filepath = get_annotated_filepath  # type: ignore[attr-defined]
    fp.exists_annotated_filepath = exists_annotated_filepath  # type: ignore[attr-defined]
    fp.get_input_directory = lambda: dirs["input"]  # type: ignore[attr-defined]
    file_names.install(fp)
    file_names.install(fp)  # a second install changes nothing
    return fp


@pytest.fixture
def fp(tmp_path: Path) -> ModuleType:
    fp = stand_in(tmp_path)
    for rel in ("input/a.png", "input/sub/b.png", f"input/serverless/t1/{HASH}.png",
                f"input/serverless/t2/{HASH}.png", "output/t2/ComfyUI_00001_.png",
                "temp/x.png", "elsewhere.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere.png", tmp_path / "input" / "link.png")
    return fp


def test_names_in_the_input_folder_resolve(fp: ModuleType, tmp_path: Path) -> None:
    inp = tmp_path / "input"
    for name, path in (("a.png", inp / "a.png"), ("sub/b.png", inp / "sub/b.png"),
                       ("a.png [input]", inp / "a.png"), (str(inp / "a.png"), inp / "a.png")):
        assert fp.exists_annotated_filepath(name), name
        assert Path(fp.get_annotated_filepath(name)) == path
    assert not fp.exists_annotated_filepath("missing.png")


@pytest.mark.parametrize("name", [
    "t2/ComfyUI_00001_.png [output]", "t2/ComfyUI_00001_.png[output]", "x.png [temp]",
    "../output/t2/ComfyUI_00001_.png", "sub/../../elsewhere.png", "../elsewhere.png",
    "link.png", "", "a\x00.png", "/etc/passwd", "x" * 5000,
    f"serverless/t2/{HASH}.png", f"./serverless/t1/{HASH}.png"])
def test_names_leaving_the_allowed_part_fail_as_missing_ones(fp: ModuleType, tmp_path: Path,
                                                            name: str) -> None:
    assert not fp.exists_annotated_filepath(name)
    with pytest.raises(FileNameRefused, match="refused"):
        fp.get_annotated_filepath(name)


def test_absolute_paths_outside_are_refused_existing_or_not(fp: ModuleType, tmp_path: Path) -> None:
    for p in (tmp_path / "elsewhere.png", tmp_path / "missing.png",
              tmp_path / "output/t2/ComfyUI_00001_.png"):
        assert not fp.exists_annotated_filepath(str(p))
        with pytest.raises(FileNameRefused):
            fp.get_annotated_filepath(str(p))


def test_only_the_graphs_own_serverless_folders_are_granted(fp: ModuleType, tmp_path: Path) -> None:
    grants = granted_folders(iter([f"serverless/t1/{HASH}.png", "a.png",
                                   f"serverless/../{HASH}.png", "serverless/t3/not-a-hash.png"]))
    assert grants == frozenset({"serverless/t1"})
    with granting(grants):
        assert fp.exists_annotated_filepath(f"serverless/t1/{HASH}.png")
        assert fp.get_annotated_filepath(f"serverless/t1/{HASH}.png").endswith(HASH + ".png")
        # LoadImage is handed the absolute path by WebcamCapture and Load3D.
        assert fp.exists_annotated_filepath(str(tmp_path / f"input/serverless/t1/{HASH}.png"))
        assert not fp.exists_annotated_filepath(f"serverless/t2/{HASH}.png")
    assert not fp.exists_annotated_filepath(f"serverless/t1/{HASH}.png")
