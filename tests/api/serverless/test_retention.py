"""Issue 29 through the real HTTP API, on two instances sharing one folder
and a local S3 stand-in: DELETE /task, keep nothing, ?ttl=, expires_at.

"No byte remains" is checked by scanning every file under the shared
folder (zlib-compressed log files decompressed too) and every object in the
bucket for the task's input and output bytes, raw and as base64.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
import websocket
from PIL import Image

from tests.api.serverless.test_images import load_graph
from tests.conftest import text_to_image
from tests.fakes.moto_s3 import serve_s3
from tests.fakes.oss_server import FakeOss
from tests.fakes.webhook_receiver import SECRET, Receiver, serve_receiver
from tests.servers import Server

API = "/api/serverless"
BUCKET = "ret-bucket"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
       "AWS_EC2_METADATA_DISABLED": "true"}
ONE = {"X-Api-Key": "key-one-0123456789"}
TWO = {"X-Api-Key": "key-two-0123456789"}


def unique_png() -> bytes:
    """A PNG no other test makes: its bytes identify this task's input."""
    img = Image.frombytes("RGB", (24, 24), os.urandom(24 * 24 * 3))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with serve_s3(BUCKET, {}) as url:
        yield url


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, s3: str) -> Iterator[tuple[Server, Server]]:
    """Two instances on one folder (outputs, inputs, task log)."""
    base = tmp_path_factory.mktemp("retention")
    env: dict[str, Any] = {
        "raw_env": AWS, "storage": "s3", "s3_bucket": BUCKET, "s3_endpoint": s3,
        "s3_region": "us-east-1", "s3_link_expire": 300, "delete_objects": 1, "max_ttl": 600,
        "api_keys": f"{ONE['X-Api-Key']},{TWO['X-Api-Key']}",
        "url_allowlist": "127.0.0.1", "webhook_secret": SECRET, "webhook_backoff": 2}
    a = Server(base, **env)
    try:
        a.wait_ready(headers=ONE)
        b = Server(base, **env)
        try:
            yield a, b.wait_ready(headers=ONE)
        finally:
            b.stop()
    finally:
        a.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as r:
        yield r


def bucket_objects(endpoint: str) -> dict[str, bytes]:
    client: Any = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id="x", aws_secret_access_key="x")
    found = {}
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        try:
            found[item["Key"]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        except client.exceptions.NoSuchKey:
            continue  # deleted between the listing and the read
    return found


def forms_of(needles: list[bytes]) -> list[bytes]:
    return [n for raw in needles for n in (raw, base64.b64encode(raw))]


def holders(root: Path, endpoint: str | None, needles: list[bytes]) -> list[str]:
    """Every file under ``root`` and object in the S3 bucket (``endpoint``)
    holding one of ``needles`` (raw or base64), zlib files read
    decompressed as well."""
    forms = forms_of(needles)
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            try:
                data = path.read_bytes()
            except OSError:
                continue
            texts = [data]
            try:
                texts.append(zlib.decompress(data))
            except zlib.error:
                pass
            if any(f in t for f in forms for t in texts):
                found.append(str(path))
    for key, body in (bucket_objects(endpoint) if endpoint else {}).items():
        if any(f in body for f in forms):
            found.append(f"s3://{BUCKET}/{key}")
    return found


def run(server: Server, image: bytes, task_id: str, params: str = "",
        headers: dict[str, str] = ONE) -> requests.Response:
    graph = load_graph(base64.b64encode(image).decode())
    return server.run(graph, f"?output_base64=1&output_oss=1{params}",
                      headers={**headers, "X-Task-Id": task_id})


def status(server: Server, task_id: str, headers: dict[str, str] = ONE) -> list[dict[str, Any]]:
    r = requests.get(f"{server.url}{API}/status", params={"task_id": task_id},
                     headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json())


def delete(server: Server, task_id: str, headers: dict[str, str] = ONE) -> requests.Response:
    return requests.delete(f"{server.url}{API}/task", params={"task_id": task_id},
                           headers=headers, timeout=60)


def wait_until(check: Any, timeout: float = 30.0) -> Any:
    """Poll ``check`` (files other processes delete) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _base(server: Server) -> Path:
    return server.output_dir.parent


def test_delete_leaves_no_byte_and_a_retry_answers_deleted(pair: tuple[Server, Server],
                                                           s3: str) -> None:
    a, b = pair
    image = unique_png()
    r = run(a, image, "del-1")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    (res,) = data["results"]
    output = base64.b64decode(res["output"]["base64"]["data"])
    link = res["output"]["s3"]["url"]
    assert requests.get(link, timeout=10).status_code == 200
    assert data["expires_at"].endswith("Z")
    # The materialised input goes when the task ends; its output stays.
    assert holders(_base(a), s3, [output])

    # Another key's delete is refused as unknown, and removes nothing.
    assert delete(b, "del-1", TWO).status_code == 404
    assert holders(_base(a), s3, [output])

    r = delete(b, "del-1")  # on the other instance
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "deleted" and r.json()["objects"]["deleted"] == 1
    assert holders(_base(a), s3, [image, output]) == []
    assert requests.get(link, timeout=10).status_code == 404

    for server in (a, b):  # a's engine ran it and kept it in memory
        (final,) = status(server, "del-1")
        assert final["data"]["error"]["type"] == "task_deleted"
        assert final["data"]["deleted"]["status"] == "success"
        retry = run(server, image, "del-1")
        assert retry.status_code == 410, retry.text
        assert retry.json()["data"]["error"]["type"] == "task_deleted"
    assert holders(_base(a), s3, [image, output]) == []
    assert delete(a, "del-1").status_code == 200  # again: nothing more to do
    assert delete(a, "never-was").status_code == 404


def test_keep_nothing_keeps_hashes_only(pair: tuple[Server, Server], s3: str) -> None:
    a, b = pair
    image = unique_png()
    r = run(a, image, "keep-0", "&keep=nothing")
    assert r.status_code == 200, r.text
    (res,) = r.json()["data"]["results"]
    output = base64.b64decode(res["output"]["base64"]["data"])  # the answer is whole
    left = wait_until(lambda: not holders(_base(a), s3, [image, output]))
    assert left, holders(_base(a), s3, [image, output])
    for server in (a, b):
        final = status(server, "keep-0")[-1]["data"]
        assert final["status"] == "success" and final["kept"] == "nothing"
        (kept,) = final["results"]
        assert kept["output"]["error"]["type"] == "output_deleted"
        assert kept["output"]["sha256"] == hashlib.sha256(output).hexdigest()
        assert kept["output"]["size"] == len(output)
        assert "base64" not in kept["output"] and "s3" not in kept["output"]


def test_ttl_deletes_on_time_and_is_bounded(pair: tuple[Server, Server], s3: str) -> None:
    a, b = pair
    image = unique_png()
    r = run(b, image, "ttl-1", "&ttl=2")
    assert r.status_code == 200, r.text
    (res,) = r.json()["data"]["results"]
    output = base64.b64decode(res["output"]["base64"]["data"])
    expires = datetime.strptime(r.json()["data"]["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    left = expires.replace(tzinfo=timezone.utc).timestamp() - time.time()
    assert 0 < left <= 3
    folder = a.output_dir / "serverless_api" / "ttl-1"
    assert wait_until(lambda: not folder.exists())
    assert holders(_base(a), s3, [image, output]) == []
    assert status(a, "ttl-1") == []
    over = run(a, image, "ttl-2", "&ttl=601")
    assert over.status_code == 400 and "ttl" in over.json()["data"]["error"]["message"]
    bad = run(a, image, "ttl-3", "&keep=some")
    assert bad.status_code == 400 and "keep" in bad.json()["data"]["error"]["message"]


def test_keep_nothing_waits_for_the_webhook(pair: tuple[Server, Server], s3: str,
                                            receiver: Receiver) -> None:
    a, _ = pair
    path, url = receiver.new_hook("keep-nothing")
    receiver.script(path, 500, 200)  # acknowledged on the second attempt
    image = unique_png()
    r = run(a, image, "keep-hook", f"&keep=nothing&webhook={url}&webhook_base64=1")
    assert r.status_code == 200, r.text
    output = base64.b64decode(r.json()["data"]["results"][0]["output"]["base64"]["data"])
    receiver.wait(path, 1)
    # Not acknowledged yet: the outputs stay for the next attempt.
    assert holders(_base(a), s3, [output])
    _, second = receiver.wait(path, 2)
    assert second.verified, second.error
    sent = second.payload["data"]["results"][0]["output"]["base64"]["data"]
    assert base64.b64decode(sent) == output
    assert wait_until(lambda: not holders(_base(a), s3, [image, output]))


def test_delete_cancels_a_running_task(pair: tuple[Server, Server]) -> None:
    a, b = pair
    r = a.run(text_to_image(steps=400), headers={**ONE, "X-Task-Id": "del-running",
                                                  "X-Fc-Invocation-Type": "Async"})
    assert r.status_code == 202, r.text
    assert wait_until(lambda: any(ev["type"] == "progress"
                                  for ev in status(a, "del-running")), timeout=120)
    r = delete(b, "del-running")  # the other instance asks the owner to cancel
    assert r.status_code == 200, r.text
    for server in (a, b):
        (final,) = status(server, "del-running")
        assert final["data"]["error"]["type"] == "task_deleted"
        assert final["data"]["deleted"]["error_type"] == "execution_interrupted"
    assert not (a.output_dir / "del-running").exists()


def test_websocket_takes_ttl_and_keep(pair: tuple[Server, Server], s3: str) -> None:
    a, b = pair
    header = [f"X-Api-Key: {ONE['X-Api-Key']}"]
    ws = websocket.create_connection(f"{a.ws_url}?keep=nothing&output_base64=1",
                                     header=header, timeout=60)
    try:
        image = unique_png()
        ws.send(json.dumps(load_graph(base64.b64encode(image).decode())))
        while (ev := json.loads(ws.recv()))["type"] != "serverless_api":
            pass
    finally:
        ws.close()
    data = ev["data"]
    output = base64.b64decode(data["results"][0]["output"]["base64"]["data"])
    assert data["expires_at"].endswith("Z")
    assert wait_until(lambda: not holders(_base(a), s3, [image, output]))
    kept = status(b, data["task_id"])[-1]["data"]["results"][0]["output"]
    assert kept["error"]["type"] == "output_deleted"
    bad = websocket.create_connection(f"{a.ws_url}?ttl=soon", header=header, timeout=60)
    try:
        ev = json.loads(bad.recv())
        assert ev["data"]["error"]["type"] == "invalid_parameter"
        assert "ttl" in ev["data"]["error"]["message"]
    finally:
        bad.close()


def test_delete_removes_oss_objects(tmp_path: Path) -> None:
    """The same with OSS (the local stand-in): the object and its signed link go."""
    with FakeOss(keys={"oss-key-id": "oss-key-secret"}) as oss:
        s = Server(tmp_path, raw_env={"OSS_ACCESS_KEY_ID": "oss-key-id",
                                      "OSS_ACCESS_KEY_SECRET": "oss-key-secret"},
                   oss_bucket="test-bucket", oss_endpoint=oss.endpoint, oss_region="cn-hangzhou",
                   oss_link_expire=600, delete_objects=1)
        try:
            s.wait_ready()
            image = unique_png()
            r = s.run(load_graph(base64.b64encode(image).decode()),
                      "?output_base64=1&output_oss=1", headers={"X-Task-Id": "oss-1"})
            assert r.status_code == 200, r.text
            out = r.json()["data"]["results"][0]["output"]
            output = base64.b64decode(out["base64"]["data"])
            assert requests.get(out["oss"]["url"], timeout=10).content == output
            r = delete(s, "oss-1", {})
            assert r.status_code == 200 and r.json()["objects"]["deleted"] == 1, r.text
            assert requests.get(out["oss"]["url"], timeout=10).status_code == 404
            assert not any(f in o.data for o in oss.objects.values()
                           for f in forms_of([image, output]))
            assert holders(tmp_path, None, [image, output]) == []
        finally:
            s.stop()
