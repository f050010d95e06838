"""A small web server on a loopback address, serving test images and the
failure cases image inputs must survive (404, slow, oversized, bombs...)."""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from PIL import Image


def make_png(size: tuple[int, int] = (8, 6), color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A few hundred bytes that claim to be a 1-bit 100000x100000 image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


PNG = make_png()
JPEG_BUF = io.BytesIO()
Image.new("RGB", (5, 5), "blue").save(JPEG_BUF, "JPEG")
JPEG = JPEG_BUF.getvalue()


def noise_png(side: int = 150, seed: int = 7) -> bytes:
    """A PNG of random pixels: about 3 bytes a pixel whatever the compression."""
    import random

    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


NOISE = noise_png()


class Web:
    """Routes of the test web server; ``requests`` records (host header, path)."""

    def __init__(self) -> None:
        self.release = threading.Event()  # lets the slow handler finish at teardown
        self.requests: list[tuple[str, str]] = []
        self.base = ""
        #: ``/held*`` requests being answered now, and the most at once.
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        #: Bytes of body written by ``/endless`` and ``/huge-declared.png`` answers.
        self.streamed = 0

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


def _serve(web: Web, host: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, ctype: str = "image/png",
                  headers: dict[str, str] | None = None, length: bool = True) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            web.requests.append((self.headers.get("Host", ""), self.path))
            p = self.path
            if p == "/ok.png":
                self._send(200, PNG)
            elif p == "/ok.jpg":
                self._send(200, JPEG, "image/jpeg")
            elif p == "/missing.png":
                self._send(404, b"not found", "text/plain")
            elif p == "/slow.png":
                web.release.wait(30)
                self._send(200, PNG)
            elif p == "/big-declared.png":
                self._send(200, b"\0" * 50_000)
            elif p == "/big-undeclared.png":  # HTTP/1.0: body ends when the connection closes
                self._send(200, PNG + b"\0" * 50_000, length=False)
            elif p.startswith("/noise.png"):
                self._send(200, NOISE)
            elif p.startswith("/held"):  # held open a moment, to overlap with others
                web.enter()
                try:
                    web.release.wait(0.4)
                    self._send(200, PNG)
                finally:
                    web.leave()
            elif p.split("?")[0] in ("/endless", "/huge-declared.png"):
                # Zeros until the client hangs up (declared as 1 GB, or undeclared).
                headers = {"Content-Length": "1000000000"} if p.startswith("/huge") else {}
                self._send(200, b"", headers=headers, length=False)
                try:
                    for _ in range(100_000):
                        self.wfile.write(b"\0" * 65536)
                        web.streamed += 65536
                except OSError:
                    pass
            elif p == "/text":
                self._send(200, b"hello, not an image", "text/plain")
            elif p == "/bomb.png":
                self._send(200, bomb_png())
            elif p.startswith("/redirect?to="):
                self._send(302, b"", headers={"Location": p[len("/redirect?to="):]})
            elif p == "/loop":
                self._send(302, b"", headers={"Location": "/loop"})
            else:
                self._send(404, b"no route", "text/plain")

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server  # bound and listening: ready as soon as the constructor returns




@contextlib.contextmanager
def serve_web(host: str = "127.0.0.1") -> Iterator[Web]:
    """A running server on ``host``; ``web.base`` is its URL."""
    web = Web()
    server = _serve(web, host)
    web.base = f"http://{host}:{server.server_address[1]}"
    try:
        yield web
    finally:
        web.release.set()
        server.shutdown()
        server.server_close()
