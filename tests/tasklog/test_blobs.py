"""Tests for comfy_embed.tasklog.blobs (issue 14): base64 image data out of
the fsynced final file, as a reference to the output file or in a sidecar,
and back on read. Real files under tmp_path."""

from __future__ import annotations

import base64
import os
import zlib
from pathlib import Path
from typing import Any

import pytest

from comfy_embed.events import FINAL
from comfy_embed.tasklog.blobs import relative_file
from comfy_embed.tasklog.files import decode
from comfy_embed.tasklog.log import TaskLog

from tests.tasklog.test_log import base64_final, ev


def image_final(task_id: str, files: list[tuple[Path, str, bytes]]) -> dict[str, Any]:
    """A final event as the service renders it with ``output_base64``: each
    result names its file (``dir``/``subfolder``/``filename``) and inlines
    ``data``."""
    return {"type": FINAL, "data": {
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


# --- the sidecar ------------------------------------------------------------


def test_final_keeps_base64_in_a_sidecar(tmp_path: Path) -> None:
    tl = TaskLog(tmp_path, "i1")
    tl.claim("t")
    images = [os.urandom(3000), b"", os.urandom(1)]
    event = base64_final("t", images)
    assert tl.extend("t", [(1, ev(1)), (2, event)]) == 2
    names = sorted(os.listdir(tmp_path / "t"))
    (blob,) = [n for n in names if n.endswith(".blob")]
    # The owner's last flush (event 1) is in the final file too.
    assert names == sorted(["final", blob, "owner.json"])
    # The fsynced final file holds no image data; the sidecar holds the bytes.
    assert len((tmp_path / "t" / "final").read_bytes()) < 1000
    assert (tmp_path / "t" / blob).read_bytes() == b"".join(images)
    # Read back (by another instance too) exactly as written.
    assert TaskLog(tmp_path, "i2").read("t") == [(1, ev(1)), (2, event)]
    assert tl.read("t", since=1) == [(2, event)]
    # A lost sidecar (only a machine crash does that) drops the image data,
    # never the final event.
    (tmp_path / "t" / blob).unlink()
    (_, got), = tl.read("t", since=1)
    assert got["data"]["status"] == "success"
    assert [r["output"] for r in got["data"]["results"]] == [{"comfy": {"filename": f"x{i}.png"}}
                                                             for i in range(3)]


# --- the output file instead of a copy --------------------------------------


def test_output_file_referenced_not_copied(layout: tuple[Path, Path]) -> None:
    out, root = layout
    png = os.urandom(5000)
    event = image_final("t", [save(out, "t", "a.png", png)])
    tl = TaskLog(root, "i1")
    tl.claim("t")
    assert tl.extend("t", [(1, ev(1)), (2, event)]) == 2
    assert sorted(os.listdir(root / "t")) == ["final", "owner.json"]  # no sidecar
    assert (root / "t" / "final").stat().st_size < 600
    stored = decode((root / "t" / "final").read_bytes())["event"]
    assert stored["data"]["results"][0]["output"]["base64"] == {
        "file": "../t/a.png", "size": 5000, "crc32": zlib.crc32(png)}
    # Another instance reads it back exactly, base64 included, even where
    # the shared folder is mounted under another path.
    (out.parent / "mnt").symlink_to(out)
    assert TaskLog(out.parent / "mnt" / "serverless_api", "i2").read("t") == [(1, ev(1)),
                                                                             (2, event)]


def test_relative_dir_is_resolved_against_the_output_folder(layout: tuple[Path, Path]) -> None:
    # Issue 25 (14): clients see comfy.dir relative to the output folder
    # ("."); the writer, told the output folder, still references the file.
    out, root = layout
    png = os.urandom(5000)
    event = image_final("t", [save(out, "t", "a.png", png)])
    event["data"]["results"][0]["output"]["comfy"]["dir"] = "."
    tl = TaskLog(root, "i1", output_root=out)
    tl.claim("t")
    assert tl.extend("t", [(1, ev(1)), (2, event)]) == 2
    assert sorted(os.listdir(root / "t")) == ["final", "owner.json"]  # no sidecar
    stored = decode((root / "t" / "final").read_bytes())["event"]
    assert stored["data"]["results"][0]["output"]["base64"]["file"] == "../t/a.png"
    assert TaskLog(root, "i2").read("t") == [(1, ev(1)), (2, event)]
    # Not told the output folder: the bytes are copied, still read back exactly.
    tl2 = TaskLog(root, "i3")
    tl2.claim("u")
    event_u = image_final("u", [save(out, "u", "b.png", png)])
    event_u["data"]["results"][0]["output"]["comfy"]["dir"] = "."
    tl2.append("u", event_u)
    assert TaskLog(root, "i2").read("u")[-1][1] == event_u


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
        assert relative_file(bad) is None, bad
    assert relative_file("../t/a.png") == "../t/a.png"
    assert relative_file("../../out/t/a.png") == "../../out/t/a.png"
