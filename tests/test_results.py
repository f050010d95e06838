"""ComfyUI history outputs -> the API's ``results``: order, indexes, folders,
re-encoding, base64, uploads to a real OSS-like server (tests/fakes)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from comfy_embed.config import Settings
from comfy_embed.errors import StorageError
from comfy_embed.results import OutputFile, collect_files, reencode, render_results
from comfy_embed.storage.oss import OssStore
from tests.fakes import FakeOss

ENV = {"OSS_ACCESS_KEY_ID": "ak", "OSS_ACCESS_KEY_SECRET": "sk"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    out = {k: tmp_path / k for k in ("output", "temp")}
    for d in out.values():
        (d / "t").mkdir(parents=True)
    return out


def png(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    Image.new("RGB", (8, 8), color).save(path)
    return path


def test_collect_orders_nodes_numerically_and_indexes_every_file(dirs: dict[str, Path]) -> None:
    outputs = {
        "10": {"images": [{"filename": "b.png", "subfolder": "t", "type": "output"}]},
        "9": {"images": [{"filename": "a1.png", "subfolder": "t", "type": "output"},
                         {"filename": "a2.png", "subfolder": "t", "type": "output"}],
              "animated": [True],  # not a file entry
              "gifs": [{"filename": "a.webp", "subfolder": "t", "type": "output"}]},
        "x": {"images": [{"filename": "p.png", "subfolder": "t", "type": "temp"}]},
        "11": {"text": ["no files here"]},
        "12": None,
    }
    files = collect_files(outputs, dirs.__getitem__)
    assert [(f.node_id, f.index, f.filename) for f in files] == [
        ("9", 0, "a1.png"), ("9", 1, "a2.png"), ("9", 2, "a.webp"), ("10", 0, "b.png"),
        ("x", 0, "p.png")]
    assert files[-1].path == dirs["temp"] / "t" / "p.png"
    assert files[2].media_type == "image/webp"


def test_reencode_stills_only(tmp_path: Path) -> None:
    still = OutputFile("9", 0, "s.png", "", "output", tmp_path)
    png(still.path)
    jpg = reencode(still, "jpeg", 80)
    assert jpg.filename == "s.jpg" and jpg.path.is_file() and still.path.is_file()
    with Image.open(jpg.path) as im:
        assert im.format == "JPEG" and im.size == (8, 8)
    assert reencode(still, "png", None) == still  # already that format
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    anim = OutputFile("9", 1, "a.webp", "", "output", tmp_path)
    frames[0].save(anim.path, save_all=True, append_images=frames[1:])
    assert reencode(anim, "png", None) == anim
    audio = OutputFile("9", 2, "a.flac", "", "output", tmp_path)
    audio.path.write_bytes(b"fLaC")
    assert reencode(audio, "jpeg", None) == audio


@pytest.mark.anyio
async def test_render_base64_and_upload(tmp_path: Path) -> None:
    files = [OutputFile("9", i, f"o{i}.png", "", "output", tmp_path) for i in range(2)]
    for i, f in enumerate(files):
        png(f.path, (i * 100, 0, 0))
    with FakeOss(keys={"ak": "sk"}) as oss:
        store = OssStore(Settings(oss_bucket="test-bucket", oss_endpoint=oss.endpoint,
                                  oss_region="cn-hangzhou"), env=ENV)
        entries = await render_results(files, output_base64=True, store=store)
        for f, entry in zip(files, entries, strict=True):
            out = entry["output"]
            assert (entry["node_id"], entry["index"]) == (f.node_id, f.index)
            assert out["comfy"] == {"filename": f.filename, "type": "output", "subfolder": "",
                                    "dir": "."}
            assert out["media_type"] == "image/png"
            assert base64.b64decode(out["base64"]["data"]) == f.path.read_bytes()
            assert oss.objects[("test-bucket", out["oss"]["object"])].data == f.path.read_bytes()
        # Wrong keys: the upload fails as a StorageError, and no result comes back.
        bad = OssStore(Settings(oss_bucket="test-bucket", oss_endpoint=oss.endpoint,
                                oss_region="cn-hangzhou"),
                       env={"OSS_ACCESS_KEY_ID": "ak", "OSS_ACCESS_KEY_SECRET": "wrong"})
        with pytest.raises(StorageError, match="oss://test-bucket/"):
            await render_results(files, store=bad)


@pytest.mark.anyio
async def test_render_missing_file_is_a_storage_error(tmp_path: Path) -> None:
    gone = OutputFile("9", 0, "gone.png", "", "output", tmp_path)
    with pytest.raises(StorageError, match="could not prepare output files"):
        await render_results([gone], output_base64=True)


@pytest.mark.anyio
async def test_render_base64_small_and_large_files(tmp_path: Path) -> None:
    # Small outputs are encoded on the loop, large ones in a worker thread:
    # both give the file's exact bytes.
    import base64
    import os
    small, large = os.urandom(100), os.urandom(300 * 1024)
    (tmp_path / "s.png").write_bytes(small)
    (tmp_path / "l.png").write_bytes(large)
    files = [OutputFile("9", 0, "s.png", "", "output", tmp_path),
             OutputFile("9", 1, "l.png", "", "output", tmp_path)]
    entries = await render_results(files, output_base64=True)
    got = [base64.b64decode(e["output"]["base64"]["data"]) for e in entries]
    assert got == [small, large]


@pytest.mark.anyio
async def test_render_inline_builds_what_render_results_builds_or_declines(tmp_path: Path) -> None:
    """Small base64 outputs (or none asked) are built on the spot, exactly as
    render_results builds them; a large or a missing file declines (None)."""
    import os

    from comfy_embed.results import render_inline

    (tmp_path / "s.png").write_bytes(os.urandom(100))
    (tmp_path / "l.png").write_bytes(os.urandom(300 * 1024))
    small = [OutputFile("9", 0, "s.png", "", "output", tmp_path),
             OutputFile("9", 1, "s.png", "", "output", tmp_path)]
    for b64 in (True, False):
        assert render_inline(small, output_base64=b64) == await render_results(small, output_base64=b64)
    large = small + [OutputFile("9", 2, "l.png", "", "output", tmp_path)]
    assert render_inline(large, output_base64=True) is None
    assert render_inline(large, output_base64=False) is not None  # nothing to read
    # A missing file declines too: render_results reports it (above).
    gone = [OutputFile("9", 0, "gone.png", "", "output", tmp_path)]
    assert render_inline(gone + small, output_base64=True) is None
