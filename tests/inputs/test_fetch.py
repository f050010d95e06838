"""ImageFetcher against real HTTP servers on 127.0.0.1 and a fake OSS."""

from __future__ import annotations

import base64
import hashlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import anyio
import pytest

from comfy_embed.config import Settings
from comfy_embed.errors import ImageInputError, InputPathInvalid
from comfy_embed.inputs.fetch import ImageFetcher, is_remote_or_inline
from comfy_embed.storage import input_readers
from tests.fakes import FakeObject, FakeOss
from tests.fakes.web_server import JPEG, PNG, Web, bomb_png, make_png, serve_web


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def web() -> Iterator[Web]:
    with serve_web("127.0.0.1") as web:
        yield web


@pytest.fixture
def other_web() -> Iterator[Web]:
    """A server on 127.0.0.2, which the allowlist does not admit: it must never be reached."""
    with serve_web("127.0.0.2") as web:
        yield web


@pytest.fixture
def input_dir(tmp_path: Path) -> Path:
    d = tmp_path / "input"
    (d / "sub").mkdir(parents=True)
    (d / "example.png").write_bytes(PNG)
    (d / "sub" / "x.png").write_bytes(PNG)
    return d


def fetcher(input_dir: Path, store: Any = None, **kw: Any) -> ImageFetcher:
    base: dict[str, Any] = dict(url_allowlist=("127.0.0.1",), fetch_timeout=5.0)
    base.update(kw)
    settings = Settings(**base)
    return ImageFetcher(settings, input_dir, input_readers(settings, oss=store))


def _check_materialised(input_dir: Path, name: str, data: bytes, ext: str) -> None:
    assert name == f"serverless/{hashlib.sha256(data).hexdigest()}.{ext}"
    assert (input_dir / name).read_bytes() == data
    # No temporary files left behind.
    assert [p.name for p in (input_dir / "serverless").iterdir()] == [name.split("/")[1]]


# --- URLs -----------------------------------------------------------------------
@pytest.mark.anyio
async def test_url_png_is_materialised(web: Web, input_dir: Path) -> None:
    f = fetcher(input_dir)
    name = await f.materialise(web.base + "/ok.png")
    _check_materialised(input_dir, name, PNG, "png")
    assert await f.materialise(web.base + "/ok.png") == name  # same content, same name


@pytest.mark.anyio
async def test_url_jpeg_gets_jpg_extension(web: Web, input_dir: Path) -> None:
    name = await fetcher(input_dir).materialise(web.base + "/ok.jpg")
    _check_materialised(input_dir, name, JPEG, "jpg")


@pytest.mark.anyio
async def test_redirect_within_allowlist_is_followed(web: Web, input_dir: Path) -> None:
    name = await fetcher(input_dir).materialise(web.base + "/redirect?to=/ok.png")
    _check_materialised(input_dir, name, PNG, "png")


@pytest.mark.anyio
@pytest.mark.parametrize("path, match", [
    ("/missing.png", "HTTP 404"),
    ("/text", "not an image"),
    ("/big-declared.png", "over the 10000 byte limit"),
    ("/big-undeclared.png", "over the 10000 byte limit"),
    ("/bomb.png", "100000x100000|decompression bomb"),
    ("/loop", "more than 5 redirects"),
])
async def test_url_failures(web: Web, input_dir: Path, path: str, match: str) -> None:
    url = web.base + path
    with pytest.raises(ImageInputError, match=match) as info:
        await fetcher(input_dir, max_image_bytes=10_000).materialise(url)
    assert url in str(info.value) or path == "/loop"
    # Nothing left on disk: the partial download is removed (its folder may stay).
    assert not [p for p in (input_dir / "serverless").rglob("*") if not p.is_dir()]


@pytest.mark.anyio
async def test_url_timeout(web: Web, input_dir: Path) -> None:
    with anyio.fail_after(10):
        with pytest.raises(ImageInputError, match="timed out after 0.3s"):
            await fetcher(input_dir, fetch_timeout=0.3).materialise(web.base + "/slow.png")


@pytest.mark.anyio
async def test_unreachable_host(input_dir: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now
    with pytest.raises(ImageInputError, match=f"127.0.0.1:{port}/x.png: cannot fetch"):
        await fetcher(input_dir).materialise(f"http://127.0.0.1:{port}/x.png")


@pytest.mark.anyio
async def test_loopback_refused_without_allowlist(web: Web, input_dir: Path) -> None:
    with pytest.raises(ImageInputError, match="refused, 127.0.0.1 resolves to 127.0.0.1, "
                                              "a loopback address"):
        await fetcher(input_dir, url_allowlist=()).materialise(web.base + "/ok.png")
    assert web.requests == []


@pytest.mark.anyio
async def test_cidr_allowlist(web: Web, input_dir: Path) -> None:
    name = await fetcher(input_dir, url_allowlist=("127.0.0.0/8",)).materialise(
        web.base + "/ok.png")
    _check_materialised(input_dir, name, PNG, "png")


@pytest.mark.anyio
async def test_redirect_to_other_loopback_refused_before_connecting(
        web: Web, other_web: Web, input_dir: Path) -> None:
    target = other_web.base + "/ok.png"
    with pytest.raises(ImageInputError, match="127.0.0.2, a loopback address"):
        await fetcher(input_dir).materialise(web.base + "/redirect?to=" + target)
    assert other_web.requests == []  # refused before any connection


@pytest.mark.anyio
@pytest.mark.parametrize("target, why", [
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
    ("http://100.64.1.1/x.png", "carrier-grade NAT"),
    ("http://10.1.2.3/x.png", "private"),
    ("http://[::1]/x.png", "loopback"),
    ("http://[::ffff:169.254.169.254]/x.png", "cloud metadata"),
    ("http://0.0.0.0/x.png", "unspecified"),
    ("http://224.0.0.1/x.png", "multicast"),
    ("http://240.0.0.1/x.png", "reserved"),
])
async def test_redirect_to_internal_addresses_refused(web: Web, input_dir: Path,
                                                      target: str, why: str) -> None:
    with pytest.raises(ImageInputError, match=why):
        await fetcher(input_dir).materialise(web.base + "/redirect?to=" + target)
    # Also refused when named directly (these addresses are never contacted:
    # the check runs on the resolved address before connecting).
    with pytest.raises(ImageInputError, match=why):
        await fetcher(input_dir).materialise(target)


@pytest.mark.anyio
async def test_bad_urls(input_dir: Path) -> None:
    with pytest.raises(ImageInputError, match="credentials"):
        await fetcher(input_dir).materialise("http://user:pw@127.0.0.1/x.png")
    with pytest.raises(ImageInputError, match="cannot resolve host"):
        await fetcher(input_dir).materialise("http://no-such-host.invalid/x.png")


# --- inline -----------------------------------------------------------------------
@pytest.mark.anyio
async def test_raw_base64(input_dir: Path) -> None:
    text = base64.b64encode(PNG).decode()
    assert text.startswith("iVBORw0KGgo")
    name = await fetcher(input_dir).materialise(text)
    _check_materialised(input_dir, name, PNG, "png")


@pytest.mark.anyio
async def test_raw_base64_jpeg_unpadded_with_newlines(input_dir: Path) -> None:
    text = base64.encodebytes(JPEG).decode().rstrip("=\n")
    assert text.startswith("/9j/")
    name = await fetcher(input_dir).materialise(text)
    _check_materialised(input_dir, name, JPEG, "jpg")


@pytest.mark.anyio
async def test_data_uri(input_dir: Path) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    name = await fetcher(input_dir).materialise(uri)
    _check_materialised(input_dir, name, PNG, "png")


@pytest.mark.anyio
@pytest.mark.parametrize("value, match", [
    ("iVBORw0KGgo" + "!@#$" * 30, "base64 image is not valid base64"),
    ("data:image/png;base64,iVBORw0KGgo%%%%", "data URI is not valid base64"),
    ("data:image/png,rawbytes", "data URI must be"),
    ("iVBORw0KGgo" + "A" * 100, "base64 image: (not an image|broken image)"),
    ("data:image/png;base64," + base64.b64encode(PNG[:40]).decode(), "broken image|not an image"),
    ("data:image/png;base64," + base64.b64encode(bomb_png()).decode(),
     "pixel limit|decompression bomb"),
])
async def test_bad_inline_images(input_dir: Path, value: str, match: str) -> None:
    with pytest.raises(ImageInputError, match=match):
        await fetcher(input_dir).materialise(value)


@pytest.mark.anyio
async def test_pixel_limit(input_dir: Path) -> None:
    big = make_png((200, 100))
    text = base64.b64encode(big).decode()
    with pytest.raises(ImageInputError, match="200x100 is over the 10000 pixel limit"):
        await fetcher(input_dir, max_image_pixels=10_000).materialise(text)
    assert await fetcher(input_dir, max_image_pixels=20_000).materialise(text)


@pytest.mark.anyio
async def test_inline_size_limit(input_dir: Path) -> None:
    text = base64.b64encode(make_png((300, 300), "white") + b"\0" * 5000).decode()
    with pytest.raises(ImageInputError, match="over the 1000 byte limit"):
        await fetcher(input_dir, max_image_bytes=1000).materialise(text)


def test_is_remote_or_inline() -> None:
    for v in ("http://x/a.png", "HTTPS://x/a.png", "oss://b/k.png", "data:image/png;base64,AA",
              base64.b64encode(PNG).decode(), "/9j/4AAQSkZJRgABAQ", "R0lGODlhAQABAAAAACw="):
        assert is_remote_or_inline(v), v
    for v in ("example.png", "sub/x.png", "x.png [input]", "/etc/passwd", "../x.png",
              "iVBORw0KGgo.png"):
        assert not is_remote_or_inline(v), v


# --- file names -------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("value", ["example.png", "sub/x.png", "example.png [input]",
                                   "sub/x.png [input]"])
async def test_file_names_pass_unchanged(input_dir: Path, value: str) -> None:
    assert await fetcher(input_dir).materialise(value) == value


@pytest.mark.anyio
async def test_symlink_inside_input_is_fine(input_dir: Path) -> None:
    (input_dir / "alias.png").symlink_to(input_dir / "sub" / "x.png")
    assert await fetcher(input_dir).materialise("alias.png") == "alias.png"


@pytest.mark.anyio
@pytest.mark.parametrize("value, match", [
    ("../x.png", "'..'"),
    ("sub/../../x.png", "'..'"),
    ("/etc/passwd", "absolute"),
    ("link.png", "outside the input folder"),
    ("linkdir/secret.png", "outside the input folder"),
    ("nothere.png", "no such file"),
    ("sub", "no such file"),
    ("example.png [output]", "only files in the input folder"),
    ("example.png [temp]", "only files in the input folder"),
    ("", "not a valid file name"),
    ("a\x00b.png", "not a valid file name"),
])
async def test_bad_file_names(input_dir: Path, tmp_path: Path, value: str, match: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (tmp_path / "x.png").write_bytes(PNG)
    (input_dir / "link.png").symlink_to(outside / "secret.png")
    (input_dir / "linkdir").symlink_to(outside)
    with pytest.raises(InputPathInvalid, match=match):
        await fetcher(input_dir).materialise(value)


# --- oss:// -----------------------------------------------------------------------
@pytest.fixture
def oss() -> Iterator[FakeOss]:
    with FakeOss(keys={"ak": "sk"}) as fake:
        fake.objects[("test-bucket", "in/cat.png")] = FakeObject(PNG, "image/png")
        fake.objects[("test-bucket", "in/notes.txt")] = FakeObject(b"hello", "text/plain")
        yield fake


def _oss_fetcher(input_dir: Path, oss: FakeOss, **kw: Any) -> ImageFetcher:
    from comfy_embed.storage import OssStore

    s = Settings(oss_endpoint=oss.endpoint, oss_region="cn-hangzhou", **kw)
    store = OssStore(s, env={"OSS_ACCESS_KEY_ID": "ak", "OSS_ACCESS_KEY_SECRET": "sk"})
    return ImageFetcher(s, input_dir, input_readers(s, oss=store))


@pytest.mark.anyio
async def test_oss_input_with_configured_endpoint(input_dir: Path, oss: FakeOss) -> None:
    f = _oss_fetcher(input_dir, oss)
    name = await f.materialise("oss://test-bucket/in/cat.png")
    _check_materialised(input_dir, name, PNG, "png")
    host = oss.endpoint.split("://")[1]
    assert await f.materialise(f"oss://test-bucket.{host}/in/cat.png") == name


@pytest.mark.anyio
@pytest.mark.parametrize("value, match", [
    ("oss://test-bucket.evil.example.com/in/cat.png", "evil.example.com is not the configured"),
    ("oss://test-bucket/in/missing.png", "NoSuchKey"),
    ("oss://test-bucket/in/notes.txt", "not an image"),
    ("oss://test-bucket", "expected oss://bucket"),
])
async def test_oss_input_failures(input_dir: Path, oss: FakeOss, value: str, match: str) -> None:
    with pytest.raises(ImageInputError, match=match):
        await _oss_fetcher(input_dir, oss).materialise(value)


@pytest.mark.anyio
async def test_oss_input_size_cap_and_no_store(input_dir: Path, oss: FakeOss) -> None:
    with pytest.raises(ImageInputError, match="byte limit"):
        await _oss_fetcher(input_dir, oss, max_image_bytes=10).materialise(
            "oss://test-bucket/in/cat.png")
    with pytest.raises(ImageInputError, match="object storage is not configured"):
        await fetcher(input_dir).materialise("oss://test-bucket/in/cat.png")


# --- safety (issue 9): name checks are bounded and linear ----------------------
from comfy_embed.inputs.fetch import check_name_text  # noqa: E402


@pytest.mark.parametrize("value, needle", [
    ("abcdefg/" * 3_500_000, "byte limit"),  # 28 MB: refused by length alone
    ("é" * 3000, "byte limit"),
    ("a" * 256 + ".png", "over 255 bytes"),
    ("sub/" + "b" * 300, "over 255 bytes"),
    ("../x.png", "'..'"), ("/etc/passwd", "absolute"), ("~root/x", "absolute"),
    ("x\x00.png", "not a valid"), ("x.png [output]", "input folder"),
    ("serverless/abc/x.png", "reserved"), ("./serverless/x.png", "reserved"),
])
def test_check_name_text_refuses(value: str, needle: str) -> None:
    with pytest.raises(InputPathInvalid) as info:
        check_name_text(value)
    assert needle in info.value.reason
    assert len(info.value.reason) < 400  # the value is quoted shortened


@pytest.mark.anyio
async def test_long_names_never_reach_the_filesystem(input_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    f = fetcher(input_dir)

    def no_fs(*a: Any, **k: Any) -> Any:
        raise AssertionError("the filesystem was consulted")
    for name in ("resolve", "is_file", "exists", "stat"):
        monkeypatch.setattr(Path, name, no_fs)
    with pytest.raises(InputPathInvalid, match="byte limit"):
        await f.materialise("abcdefg/" * 100_000)
    with pytest.raises(InputPathInvalid, match="255 bytes"):
        await f.materialise("a" * 300 + ".png")


@pytest.mark.anyio
async def test_per_task_folder(input_dir: Path) -> None:
    data = base64.b64encode(PNG).decode()
    name = await fetcher(input_dir).materialise(data, folder="task-1")
    assert name == f"serverless/task-1/{hashlib.sha256(PNG).hexdigest()}.png"
    assert (input_dir / name).read_bytes() == PNG
