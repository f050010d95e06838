"""Shared pieces of the SDK-driven v2 tests: a graph that reads an uploaded
image and writes it inverted (so a test can check real pixels), small PNGs,
and the long graph a cancel needs."""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from tests.conftest import text_to_image

#: The SaveImage node of :func:`invert_graph`.
SAVE = "3"
#: The LoadImage node of :func:`invert_graph`, whose ``image`` gets the asset.
LOAD = "1"


def invert_graph(prefix: str = "v2sdk") -> dict[str, Any]:
    """LoadImage -> ImageInvert -> SaveImage (API format)."""
    return {
        LOAD: {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": [LOAD, 0]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix,
                                                     "images": ["2", 0]}},
    }


def random_color() -> tuple[int, int, int]:
    """A colour no other test run uses (so an upload is a new blob)."""
    rng = random.SystemRandom()
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def png_bytes(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color: tuple[int, int, int]) -> Path:
    path.write_bytes(png_bytes(color))
    return path


def pixel(data: bytes) -> tuple[int, int, int]:
    """The top-left pixel of an image file's bytes."""
    with Image.open(io.BytesIO(data)) as im:
        return tuple(im.convert("RGB").getpixel((0, 0)))  # type: ignore[return-value]


def inverted(color: tuple[int, int, int]) -> tuple[int, int, int]:
    return (255 - color[0], 255 - color[1], 255 - color[2])


def is_inverted(data: bytes, color: tuple[int, int, int]) -> bool:
    """Whether the image holds ``color`` inverted (ComfyUI works in floats,
    so a channel may round one off)."""
    return all(abs(a - b) <= 1 for a, b in zip(pixel(data), inverted(color)))


def long_graph(seed: int) -> dict[str, Any]:
    """A text-to-image run long enough to be canceled while it runs."""
    return text_to_image(steps=3000, seed=seed)


def wait_until(probe: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll ``probe`` (a real request) until true; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
