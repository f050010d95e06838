"""Models kept warm (COMFY_EMBED_KEEP_LOADED) and the loaded-models hint:
real ComfyUI, the tiny checkpoint under two names, a real server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import pytest
import requests

from comfy_embed._comfy.checkpoint import TINY_CHECKPOINT
from comfy_embed._comfy.warm import KeptModels
from comfy_embed.api.metrics import loaded_models_header
from comfy_embed.runtime import Engine

from tests.conftest import image_only, text_to_image
from tests.servers import Server

CACHE = Path.home() / ".cache" / "comfy-embed"
OTHER = "other-sd15.safetensors"


def with_checkpoint(name: str, seed: int) -> dict[str, Any]:
    graph = text_to_image(steps=1, seed=seed)
    graph["4"]["inputs"]["ckpt_name"] = name
    return graph


def models(report: dict[str, Any]) -> dict[str, Any]:
    """``{"loaded": [(name, kept)], "resident": [(name, kept)], "evicted": [...]}``."""
    m = report["models"]
    return {"loaded": [(e["name"], e["kept"]) for e in m["loaded"]],
            "resident": [(e["name"], e["kept"]) for e in m["resident"]],
            "evicted": m["evicted"]}


def loaded_header(r: requests.Response) -> list[str]:
    value = r.headers["X-Loaded-Models"]
    return [unquote(v) for v in value.split(",")] if value else []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    base = tmp_path_factory.mktemp("warm")
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # The same file under a second name: another model to ComfyUI (another
    # loader signature), not kept. The server builds the first at boot.
    (checkpoints / OTHER).symlink_to(CACHE / TINY_CHECKPOINT)
    # gc and freeing cached memory after every job (native's upkeep, due at once).
    s = Server(base, keep_loaded=TINY_CHECKPOINT, gc_interval=0).wait_ready()
    yield s
    s.stop()


def test_kept_model_stays_loaded_while_another_is_unloaded(server: Server) -> None:
    # Loaded at boot (a checkpoint loader loads it alone): warm from the start.
    r = requests.get(server.url + "/ready", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["loaded_models"] == [TINY_CHECKPOINT]
    assert r.json()["kept_models"] == [TINY_CHECKPOINT]
    assert loaded_header(r) == [TINY_CHECKPOINT]

    # Another checkpoint runs: read from disk, not kept; the kept one stays.
    r = server.run(with_checkpoint(OTHER, 1))
    assert r.status_code == 200, r.text
    assert models(r.json()["data"]["report"]) == {
        "loaded": [(OTHER, False)], "resident": [], "evicted": []}
    assert loaded_header(r) == [OTHER, TINY_CHECKPOINT]

    # The kept one answers from the cache although a workflow without it ran
    # in between (the classic cache dropped it at that run's start before).
    r = server.run(with_checkpoint(TINY_CHECKPOINT, 2))
    assert r.status_code == 200, r.text
    assert models(r.json()["data"]["report"]) == {
        "loaded": [], "resident": [(TINY_CHECKPOINT, True)], "evicted": []}
    # ... and the other one was unloaded as before (not in this run's graph).
    assert loaded_header(r) == [TINY_CHECKPOINT]

    # A run with no model at all, then the between-jobs upkeep: still kept.
    r = server.run(image_only(batch=1))
    assert r.status_code == 200, r.text
    assert loaded_header(r) == [TINY_CHECKPOINT]
    r = server.run(with_checkpoint(OTHER, 3))  # read from disk again: it was unloaded
    assert models(r.json()["data"]["report"])["loaded"] == [(OTHER, False)]
    r = server.run(with_checkpoint(TINY_CHECKPOINT, 4))
    assert models(r.json()["data"]["report"])["resident"] == [(TINY_CHECKPOINT, True)]
    log = server.log_path.read_text()
    assert "kept loaded (COMFY_EMBED_KEEP_LOADED)" in log


def test_loaded_models_in_ready_header_and_metrics(server: Server) -> None:
    r = server.run(with_checkpoint(OTHER, 5))
    assert r.status_code == 200, r.text
    ready = requests.get(server.url + "/ready", timeout=10)
    assert ready.json()["loaded_models"] == [OTHER, TINY_CHECKPOINT] == loaded_header(ready)
    assert loaded_header(requests.get(server.url + "/health", timeout=10)) == [OTHER, TINY_CHECKPOINT]
    text = requests.get(server.url + "/metrics", timeout=10).text
    series = dict(re.findall(r'^comfy_embed_model_loaded\{(.*)\} (\S+)$', text, re.M))
    assert series == {f'kept="false",model="{OTHER}"': "1.0",
                      f'kept="true",model="{TINY_CHECKPOINT}"': "1.0"}, text
    assert "comfy_embed_kept_model_evictions_total 0.0" in text


def test_header_encodes_each_name_once_per_change() -> None:
    names = ("a,b.safetensors", "sd/ü x.ckpt")
    value = loaded_models_header(names)
    assert value == b"a%2Cb.safetensors,sd/%C3%BC%20x.ckpt"
    assert [unquote(v) for v in value.decode().split(",")] == list(names)
    assert loaded_models_header(names) is value  # the same tuple: not encoded again
    assert loaded_models_header(()) == b""


def test_release_under_pressure_lets_the_kept_model_go(engine: Engine) -> None:
    """In this process's ComfyUI: a pinned checkpoint survives a run without
    it; released (what the memory guard does under pressure), the next run
    reads it from disk and its report names the eviction."""
    comfy = engine.comfy
    old, comfy.kept = comfy.kept, KeptModels({TINY_CHECKPOINT})
    try:
        def run(graph: dict[str, Any]) -> dict[str, Any]:
            result = anyio.run(lambda: engine.run(graph))
            return models(result["data"]["report"])

        first = run(with_checkpoint(TINY_CHECKPOINT, 11))
        assert first["evicted"] == [] and (TINY_CHECKPOINT, True) in (
            first["loaded"] + first["resident"])
        run(image_only(batch=1))  # would have dropped the loader's outputs
        assert run(with_checkpoint(TINY_CHECKPOINT, 12))["resident"] == [(TINY_CHECKPOINT, True)]
        assert comfy.loaded_models == (TINY_CHECKPOINT,)

        assert engine._release_kept("a test's pressure") == [TINY_CHECKPOINT]
        assert comfy.loaded_models == () and comfy.kept.pinned == frozenset()
        after = run(with_checkpoint(TINY_CHECKPOINT, 13))
        assert after["loaded"] == [(TINY_CHECKPOINT, True)]
        assert after["evicted"] == [TINY_CHECKPOINT]
        assert "comfy_embed_kept_model_evictions_total 1.0" in engine.metrics.render_text().decode()
        assert run(with_checkpoint(TINY_CHECKPOINT, 14))["evicted"] == []  # told once
    finally:
        comfy.kept.release("test over")
        comfy.kept = old


def test_kept_under_the_lru_cache(tmp_path: Path) -> None:
    """COMFY_EMBED_CACHE=lru:N evicts by age: a pinned entry comes back
    marked as used now, so it outlives the workflows that ran since."""
    checkpoints = tmp_path / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / OTHER).symlink_to(CACHE / TINY_CHECKPOINT)
    server = Server(tmp_path, keep_loaded=TINY_CHECKPOINT, cache="lru:1").wait_ready()
    try:
        for seed in (21, 22):  # two runs of the other model: beyond lru:1's age
            r = server.run(with_checkpoint(OTHER, seed))
            assert r.status_code == 200, r.text
        r = server.run(with_checkpoint(TINY_CHECKPOINT, 23))
        assert r.status_code == 200, r.text
        assert models(r.json()["data"]["report"])["resident"] == [(TINY_CHECKPOINT, True)]
        r = server.run(image_only(batch=1))
        r = server.run(with_checkpoint(OTHER, 24))  # not kept: aged out, read again
        assert models(r.json()["data"]["report"])["loaded"] == [(OTHER, False)]
        assert loaded_header(r) == [OTHER, TINY_CHECKPOINT]
    finally:
        server.stop()
