"""Image inputs: file names in the input folder, URLs (``http(s)://``,
``oss://``, ``s3://``) and inline base64, turned into a file name LoadImage
can open.

URLs are read through the storage package's :class:`~comfy_embed.storage.Readers`,
which picks a reader by the URL's scheme (``http(s)`` through
:mod:`comfy_embed.net`: private, loopback, link-local and metadata addresses
refused unless allowlisted, on every redirect, the connection pinned to the
checked address). Everything that arrives as bytes is checked to be a real,
reasonably sized image (or audio, video) and stored under a content-hash
name in ``<input>/serverless/``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import re
import tempfile
import weakref
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import anyio
import anyio.to_thread
from PIL import Image, UnidentifiedImageError

from comfy_embed.config import Settings
from comfy_embed.errors import ImageInputError, InputPathInvalid
from comfy_embed.inputs import media
from comfy_embed.prepare.pipeline import InputBudget
from comfy_embed.storage import Readers, input_readers

if TYPE_CHECKING:
    from comfy_embed.storage import Credentials

__all__ = ["ImageFetcher", "is_remote_or_inline", "check_name_text", "SUBFOLDER"]

logger = logging.getLogger(__name__)

#: Sub-folder of the input folder that materialised images go to.
SUBFOLDER = "serverless"
#: A fetched body is written to its file in pieces of this size (each one
#: write in a worker thread: the input folder may be a slow network mount).
_WRITE_BYTES = 1024 * 1024

# Formats LoadImage handles. Restricting Image.open to them keeps Pillow away
# from plugins that shell out or parse exotic containers (EPS runs Ghostscript).
_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG covers MPO
_EXT = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tiff"}
# Leading base64 characters of PNG, JPEG, WebP (RIFF), GIF.
_B64_MAGIC = ("iVBORw0KGgo", "/9j/", "UklGR", "R0lGOD")
_B64_CHARS = re.compile(r"[A-Za-z0-9+/=\s]+")
_DATA_URI = re.compile(r"data:([^,]*),(.*)", re.DOTALL | re.IGNORECASE)


def is_remote_or_inline(value: str) -> bool:
    """True when ``value`` is an http(s)/oss/s3 URL, a data URI or raw base64 image
    bytes, i.e. something :meth:`ImageFetcher.materialise` turns into a file."""
    head = value[:16].lower()
    return (head.startswith(("http://", "https://", "oss://", "s3://", "data:"))
            or _looks_base64(value))


def _looks_base64(value: str) -> bool:
    if not value.startswith(_B64_MAGIC):
        return False
    # A long value with an image signature is base64 even when corrupted (so it
    # gets a base64 error, not "no such file"); a short one only if it is clean.
    return len(value) >= 64 or _B64_CHARS.fullmatch(value) is not None


#: Bounds checked before any filesystem call (resolving a path costs one
#: lookup per component, so an unbounded name would cost its length squared).
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255


def _short(value: str) -> str:
    return repr(value if len(value) <= 120 else value[:120] + "...")


def check_name_text(value: str) -> None:
    """Refuse a file-name input that could not name a file of the input
    folder, by its text alone: linear in its length, which is bounded first.
    Names under ``serverless/`` are refused: that folder holds other callers'
    materialised images."""
    if len(value) > MAX_NAME_BYTES:
        raise InputPathInvalid(f"file name of {len(value)} characters is over the "
                               f"{MAX_NAME_BYTES} byte limit")
    name = value
    if name.endswith(" [input]"):
        name = name[: -len(" [input]")]
    elif name.endswith((" [output]", " [temp]")):
        raise InputPathInvalid(f"{_short(value)}: only files in the input folder may be used")
    if not name.strip() or "\x00" in name:
        raise InputPathInvalid(f"{_short(value)} is not a valid file name")
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_NAME_BYTES:
        raise InputPathInvalid(f"file name of {len(encoded)} bytes is over the "
                               f"{MAX_NAME_BYTES} byte limit")
    if name.startswith(("/", "~")) or os.path.isabs(name):
        raise InputPathInvalid(f"{_short(value)}: absolute paths are not allowed")
    parts = name.split("/")
    if ".." in parts:
        raise InputPathInvalid(f"{_short(value)}: '..' may not leave the input folder")
    if any(len(p.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES for p in parts):
        raise InputPathInvalid(f"{_short(value)}: a file or folder name is over "
                               f"{MAX_COMPONENT_BYTES} bytes")
    if [p for p in parts if p not in ("", ".")][:1] == [SUBFOLDER]:
        raise InputPathInvalid(f"{_short(value)}: the {SUBFOLDER}/ folder is reserved for "
                               "images sent inline or by URL")


class ImageFetcher:
    """Turns an image input value into a file name inside ``input_dir``.

    URLs are read by ``readers`` (default: :func:`~comfy_embed.storage.input_readers`
    with no store, so ``oss://`` and ``s3://`` inputs are refused as not
    configured). One fetcher serves an engine: its HTTP client is reused
    until :meth:`aclose`.
    """

    def __init__(self, settings: Settings, input_dir: Path, readers: Readers | None = None,
                 on_fetched: Callable[[str, int], None] | None = None) -> None:
        self.settings = settings
        #: Told (source, bytes) of each image fetched or decoded (metrics).
        self.on_fetched = on_fetched
        self.input_dir = Path(input_dir).resolve()
        self.readers = readers if readers is not None else input_readers(settings)
        self._limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                                  anyio.CapacityLimiter] = weakref.WeakKeyDictionary()

    async def materialise(self, value: str, credentials: "Credentials | None" = None,
                          kind: str = "image", folder: str | None = None,
                          budget: InputBudget | None = None) -> str:
        """Return the string to put in the workflow's ``image`` input (or
        audio / video input, with ``kind``).

        File names are checked and returned unchanged; URLs, ``oss://``,
        ``s3://`` and base64 are fetched or decoded, verified and written to
        ``serverless/[<folder>/]<sha256>.<ext>``, which is returned. A
        per-task ``folder`` keeps one caller's images out of another's reach.
        Bytes fetched or decoded are charged to ``budget`` (the request's).
        """
        scheme = self.readers.scheme(value)
        if scheme is not None:
            return await self._fetch(value, scheme, credentials, kind, folder, budget)
        if value[:5].lower() == "data:":
            data, source = self._decode_data_uri(value), "base64"
        elif _looks_base64(value) or (kind != "image" and media.looks_base64(value)):
            data, source = self._decode_base64(value.strip(), f"base64 {kind}"), "base64"
        else:
            check_name_text(value)  # bounded and linear, before a thread or a path lookup
            await anyio.to_thread.run_sync(self._check_name, value)
            return value
        if budget is not None:
            budget.charge(len(data))
        if self.on_fetched is not None:
            self.on_fetched(source, len(data))
        return await anyio.to_thread.run_sync(self._store, data, _describe(value, kind), kind, folder)

    async def _fetch(self, url: str, scheme: str, credentials: "Credentials | None", kind: str,
                     folder: str | None, budget: InputBudget | None) -> str:
        """Read ``url`` into a temporary file of its folder, hashing as it
        arrives, then verify the file and give it its content-hash name.

        At most ``fetch_concurrency`` reads run at once on this instance
        (all requests together), and no body is ever whole in memory: many
        URL inputs cost disk (each at most ``max_image_bytes``), not RAM.
        """
        relative = f"{SUBFOLDER}/{folder}" if folder else SUBFOLDER
        directory = self.input_dir / relative
        async with self._limiter():
            fd, tmp = await anyio.to_thread.run_sync(_temp_file, directory)
            size = 0
            digest = hashlib.sha256()
            pending = bytearray()
            try:
                with os.fdopen(fd, "wb") as f:
                    async def write(chunk: bytes) -> None:
                        nonlocal size
                        if budget is not None:
                            budget.charge(len(chunk))
                        size += len(chunk)
                        digest.update(chunk)
                        pending.extend(chunk)
                        if len(pending) >= _WRITE_BYTES:  # to disk off the loop, 1 MiB at a time
                            await anyio.to_thread.run_sync(f.write, bytes(pending))
                            pending.clear()

                    await self.readers.read_into(url, credentials, write=write,
                                                 max_bytes=self.settings.inputs.max_image_bytes)
                    await anyio.to_thread.run_sync(f.write, bytes(pending))
            except BaseException:
                _discard(Path(tmp), self.input_dir)
                raise
        if self.on_fetched is not None:
            self.on_fetched("url" if scheme in ("http", "https") else scheme, size)
        return await anyio.to_thread.run_sync(self._store_file, Path(tmp), digest.hexdigest(),
                                              _describe(url, kind), kind, relative)

    def _limiter(self) -> anyio.CapacityLimiter:
        """The running loop's limiter of concurrent fetches (a limiter
        belongs to one loop; ``run_workflow`` runs one loop per call)."""
        loop = asyncio.get_running_loop()
        limiter = self._limiters.get(loop)
        if limiter is None:
            limiter = self._limiters[loop] = anyio.CapacityLimiter(
                self.settings.inputs.fetch_concurrency)
        return limiter

    async def aclose(self) -> None:
        """Close the running loop's HTTP client (a later fetch opens another)."""
        await self.readers.aclose()

    # --- file names -----------------------------------------------------------
    def _check_name(self, value: str) -> None:
        check_name_text(value)
        name = value[: -len(" [input]")] if value.endswith(" [input]") else value
        try:
            path = (self.input_dir / name).resolve()
            if not path.is_relative_to(self.input_dir):
                raise InputPathInvalid(f"{_short(value)} points outside the input folder")
            if not path.is_file():
                raise InputPathInvalid(f"{_short(value)}: no such file in the input folder")
        except OSError as e:  # ELOOP, ENAMETOOLONG on an odd filesystem...
            raise InputPathInvalid(f"{_short(value)} is not a usable file name "
                                   f"({e.strerror or e})") from None

    # --- inline bytes -----------------------------------------------------------
    def _decode_base64(self, text: str, what: str) -> bytes:
        text = re.sub(r"\s+", "", text)
        # Refuse before decoding: base64 is 4 characters per 3 bytes.
        limit = self.settings.inputs.max_image_bytes
        if len(text) // 4 * 3 > limit:
            raise ImageInputError(f"{what} is over the {limit} byte limit")
        text += "=" * (-len(text) % 4)  # many clients drop the padding
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageInputError(f"{what} is not valid base64: {e}") from None

    def _decode_data_uri(self, value: str) -> bytes:
        m = _DATA_URI.fullmatch(value)
        if not m or "base64" not in [p.strip().lower() for p in m.group(1).split(";")]:
            raise ImageInputError("data URI must be of the form data:image/<type>;base64,<data>")
        return self._decode_base64(m.group(2), "data URI")

    # --- verification and storage ----------------------------------------------
    def _store(self, data: bytes, source: str, kind: str = "image",
               subfolder: str | None = None) -> str:
        """Verify ``data`` is an image (audio, video) and write it under its hash (in a thread)."""
        ext = (self._verify(data, source) if kind == "image"
               else media.probe(data, kind, source, self.settings))
        name = f"{hashlib.sha256(data).hexdigest()}.{ext}"
        relative = f"{SUBFOLDER}/{subfolder}" if subfolder else SUBFOLDER
        folder = self.input_dir / relative
        final = folder / name
        if not final.exists():  # content-addressed: same name, same bytes
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="." + ext)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, final)  # readers never see a half-written file
            except BaseException:
                _discard(Path(tmp), self.input_dir)
                raise
        logger.debug("materialised %s as %s/%s", source, relative, name)
        return f"{relative}/{name}"

    def _store_file(self, tmp: Path, digest: str, source: str, kind: str, relative: str) -> str:
        """Verify the fetched file ``tmp`` and rename it to its content-hash
        name in its folder (in a thread); ``tmp`` is gone either way."""
        try:
            ext = (self._verify(tmp, source) if kind == "image"
                   else media.probe(tmp, kind, source, self.settings))
        except BaseException:
            _discard(tmp, self.input_dir)
            raise
        name = f"{digest}.{ext}"
        os.replace(tmp, tmp.parent / name)  # content-addressed: same name, same bytes
        logger.debug("materialised %s as %s/%s", source, relative, name)
        return f"{relative}/{name}"

    def _verify(self, data: bytes | Path, source: str) -> str:
        """Return the file extension for ``data``, or raise if it is not a usable image."""
        limit = self.settings.inputs.max_image_pixels
        try:
            # Image.open reads only the header, so the size check comes before
            # any pixel is decoded. Pillow's own bomb check (Image.MAX_IMAGE_PIXELS)
            # is process-wide and left alone; its error/warning is caught below.
            with Image.open(_opened(data), formats=_FORMATS) as im:
                width, height = im.size
                frames = getattr(im, "n_frames", 1)
                fmt = im.format or ""
                # LoadImage decodes every frame, so all of them count.
                if width * height * frames > limit:
                    raise ImageInputError(
                        f"{source}: image of {width}x{height}"
                        + (f"x{frames} frames" if frames > 1 else "")
                        + f" is over the {limit} pixel limit")
                im.verify()
            with Image.open(_opened(data), formats=_FORMATS) as im:
                im.load()
        except ImageInputError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageInputError(f"{source}: refused as a decompression bomb ({e})") from None
        except UnidentifiedImageError:
            raise ImageInputError(f"{source}: not an image (or an unsupported format; "
                                  f"supported: {', '.join(_FORMATS)})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageInputError(f"{source}: broken image data ({e})") from None
        return _EXT.get(fmt, fmt.lower())


def _temp_file(directory: Path) -> tuple[int, str]:
    """A new hidden file in ``directory`` (made if missing), open for writing."""
    for _ in range(3):  # a failed fetch beside this one may remove the empty folder meanwhile
        directory.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(dir=directory, prefix=".tmp-")
        except FileNotFoundError:
            continue
    return tempfile.mkstemp(dir=directory, prefix=".tmp-")


def _discard(tmp: Path, top: Path) -> None:
    """Remove a failed fetch's file, and the folders it made that are now
    empty, up to ``top``: a refused input leaves nothing behind."""
    tmp.unlink(missing_ok=True)
    folder = tmp.parent
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty: another input of the task, or another task
            return
        folder = folder.parent


def _opened(data: bytes | Path) -> BytesIO | Path:
    """What Pillow opens: bytes in memory, or a file by its path."""
    return BytesIO(data) if isinstance(data, bytes) else data


def _describe(value: str, kind: str = "image") -> str:
    """A short name for an input value in error messages (no megabytes of base64)."""
    if value[:16].lower().startswith(("http://", "https://", "oss://", "s3://")):
        return value if len(value) <= 300 else value[:300] + "..."
    if value[:5].lower() == "data:":
        return "data URI"
    return f"base64 {kind}"
