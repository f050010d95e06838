"""A loopback web server for arbitrary bytes (media inputs, model files):
counts requests per path and can send slowly, so that concurrent readers
overlap."""

from __future__ import annotations

import contextlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator


class Files:
    """``files`` maps a path to its bytes; ``hits`` counts GETs per path;
    ``chunk_delay`` seconds pass between 64 KB chunks."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.chunk_delay = 0.0
        #: Paths answered without Content-Length (the body ends when the connection does).
        self.undeclared: set[str] = set()
        #: Paths whose answer waits until their event is set.
        self.holds: dict[str, threading.Event] = {}
        self.base = ""
        self._lock = threading.Lock()

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits.get(path, 0)


@contextlib.contextmanager
def serve_files(host: str = "127.0.0.1") -> Iterator[Files]:
    files = Files()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            with files._lock:
                files.hits[self.path] = files.hits.get(self.path, 0) + 1
            body = files.files.get(self.path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            hold = files.holds.get(self.path)
            if hold is not None:
                hold.wait(120)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            if self.path not in files.undeclared:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), 65536):
                try:
                    self.wfile.write(body[i:i + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    return
                if files.chunk_delay:
                    time.sleep(files.chunk_delay)  # a slow link, so that readers overlap

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    files.base = f"http://{host}:{server.server_address[1]}"
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()
