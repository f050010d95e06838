"""The public surface (comfy_embed/__init__.py): explicit, typed, versioned,
and importing it starts nothing heavy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import comfy_embed
from comfy_embed import errors

ROOT = Path(__file__).resolve().parent.parent


def test_all_names_exist_and_cover_every_error() -> None:
    assert len(set(comfy_embed.__all__)) == len(comfy_embed.__all__)
    for name in comfy_embed.__all__:
        assert hasattr(comfy_embed, name), name
    assert set(errors.__all__) <= set(comfy_embed.__all__)
    for name in ("run_workflow", "Engine", "Settings", "RunOptions", "ComfyEmbedError"):
        assert name in comfy_embed.__all__
    documented = (ROOT / "README.md").read_text()
    for name in ("WorkflowInvalid", "ExecutionFailed", "NotAccepting", "QueueFull", "RunTimeout"):
        assert f"`{name}`" in documented, name


def test_version_is_written_once() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", comfy_embed.__version__)
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()
    assert 'attr = "comfy_embed.version.__version__"' in (ROOT / "pyproject.toml").read_text()
    assert f"## {comfy_embed.__version__.split('.dev')[0]} " in (ROOT / "CHANGELOG.md").read_text()


def test_typed_and_licensed() -> None:
    assert (ROOT / "comfy_embed" / "py.typed").is_file()
    assert "GNU GENERAL PUBLIC LICENSE\n                       Version 3" in (
        ROOT / "LICENSE").read_text()
    assert 'license = "GPL-3.0-or-later"' in (ROOT / "pyproject.toml").read_text()


def test_importing_the_package_loads_no_comfyui_torch_or_starlette() -> None:
    code = ("import sys, comfy_embed; print(sorted(m for m in ('torch', 'starlette', 'nodes', "
            "'execution', 'comfy', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
