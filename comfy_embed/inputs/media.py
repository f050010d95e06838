"""Audio and video inputs: recognising them inline and checking that bytes
are real, bounded audio or video before a node opens them.

The container is recognised from its first bytes and only a short list of
formats is handed to FFmpeg (through ``av``), each by its demuxer name: a
playlist or concat file (which would make FFmpeg open other files or URLs)
never reaches a demuxer that follows references.
"""

from __future__ import annotations

import base64
import binascii
import re
from io import BytesIO
from pathlib import Path
from typing import Any

from comfy_embed.config import Settings
from comfy_embed.errors import ImageInputError

__all__ = ["looks_base64", "probe", "sniff"]

_B64_CHARS = re.compile(r"[A-Za-z0-9+/=\s]+")

#: FFmpeg demuxer for each recognised container, and the file extension.
_CONTAINERS: dict[str, tuple[str, str]] = {
    "wav": ("wav", "wav"), "mp3": ("mp3", "mp3"), "flac": ("flac", "flac"),
    "ogg": ("ogg", "ogg"), "mp4": ("mov,mp4,m4a,3gp,3g2,mj2", "mp4"),
    "webm": ("matroska,webm", "webm"), "gif": ("gif", "gif"), "avi": ("avi", "avi"),
    "webp": ("webp_pipe", "webp"),
}
_AUDIO_CONTAINERS = ("wav", "mp3", "flac", "ogg", "mp4", "webm")
_VIDEO_CONTAINERS = ("mp4", "webm", "gif", "avi", "webp")


#: A value this long made only of base64 characters is read as base64 even
#: without a known signature (then refused as not audio/video, 422), not as a
#: file name: no file name of the input folder looks like that.
_SURELY_BASE64 = 256


def looks_base64(value: str) -> bool:
    """True when ``value`` is base64 of an audio or video container (its
    first 12 bytes carry a known signature), or :data:`_SURELY_BASE64`
    characters or more of the base64 alphabet."""
    if len(value) < 64 or _B64_CHARS.fullmatch(value[:4096]) is None:
        return False
    if len(value) >= _SURELY_BASE64:
        return True
    try:
        head = base64.b64decode(re.sub(r"\s+", "", value[:64])[:16])
    except (binascii.Error, ValueError):
        return False
    return sniff(head) is not None


def sniff(data: bytes) -> str | None:
    """The container of ``data`` from its signature (a key of _CONTAINERS)."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[4:8] == b"ftyp":
        return "mp4"
    return None


def probe(data: bytes | Path, kind: str, source: str, settings: Settings) -> str:
    """Check that ``data`` (bytes, or a file) is real ``kind`` ("audio" or
    "video") within the limits (duration, frame size); return the file
    extension to store it under. Raises ImageInputError (the input-error
    type for every media kind)."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            container = sniff(f.read(16))
    else:
        container = sniff(data)
    allowed = _AUDIO_CONTAINERS if kind == "audio" else _VIDEO_CONTAINERS
    if container is None or container not in allowed:
        names = ", ".join(_CONTAINERS[c][1] for c in allowed)
        raise ImageInputError(f"{source}: not {kind} (or an unsupported format; supported: {names})")
    demuxer, ext = _CONTAINERS[container]
    import av  # FFmpeg; imported here so that image-only use never loads it

    try:
        with av.open(_opened(data), mode="r", format=demuxer) as box:
            streams = box.streams.audio if kind == "audio" else box.streams.video
            if not streams:
                raise ImageInputError(f"{source}: the {container} file has no {kind} stream")
            stream = streams[0]
            seconds = _duration(box, stream)
            limit = settings.inputs.max_media_seconds
            if seconds is not None and seconds > limit:
                raise ImageInputError(f"{source}: {kind} of {seconds:.1f}s is over the "
                                      f"{limit:g}s limit")
            if kind == "video":
                w, h = stream.codec_context.width, stream.codec_context.height
                if w * h > settings.inputs.max_image_pixels:
                    raise ImageInputError(f"{source}: video frames of {w}x{h} are over the "
                                          f"{settings.inputs.max_image_pixels} pixel limit")
            # Decode one frame: a header alone does not prove the data is usable.
            for _ in box.decode(stream):
                break
            else:
                raise ImageInputError(f"{source}: the {kind} stream has no decodable frame")
    except ImageInputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError, EOFError) as e:
        raise ImageInputError(f"{source}: broken {kind} data ({e})") from None
    return "mkv" if ext == "webm" and not _webm_codecs(data) else ext


def _duration(box: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if box.duration is not None:
        return box.duration / 1_000_000  # av.time_base
    return None


def _opened(data: bytes | Path) -> BytesIO | str:
    """What FFmpeg opens: bytes in memory, or a file by its path."""
    return BytesIO(data) if isinstance(data, bytes) else str(data)


def _webm_codecs(data: bytes | Path) -> bool:
    """WebM proper carries only VP8/VP9/AV1 and Vorbis/Opus; other Matroska
    files keep the .mkv extension so that players and nodes open them right."""
    import av

    with av.open(_opened(data), mode="r", format="matroska,webm") as box:
        names = {s.codec_context.name for s in box.streams if s.codec_context is not None}
    return names <= {"vp8", "vp9", "av1", "vorbis", "opus"}
