"""A recording reverse proxy on 127.0.0.1: point an SDK's COMFY_BASE_URL at
it and every request it makes reaches the real server unchanged, while the
proxy keeps each exchange for tests/api/v2/conformance.py to validate. The
SDKs are not touched; they only see another base URL (the server builds its
links from the Host header, which the proxy passes on, so links lead back
through the proxy).

Bodies are relayed as they arrive (event streams stay live); an exchange is
recorded when its answer starts and holds the whole body once the client has
seen it end.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests
from requests.structures import CaseInsensitiveDict

from tests.servers import free_port

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length"}


class _Request:
    def __init__(self, method: str, url: str) -> None:
        self.method, self.url = method, url


class Exchange:
    """One request and its whole answer, shaped like the parts of a
    ``requests.Response`` that Conformance reads."""

    def __init__(self, method: str, url: str, status: int, headers: dict[str, str],
                 body: bytes) -> None:
        self.request = _Request(method, url)
        self.status_code = status
        self.headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(headers)
        self.content = body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def iter_lines(self, decode_unicode: bool = True) -> list[str]:
        return self.text.splitlines()

    def __repr__(self) -> str:
        return f"{self.request.method} {self.request.url} -> {self.status_code}"


class RecordingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                with requests.request(self.command, proxy.upstream + self.path, data=body,
                                      headers=headers, stream=True, allow_redirects=False,
                                      timeout=600) as up:
                    kept = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
                    # Kept before the client can see the answer end: a body ends only when
                    # this connection closes (after the last chunk is added below), and a
                    # 204 or a HEAD answer has none.
                    exchange = Exchange(self.command, proxy.url + self.path, up.status_code,
                                        kept, b"")
                    with proxy._lock:
                        proxy.exchanges.append(exchange)
                    self.send_response(up.status_code)
                    for k, v in kept.items():
                        self.send_header(k, v)
                    self.send_header("Connection", "close")  # the body ends with the connection
                    self.end_headers()
                    if self.command != "HEAD":
                        for chunk in up.raw.stream(65536, decode_content=False):
                            exchange.content += chunk
                            self.wfile.write(chunk)
                            self.wfile.flush()
                    self.close_connection = True

            do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:  # noqa: PYI034
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def v2(self) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if "/api/v2/" in e.request.url]
