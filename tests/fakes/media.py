"""Small real audio and video files, made at test time (nothing committed)."""

from __future__ import annotations

import io
import math
import struct
import wave


def make_wav(seconds: float = 0.5, rate: int = 8000) -> bytes:
    """A mono 16-bit sine tone."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(i * 440 * 2 * math.pi / rate)))
                               for i in range(int(seconds * rate))))
    return buf.getvalue()


def make_mp4(frames: int = 6, size: int = 32, fps: int = 6) -> bytes:
    """An H.264 MP4 of coloured frames."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as box:
        stream = box.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.full((size, size, 3), (40 * i) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return buf.getvalue()
