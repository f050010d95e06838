"""A webhook receiver on 127.0.0.1 that verifies every delivery with the
``standardwebhooks`` library (an implementation independent of ours) and
answers from a per-path script of statuses."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

__all__ = ["Call", "Receiver", "serve_receiver", "SECRET"]

#: The signing secret of the tests, in the Standard Webhooks ``whsec_`` form.
SECRET = "whsec_" + base64.b64encode(b"comfy-embed webhook test key!!").decode()


@dataclass
class Call:
    """One POST as received."""

    path: str
    headers: dict[str, str]
    body: bytes
    #: The payload as the library returned it after checking the signature,
    #: or None when verification failed (``error`` says why).
    payload: Any
    error: str | None
    answered: int

    @property
    def verified(self) -> bool:
        return self.error is None

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


class Receiver:
    """Calls by path; ``script(path, 500, 500)`` answers 500 twice, then 200."""

    def __init__(self, secret: str) -> None:
        self.verifier = Webhook(secret)
        self.calls: list[Call] = []
        self.url = ""
        self._scripts: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._cond = threading.Condition()

    def new_hook(self, name: str) -> tuple[str, str]:
        """A fresh path on this receiver, and its URL."""
        path = f"/{name}-{uuid.uuid4().hex[:8]}"
        return path, self.url + path

    def script(self, path: str, *answers: int | tuple[int, dict[str, str]]) -> None:
        self._scripts[path] = [a if isinstance(a, tuple) else (a, {}) for a in answers]

    def _answer(self, path: str) -> tuple[int, dict[str, str]]:
        queue = self._scripts.get(path)
        return queue.pop(0) if queue else (200, {})

    def record(self, call: Call) -> None:
        with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def at(self, path: str) -> list[Call]:
        with self._cond:
            return [c for c in self.calls if c.path == path]

    def wait(self, path: str, count: int, timeout: float = 60) -> list[Call]:
        """The first ``count`` calls to ``path``, waiting for them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(calls := [c for c in self.calls if c.path == path]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{path}: {len(calls)} of {count} webhook calls "
                                       f"after {timeout}s")
                self._cond.wait(left)
        return calls


@contextlib.contextmanager
def serve_receiver(secret: str = SECRET) -> Iterator[Receiver]:
    receiver = Receiver(secret)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            payload: Any = None
            error: str | None = None
            try:
                payload = receiver.verifier.verify(body, headers)
            except (WebhookVerificationError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
            with receiver._cond:
                status, extra = receiver._answer(self.path)
            receiver.record(Call(self.path, headers, body, payload, error, status))
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            answer = json.dumps({"ok": status < 300}).encode()
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        httpd.shutdown()
        httpd.server_close()
