"""Input objects read by URL: the scheme registry, the store-backed readers,
and the one endpoint rule every backend obeys (the OSS and S3 readers are
exercised against their fake servers in test_oss.py, test_s3.py and
tests/inputs/test_fetch.py)."""

from __future__ import annotations

from typing import Any

import pytest

from comfy_embed.config import Settings
from comfy_embed.errors import ImageInputError, StorageError
from comfy_embed.storage import Credentials, Readers, input_readers
from comfy_embed.storage.base import allowed_endpoint

pytestmark = pytest.mark.anyio


class Recording:
    """A store that records what it was asked for."""

    result_key = "rec"

    def __init__(self, error: str | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.error = error

    async def get_object(self, bucket: str, endpoint: str | None, key: str,
                         credentials: Credentials | None = None,
                         max_bytes: int | None = None) -> bytes:
        self.calls.append((bucket, endpoint, key, max_bytes))
        if self.error:
            raise StorageError(self.error)
        return b"bytes"


async def test_the_registry_picks_the_reader_by_scheme() -> None:
    oss, s3 = Recording(), Recording()
    readers = input_readers(Settings(), oss=oss, s3=s3)
    assert [readers.scheme(u) for u in ("HTTPS://x/a", "oss://b/k", "s3://b/k", "a.png",
                                        "data:image/png;base64,AA", "gs://b/k")] == [
        "https", "oss", "s3", None, None, None]
    assert await readers.read("oss://bkt.oss-cn-x.aliyuncs.com/in/a.png", max_bytes=9) == b"bytes"
    assert await readers.read("s3://bkt/in/a.png", max_bytes=7) == b"bytes"
    assert oss.calls == [("bkt", "oss-cn-x.aliyuncs.com", "in/a.png", 9)]
    assert s3.calls == [("bkt", None, "in/a.png", 7)]
    with pytest.raises(ImageInputError, match="gs://b/k: no reader"):
        await readers.read("gs://b/k", max_bytes=1)


async def test_a_new_scheme_is_one_registration() -> None:
    class Memory:
        async def read(self, url: str, credentials: Credentials | None, max_bytes: int) -> bytes:
            return url.encode()[:max_bytes]

    readers = Readers()
    readers.register("MEM", Memory())
    assert readers.scheme("mem://x") == "mem"
    assert await readers.read("mem://abcdef", max_bytes=4) == b"mem:"


@pytest.mark.parametrize("url, match", [
    ("oss://bkt/k", "oss://bkt/k: object storage is not configured"),
    ("s3://bkt/k", "s3://bkt/k: S3 storage is not configured"),
    ("oss://bkt", "expected oss://bucket"),  # the URL is checked first
    ("s3://Bad_Bucket/k", "not an S3 bucket name"),
])
async def test_without_a_store_such_urls_are_refused(url: str, match: str) -> None:
    with pytest.raises(ImageInputError, match=match):
        await input_readers(Settings()).read(url, max_bytes=10)


async def test_a_store_failure_names_the_url() -> None:
    readers = input_readers(Settings(), oss=Recording("NoSuchKey (HTTP 404)"))
    with pytest.raises(ImageInputError, match=r"cannot read oss://b/k.png: NoSuchKey \(HTTP 404\)"):
        await readers.read("oss://b/k.png", max_bytes=10)


CONF = "https://oss-cn-x.aliyuncs.com"


@pytest.mark.parametrize("requested, configured, expected", [
    (None, CONF, CONF),
    (CONF, CONF, CONF),
    ("oss-cn-x.aliyuncs.com", CONF, CONF),  # its host: the configured URL, scheme and all
    ("oss-cn-x.aliyuncs.com", "oss-cn-x.aliyuncs.com", "oss-cn-x.aliyuncs.com"),
    ("ok.example", CONF, "https://ok.example"),
    ("http://ok.example", None, "http://ok.example"),
    (None, None, None),
])
def test_the_endpoint_rule(requested: str | None, configured: str | None,
                           expected: str | None) -> None:
    assert allowed_endpoint(requested, configured, ["OK.example"], "X_ALLOWLIST") == expected


@pytest.mark.parametrize("requested, match", [
    ("evil.example", "endpoint evil.example is not the configured one nor in X_ALLOWLIST"),
    ("https://evil.example/", "evil.example is not the configured one"),
    ("ftp://ok.example", "must be an http"),
])
def test_the_endpoint_rule_refuses(requested: str, match: str) -> None:
    with pytest.raises(StorageError, match=match):
        allowed_endpoint(requested, CONF, ["ok.example"], "X_ALLOWLIST")
