"""Turning ComfyUI's history outputs into the ``results`` list of the API.

Every file of every output node, in node order then index order; base64 and
object-storage copies are added after the run, off the executor thread.
"""

from __future__ import annotations

import base64
import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import anyio

from comfy_embed.errors import StorageError
from comfy_embed.prepare.graph import node_order

if TYPE_CHECKING:
    from comfy_embed.storage import Store

__all__ = ["OutputFile", "collect_files", "collect_values", "jsonable", "render_inline",
           "render_results"]


@dataclass(frozen=True)
class OutputFile:
    node_id: str
    index: int
    filename: str
    subfolder: str
    type: str
    #: The absolute folder (server side only: never sent to clients).
    dir: Path
    #: ``dir`` relative to the output folder, as clients see it (``"."``).
    rel_dir: str = "."

    @property
    def path(self) -> Path:
        return self.dir / self.subfolder / self.filename

    @property
    def media_type(self) -> str:
        return mimetypes.guess_type(self.filename)[0] or "application/octet-stream"


def collect_files(outputs: dict[str, Any], directory_of: Callable[[str], Path]) -> list[OutputFile]:
    """Every file entry (``{filename, subfolder, type}``) in every list of
    every node's UI output: images, batches, animations, video, audio."""
    files: list[OutputFile] = []
    shown: dict[str, str] = {}
    for node_id in sorted(outputs, key=node_order):
        index = 0
        for value in (outputs[node_id] or {}).values():
            if not isinstance(value, list):
                continue
            for item in value:
                if isinstance(item, dict) and "filename" in item:
                    kind = item.get("type", "output")
                    folder = directory_of(kind)
                    if kind not in shown:
                        shown[kind] = public_dir(folder, directory_of("output"))
                    files.append(OutputFile(node_id, index, item["filename"],
                                            item.get("subfolder", ""), kind,
                                            folder, shown[kind]))
                    index += 1
    return files


def public_dir(folder: Path, output_root: Path) -> str:
    """``folder`` as ``output.comfy.dir`` shows it: relative to the output
    folder, ``/``-separated (``"."`` for outputs, ``"../temp"`` say for
    previews), so no server path reaches a client."""
    return os.path.relpath(folder, output_root).replace(os.sep, "/")


#: UI keys that only describe the files beside them (SaveAnimatedWEBP's flag).
_FILE_COMPANIONS = frozenset({"animated"})


def collect_values(outputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The non-file part of every node's UI output, ``{node_id: {key: value}}``:
    text (PreviewAny, ShowText nodes), numbers, JSON. Lists of file entries are
    ``results`` and are left out; values that are not JSON become strings."""
    values: dict[str, dict[str, Any]] = {}
    for node_id in sorted(outputs, key=node_order):
        ui = outputs[node_id] or {}
        if not isinstance(ui, dict):
            continue
        kept = {}
        for key, value in ui.items():
            if key in _FILE_COMPANIONS or _is_file_list(value):
                continue
            kept[str(key)] = jsonable(value)
        if kept:
            values[node_id] = kept
    return values


def _is_file_list(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(v, dict) and "filename" in v for v in value))


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` with everything JSON cannot hold turned into strings (numpy
    and torch scalars into numbers): what nodes put in messages is arbitrary."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if depth > 16:
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 1) == 0:
        try:
            return jsonable(item(), depth + 1)
        except Exception:
            pass
    return str(value)


#: ``output_format`` values and the Pillow format / extension they give.
FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg"), "jpg": ("JPEG", "jpg"),
           "webp": ("WEBP", "webp")}


def reencode(f: OutputFile, output_format: str, quality: int | None) -> OutputFile:
    """A copy of a still image in another format, beside the original.
    Animations, video and audio are left as they are."""
    from PIL import Image

    pil_format, ext = FORMATS[output_format]
    if f.path.suffix.lower().lstrip(".") == ext or not f.media_type.startswith("image/"):
        return f
    with Image.open(f.path) as im:
        if getattr(im, "is_animated", False):
            return f
        still = im.convert("RGB") if pil_format == "JPEG" and im.mode not in ("RGB", "L") else im
        target = f.path.with_suffix("." + ext)
        options = {"quality": quality} if quality and pil_format != "PNG" else {}
        still.save(target, pil_format, **options)
    return OutputFile(f.node_id, f.index, target.name, f.subfolder, f.type, f.dir, f.rel_dir)


#: Outputs up to this size are base64-encoded on the event loop (well under
#: a millisecond); larger ones in a worker thread.
_INLINE_BYTES = 128 * 1024


def _small(path: Path) -> bool:
    try:
        return path.stat().st_size <= _INLINE_BYTES
    except OSError:
        return False  # the worker thread reports it like any unreadable file


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _entries(files: list[OutputFile]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for f in files:
        out: dict[str, Any] = {"comfy": {"filename": f.filename, "type": f.type,
                                         "subfolder": f.subfolder, "dir": f.rel_dir},
                               "media_type": f.media_type}
        entries.append({"node_id": f.node_id, "index": f.index, "output": out})
    return entries


def render_inline(files: list[OutputFile], *, output_base64: bool = False
                  ) -> list[dict[str, Any]] | None:
    """The ``results`` entries when nothing needs awaiting (no upload, no
    conversion, base64 of small files only), built on the spot: the common
    answer skips a task and its loop iterations. None when
    :func:`render_results` must do it. Raises StorageError as it does."""
    if output_base64 and not all(_small(f.path) for f in files):
        return None
    entries = _entries(files)
    if output_base64:
        for f, entry in zip(files, entries, strict=True):
            try:
                entry["output"]["base64"] = {"data": _b64(f.path)}
            except OSError as e:  # deleted meanwhile
                raise StorageError(f"could not prepare output files: {e}") from e
    return entries


async def render_results(files: list[OutputFile], *, output_base64: bool = False,
                         store: Store | None = None, credentials: Any = None,
                         output_format: str | None = None, quality: int | None = None
                         ) -> list[dict[str, Any]]:
    """The API's ``results`` entries; uploads run concurrently. Raises
    StorageError if any upload fails: no result is reported half-uploaded."""
    if output_format:
        files = [await anyio.to_thread.run_sync(reencode, f, output_format, quality) for f in files]
    entries = _entries(files)

    jobs: list[Callable[[], Awaitable[None]]] = []
    failures: list[BaseException] = []
    for f, entry in zip(files, entries, strict=True):
        out = entry["output"]
        if output_base64 and _small(f.path):
            # Just written, so in the page cache: encoding it here costs less
            # than the hop to a worker thread (on every request's answer path).
            try:
                out["base64"] = {"data": _b64(f.path)}
            except OSError as e:  # deleted meanwhile: reported like the others
                failures.append(e)
        elif output_base64:
            async def enc(f: OutputFile = f, out: dict[str, Any] = out) -> None:
                out["base64"] = {"data": await anyio.to_thread.run_sync(_b64, f.path)}
            jobs.append(enc)
        if store is not None:
            key = store.result_key

            async def up(f: OutputFile = f, out: dict[str, Any] = out, key: str = key) -> None:
                out[key] = await store.upload(f.path, f.media_type, credentials)
            jobs.append(up)

    async def guarded(job: Callable[[], Awaitable[None]]) -> None:
        # Collect rather than let the task group wrap errors in a group:
        # callers get the first StorageError itself.
        try:
            await job()
        except Exception as e:
            failures.append(e)

    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(guarded, job)
    if failures:
        first = failures[0]
        if isinstance(first, StorageError):
            raise first
        raise StorageError(f"could not prepare output files: {first}") from first
    return entries
