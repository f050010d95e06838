"""Comfy API v2's ``core/ASSET`` references in a workflow, resolved to input
files: ``{"__type": "core/ASSET", "info": {"id": "asset_...", ...}}`` where
a file name would go (LoadImage's ``image``) becomes the name of a copy of
the asset's bytes under ``serverless/<task_id>/`` in the input folder (the
task's own inputs: out of other tasks' reach, deleted when it ends).

``info.id`` is authoritative (``hash`` and ``file_path`` are hints). A
reference that is malformed, names no asset, one whose bytes are gone, or
another owner's fails the request with MissingAsset (422 ``missing_asset``)
naming the node and input; all of them in one error.
"""

from __future__ import annotations

import mimetypes
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from comfy_embed.assets.store import AssetRecord, AssetStore
from comfy_embed.errors import MissingAsset

__all__ = ["ASSET_TYPE", "asset_refs", "resolve_assets"]

ASSET_TYPE = "core/ASSET"
#: Where materialised inputs go under the input folder (inputs.fetch.SUBFOLDER).
_SUBFOLDER = "serverless"

Ref = tuple[str, str, str, Any]


def asset_refs(prompt: dict[str, Any]) -> Iterator[Ref]:
    """``(node_id, class_type, input_name, value)`` of every input whose value
    is a ``core/ASSET`` reference."""
    for node_id, node in prompt.items():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for name, value in inputs.items():
            if isinstance(value, dict) and value.get("__type") == ASSET_TYPE:
                yield str(node_id), str(node.get("class_type", "")), str(name), value


def _why_not(value: Any, record: AssetRecord | None, owner: str | None,
             store: AssetStore) -> str | None:
    info = value.get("info")
    if not isinstance(info, dict) or not isinstance(info.get("id"), str):
        return "a core/ASSET reference needs info.id (the asset id)"
    if owner is None:
        return "core/ASSET references are resolved on the Comfy API v2 (/api/v2/jobs) only"
    if record is None or record.owner != owner:
        return f"asset {info['id'][:80]!r} does not exist (or is not yours)"
    if not store.blob_path(record.digest).is_file():
        return f"asset {record.id} is not ready (its bytes are missing)"
    return None


def _name(record: AssetRecord) -> str:
    """A file name for the copy: the digest, with the asset's extension."""
    ext = PurePosixPath(record.file_path or "").suffix.lower()
    if not ext or len(ext) > 10 or not ext[1:].isalnum():
        ext = mimetypes.guess_extension(record.content_type) or ""
    return f"{record.digest}{ext}"


def resolve_assets(prompt: dict[str, Any], refs: list[Ref], store: AssetStore,
                   owner: str | None, input_dir: Path, folder: str) -> None:
    """Rewrite each reference to the name of its bytes' copy under
    ``serverless/<folder>/`` (blocking: run in a worker thread)."""
    errors: list[MissingAsset] = []
    found: list[tuple[Ref, AssetRecord]] = []
    for ref in refs:
        node_id, class_type, name, value = ref
        info = value.get("info")
        asset_id = info.get("id") if isinstance(info, dict) else None
        record = store.get(asset_id) if isinstance(asset_id, str) else None
        why = _why_not(value, record, owner, store)
        if why is not None:
            errors.append(MissingAsset(why, node_id=node_id, class_type=class_type,
                                       input_name=name, value=asset_id))
        elif record is not None:
            found.append((ref, record))
    if errors:
        first = errors[0]
        for other in errors[1:]:
            first.node_errors.update(other.node_errors)
        raise first
    target = input_dir / _SUBFOLDER / folder
    for (node_id, _, name, _), record in found:
        target.mkdir(parents=True, exist_ok=True)
        file = target / _name(record)
        if not file.exists():
            tmp = target / f".{file.name}.part"
            try:
                os.link(store.blob_path(record.digest), tmp)
            except OSError:  # another filesystem, or no hard links: a copy
                shutil.copyfile(store.blob_path(record.digest), tmp)
            os.replace(tmp, file)
        prompt[node_id]["inputs"][name] = f"{_SUBFOLDER}/{folder}/{file.name}"
