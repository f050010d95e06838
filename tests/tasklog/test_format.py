"""The task log's on-disk format (issue 14): compressed files, the owner's
last flush in the final file, output files referenced instead of copied, and
logs of earlier versions still read. Real files under tmp_path."""

from __future__ import annotations

import base64
import errno
import json
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.tasklog import log as tasklog
from comfy_embed.tasklog.log import FINAL_TYPE, TaskLog

from tests.tasklog.test_log import ev, final, run_threads


def image_final(task_id: str, files: list[tuple[Path, str, bytes]]) -> dict[str, Any]:
    """A final event as the service renders it with ``output_base64``: each
    result names its file (``dir``/``subfolder``/``filename``) and inlines
    ``data``."""
    return {"type": FINAL_TYPE, "data": {
        "status": "success", "task_id": task_id, "prompt_id": "p", "results": [
            {"node_id": "9", "index": i, "output": {
                "comfy": {"filename": name, "type": "output", "subfolder": task_id,
                          "dir": str(out_dir)},
                "media_type": "image/png",
                "base64": {"data": base64.b64encode(data).decode()}}}
            for i, (out_dir, name, data) in enumerate(files)]}}


def save(out_dir: Path, task_id: str, name: str, data: bytes) -> tuple[Path, str, bytes]:
    (out_dir / task_id).mkdir(parents=True, exist_ok=True)
    (out_dir / task_id / name).write_bytes(data)
    return out_dir, name, data


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """The default layout: the task log inside the output folder."""
    out = tmp_path / "output"
    root = out / "serverless_api"
    root.mkdir(parents=True)
    return out, root


# --- compression and file count ------------------------------------------------


def test_files_are_compressed_json(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    tl.extend("t", [(1, ev(1, note="abc" * 100)), (2, ev(2, note="abc" * 100))])
    tl.extend("t", [(3, ev(3)), (4, final())])
    d = tmp_path / "t"
    for name in ("00000001.json", "final"):
        raw = (d / name).read_bytes()
        assert raw[:1] == b"x"
        json.loads(zlib.decompress(raw))  # zlib-compressed JSON, nothing else
    assert (d / "00000001.json").stat().st_size < 200  # 600 bytes of notes, squeezed
    assert tl.read("t") == [(1, ev(1, note="abc" * 100)), (2, ev(2, note="abc" * 100)),
                            (3, ev(3)), (4, final())]


def test_short_task_is_two_files(tmp_path: Path) -> None:
    """A task that ends before its first flush: owner file and final file."""
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    assert tl.extend("t", [(1, ev(1)), (2, ev(2)), (4, ev(4)), (5, final())]) == 5
    assert sorted(os.listdir(tmp_path / "t")) == ["final", "owner.json"]
    other = TaskLog(tmp_path, "i2")
    assert other.read("t") == [(1, ev(1)), (2, ev(2)), (4, ev(4)), (5, final())]
    assert other.read("t", since=2) == [(4, ev(4)), (5, final())]
    assert other.read("t", since=4) == [(5, final())]
    assert other.read("t", since=5) == []
    # Nothing counts after it, from anyone.
    assert tl.append("t", ev(6)) == 5 and other.append("t", final("error")) == 5
    assert [s for s, _ in other.read("t")] == [1, 2, 4, 5]


def test_owner_final_after_segments(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    tl.extend("t", [(1, ev(1)), (2, ev(2))])
    reader = TaskLog(tmp_path, "r")
    assert [s for s, _ in reader.read("t")] == [1, 2]
    tl.extend("t", [(3, ev(3)), (7, final())])
    assert sorted(os.listdir(tmp_path / "t")) == ["00000001.json", "final", "owner.json"]
    assert reader.read("t", since=2) == [(3, ev(3)), (7, final())]
    assert [s for s, _ in reader.read("t")] == [1, 2, 3, 7]


def test_large_last_flush_keeps_a_segment(tmp_path: Path) -> None:
    """The fsynced final file stays small: a big last flush is a segment."""
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    noise = [base64.b64encode(os.urandom(30_000)).decode() for _ in range(4)]
    batch: list[tuple[int | None, dict[str, Any]]] = [(n + 1, ev(n + 1, noise=x))
                                                      for n, x in enumerate(noise)]
    assert tl.extend("t", [*batch, (5, final())]) == 5
    assert sorted(os.listdir(tmp_path / "t")) == ["00000001.json", "final", "owner.json"]
    assert (tmp_path / "t" / "final").stat().st_size < 1000
    assert TaskLog(tmp_path, "r").read("t") == [*batch, (5, final())]


# --- exactly one final -------------------------------------------------------------


def test_owner_final_wins_over_a_rescuers_placeholder(tmp_path: Path) -> None:
    """A rescuer published its placeholder at the seq the owner (stale view)
    also starts its final at; the owner's final wins the name."""
    owner = TaskLog(tmp_path, "owner")
    owner.claim("t")
    owner.extend("t", [(1, ev(1))])
    d = tmp_path / "t"
    assert tasklog._publish(d, "00000002.json", tasklog._encode([[2, {"type": FINAL_TYPE}]]))
    reader = TaskLog(tmp_path, "r")
    assert [s for s, _ in reader.read("t")] == [1]  # stops before the placeholder
    assert owner.extend("t", [(2, ev(2)), (3, final())]) == 3
    assert reader.read("t", since=1) == [(2, ev(2)), (3, final())]
    assert reader.read("t") == [(1, ev(1)), (2, ev(2)), (3, final())]
    assert TaskLog(tmp_path, "late").append("t", final("error")) == 3


def test_final_events_supersede_the_chain_from_their_first_seq(tmp_path: Path) -> None:
    """Whatever segment lies from the owner's ``from`` on (here a stray
    non-owner event the owner did not see) is not read beside the final's
    own events: no seq twice."""
    owner = TaskLog(tmp_path, "owner")
    owner.claim("t")
    owner.extend("t", [(1, ev(1))])
    assert TaskLog(tmp_path, "stray").append("t", ev(99)) == 2
    assert owner.extend("t", [(2, ev(2)), (3, final())]) == 3
    assert TaskLog(tmp_path, "r").read("t") == [(1, ev(1)), (2, ev(2)), (3, final())]


def test_rescuer_final_wins_over_owner(tmp_path: Path) -> None:
    owner = TaskLog(tmp_path, "owner")
    owner.claim("t")
    owner.extend("t", [(1, ev(1))])
    assert TaskLog(tmp_path, "rescuer").append("t", final("error")) == 2
    # The owner's last flush comes too late: not a second final.
    assert owner.extend("t", [(2, ev(2)), (3, final())]) == 2
    events = TaskLog(tmp_path, "r").read("t")
    assert [s for s, _ in events] == [1, 2] and events[-1][1]["data"]["status"] == "error"


@pytest.mark.parametrize("hardlinks", [True, False])
def test_owner_and_rescuers_race_one_final(tmp_path: Path, hardlinks: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if not hardlinks:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(tasklog.os, "link", refuse)
    for round_ in range(10):
        task = f"t{round_}"
        owner = TaskLog(tmp_path, "owner")
        owner.claim(task)
        owner.extend(task, [(1, ev(1))])
        rescuers = [TaskLog(tmp_path, f"r{i}") for i in range(3)]

        def finish(i: int) -> int:
            if i == 0:
                return owner.extend(task, [(2, ev(2)), (3, ev(3)), (4, final("owner"))])
            return rescuers[i - 1].append(task, final(f"r{i}"))

        seqs = run_threads(4, finish)
        events = TaskLog(tmp_path, "reader").read(task)
        finals = [(s, e) for s, e in events if e["type"] == FINAL_TYPE]
        assert len(finals) == 1 and events[-1] == finals[0]
        assert set(seqs) == {finals[0][0]}  # everyone is told the one that counts
        got = [s for s, _ in events]
        assert got == sorted(set(got)) and got[0] == 1
        if finals[0][1]["data"]["status"] == "owner":
            assert got == [1, 2, 3, 4]


# --- base64: the output file instead of a copy ---------------------------------------


def test_output_file_referenced_not_copied(layout: tuple[Path, Path]) -> None:
    out, root = layout
    png = os.urandom(5000)
    event = image_final("t", [save(out, "t", "a.png", png)])
    tl = TaskLog(root, "i1")
    tl.claim("t")
    assert tl.extend("t", [(1, ev(1)), (2, event)]) == 2
    assert sorted(os.listdir(root / "t")) == ["final", "owner.json"]  # no sidecar
    assert (root / "t" / "final").stat().st_size < 600
    stored = tasklog._decode((root / "t" / "final").read_bytes())["event"]
    assert stored["data"]["results"][0]["output"]["base64"] == {
        "file": "../t/a.png", "size": 5000, "crc32": zlib.crc32(png)}
    # Another instance reads it back exactly, base64 included, even where
    # the shared folder is mounted under another path.
    (out.parent / "mnt").symlink_to(out)
    assert TaskLog(out.parent / "mnt" / "serverless_api", "i2").read("t") == [(1, ev(1)),
                                                                             (2, event)]


def test_deleted_or_changed_output_reads_as_an_error(layout: tuple[Path, Path]) -> None:
    out, root = layout
    event = image_final("t", [save(out, "t", "a.png", b"first image"),
                              save(out, "t", "b.png", b"second image")])
    tl = TaskLog(root, "i1")
    tl.claim("t")
    tl.append("t", event)
    (out / "t" / "a.png").unlink()
    (out / "t" / "b.png").write_bytes(b"second imagf")  # same size, other bytes
    (_, got), = TaskLog(root, "i2").read("t")
    assert got["data"]["status"] == "success"
    a, b = (r["output"] for r in got["data"]["results"])
    assert a["comfy"] == event["data"]["results"][0]["output"]["comfy"]
    assert a["base64"]["error"]["type"] == "output_unavailable"
    assert "'a.png' was deleted" in a["base64"]["error"]["message"]
    assert "data" not in a["base64"]
    assert b["base64"]["error"]["type"] == "output_unavailable"
    assert "'b.png' was changed" in b["base64"]["error"]["message"]
    # Retention deletes the output folder, then the log: nothing in between breaks.
    import shutil
    shutil.rmtree(out / "t")
    assert TaskLog(root, "i2").read("t")[-1][1]["data"]["results"][0]["output"]["base64"][
        "error"]["type"] == "output_unavailable"


def test_copies_when_a_reader_may_not_see_the_file(tmp_path: Path) -> None:
    out = tmp_path / "output"
    elsewhere = tmp_path / "shared-log"  # COMFY_EMBED_TASK_LOG_DIR outside the output folder
    png = b"\x89PNG saved"
    converted = b"\xff\xd8 a jpeg whose bytes are not the saved file"
    tl = TaskLog(elsewhere, "i1")
    tl.claim("t")
    event = image_final("t", [save(out, "t", "a.png", png)])
    tl.append("t", event)
    names = sorted(os.listdir(elsewhere / "t"))
    assert len(names) == 3 and names[1].endswith(".blob")
    assert TaskLog(elsewhere, "i2").read("t") == [(1, event)]
    # In the output folder, but the bytes differ from the file: a copy too.
    root = out / "serverless_api"
    tl = TaskLog(root, "i1")
    tl.claim("u")
    save(out, "u", "a.png", png)
    event = image_final("u", [(out, "a.png", converted)])
    tl.append("u", event)
    assert any(n.endswith(".blob") for n in os.listdir(root / "u"))
    (out / "u" / "a.png").unlink()
    assert TaskLog(root, "i2").read("u") == [(1, event)]


def test_file_references_stay_below_a_log_ancestor(layout: tuple[Path, Path]) -> None:
    _, root = layout
    for bad in ("/etc/passwd", "a.png", "../../x/../../etc/passwd", "..", "../", "", 7,
                "../t/./a.png", "..\\x"):
        assert tasklog._relative_file(bad) is None, bad
    assert tasklog._relative_file("../t/a.png") == "../t/a.png"
    assert tasklog._relative_file("../../out/t/a.png") == "../../out/t/a.png"


# --- earlier versions' logs ------------------------------------------------------------


def test_reads_the_previous_uncompressed_format(tmp_path: Path) -> None:
    """The version before: plain JSON, a placeholder segment, ``final`` with
    the event and a sidecar blob."""
    d = tmp_path / "t"
    d.mkdir()
    png = os.urandom(300)
    stripped = {"type": FINAL_TYPE, "data": {"status": "success", "results": [
        {"node_id": "9", "index": 0, "output": {"comfy": {"filename": "x.png"},
                                                "base64": {"blob": [0, 300]}}}]}}
    (d / "owner.json").write_text(json.dumps({"instance_id": "old"}))
    (d / "00000001.json").write_text(json.dumps([[1, ev(1)], [3, {"type": FINAL_TYPE}]]))
    (d / "final.abc.blob").write_bytes(png)
    (d / "final").write_text(json.dumps({"seq": 3, "event": stripped, "blob": "final.abc.blob"}))
    tl = TaskLog(tmp_path, "new")
    (s1, e1), (s3, e3) = tl.read("t")
    assert (s1, e1, s3) == (1, ev(1), 3)
    assert e3["data"]["results"][0]["output"]["base64"] == {
        "data": base64.b64encode(png).decode()}
    assert tl.read("t", since=1) == [(3, e3)]
    assert tl.is_final("t") and tl.append("t", final("error")) == 3
