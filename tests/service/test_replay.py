"""POST /api/serverless/run?replay=<task_id> on a real server: a seeded
text-to-image task run again gives the same pixels and no differences; after
the checkpoint file is swapped, the differences name the model."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import requests
from PIL import Image

from tests.servers import Server

TINY = Path.home() / ".cache" / "comfy-embed" / "tiny-sd15.safetensors"  # tests/servers.py


def graph() -> dict[str, Any]:
    g = json.loads(resources.files("comfy_embed.examples").joinpath("text_to_image.json").read_text())
    g["4"]["inputs"]["ckpt_name"] = "replayed.safetensors"
    g["5"]["inputs"].update(width=64, height=64)
    g["3"]["inputs"].update(steps=2, seed=-1)  # resolved at submit: the record keeps the seed
    return g


def pixels(server: Server, answer: dict[str, Any]) -> bytes:
    (result,) = answer["data"]["results"]
    with Image.open(io.BytesIO(server.file_of(result["output"]["comfy"]).read_bytes())) as im:
        return im.convert("RGB").tobytes()


def test_replay_same_pixels_then_the_swapped_model_named(tmp_path: Path) -> None:
    base = tmp_path / "base"
    ckpt = base / "models" / "checkpoints" / "replayed.safetensors"
    server = Server(base, cache="none")
    try:
        server.wait_ready()  # builds the tiny checkpoint if the cache has none
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TINY, ckpt)
        first = server.run(graph(), headers={"X-Fc-Request-Id": "replay-source"})
        assert first.status_code == 200, first.text
        seed = first.json()["data"]["seeds"]["3"]
        # The record rides in the fsynced final file: no file of its own,
        # on disk with the answer.
        folder = base / "output" / "serverless_api" / "replay-source"
        names = {p.name for p in folder.iterdir()}
        assert "final" in names and "replay.json" not in names, names

        again = server.run(None, "?replay=replay-source")
        assert again.status_code == 200, again.text
        body = again.json()
        assert body["data"]["replay"] == {"of": "replay-source", "differences": {}}
        assert body["data"]["seeds"]["3"] == seed
        assert body["data"]["report"]["environment"]["replay"]["differences"] == {}
        assert pixels(server, body) == pixels(server, first.json())

        # The checkpoint swapped for one whose last weight differs.
        data = bytearray(ckpt.read_bytes())
        data[-2] ^= 0x01
        ckpt.write_bytes(bytes(data))
        swapped = server.run(None, "?replay=replay-source")
        assert swapped.status_code == 200, swapped.text
        recorded = first.json()["data"]["report"]["environment"]["models"]
        assert swapped.json()["data"]["replay"]["differences"] == {"models": {
            "checkpoints/replayed.safetensors": {
                "recorded": recorded["checkpoints/replayed.safetensors"],
                "now": hashlib.sha256(bytes(data)).hexdigest()}}}

        # A graph too large for the final file (a 40 KB node title): its
        # record is a file of its own, written just after the answer.
        big = graph()
        big["6"]["_meta"]["title"] = "a lighthouse " * 3_000
        large = server.run(big, headers={"X-Fc-Request-Id": "replay-large"})
        assert large.status_code == 200, large.text
        replayed = server.run(None, "?replay=replay-large")
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["data"]["seeds"] == large.json()["data"]["seeds"]
        assert (base / "output" / "serverless_api" / "replay-large" / "replay.json").is_file()

        # A task that left no record: 400 naming the parameter; the server goes on.
        missing = server.run(None, "?replay=no-such-task")
        assert missing.status_code == 400
        assert "replay: task no-such-task has no recorded graph" in missing.json()["data"]["error"]["message"]
        assert requests.get(server.url + "/ready", timeout=5).status_code == 200
    finally:
        server.stop()
