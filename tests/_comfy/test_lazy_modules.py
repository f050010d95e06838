"""Deferred imports at boot (comfy_embed._comfy.lazy_modules): importing costs
nothing, the first use loads the real module, and nodes that need a deferred
module still work."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.runtime import Engine

from tests.conftest import text_to_image

ROOT = Path(__file__).resolve().parents[2]

# A package whose __init__ counts its runs and imports a submodule itself.
_PACKAGE = {
    "fakepkg/__init__.py": """
        import os
        os.environ["INITS"] = str(int(os.environ.get("INITS", "0")) + 1)
        __version__ = "1.2.3"
        from . import inner
        class Base:
            pass
        def hello(x):
            return f"hello {x}"
    """,
    "fakepkg/inner.py": """
        import os
        os.environ["INNER"] = str(int(os.environ.get("INNER", "0")) + 1)
        VALUE = 42
    """,
    "fakepkg/sub/__init__.py": """
        def func(x):
            return x * 2
        class Thing:
            pass
    """,
    "fakepkg/other.py": "OTHER = 7\n",
}

_USE = """
    import os, sys
    from comfy_embed._comfy import lazy_modules as lm
    assert lm.install({"fakepkg": ("fakepkg", "fakepkg.sub"), "absent_pkg_x": ("absent_pkg_x",)}) \\
        == ["fakepkg", "fakepkg.sub"]
    import fakepkg
    import fakepkg.sub as sub
    from fakepkg.sub import func, Thing
    from fakepkg import hello
    assert "INITS" not in os.environ and not lm.loaded("fakepkg")  # nothing ran yet
    assert func(3) == 6 and hello("x") == "hello x"
    assert os.environ["INITS"] == "1" and lm.loaded("fakepkg")
    assert isinstance(Thing(), Thing) and isinstance(Thing(), sub.Thing)
    class Mine(fakepkg.Base):
        pass
    assert issubclass(Mine, fakepkg.Base) and fakepkg.__version__ == "1.2.3"
    import fakepkg.other
    assert fakepkg.other.OTHER == 7 and fakepkg.inner.VALUE == 42
    assert os.environ["INITS"] == "1" and os.environ["INNER"] == "1"
    try:
        import absent_pkg_x
    except ImportError:
        pass
    else:
        raise AssertionError("a stand-in for a package that is not installed")
"""

_FIRST_SUBMODULE = """
    import os, sys
    from comfy_embed._comfy import lazy_modules as lm
    lm.install({"fakepkg": ("fakepkg", "fakepkg.sub")})
    import fakepkg.inner  # a submodule with no stand-in, before any use
    import fakepkg
    # The package ran once, and its own import of inner was not run again.
    assert os.environ["INITS"] == "1" and os.environ["INNER"] == "1"
    assert sys.modules["fakepkg.inner"] is fakepkg.inner and fakepkg.inner.VALUE == 42
    assert sys.modules["fakepkg.inner"].__spec__.origin.endswith("inner.py")
"""


def _run(tmp_path: Path, code: str) -> None:
    for name, text in _PACKAGE.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    script = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]\n" + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_stand_ins_defer_and_forward(tmp_path: Path) -> None:
    _run(tmp_path, _USE)


def test_submodule_imported_first_runs_once(tmp_path: Path) -> None:
    _run(tmp_path, _FIRST_SUBMODULE)


_BOOT = """
    import json, sys
    from pathlib import Path
    from comfy_embed.config import Settings
    from comfy_embed._comfy.comfy import Comfy
    from comfy_embed._comfy import lazy_modules as lm
    comfy = Comfy.boot(Settings(base_dir=Path(sys.argv[1]), device="cpu"))
    names = ["torchvision", "torch._dynamo", "scipy.stats", "scipy.integrate", "kornia",
             "av", "spandrel"]
    print(json.dumps({"deferred": comfy.deferred_modules,
                      "loaded": [n for n in names if lm.loaded(n)],
                      "nodes": len(comfy._nodes.NODE_CLASS_MAPPINGS)}))
"""


@pytest.mark.server  # boots real ComfyUI in a subprocess
def test_boot_defers_what_sd15_does_not_use(tmp_path: Path) -> None:
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(_BOOT)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"torchvision", "scipy.stats", "kornia", "spandrel"} <= set(out["deferred"])
    assert out["loaded"] == [], out
    # The nodes that import them are all there (Canny, upscale models, video).
    assert out["nodes"] > 300


@pytest.mark.anyio
async def test_nodes_using_deferred_modules_work(engine: Engine) -> None:
    # kornia: Canny; scipy.stats: the beta scheduler; scipy.integrate: LMS.
    canny = {"1": {"class_type": "EmptyImage",
                   "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0x808080}},
             "2": {"class_type": "Canny", "inputs": {"image": ["1", 0], "low_threshold": 0.4,
                                                     "high_threshold": 0.8}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    assert (await engine.run(canny))["data"]["status"] == "success"
    graph: dict[str, Any] = text_to_image(steps=2, seed=31)
    graph["3"]["inputs"].update(scheduler="beta", sampler_name="lms")
    assert (await engine.run(graph))["data"]["status"] == "success"
    from comfy_embed._comfy import lazy_modules
    if engine.comfy.deferred_modules:
        assert lazy_modules.loaded("kornia") and lazy_modules.loaded("scipy.stats")
