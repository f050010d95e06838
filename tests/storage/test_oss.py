"""OssStore against a real OSS-like server on 127.0.0.1 (tests/fakes/oss_server.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
import requests

from comfy_embed.config import Settings
from comfy_embed.errors import StorageError
from comfy_embed.storage import Credentials, credentials_from_headers
from comfy_embed.storage.oss import MAX_V4_LINK_SECONDS, OssStore, region_of
from tests.fakes import FakeOss

KEY_ID, SECRET = "LTAIfakeid", "fake-secret"
STS_ID, STS_SECRET, TOKEN = "STS.fakeid", "sts-secret", "good-token"
ENV = {"OSS_ACCESS_KEY_ID": KEY_ID, "OSS_ACCESS_KEY_SECRET": SECRET}
PNG = b"\x89PNG\r\n\x1a\n" + b"not really a png, storage does not care" * 10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def oss() -> Iterator[FakeOss]:
    with FakeOss(keys={KEY_ID: SECRET, STS_ID: STS_SECRET}, tokens={TOKEN}) as fake:
        yield fake


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "out.png"
    p.write_bytes(PNG)
    return p


def settings(oss: FakeOss, **kw: object) -> Settings:
    base: dict[str, object] = dict(oss_bucket="test-bucket", oss_endpoint=oss.endpoint,
                                   oss_region="cn-hangzhou", oss_link_expire=600)
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("v4", [True, False], ids=["v4", "v1"])
async def test_upload_then_signed_url_serves_same_bytes(oss: FakeOss, image: Path,
                                                        v4: bool) -> None:
    store = OssStore(settings(oss, oss_sign_v4=v4, oss_prefix="outs/"), env=ENV)
    out = await store.upload(image)
    assert out["bucket"] == "test-bucket"
    assert out["region"] == "oss-cn-hangzhou"
    assert out["object"].startswith("outs/") and out["object"].endswith(".png")
    assert len(out["object"].split("/")[1]) == len("0" * 32) + len(".png")
    assert oss.objects[("test-bucket", out["object"])].data == PNG
    assert out["url"].startswith(oss.endpoint + "/test-bucket/outs/")
    assert ("x-oss-signature=" if v4 else "Signature=") in out["url"]
    expire = datetime.strptime(out["expire"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((expire - datetime.now(timezone.utc)).total_seconds() - 600) < 30

    r = requests.get(out["url"], timeout=10)
    assert r.status_code == 200
    assert r.content == PNG
    assert r.headers["Content-Type"] == "image/png"


@pytest.mark.anyio
async def test_explicit_content_type_and_no_link_without_expire(oss: FakeOss,
                                                                image: Path) -> None:
    store = OssStore(settings(oss, oss_link_expire=None), env=ENV)
    out = await store.upload(image, content_type="image/x-test")
    assert set(out) == {"region", "bucket", "object"}
    assert oss.objects[("test-bucket", out["object"])].content_type == "image/x-test"


@pytest.mark.anyio
async def test_public_endpoint_used_for_links(oss: FakeOss, image: Path) -> None:
    with FakeOss(keys={KEY_ID: SECRET}) as public:
        store = OssStore(settings(oss, oss_public_endpoint=public.endpoint), env=ENV)
        out = await store.upload(image)
    assert out["url"].startswith(public.endpoint + "/")


@pytest.mark.anyio
@pytest.mark.parametrize("v4", [True, False], ids=["v4", "v1"])
async def test_expired_link_is_refused(oss: FakeOss, image: Path, v4: bool) -> None:
    store = OssStore(settings(oss, oss_sign_v4=v4, oss_link_expire=60), env=ENV)
    out = await store.upload(image)
    oss.clock_offset = 120  # two minutes later
    r = requests.get(out["url"], timeout=10)
    assert r.status_code == 403
    assert b"<Code>AccessDenied</Code>" in r.content and b"expired" in r.content


@pytest.mark.anyio
@pytest.mark.parametrize("v4", [True, False], ids=["v4", "v1"])
async def test_tampered_link_is_refused(oss: FakeOss, image: Path, v4: bool) -> None:
    store = OssStore(settings(oss, oss_sign_v4=v4), env=ENV)
    out = await store.upload(image)
    # Pointing the signature at another object must fail.
    other = out["url"].replace(out["object"].split("/")[1], "0" * 32 + ".png")
    r = requests.get(other, timeout=10)
    assert r.status_code == 403
    assert b"SignatureDoesNotMatch" in r.content


@pytest.mark.anyio
@pytest.mark.parametrize("v4", [True, False], ids=["v4", "v1"])
@pytest.mark.parametrize("env, code", [
    ({"OSS_ACCESS_KEY_ID": KEY_ID, "OSS_ACCESS_KEY_SECRET": "wrong"}, "SignatureDoesNotMatch"),
    ({"OSS_ACCESS_KEY_ID": "nobody", "OSS_ACCESS_KEY_SECRET": SECRET}, "InvalidAccessKeyId"),
    ({"OSS_ACCESS_KEY_ID": STS_ID, "OSS_ACCESS_KEY_SECRET": STS_SECRET,
      "OSS_SESSION_TOKEN": "bad-token"}, "InvalidSecurityToken"),
], ids=["wrong-secret", "unknown-key", "bad-token"])
async def test_bad_credentials_raise_storage_error(oss: FakeOss, image: Path, v4: bool,
                                                  env: dict[str, str], code: str) -> None:
    store = OssStore(settings(oss, oss_sign_v4=v4), env=env)
    with pytest.raises(StorageError, match=f"HTTP 403 {code}"):
        await store.upload(image)
    assert oss.objects == {}
    with pytest.raises(StorageError, match="403"):
        await store.get_object("test-bucket", None, "anything")


@pytest.mark.anyio
@pytest.mark.parametrize("v4", [True, False], ids=["v4", "v1"])
async def test_sts_token_link_works(oss: FakeOss, image: Path, v4: bool) -> None:
    env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": STS_ID, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": STS_SECRET,
           "ALIBABA_CLOUD_SECURITY_TOKEN": TOKEN}
    store = OssStore(settings(oss, oss_sign_v4=v4), env=env)
    out = await store.upload(image)
    assert ("x-oss-security-token=" if v4 else "security-token=") + TOKEN in out["url"]
    r = requests.get(out["url"], timeout=10)
    assert r.status_code == 200 and r.content == PNG
    # The same link with another token is refused.
    r = requests.get(out["url"].replace(TOKEN, "bad-token"), timeout=10)
    assert r.status_code == 403 and b"InvalidSecurityToken" in r.content


def test_credential_chain_order() -> None:
    s = Settings()
    req = Credentials("req-id", "req-secret", "req-token")
    oss_env = {"OSS_ACCESS_KEY_ID": "a", "OSS_ACCESS_KEY_SECRET": "b", "OSS_SESSION_TOKEN": "t"}
    ali_env = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "c", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "d",
               "ALIBABA_CLOUD_SECURITY_TOKEN": "u"}
    assert OssStore(s, env={**oss_env, **ali_env}).credentials(req) == Credentials("a", "b", "t")
    assert OssStore(s, env=ali_env).credentials(req) == Credentials("c", "d", "u")
    assert OssStore(s, env={}).credentials(req) == req
    # An incomplete pair is skipped, not half-used.
    assert OssStore(s, env={"OSS_ACCESS_KEY_ID": "a"}).credentials(req) == req
    with pytest.raises(StorageError, match="OSS_ACCESS_KEY_ID.*ALIBABA_CLOUD_ACCESS_KEY_ID"):
        OssStore(s, env={}).credentials()


@pytest.mark.anyio
async def test_credentials_read_on_each_call(oss: FakeOss, image: Path) -> None:
    env: dict[str, str] = {}
    store = OssStore(settings(oss), env=env)
    with pytest.raises(StorageError, match="no object storage credentials"):
        await store.upload(image)
    env.update(ENV)  # e.g. a rotated token appearing in the environment
    assert (await store.upload(image))["object"]


@pytest.mark.anyio
@pytest.mark.parametrize("v4", [True, False], ids=["v4", "v1"])
async def test_per_request_credentials(oss: FakeOss, image: Path, v4: bool) -> None:
    creds = credentials_from_headers({"X-Fc-Access-Key-Id": STS_ID,
                                      "x-fc-access-key-secret": STS_SECRET,
                                      "X-FC-SECURITY-TOKEN": TOKEN})
    assert creds == Credentials(STS_ID, STS_SECRET, TOKEN)
    store = OssStore(settings(oss, oss_sign_v4=v4), env={})
    out = await store.upload(image, credentials=creds)
    assert requests.get(out["url"], timeout=10).content == PNG
    data = await store.get_object("test-bucket", None, out["object"], credentials=creds)
    assert data == PNG


def test_credentials_from_headers_needs_both_halves() -> None:
    assert credentials_from_headers({}) is None
    assert credentials_from_headers({"x-fc-access-key-id": "a"}) is None
    assert credentials_from_headers({"x-fc-access-key-id": "a",
                                     "x-fc-access-key-secret": "b"}) == Credentials("a", "b")


@pytest.mark.anyio
async def test_get_object_limits_and_missing(oss: FakeOss, image: Path) -> None:
    store = OssStore(settings(oss), env=ENV)
    out = await store.upload(image)
    assert await store.get_object("test-bucket", oss.endpoint, out["object"]) == PNG
    with pytest.raises(StorageError, match="byte limit"):
        await store.get_object("test-bucket", None, out["object"], max_bytes=10)
    with pytest.raises(StorageError, match="404 NoSuchKey"):
        await store.get_object("test-bucket", None, "missing.png")


@pytest.mark.anyio
async def test_transient_failures_are_retried(oss: FakeOss, image: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("comfy_embed.storage.oss._BACKOFF", 0.01)
    store = OssStore(settings(oss), env=ENV)
    oss.fail_next = 2
    out = await store.upload(image)
    assert ("test-bucket", out["object"]) in oss.objects
    oss.fail_next = 10
    with pytest.raises(StorageError, match="503"):
        await store.upload(image)


@pytest.mark.anyio
async def test_unreachable_endpoint(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("comfy_embed.storage.oss._BACKOFF", 0.01)
    with FakeOss(keys={}) as gone:
        endpoint = gone.endpoint
    store = OssStore(Settings(oss_bucket="bkt", oss_endpoint=endpoint, oss_region="cn-x"),
                     env=ENV)
    with pytest.raises(StorageError, match="cannot reach object storage"):
        await store.upload(image)
    with pytest.raises(StorageError, match="bucket_name is invalid"):
        await store.get_object("b", None, "k")


@pytest.mark.anyio
async def test_missing_configuration_is_named(image: Path) -> None:
    with pytest.raises(StorageError, match="COMFY_EMBED_OSS_BUCKET"):
        await OssStore(Settings(oss_endpoint="oss-cn-hangzhou.aliyuncs.com"), env=ENV).upload(image)
    with pytest.raises(StorageError, match="COMFY_EMBED_OSS_ENDPOINT"):
        await OssStore(Settings(oss_bucket="b"), env=ENV).upload(image)
    with pytest.raises(StorageError, match="COMFY_EMBED_OSS_REGION"):
        await OssStore(Settings(oss_bucket="b", oss_endpoint="http://127.0.0.1:1"),
                       env=ENV).upload(image)


def test_region_derivation() -> None:
    assert region_of("oss-cn-hangzhou.aliyuncs.com") == "cn-hangzhou"
    assert region_of("https://oss-cn-shanghai-internal.aliyuncs.com") == "cn-shanghai"
    assert region_of("http://127.0.0.1:9000") is None
    s = Settings(oss_endpoint="oss-ap-southeast-1.aliyuncs.com")
    assert OssStore(s, env={}).region() == "ap-southeast-1"
    assert OssStore(s.replace(oss_region="oss-eu-west-1"), env={}).region() == "eu-west-1"


def test_link_lifetime_is_clamped() -> None:
    store = OssStore(Settings(oss_sign_v4=True), env={})
    assert store._link_seconds(30 * 24 * 3600, Credentials("a", "b")) == MAX_V4_LINK_SECONDS
    soon = Credentials("a", "b", "t", expiration=datetime.now(timezone.utc) + timedelta(hours=1))
    assert 3500 < store._link_seconds(24 * 3600, soon) <= 3600
    v1 = OssStore(Settings(oss_sign_v4=False), env={})
    assert v1._link_seconds(30 * 24 * 3600, Credentials("a", "b")) == 30 * 24 * 3600


@pytest.mark.anyio
@pytest.mark.parametrize("v4", [True, False], ids=["v4", "v1"])
async def test_sign_gives_a_fresh_link_to_an_uploaded_object(oss: FakeOss, image: Path,
                                                             v4: bool) -> None:
    """Comfy API v2 redirects an output's content to a link signed then."""
    store = OssStore(settings(oss, oss_sign_v4=v4), env=ENV)
    out = await store.upload(image)
    url = await store.sign(out["bucket"], out["object"])
    assert url is not None and ("x-oss-signature=" if v4 else "Signature=") in url
    assert requests.get(url, timeout=10).content == PNG
    unsigned = OssStore(settings(oss, oss_link_expire=None), env=ENV)
    assert await unsigned.sign(out["bucket"], out["object"]) is None
