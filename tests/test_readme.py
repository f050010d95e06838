"""The README's "Try it" commands, run as written, in order: a newcomer's
first five minutes must work.

Only the blocks marked ``<!-- readme-test: NAME -->`` are run, so other
sections can be added freely. Two things differ from a fresh clone, both
about where, not what: ``localhost:9000`` becomes a free port (tests run in
parallel), and ``COMFY_EMBED_SKIP_SETUP=1`` skips ``scripts/setup`` (this test
already runs from the set-up ``.venv``). No ``COMFY_EMBED_*`` setting of the
test environment leaks into the commands.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tests.servers import free_port
from tests.test_cli_output import check_clean_output, run_on_terminal

ROOT = Path(__file__).resolve().parent.parent
# They start real processes that boot ComfyUI: the slow tier.
pytestmark = pytest.mark.server
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*([\w-]+)\s*-->\s*\n```(\w*)\n(.*?)\n```", re.S)
PNG = b"\x89PNG\r\n\x1a\n"


def readme_blocks() -> dict[str, str]:
    """``{name: code}`` of every marked fenced block of README.md."""
    blocks = {m.group(1): m.group(3) for m in MARKER.finditer(README.read_text())}
    return blocks


def commands(block: str) -> list[str]:
    """The shell commands of a block, one a line, trailing comments dropped."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def clean_env(**extra: str) -> dict[str, str]:
    """A shell as a newcomer has it: none of the test's COMFY_EMBED_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COMFY_EMBED_") and k != "FC_SERVER_PORT"}
    # Outside a worktree this is the clone itself; inside one it makes the
    # worktree's code win over the shared editable install.
    env["PYTHONPATH"] = str(ROOT)
    env["COMFY_EMBED_SKIP_SETUP"] = "1"
    env.update(extra)
    return env


def sse_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]


def test_readme_has_the_marked_blocks() -> None:
    blocks = readme_blocks()
    for name in ("demo", "serve", "curl", "library", "cli", "tests", "saved", "apps", "openai"):
        assert name in blocks, f"README.md lost its <!-- readme-test: {name} --> block"
    assert commands(blocks["serve"]) == ["scripts/serve"]
    assert commands(blocks["demo"]) == ["scripts/demo"]
    assert commands(blocks["tests"]) == ["scripts/test"]
    # .ci/run is what CI runs: the same test command, and the library snippet
    # against the built wheel in a fresh environment.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in ci and "scripts/wheel-check" in ci
    assert "readme-test:\\s*library" in (ROOT / "scripts" / "wheel-check").read_text()


def test_use_it_in_your_project_names_both_ways_to_get_comfyui() -> None:
    text = README.read_text()
    section = text[text.index("## Use it in your project"):]
    section = section[:section.index("\n## ", 1)]
    assert "comfy-embed install-comfyui" in section and "--from URL-or-path" in section
    assert "COMFY_EMBED_COMFYUI_DIR=" in section and "Settings(comfyui_dir=...)" in section
    assert "scripts/wheel-check" in section and "## Licence" in text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """``scripts/serve`` exactly as the README says, on a free port."""
    (cmd,) = commands(readme_blocks()["serve"])
    base = tmp_path_factory.mktemp("readme-serve")
    port = free_port()
    log = open(base / "server.log", "wb")
    env = clean_env(FC_SERVER_PORT=str(port), COMFY_EMBED_BASE_DIR=str(base / "data"),
                    COMFY_EMBED_HOST="127.0.0.1")
    proc = subprocess.Popen(shlex.split(cmd), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited {proc.returncode}: "
                                   f"{(base / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError((base / "server.log").read_text()[-3000:])
            time.sleep(0.2)  # polling a booting process, bounded by the deadline
        yield url, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_curl_examples_work_against_scripts_serve(served: tuple[str, int]) -> None:
    url, port = served
    lines = commands(readme_blocks()["curl"])
    assert len(lines) == 2 and all(line.startswith("curl ") for line in lines)
    answers = []
    for line in lines:
        assert "localhost:9000" in line
        line = line.replace("localhost:9000", f"127.0.0.1:{port}")
        out = subprocess.run(line, shell=True, cwd=ROOT, env=clean_env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        answers.append(out.stdout)

    first = json.loads(answers[0])
    assert first["type"] == "serverless_api" and first["data"]["status"] == "success", first
    images = [base64.b64decode(r["output"]["base64"]["data"]) for r in first["data"]["results"]]
    assert len(images) == 2 and all(i.startswith(PNG) for i in images)

    events = sse_events(answers[1])
    final = events[-1]
    assert final["type"] == "serverless_api", events[-3:]
    assert final["data"]["status"] == "success", final["data"].get("error")
    steps = [e["data"] for e in events if e["type"] == "progress"]
    assert steps and steps[-1]["value"] == steps[-1]["max"]
    assert final["data"]["results"][0]["output"]["comfy"]["filename"].endswith(".png")


def _run_curl(line: str, port: int) -> str:
    assert line.startswith("curl ") and "localhost:9000" in line
    line = line.replace("localhost:9000", f"127.0.0.1:{port}")
    out = subprocess.run(line, shell=True, cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_saved_workflow_posted_as_is(served: tuple[str, int]) -> None:
    """The editor's saved format (nodes, links, a Reroute, a Note) runs as posted."""
    _, port = served
    (line,) = commands(readme_blocks()["saved"])
    assert "saved_workflow.json" in line
    answer = json.loads(_run_curl(line, port))
    assert answer["data"]["status"] == "success", answer
    images = [base64.b64decode(r["output"]["base64"]["data"]) for r in answer["data"]["results"]]
    assert len(images) == 2 and all(i.startswith(PNG) for i in images)


def test_app_call_with_curl(served: tuple[str, int]) -> None:
    _, port = served
    listed, called = commands(readme_blocks()["apps"])
    apps = {a["name"]: a for a in json.loads(_run_curl(listed, port))["apps"]}
    assert {"text-to-image", "invert"} <= set(apps)
    assert apps["text-to-image"]["schema"]["properties"]["prompt"]["type"] == "string"
    answer = json.loads(_run_curl(called, port))
    assert answer["data"]["status"] == "success", answer
    assert answer["data"]["seeds"] == {"3": 5} and len(answer["data"]["results"]) == 2


def test_openai_snippet_runs_as_written(served: tuple[str, int], tmp_path: Path) -> None:
    pytest.importorskip("openai")
    _, port = served
    code = readme_blocks()["openai"].replace("localhost:9000", f"127.0.0.1:{port}")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "text-to-image" in out.stdout
    assert (tmp_path / "lighthouse.png").read_bytes().startswith(PNG)


def test_the_page_the_readme_points_at_is_served(served: tuple[str, int]) -> None:
    url, _ = served
    assert "open http://localhost:9000/" in readme_blocks()["serve"]
    page = requests.get(url + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "comfy-embed playground" in page.text


def test_library_snippet_runs_as_written(tmp_path: Path) -> None:
    """From a folder outside the checkout, as in someone else's project; the
    base folder comes from the environment although the snippet passes a
    Settings of its own (keywords and COMFY_EMBED_* merge). CI runs the same
    snippet against the built wheel in a fresh environment (scripts/wheel-check)."""
    snippet = readme_blocks()["library"]
    assert "comfy_embed/" not in snippet  # nothing read from the checkout's files
    env = clean_env(COMFY_EMBED_BASE_DIR=str(tmp_path / "data"))
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    status, rest = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert status == "success"
    assert re.match(r"\{'3': \d+\} ComfyUI_\d{5}_\.png$", rest), rest
    name = rest.rsplit(" ", 1)[1]
    (written,) = (tmp_path / "data" / "output").rglob(name)  # in the task's own folder
    assert written.read_bytes().startswith(PNG)


def test_cli_command_runs_as_written(tmp_path: Path) -> None:
    (line,) = commands(readme_blocks()["cli"])
    # Run from a scratch folder that sees the clone's files, so `--out out`
    # lands there, not in the repository.
    for name in ("comfy_embed", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = clean_env(COMFY_EMBED_BASE_DIR=str(tmp_path / "data"))
    out = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["data"]["status"] == "success"
    written = [p.name for p in (tmp_path / "out").iterdir()]
    assert written == [result["data"]["results"][0]["output"]["comfy"]["filename"]]


def test_demo_runs_as_written_with_clean_terminal_output() -> None:
    (line,) = commands(readme_blocks()["demo"])
    rc, output = run_on_terminal(shlex.split(line), clean_env())
    assert rc == 0, output[-3000:]
    check_clean_output(output, steps=8)
    wrote = re.findall(r"wrote (\S+\.png)", output)
    assert wrote and all((ROOT / p).read_bytes().startswith(PNG) for p in wrote)
    assert all((ROOT / p).parent == ROOT / "demo-output" for p in wrote), wrote
