"""Shared fixtures: one real ComfyUI per test process (its state is
process-global), booted on CPU with folders under a temporary directory."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from comfy_embed import Settings, shared_engine
from comfy_embed.runtime import Engine

from tests.servers import Server

# Settings(...) built in code take the COMFY_EMBED_* variables they do not set
# (keywords > environment > defaults): the tests start from none of them, so
# a variable set by CI or a developer's shell changes no test. Variables that
# are not settings (COMFY_EMBED_TEST_BROWSER) stay.
for _var in [v for v in os.environ if v == "FC_SERVER_PORT" or (
        v.startswith("COMFY_EMBED_") and v[len("COMFY_EMBED_"):].lower() in Settings.flat_fields())]:
    del os.environ[_var]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the real-server tier ``server``: tests that boot real ComfyUI in
    this process (the ``engine`` fixture) or start real servers
    (tests/servers.py). ``pytest -m "not server"`` is then the fast tier;
    the default run (CI) runs both."""
    for item in items:
        module = getattr(item, "module", None)
        if "engine" in getattr(item, "fixturenames", ()) or getattr(module, "Server", None) is Server:
            item.add_marker(pytest.mark.server)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    base = tmp_path_factory.mktemp("comfy")
    return Settings(base_dir=base, tiny_checkpoint=True, device="cpu",
                    cache_dir=Path.home() / ".cache" / "comfy-embed", max_queue=8)


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Engine:
    engine = shared_engine(settings)
    engine.executor.wait_ready(300)
    return engine


def example(name: str) -> dict[str, Any]:
    text = resources.files("comfy_embed.examples").joinpath(f"{name}.json").read_text()
    return json.loads(text)


def text_to_image(steps: int = 3, size: int = 64, seed: int = 1) -> dict[str, Any]:
    g = example("text_to_image")
    g["5"]["inputs"].update(width=size, height=size)
    g["3"]["inputs"].update(steps=steps, seed=seed)
    return g


def image_only(batch: int = 2, color: int = 0xFF0000, size: int = 64) -> dict[str, Any]:
    g = example("image_only")
    g["1"]["inputs"].update(batch_size=batch, color=color, width=size, height=size)
    return g
