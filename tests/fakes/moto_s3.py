"""A moto S3 server on 127.0.0.1 with one bucket, for S3 tests."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import boto3
from moto import server as moto_server


@contextlib.contextmanager
def serve_s3(bucket: str, objects: dict[str, tuple[bytes, str]]) -> Iterator[str]:
    """Yield the endpoint URL of a running server holding ``bucket`` with
    ``objects`` (``{key: (body, content_type)}``)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    client: Any = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                               aws_access_key_id="x", aws_secret_access_key="x")
    client.create_bucket(Bucket=bucket)
    for key, (body, ctype) in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ctype)
    try:
        yield url
    finally:
        server.stop()
