"""S3Store and ``s3://`` inputs against a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import requests

from comfy_embed.config import Settings
from comfy_embed.errors import ImageInputError, StorageError
from comfy_embed.inputs.fetch import ImageFetcher, is_remote_or_inline
from comfy_embed.storage import Credentials, input_readers
from comfy_embed.storage.s3 import MAX_PRESIGN_SECONDS, S3Store
from tests.fakes.moto_s3 import serve_s3
from tests.fakes.web_server import PNG

BUCKET = "test-bucket"
KEY_ID, SECRET = "AKIAFAKEFAKEFAKE", "fake-secret"
ENV = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_ambient_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep boto3's default chain away from this machine's keys, files and
    instance metadata, so 'no credentials' is deterministic and quick."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with serve_s3(BUCKET, {"in/cat.png": (PNG, "image/png"),
                           "in/notes.txt": (b"hello", "text/plain")}) as url:
        yield url


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "out.png"
    p.write_bytes(PNG)
    return p


def settings(endpoint: str, **kw: Any) -> Settings:
    base: dict[str, Any] = dict(storage="s3", s3_bucket=BUCKET, s3_endpoint=endpoint,
                                s3_region="us-east-1", s3_link_expire=600, fetch_timeout=5.0)
    base.update(kw)
    return Settings(**base)


def _query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def _raw(endpoint: str, key: str) -> Any:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    return client.get_object(Bucket=BUCKET, Key=key)


# --- upload -------------------------------------------------------------------
@pytest.mark.anyio
async def test_upload_then_presigned_url_serves_same_bytes(endpoint: str, image: Path) -> None:
    store = S3Store(settings(endpoint, s3_prefix="/outs/"), env=ENV)
    store.check()
    out = await store.upload(image)
    assert set(out) == {"region", "bucket", "object", "url", "expire"}
    assert out["bucket"] == BUCKET and out["region"] == "us-east-1"
    prefix, name = out["object"].split("/")
    assert prefix == "outs" and len(name) == 32 + len(".png") and name.endswith(".png")
    int(name[:32], 16)  # uuid4 hex

    assert out["url"].startswith(f"{endpoint}/{BUCKET}/outs/")  # path-style on custom endpoints
    q = _query(out["url"])
    assert q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and q["X-Amz-Expires"] == "600"
    expire = datetime.strptime(out["expire"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    assert abs((expire - datetime.now(timezone.utc)).total_seconds() - 600) < 30

    r = requests.get(out["url"], timeout=10)
    assert r.status_code == 200
    assert r.content == PNG
    assert r.headers["Content-Type"] == "image/png"


@pytest.mark.anyio
async def test_explicit_content_type_and_no_link_without_expire(endpoint: str,
                                                                image: Path) -> None:
    store = S3Store(settings(endpoint, s3_link_expire=None), env=ENV)
    out = await store.upload(image, content_type="image/x-test")
    assert set(out) == {"region", "bucket", "object"}
    assert out["object"].startswith("serverless-api-output/")
    stored = _raw(endpoint, out["object"])
    assert stored["ContentType"] == "image/x-test" and stored["Body"].read() == PNG


@pytest.mark.anyio
async def test_link_lifetime_clamped(endpoint: str, image: Path) -> None:
    store = S3Store(settings(endpoint, s3_link_expire=30 * 24 * 3600), env=ENV)
    out = await store.upload(image)
    assert _query(out["url"])["X-Amz-Expires"] == str(MAX_PRESIGN_SECONDS)
    expire = datetime.strptime(out["expire"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    left = (expire - datetime.now(timezone.utc)).total_seconds()
    assert abs(left - MAX_PRESIGN_SECONDS) < 30


@pytest.mark.anyio
async def test_upload_to_missing_bucket_names_it(endpoint: str, image: Path) -> None:
    store = S3Store(settings(endpoint, s3_bucket="no-such-bucket"), env=ENV)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/.*NoSuchBucket.*HTTP 404"):
        await store.upload(image)


@pytest.mark.anyio
async def test_unreachable_endpoint_is_a_storage_error(image: Path) -> None:
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    store = S3Store(settings("http://127.0.0.1:9"), env=ENV)
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/.*127.0.0.1:9"):
        await store.upload(image)


# --- credentials ---------------------------------------------------------------
@pytest.mark.anyio
async def test_credentials_from_env_mapping(endpoint: str, image: Path) -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKIAFROMMAPPING", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_SESSION_TOKEN": "token-from-mapping"}
    store = S3Store(settings(endpoint), env=env)
    q = _query((await store.upload(image))["url"])
    assert q["X-Amz-Credential"].startswith("AKIAFROMMAPPING/")
    assert q["X-Amz-Security-Token"] == "token-from-mapping"
    # Read again on every call: a rotated key is used without a new store.
    env["AWS_ACCESS_KEY_ID"] = "AKIAROTATED"
    q = _query((await store.upload(image))["url"])
    assert q["X-Amz-Credential"].startswith("AKIAROTATED/")


@pytest.mark.anyio
async def test_request_credentials_when_nothing_else(endpoint: str, image: Path) -> None:
    store = S3Store(settings(endpoint), env={})
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"):
        await store.upload(image)
    expires = datetime.now(timezone.utc) + timedelta(seconds=120)
    creds = Credentials("AKIAPERREQUEST", "s", "req-token", expiration=expires)
    out = await store.upload(image, credentials=creds)
    q = _query(out["url"])
    assert q["X-Amz-Credential"].startswith("AKIAPERREQUEST/")
    assert q["X-Amz-Security-Token"] == "req-token"
    assert 100 <= int(q["X-Amz-Expires"]) <= 120  # the link dies with the token


@pytest.mark.anyio
async def test_env_mapping_wins_over_request_credentials(endpoint: str, image: Path) -> None:
    store = S3Store(settings(endpoint), env=ENV)
    out = await store.upload(image, credentials=Credentials("AKIAPERREQUEST", "s"))
    assert _query(out["url"])["X-Amz-Credential"].startswith(KEY_ID + "/")


# --- settings --------------------------------------------------------------------
@pytest.mark.anyio
async def test_missing_settings_name_the_variable(image: Path) -> None:
    store = S3Store(Settings(storage="s3"), env=ENV)
    with pytest.raises(StorageError, match="COMFY_EMBED_S3_BUCKET"):
        store.check()
    with pytest.raises(StorageError, match="COMFY_EMBED_S3_BUCKET"):
        await store.upload(image)
    bad = S3Store(Settings(s3_bucket=BUCKET, s3_endpoint="minio.local:9000"), env=ENV)
    with pytest.raises(StorageError, match="COMFY_EMBED_S3_ENDPOINT"):
        bad.check()


def test_settings_from_env() -> None:
    s = Settings.from_env({"COMFY_EMBED_STORAGE": "s3", "COMFY_EMBED_S3_BUCKET": "b",
                           "COMFY_EMBED_S3_ENDPOINT": "https://x.r2.cloudflarestorage.com",
                           "COMFY_EMBED_S3_LINK_EXPIRE": "3600",
                           "COMFY_EMBED_S3_ENDPOINT_ALLOWLIST": "a.example, b.example"})
    assert (s.store.backend, s.store.s3_bucket, s.store.s3_link_expire) == ("s3", "b", 3600)
    assert s.store.s3_endpoint == "https://x.r2.cloudflarestorage.com"
    assert s.store.s3_endpoint_allowlist == ("a.example", "b.example")
    assert s.store.s3_region is None and s.store.s3_prefix == "serverless-api-output"


def test_without_boto3_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
    with pytest.raises(StorageError, match=r"comfy-embed\[s3\]"):
        S3Store(Settings(s3_bucket=BUCKET), env=ENV).check()


# --- get_object -------------------------------------------------------------------
@pytest.mark.anyio
async def test_get_object(endpoint: str) -> None:
    store = S3Store(settings(endpoint), env=ENV)
    assert await store.get_object(BUCKET, None, "in/cat.png") == PNG
    assert await store.get_object(BUCKET, endpoint, "in/cat.png") == PNG  # the configured one


@pytest.mark.anyio
async def test_get_object_failures(endpoint: str) -> None:
    store = S3Store(settings(endpoint), env=ENV)
    with pytest.raises(StorageError, match=f"s3://{BUCKET}/in/missing.png: NoSuchKey"):
        await store.get_object(BUCKET, None, "in/missing.png")
    with pytest.raises(StorageError, match="byte limit"):
        await store.get_object(BUCKET, None, "in/cat.png", max_bytes=10)
    with pytest.raises(StorageError, match="COMFY_EMBED_S3_ENDPOINT_ALLOWLIST"):
        await store.get_object(BUCKET, "https://evil.example.com", "in/cat.png")


@pytest.mark.anyio
async def test_get_object_from_allowlisted_endpoint(endpoint: str) -> None:
    host = urlsplit(endpoint).netloc
    store = S3Store(settings("https://elsewhere.example", s3_endpoint_allowlist=(host,)),
                    env=ENV)
    assert await store.get_object(BUCKET, endpoint, "in/cat.png") == PNG


# --- s3:// inputs -------------------------------------------------------------------
@pytest.fixture
def input_dir(tmp_path: Path) -> Path:
    d = tmp_path / "input"
    d.mkdir()
    return d


def _fetcher(input_dir: Path, endpoint: str, **kw: Any) -> ImageFetcher:
    s = settings(endpoint, **kw)
    return ImageFetcher(s, input_dir, input_readers(s, s3=S3Store(s, env=ENV)))


@pytest.mark.anyio
async def test_s3_input_is_materialised(input_dir: Path, endpoint: str) -> None:
    name = await _fetcher(input_dir, endpoint).materialise(f"s3://{BUCKET}/in/cat.png")
    assert name == f"serverless/{hashlib.sha256(PNG).hexdigest()}.png"
    assert (input_dir / name).read_bytes() == PNG
    assert [p.name for p in (input_dir / "serverless").iterdir()] == [name.split("/")[1]]


@pytest.mark.anyio
@pytest.mark.parametrize("value, match", [
    (f"s3://{BUCKET}/in/notes.txt", "not an image"),
    (f"s3://{BUCKET}/in/missing.png", "NoSuchKey"),
    (f"s3://{BUCKET}", "expected s3://bucket/key"),
    ("s3://user@127.0.0.1:9000/in/cat.png", "cannot name an endpoint"),
    ("s3://Bad_Bucket/in/cat.png", "not an S3 bucket name"),
])
async def test_s3_input_failures(input_dir: Path, endpoint: str, value: str, match: str) -> None:
    with pytest.raises(ImageInputError, match=match):
        await _fetcher(input_dir, endpoint).materialise(value)
    assert not (input_dir / "serverless").exists()


@pytest.mark.anyio
async def test_s3_input_size_cap_and_no_store(input_dir: Path, endpoint: str) -> None:
    with pytest.raises(ImageInputError, match="byte limit"):
        await _fetcher(input_dir, endpoint, max_image_bytes=10).materialise(
            f"s3://{BUCKET}/in/cat.png")
    plain = ImageFetcher(settings(endpoint), input_dir)
    with pytest.raises(ImageInputError, match="S3 storage is not configured"):
        await plain.materialise(f"s3://{BUCKET}/in/cat.png")


def test_s3_is_remote() -> None:
    assert is_remote_or_inline("s3://b/k.png") and is_remote_or_inline("S3://b/k.png")


@pytest.mark.anyio
async def test_sign_gives_a_fresh_link_to_an_uploaded_object(endpoint: str, image: Path) -> None:
    """Comfy API v2 redirects an output's content to a link presigned then."""
    store = S3Store(settings(endpoint), env=ENV)
    out = await store.upload(image)
    url = await store.sign(out["bucket"], out["object"])
    assert url is not None and _query(url)["X-Amz-Expires"] == "600"
    assert requests.get(url, timeout=10).content == PNG
    unsigned = S3Store(settings(endpoint, s3_link_expire=None), env=ENV)
    assert await unsigned.sign(out["bucket"], out["object"]) is None
