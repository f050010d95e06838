"""core/ASSET references resolved to files of the task's input folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_embed.assets.store import AssetStore, Hasher
from comfy_embed.errors import MissingAsset
from comfy_embed.prepare.assetrefs import asset_refs, resolve_assets


def stored(store: AssetStore, owner: str, data: bytes, path: str = "p.png") -> str:
    h = Hasher(store)
    h.write(data)
    digest = h.close()
    store.keep_blob(h, digest)
    return store.mint(owner, digest, len(data), "image/png", path, []).id


def graph(ref: object) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": ref}},
            "2": {"class_type": "X", "inputs": {"a": ["1", 0], "b": "text"}}}


def ref(asset_id: object) -> dict:
    return {"__type": "core/ASSET", "info": {"id": asset_id}}


def test_resolves_to_a_copy_in_the_task_folder(tmp_path: Path) -> None:
    store = AssetStore(tmp_path / "log")
    asset_id = stored(store, "alice", b"bytes")
    prompt = graph(ref(asset_id))
    refs = list(asset_refs(prompt))
    assert [r[:3] for r in refs] == [("1", "LoadImage", "image")]
    resolve_assets(prompt, refs, store, "alice", tmp_path / "input", "job_1")
    name = prompt["1"]["inputs"]["image"]
    assert name.startswith("serverless/job_1/") and name.endswith(".png")
    assert (tmp_path / "input" / name).read_bytes() == b"bytes"
    assert prompt["2"]["inputs"] == {"a": ["1", 0], "b": "text"}


@pytest.mark.parametrize("case", ["unknown", "other_owner", "malformed", "no_owner", "gone"])
def test_refused_references(tmp_path: Path, case: str) -> None:
    store = AssetStore(tmp_path / "log")
    asset_id = stored(store, "alice", b"bytes")
    value = ref(asset_id)
    owner: str | None = "alice"
    if case == "unknown":
        value = ref("asset_" + "1" * 32)
    elif case == "other_owner":
        owner = "bob"
    elif case == "malformed":
        value = {"__type": "core/ASSET", "info": "x"}
    elif case == "no_owner":
        owner = None  # the FC API: no v2 assets
    else:
        for blob in store.blobs.rglob("*"):
            if blob.is_file():
                blob.unlink()
    prompt = graph(value)
    with pytest.raises(MissingAsset) as err:
        resolve_assets(prompt, list(asset_refs(prompt)), store, owner, tmp_path / "in", "t")
    assert err.value.type == "missing_asset"
    assert "node 1 (LoadImage) input 'image'" in err.value.message
    assert list(err.value.node_errors) == ["1"]
    assert not (tmp_path / "in").exists()  # nothing written
