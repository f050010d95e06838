"""The playground's routes in-process (fast tier): the page, its files and
the bundled examples. The page's behaviour in a browser is tests/api/test_page_browser.py."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Iterator

import pytest

from comfy_embed.api.page import STATIC_DIR

from tests.api.serverless.test_inprocess import App, open_app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    yield from open_app(tmp_path)


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_page_is_served_at_root_and_playground(app: App, path: str) -> None:
    r = app.client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "<title>comfy-embed playground</title>" in r.text
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', r.text)
    assert len(assets) == 2
    for asset in assets:
        a = app.client.get("/" + asset)
        assert a.status_code == 200, asset
    assert app.client.get("/static/playground.js").headers["content-type"].split(";")[0] in (
        "text/javascript", "application/javascript")
    assert app.client.get("/static/playground.css").headers["content-type"].startswith("text/css")


def test_static_files_load_nothing_from_elsewhere() -> None:
    # No CDN, no fonts, no analytics: the page works on a closed network.
    names = sorted(p.name for p in STATIC_DIR.glob("playground.*"))
    assert names == ["playground.css", "playground.html", "playground.js"]
    for name in names:
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name


def test_examples_route_lists_the_bundled_workflows(app: App) -> None:
    r = app.client.get("/playground/examples")
    assert r.status_code == 200
    got = {e["name"]: e["workflow"] for e in r.json()["examples"]}
    folder = resources.files("comfy_embed.examples")
    want = {p.name[:-5]: json.loads(p.read_text()) for p in folder.iterdir() if p.name.endswith(".json")}
    assert got == want and {"text_to_image", "image_only"} <= set(got)


def test_unknown_static_file_is_404(app: App) -> None:
    assert app.client.get("/static/nope.js").status_code == 404
    assert app.client.get("/static/../page.py").status_code == 404
