"""Output images encoded off the executor thread (issue 30).

The pool with real Pillow: a deferred save writes the bytes a direct save
writes, a failing one leaves no file, a full backlog holds the caller. Then
real servers: comfy-embed's files are byte-identical to native ComfyUI's for
the deferred nodes, and concurrent tasks never share a file name."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from benchmarks.common import NativeClient, start_native
from comfy_embed._comfy.writes import NICENESS, OutputWriter
from tests.servers import Server


def picture(seed: int = 0, size: int = 96) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


class HeldInfo(PngInfo):
    """PNG text whose chunks are read only once ``gate`` is set: holds a
    real Pillow save in the middle of encoding."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate
        self.add_text("k", "v")

    @property  # type: ignore[override]
    def chunks(self) -> list[Any]:
        self.gate.wait(30)
        return self.__dict__["_chunks"]

    @chunks.setter
    def chunks(self, value: list[Any]) -> None:
        self.__dict__["_chunks"] = value


@pytest.fixture(params=["processes", "threads"])
def writer(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OutputWriter]:
    w = OutputWriter(1, 1, lambda: [tmp_path], processes=request.param == "processes")
    yield w
    w.close()


@pytest.fixture
def threads(tmp_path: Path) -> Iterator[OutputWriter]:
    """Threads: the test holds an encode midway with an Event."""
    w = OutputWriter(1, 1, lambda: [tmp_path], processes=False)
    yield w
    w.close()


def test_a_deferred_save_writes_what_pillow_writes(writer: OutputWriter, tmp_path: Path) -> None:
    img, info = picture(), PngInfo()
    info.add_text("prompt", json.dumps({"1": {"class_type": "SaveImage"}}))
    direct = tmp_path / "direct.png"
    img.save(direct, pnginfo=info, compress_level=4)  # not deferring: Pillow's own save
    path = tmp_path / "out_00001_.png"
    writer.defer(img, path, None, {"pnginfo": info, "compress_level": 4})
    assert path.exists()  # reserved at once: the next name counts it
    (write,) = writer.finish()
    write.future.result(30)
    assert path.read_bytes() == direct.read_bytes()
    assert not list(tmp_path.glob(".encoding-*"))  # encoded beside it, then renamed over it
    assert writer.owns(path) and not writer.owns(tmp_path.parent / "elsewhere.png")


def test_a_failed_save_leaves_no_file(writer: OutputWriter, tmp_path: Path) -> None:
    path = tmp_path / "bad_00001_.png"
    writer.defer(picture(), path, "NO-SUCH-FORMAT", {})
    (write,) = writer.finish()
    with pytest.raises(KeyError):
        write.future.result(30)
    assert not path.exists() and not list(tmp_path.glob(".encoding-*"))


def test_a_full_backlog_holds_the_executor(threads: OutputWriter, tmp_path: Path) -> None:
    """Backlog 1: the second image waits for the first to be encoded."""
    gate = threading.Event()
    threads.defer(picture(1), tmp_path / "a.png", None, {"pnginfo": HeldInfo(gate)})
    second = threading.Thread(target=threads.defer,
                              args=(picture(2), tmp_path / "b.png", None, {}))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # held: no slot while "a" is being encoded
    gate.set()
    second.join(30)
    assert not second.is_alive()
    writes = threads.finish()
    for w in writes:
        w.future.result(30)
    assert [w.path.name for w in writes] == ["a.png", "b.png"]
    assert Image.open(tmp_path / "b.png").tobytes() == picture(2).tobytes()


def test_saves_of_a_deferred_node_are_handed_off_only_when_busy(threads: OutputWriter,
                                                               tmp_path: Path) -> None:
    """Only while a SaveImage runs (from its ``executing`` to its
    ``executed``), and only when the runtime says a job waits: otherwise the
    executor thread encodes, as natively."""
    sink = threads.watch(lambda kind, data: None, {"3": {"class_type": "SaveImage"},
                                                   "4": {"class_type": "ImageInvert"}})
    for busy in (False, True):
        threads.busy = lambda busy=busy: busy  # type: ignore[misc]
        sink("executing", {"node": "3"})
        picture(3).save(tmp_path / f"saved-{busy}.png")
        sink("executed", {"node": "3"})
        sink("executing", {"node": "4"})
        picture(4).save(tmp_path / f"other-{busy}.png")  # not a deferred node
        writes = threads.finish()
        assert [w.path.name for w in writes] == (["saved-True.png"] if busy else [])
        for w in writes:
            w.future.result(30)
    for name in ("saved-False", "saved-True", "other-False", "other-True"):
        assert Image.open(tmp_path / f"{name}.png").tobytes() == picture(
            3 if name.startswith("saved") else 4).tobytes()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="no per-thread priority here")
def test_encode_threads_yield_to_the_executor(writer: OutputWriter) -> None:
    """Where cores are short the executor thread (the GPU's feeder) goes first."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    # Linux: PRIO_PROCESS 0 is the calling thread (a worker process's only one).
    theirs = writer.pool().submit(os.getpriority, os.PRIO_PROCESS, 0).result(30)
    assert theirs == min(mine + NICENESS, 19)


# ------------------------------------------------------ against native ComfyUI
def graph(seed: int) -> dict[str, Any]:
    """Textured images (EmptyImage then ImageAddNoise) through every
    deferred node: SaveImage (a batch of 2), PreviewImage, SaveAnimatedWEBP,
    SaveAnimatedPNG."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 128, "height": 96, "batch_size": 2, "color": 0x3366AA}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": seed,
                                                         "strength": 0.5}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "diff"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "5": {"class_type": "SaveAnimatedWEBP",
              "inputs": {"images": ["2", 0], "filename_prefix": "anim", "fps": 6.0,
                         "lossless": False, "quality": 80, "method": "default"}},
        "6": {"class_type": "SaveAnimatedPNG",
              "inputs": {"images": ["2", 0], "filename_prefix": "apng", "fps": 6.0,
                         "compress_level": 4}},
    }


def digests(files: dict[str, list[Path]]) -> dict[str, list[str]]:
    return {node: [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
            for node, paths in files.items()}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Any]]:
    work = tmp_path_factory.mktemp("writes")
    # when_idle: these tests send one request at a time, and must see the pool.
    embed = Server(work / "embed", encode_workers=2, encode_backlog=4, encode_when_idle=1)
    native = start_native(work)
    try:
        native.wait_http("/system_stats", timeout=300)
        yield embed.wait_ready(), native
    finally:
        embed.stop()
        native.stop()


def test_files_are_byte_identical_to_native(servers: tuple[Server, Any]) -> None:
    embed, native = servers
    client = NativeClient(native.port)
    try:
        for seed in (1, 2):
            g, task_id = graph(seed), f"diff-{seed}"
            r = embed.run(g, headers={"X-Task-Id": task_id})
            assert r.status_code == 200, r.text
            # Native runs the graph comfy-embed ran: its prefixes under the
            # task's folder (the PNG text and WebP EXIF hold the prompt).
            for node in g.values():
                if "filename_prefix" in node["inputs"]:
                    node["inputs"]["filename_prefix"] = f"{task_id}/{node['inputs']['filename_prefix']}"
            history = client.run(g)["history"]["outputs"]
            theirs = {node: [native.base / ("temp" if f["type"] == "temp" else "output")
                             / f["subfolder"] / f["filename"] for f in ui["images"]]
                      for node, ui in history.items()}
            ours: dict[str, list[Path]] = {}
            for res in r.json()["data"]["results"]:
                ours.setdefault(res["node_id"], []).append(embed.file_of(res["output"]["comfy"]))
            assert sorted(ours) == ["3", "4", "5", "6"] and len(ours["3"]) == 2
            assert digests(ours) == digests(theirs)
            # File names as native gives them (PreviewImage's carry a random part).
            for node in ("3", "5", "6"):
                assert [p.name for p in ours[node]] == [p.name for p in theirs[node]]
    finally:
        client.close()


def test_names_are_reserved_before_encoding(servers: tuple[Server, Any]) -> None:
    """Two SaveImage nodes with one prefix in one task, several tasks at
    once: the second node's counter sees the first node's files, reserved
    when it ran and still being encoded, so every file keeps its own name
    (as natively), and every file is complete when the answer comes."""
    embed, _ = servers
    g = graph(7)
    del g["4"], g["5"], g["6"]
    g["3"]["inputs"]["filename_prefix"] = "burst"
    g["7"] = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "burst"}}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: embed.run(g, headers={"X-Task-Id": f"burst-{i}"}),
                                range(4)))
    paths = []
    for r in answers:
        assert r.status_code == 200, r.text
        results = r.json()["data"]["results"]
        # Results in node order; the nodes ran in either order.
        assert [x["node_id"] for x in results] == ["3", "3", "7", "7"]
        assert sorted(x["output"]["comfy"]["filename"] for x in results) == [
            f"burst_0000{n}_.png" for n in (1, 2, 3, 4)]
        for res in results:
            path = embed.file_of(res["output"]["comfy"])
            with Image.open(path) as im:
                im.load()  # complete
                plain = len(im.getcolors(4) or []) == 1  # node 7 saved EmptyImage's flat colour
                assert plain == (res["node_id"] == "7")
            paths.append(path)
    assert len(set(paths)) == 16


def test_a_file_that_cannot_be_encoded_fails_its_task(servers: tuple[Server, Any]) -> None:
    """WebP holds at most 16383 pixels a side; EmptyImage allows 16384.
    Natively SaveAnimatedWEBP fails in the node; here its encode fails in the
    pool: the task fails all the same, naming the node, no file is left under
    the reserved name, and the server goes on."""
    embed, _ = servers
    g = {"1": {"class_type": "EmptyImage",
               "inputs": {"width": 16384, "height": 8, "batch_size": 2, "color": 0}},
         "5": {"class_type": "SaveAnimatedWEBP",
               "inputs": {"images": ["1", 0], "filename_prefix": "wide", "fps": 6.0,
                          "lossless": False, "quality": 80, "method": "default"}}}
    r = embed.run(g, headers={"X-Task-Id": "too-wide"})
    assert r.status_code == 500, r.text
    error = r.json()["data"]["error"]
    assert "5" in error["message"] and "SaveAnimatedWEBP" in error["message"]
    assert "wide_00001_.webp" in error["message"] and "WebPEncodingError" in error["message"]
    assert not (embed.output_dir / "too-wide" / "wide_00001_.webp").exists()
    ok = embed.run(graph(3), headers={"X-Task-Id": "after-too-wide"})
    assert ok.status_code == 200 and ok.json()["data"]["status"] == "success"


def test_cancel_while_encoding_ends_the_task_cancelled(servers: tuple[Server, Any]) -> None:
    """Four textured 2048x2048 PNGs, two encode threads: when the node has
    run (its ``executed`` event), cancelling drops the encodes not started,
    removes their reserved files, and the task ends cancelled."""
    embed, _ = servers
    task_id = "cancel-encoding"
    g = graph(5)
    g["1"]["inputs"].update(width=2048, height=2048, batch_size=4)
    del g["4"], g["5"], g["6"]
    r = embed.run(g, headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
    assert r.status_code == 202, r.text
    events: list[dict[str, Any]] = []
    while not any(e["type"] == "executed" for e in events):
        assert not events or events[-1]["type"] != "serverless_api", events[-1]
        threading.Event().wait(0.02)
        events = embed.status(task_id)
    c = requests.post(f"{embed.url}/api/serverless/cancel", params={"task_id": task_id}, timeout=10)
    assert c.status_code == 200, c.text
    final = embed.wait_final(task_id)[-1]["data"]
    assert final["status"] == "error" and final["error"]["type"] == "execution_interrupted"
    folder = embed.output_dir / task_id
    left = sorted(p.name for p in folder.glob("diff_*.png"))
    assert len(left) < 4  # the encodes not started were dropped, their names freed
    for name in left:  # the ones that ran are whole
        with Image.open(folder / name) as im:
            im.load()


def test_a_drain_waits_for_the_files_being_encoded(tmp_path: Path) -> None:
    """/pre-stop (as SIGTERM) while a task's PNGs are still being encoded:
    the drain answers once the task ended with its final event, every file
    whole, and the server exits cleanly."""
    s = Server(tmp_path / "drain", encode_workers=1, encode_backlog=4,
               encode_when_idle=1).wait_ready()
    try:
        task_id = "drain-encoding"
        g = graph(9)
        g["1"]["inputs"].update(width=2048, height=2048, batch_size=3)
        del g["4"], g["5"], g["6"]
        r = s.run(g, headers={"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
        assert r.status_code == 202, r.text
        events: list[dict[str, Any]] = []
        while not any(e["type"] == "executed" for e in events):
            threading.Event().wait(0.02)
            events = s.status(task_id)
        assert requests.get(f"{s.url}/pre-stop", timeout=300).status_code == 200
        final = s.status(task_id)[-1]
        assert final["type"] == "serverless_api" and final["data"]["status"] == "success"
        assert len(final["data"]["results"]) == 3
        for res in final["data"]["results"]:
            with Image.open(s.file_of(res["output"]["comfy"])) as im:
                im.load()
                assert im.size == (2048, 2048)
        assert s.proc.wait(60) == 0, s.log()
    finally:
        s.stop()
