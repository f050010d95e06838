"""Base64 image data kept out of the fsynced ``final`` file.

A ``results[].output.base64`` whose bytes are exactly the saved output file,
lying in the output folder that holds this log (the default layout:
instances that share the log share that folder), keeps a reference
(``file`` relative to the log root, ``size``, ``crc32``); any other keeps its
bytes in the sidecar ``final.<token>.blob`` (raw bytes, not fsynced). Both
are put back as base64 on read; an output file deleted or changed since
(retention deletes the output folder just before the log) reads as
``base64: {"error": {"type": "output_unavailable", "message"}}``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import os
import sys
import zlib
from pathlib import Path
from typing import Any

__all__ = ["split_blobs", "inline_blobs", "relative_file"]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=64)
def _resolved_dir(path: str) -> str:
    """An output folder, symlinks resolved (a handful per process: cached)."""
    return os.path.realpath(path)


def _strict_b64decode(text: str) -> bytes:
    """The bytes of canonical base64 only (binascii.Error otherwise), so that
    encoding them again gives back the same text."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(text, strict_mode=True)
    raw = base64.b64decode(text, validate=True)  # Python 3.10 has no strict_mode
    if base64.b64encode(raw) != text.encode("ascii"):
        raise binascii.Error("not canonical base64")
    return raw


def _inside(path: str, folder: str) -> bool:
    """Whether the normalised ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _output_file(out: dict[str, Any], raw: bytes, root: str, output_root: str | None
                 ) -> dict[str, Any] | None:
    """A reference to the output file named by ``out["comfy"]`` if it holds
    exactly ``raw`` and lies in the output folder that holds the log
    ``root`` (resolved): every instance reading this log then reads the
    file too. None otherwise (the bytes are then copied). Plain strings,
    not pathlib: this runs on every answer's path."""
    comfy = out.get("comfy")
    if not isinstance(comfy, dict):
        return None
    try:
        shown = str(comfy["dir"])
        if not os.path.isabs(shown):  # relative to the output folder (what clients see)
            if output_root is None:
                return None
            shown = os.path.join(output_root, shown)
        base = _resolved_dir(shown)
        # normpath, not realpath: a realpath costs an lstat per component;
        # the bytes are compared below anyway.
        path = os.path.normpath(os.path.join(base, comfy["subfolder"], comfy["filename"]))
    except (KeyError, TypeError, ValueError, OSError, RuntimeError):
        return None
    if (not _inside(root, base) or root == base or not _inside(path, base)
            or _inside(path, root)):
        return None
    try:
        with open(path, "rb") as f:
            on_disk = f.read(len(raw) + 1)
    except OSError:
        return None
    if on_disk != raw:
        return None  # converted, or written over since: keep a copy
    return {"file": os.path.relpath(path, root).replace(os.sep, "/"), "size": len(raw),
            "crc32": zlib.crc32(raw)}


def split_blobs(event: dict[str, Any], root: str, output_root: str | None = None
                ) -> tuple[dict[str, Any], bytes]:
    """The final event without its base64 image data, and the data that must
    be copied as raw bytes; each ``base64`` output then says where its bytes
    are: in the output file (``file``, see :func:`_output_file`) or in the
    copy (``blob``: offset and length). ``root``: the log root, resolved;
    ``output_root``: the output folder, what a relative ``comfy.dir`` is
    relative to (None: such outputs are copied)."""
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(results := data.get("results"), list):
        return event, b""
    chunks: list[bytes] = []
    offset = 0
    new_results: list[Any] = []
    changed = False
    for r in results:
        out = r.get("output") if isinstance(r, dict) else None
        b64 = out.get("base64") if isinstance(out, dict) else None
        text = b64.get("data") if isinstance(b64, dict) else None
        if not isinstance(out, dict) or not isinstance(b64, dict) or not isinstance(text, str):
            new_results.append(r)
            continue
        try:
            raw = _strict_b64decode(text)
        except (binascii.Error, ValueError):
            new_results.append(r)  # not canonical base64: keep it inline
            continue
        ref = {k: v for k, v in b64.items() if k != "data"}
        pointer = _output_file(out, raw, root, output_root)
        if pointer is not None:
            ref.update(pointer)
        else:
            chunks.append(raw)
            ref["blob"] = [offset, len(raw)]
            offset += len(raw)
        changed = True
        new_results.append({**r, "output": {**out, "base64": ref}})
    if not changed:
        return event, b""
    return {**event, "data": {**data, "results": new_results}}, b"".join(chunks)


def relative_file(value: Any) -> str | None:
    """A ``file`` reference as written by :func:`_output_file`: ``..``
    steps out of the log root, then a path down; None for anything else."""
    if not isinstance(value, str) or not value or value.startswith("/") or "\\" in value:
        return None
    parts = value.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    rest = parts[ups:]
    if not ups or not rest or any(p in ("", ".", "..") for p in rest):
        return None
    return value


def _unavailable(out: dict[str, Any], why: str) -> dict[str, Any]:
    """What a reader gets in place of base64 data whose output file is gone."""
    comfy = out.get("comfy")
    name = comfy.get("filename") if isinstance(comfy, dict) else None
    return {"error": {"type": "output_unavailable",
                      "message": f"the output file {name!r} {why} after the task ended: "
                                 f"its base64 data is no longer available"}}


def _from_file(out: dict[str, Any], b64: dict[str, Any], root: Path, where: str
               ) -> dict[str, Any]:
    """The ``base64`` of a ``file`` reference: the output file's bytes, or
    why they are no longer available."""
    rest = {k: v for k, v in b64.items() if k not in ("file", "size", "crc32")}
    rel = relative_file(b64["file"])
    try:
        raw = (root / rel).read_bytes() if rel is not None else None
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raw = None
    except OSError as e:
        log.warning("tasklog: cannot read the output file of %s: %s", where, e)
        raw = None
    if raw is None:
        return _unavailable(out, "was deleted")
    if len(raw) != b64.get("size") or zlib.crc32(raw) != b64.get("crc32"):
        return _unavailable(out, "was changed")
    return {"data": base64.b64encode(raw).decode("ascii"), **rest}


def inline_blobs(event: dict[str, Any], blob: bytes | None, root: Path,
                 where: str) -> dict[str, Any]:
    """Put the image bytes back as base64 ``data``: from the sidecar, or
    from the output file (relative to this reader's log ``root``)."""
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(results := data.get("results"), list):
        return event
    new_results: list[Any] = []
    for r in results:
        out = r.get("output") if isinstance(r, dict) else None
        b64 = out.get("base64") if isinstance(out, dict) else None
        if not isinstance(out, dict) or not isinstance(b64, dict) or not (
                "blob" in b64 or "file" in b64):
            new_results.append(r)
            continue
        if "file" in b64:
            new_results.append({**r, "output": {**out, "base64": _from_file(out, b64, root,
                                                                             where)}})
            continue
        ref = b64.get("blob")
        if not isinstance(ref, list) or len(ref) != 2:
            new_results.append(r)
            continue
        start, length = ref
        rest = {k: v for k, v in b64.items() if k != "blob"}
        if blob is not None and 0 <= start and start + length <= len(blob):
            rest = {"data": base64.b64encode(blob[start:start + length]).decode("ascii"), **rest}
            new_results.append({**r, "output": {**out, "base64": rest}})
        else:
            # Only a crash of the machine (the blob is not fsynced) gets here.
            log.warning("tasklog: image data of %s is missing", where)
            new_results.append({**r, "output": {k: v for k, v in out.items() if k != "base64"}})
    return {**event, "data": {**data, "results": new_results}}
