"""The real frontend is the oracle for ``prepare/ui_format``: native ComfyUI
(vendor/ComfyUI/main.py) serves ``comfyui-frontend-package`` (the version
vendored ComfyUI pins), headless Chromium loads each saved workflow with
``app.loadGraphData`` and takes ``app.graphToPrompt()``'s output, and every
node and input is compared with comfy-embed's conversion over this
instance's own node definitions (the session's booted ComfyUI).

Corpus: every saved workflow in ``comfyui-workflow-templates`` (the pinned
version, read from the installed package) whose nodes this instance knows
(API nodes and missing packs excluded: 101 of 172 in 0.1.95); six of the
frontend repository's own browser-test assets (``ui_workflows/frontend/``,
see its SOURCE.md: copied as data because CI reaches no GitHub); and ours in
``ui_workflows/`` (bypass, mute, Reroute, PrimitiveNode, core primitives,
Note/MarkdownNote, a subgraph with promoted widgets, nested subgraphs with a
bypassed inner node), and ``ui_workflows/packs/`` (the test pack's nodes:
a ``forceInput`` input, an any-name optional section, a bypassed pack node,
an editor primitive over a pack widget; native loads that pack, and its
definitions come from native's ``/object_info`` since the session's
ComfyUI loads no custom nodes). 112 workflows; one native server and one
browser for the whole corpus.

Explained differences (the comparison skips them, each named here):
- ``_meta.title`` is not compared: for an untitled node the frontend writes
  its display name, comfy-embed the class name (ComfyUI ignores ``_meta``).
- inputs the node does not declare (LoadAudio's ``audioUI``, the audio
  player widget the frontend serialises): ComfyUI ignores them and
  comfy-embed drops undeclared constants before validation anyway.

Needs chromium + chromium-driver and selenium, like test_page_browser.py;
``COMFY_EMBED_TEST_BROWSER=required`` (CI) makes their absence a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from comfy_embed.prepare.ui_format import FRONTEND_ONLY, convert_ui_workflow
from comfy_embed.runtime import Engine
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
OWN = Path(__file__).parent / "ui_workflows"
PACK = ROOT / "tests" / "custom_nodes" / "embed_test_pack"


class _PackNodes:
    """Node definitions: this instance's, and for the test pack's nodes (the
    session's ComfyUI loads no custom nodes) the same pack's as native
    ComfyUI loaded them (``/object_info``), read the way ComfyUI's
    INPUT_TYPES reads: required then optional, a list type is a combo."""

    def __init__(self, engine: Engine, object_info: dict[str, Any]) -> None:
        self.engine, self.info = engine, object_info

    def _pack(self, class_type: str) -> dict[str, Any] | None:
        if self.engine.comfy.has_node(class_type):
            return None
        return self.info.get(class_type, {}).get("input", {})

    def input_specs(self, class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
        spec = self._pack(class_type)
        if spec is None:
            return self.engine.comfy.input_specs(class_type)
        out = {}
        for section in ("required", "optional"):
            for name, value in (spec.get(section) or {}).items():
                kind = "COMBO" if isinstance(value[0], list) else value[0]
                out[name] = (kind, value[1] if len(value) > 1 else {})
        return out

    def input_options(self, class_type: str) -> dict[str, list[Any]]:
        spec = self._pack(class_type)
        if spec is None:
            return self.engine.comfy.input_options(class_type)
        return {n: v[0] for section in ("required", "optional")
                for n, v in (spec.get(section) or {}).items() if isinstance(v[0], list)}


def _requirements() -> None:
    reason = None
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        reason = "Debian's chromium and chromium-driver are not installed (scripts/browser)"
    else:
        try:
            import comfyui_frontend_package  # noqa: F401
            import comfyui_workflow_templates  # noqa: F401
            import selenium  # noqa: F401
        except ImportError as e:
            reason = f"{e.name} is not installed (pip install -e '.[test]')"
    if reason:
        if os.environ.get("COMFY_EMBED_TEST_BROWSER") == "required":
            pytest.fail(reason + "; COMFY_EMBED_TEST_BROWSER=required")
        pytest.skip(reason)


def _templates() -> list[Path]:
    import comfyui_workflow_templates

    folder = Path(comfyui_workflow_templates.__file__).parent / "templates"
    return sorted(folder.glob("*.json"))


def _saved(path: Path) -> dict[str, Any] | None:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) and isinstance(data.get("nodes"), list) else None


def _known(workflow: dict[str, Any], engine: Engine, pack: frozenset[str] = frozenset()) -> bool:
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    ids = {s["id"] for s in subgraphs}
    nodes = list(workflow["nodes"]) + [n for s in subgraphs for n in s.get("nodes", [])]
    return all(n["type"] in FRONTEND_ONLY or n["type"] in ids or n["type"] in pack
               or engine.comfy.has_node(n["type"]) for n in nodes)


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Native ComfyUI serving the pinned frontend package, same node set as
    the session's instance (no custom nodes, no API nodes)."""
    _requirements()
    base = tmp_path_factory.mktemp("native")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "embed_test_pack").symlink_to(PACK)  # the test pack, only
    port = free_port()
    log = open(base / "native.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "vendor" / "ComfyUI" / "main.py"), "--listen", "127.0.0.1",
         "--port", str(port), "--base-directory", str(base),
         "--disable-api-nodes", "--disable-auto-launch", "--cpu",
         "--database-url", "sqlite:///:memory:"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError((base / "native.log").read_text()[-3000:])
            try:
                if requests.get(url + "/object_info/KSampler", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("native ComfyUI did not start in 180 s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


_LOAD_AND_CONVERT = """
const [wf, done] = arguments;
(async () => {
  try {
    await window.app.loadGraphData(wf, true, false, null);
    const p = await window.app.graphToPrompt();
    done({output: p.output});
  } catch (e) { done({error: String((e && e.stack) || e)}); }
})();
"""
_READY = """
const done = arguments[arguments.length - 1];
const t0 = Date.now();
(function wait() {
  if (window.app && window.app.graph && document.querySelector('canvas')) done(true);
  else if (Date.now() - t0 > 90000) done(false);
  else setTimeout(wait, 100);
})();
"""


@pytest.fixture(scope="module")
def frontend(native: str) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = str(shutil.which("chromium"))
    driver = webdriver.Chrome(service=Service(str(shutil.which("chromedriver"))), options=options)
    try:
        driver.set_script_timeout(120)
        driver.get(native + "/")
        assert driver.execute_async_script(_READY), "the frontend did not start"
        yield driver
    finally:
        driver.quit()


def _differences(ours: dict[str, Any], theirs: dict[str, Any], engine: Engine) -> list[str]:
    out = []
    for nid in sorted(set(ours) | set(theirs)):
        if nid not in ours:
            out.append(f"node {nid} ({theirs[nid]['class_type']}) missing")
            continue
        if nid not in theirs:
            out.append(f"node {nid} ({ours[nid]['class_type']}) extra")
            continue
        a, b = theirs[nid], ours[nid]
        if a["class_type"] != b["class_type"]:
            out.append(f"node {nid}: class {b['class_type']} != {a['class_type']}")
            continue
        declared = engine.comfy.input_names(a["class_type"])
        if not engine.comfy.has_node(a["class_type"]):
            declared = None  # a pack's node: every input compared
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            if declared is not None and name not in declared:
                continue  # explained above: undeclared inputs (audioUI)
            va, vb = a["inputs"].get(name, "<absent>"), b["inputs"].get(name, "<absent>")
            if va != vb:
                out.append(f"node {nid} ({a['class_type']}) input {name}: ours {vb!r:.100}, "
                           f"frontend {va!r:.100}")
    return out


def test_conversion_matches_the_frontend(engine: Engine, frontend: Any, native: str) -> None:
    info = requests.get(native + "/object_info", timeout=60).json()
    pack = frozenset(k for k, v in info.items() if v.get("python_module", "").endswith(
        "embed_test_pack"))
    assert pack == {"EmbedTestEcho", "EmbedTestFlexible", "EmbedTestSilentWait",
                    "EmbedTestDeafWait", "EmbedTestFailOnSeed"}, pack
    defs = _PackNodes(engine, info)
    files = [*_templates(), *sorted(OWN.glob("*.json")), *sorted((OWN / "frontend").glob("*.json")),
             *sorted((OWN / "packs").glob("*.json"))]
    corpus = [(p, w) for p in files
              if (w := _saved(p)) is not None and _known(w, engine, pack)]
    assert len([p for p, _ in corpus if p.parent.name == "packs"]) >= 1
    assert len(corpus) >= 60, f"only {len(corpus)} saved workflows with known nodes"
    assert len([p for p, _ in corpus if p.parent == OWN]) >= 4
    assert len([p for p, _ in corpus if p.parent.name == "frontend"]) >= 6
    failures: dict[str, list[str]] = {}
    for path, workflow in corpus:
        answer = frontend.execute_async_script(_LOAD_AND_CONVERT, workflow)
        assert "error" not in answer, f"{path.name}: the frontend failed: {answer.get('error')}"
        theirs = answer["output"]
        assert theirs, f"{path.name}: the frontend produced no nodes"
        ours = convert_ui_workflow(workflow, defs)
        diffs = _differences(ours, theirs, engine)
        if diffs:
            failures[path.name] = diffs[:10]
    assert not failures, json.dumps(failures, indent=1)
