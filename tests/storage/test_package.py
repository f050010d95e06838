"""The storage package's one interface, its backend registry, and what the
API sees of it (its public surface, no SDK import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import comfy_embed.storage as storage
from comfy_embed.config import Settings
from comfy_embed.errors import StorageError

from tests.test_architecture import PACKAGE, ROOT, imports_of


def test_backends_satisfy_the_one_protocol() -> None:
    assert storage.backends() == ("oss", "s3")
    s = Settings(oss_bucket="b", oss_endpoint="oss-cn-hangzhou.aliyuncs.com", s3_bucket="b")
    for name in storage.backends():
        store = storage.open_store(name, s, env={})
        assert isinstance(store, storage.Store)
        assert store.result_key == name
    assert storage.OssStore is storage.open_store("oss", s).__class__


def test_unknown_backend_is_refused_by_name() -> None:
    with pytest.raises(StorageError, match="unknown storage backend 'azure': expected one of oss, s3"):
        storage.open_store("azure", Settings())


def test_a_new_backend_is_one_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "memory.py").write_text(
        "from comfy_embed.storage.base import read_capped\n"
        "class MemoryStore:\n"
        "    result_key = 'memory'\n"
        "    def __init__(self, settings, env=None): self.objects = {}\n"
        "    def check(self): pass\n"
        "    async def upload(self, path, content_type=None, credentials=None):\n"
        "        self.objects[path.name] = path.read_bytes()\n"
        "        return {'object': path.name}\n"
        "    async def get_object(self, bucket, endpoint, key, credentials=None, max_bytes=None):\n"
        "        data = self.objects[key]\n"
        "        return read_capped(iter([data, b'']).__next__, len(data), max_bytes, key)\n"
        "    async def delete(self, bucket, key, credentials=None):\n"
        "        self.objects.pop(key, None)\n"
        "BACKEND = MemoryStore\n")
    monkeypatch.setattr(storage, "__path__", [*storage.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "comfy_embed.storage.memory", raising=False)
    assert "memory" in storage.backends()
    store = storage.open_store("memory", Settings())
    assert isinstance(store, storage.Store) and store.result_key == "memory"


def test_api_imports_no_storage_sdk() -> None:
    code = ("import sys, comfy_embed.api, comfy_embed.service.lifecycle, comfy_embed.runtime\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('oss2', 'boto3', 'botocore'))\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""


def test_api_uses_only_the_storage_public_surface() -> None:
    for path in (PACKAGE / "api").rglob("*.py"):
        inner = {n for n in imports_of(path) if n.startswith("comfy_embed.storage.")
                 and (PACKAGE / "storage" / f"{n.split('.')[2]}.py").exists()}
        assert not inner, f"{path.name} reaches into {sorted(inner)}"
