"""A small real OSS server on 127.0.0.1 for tests: PUT/GET/HEAD objects,
path-style (oss2 uses path-style URLs for IP endpoints), with V1 and V4
signature checks in headers and in signed URLs, and STS tokens.

Signatures are recomputed from the request as received, following the rules
in oss2/auth.py, so a test fails if the client signs something else than what
it sends.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Iterable
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

import crcmod

__all__ = ["FakeOss", "FakeObject"]

_crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)
# V1 sub-resources that take part in the signature (a subset of oss2's list,
# enough for object GET/PUT/HEAD and signed URLs).
_V1_SUBRESOURCES = frozenset({
    "acl", "security-token", "response-content-type", "response-content-disposition",
    "response-cache-control", "response-expires", "response-content-encoding",
    "response-content-language", "x-oss-process", "versionId",
})
_V1_URL_PARAMS = frozenset({"OSSAccessKeyId", "Expires", "Signature"})
_MAX_SKEW = 15 * 60


@dataclass
class FakeObject:
    """One stored object."""

    data: bytes
    content_type: str
    etag: str = ""

    def __post_init__(self) -> None:
        self.etag = self.etag or hashlib.md5(self.data).hexdigest().upper()


class _Denied(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _v4_encode(text: str, keep_slash: bool) -> str:
    return quote(text, safe="-_.~" + ("/" if keep_slash else ""))


@dataclass
class FakeOss:
    """An OSS-like server. ``keys`` maps access key id -> secret; ``tokens``
    are the valid STS tokens (a request carrying any other token is refused).

    ``objects`` maps ``(bucket, key)`` to :class:`FakeObject`. ``clock_offset``
    (seconds) shifts the server's clock, to test expired links without waiting.
    ``fail_next`` makes the next N requests answer 503 (retry tests).
    """

    keys: dict[str, str]
    tokens: set[str] = field(default_factory=set)
    buckets: Iterable[str] = ("test-bucket",)
    region: str = "cn-hangzhou"
    objects: dict[tuple[str, str], FakeObject] = field(default_factory=dict)
    clock_offset: float = 0.0
    fail_next: int = 0
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.buckets = set(self.buckets)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._endpoint: str | None = None

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> str:
        """Start serving; returns the endpoint URL (``http://127.0.0.1:PORT``)."""
        fake = self

        class Handler(_Handler):
            oss = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        # serve_forever is listening as soon as the socket is bound above, so
        # the endpoint is usable when start() returns.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="fake-oss", daemon=True)
        self._thread.start()
        self._endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self._endpoint

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the server (kept after stop())."""
        if self._endpoint is None:
            raise RuntimeError("FakeOss was never started")
        return self._endpoint

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FakeOss":
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def now(self) -> float:
        return time.time() + self.clock_offset

    # --- authentication ---------------------------------------------------------
    def authenticate(self, method: str, bucket: str, key: str,
                     params: list[tuple[str, str]], headers: dict[str, str]) -> None:
        """Raise _Denied unless the request carries a valid signature."""
        q = dict(params)
        auth = headers.get("authorization", "")
        if auth.startswith("OSS4-HMAC-SHA256 "):
            self._check_v4_header(method, bucket, key, params, headers, auth)
        elif auth.startswith("OSS "):
            self._check_v1_header(method, bucket, key, params, headers, auth)
        elif q.get("x-oss-signature-version") == "OSS4-HMAC-SHA256":
            self._check_v4_url(method, bucket, key, params, headers)
        elif "Signature" in q:
            self._check_v1_url(method, bucket, key, params, headers)
        else:
            raise _Denied(403, "AccessDenied", "You have no right to access this object.")

    def _secret(self, key_id: str) -> str:
        secret = self.keys.get(key_id)
        if secret is None:
            raise _Denied(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided "
                          "does not exist in our records.")
        return secret

    def _check_token(self, token: str | None) -> None:
        if token is not None and token not in self.tokens:
            raise _Denied(403, "InvalidSecurityToken", "The security token you provided is invalid.")

    @staticmethod
    def _mismatch() -> _Denied:
        return _Denied(403, "SignatureDoesNotMatch", "The request signature we calculated "
                       "does not match the signature you provided.")

    # V1 ---------------------------------------------------------------------
    def _v1_string(self, method: str, bucket: str, key: str, params: list[tuple[str, str]],
                   headers: dict[str, str], date: str) -> bytes:
        oss_headers = sorted((k, v) for k, v in headers.items() if k.startswith("x-oss-"))
        canon = "".join(f"{k}:{v}\n" for k, v in oss_headers)
        sub = sorted((k, v) for k, v in params if k in _V1_SUBRESOURCES)
        resource = f"/{bucket}/{key}"
        if sub:
            resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in sub)
        return "\n".join([method, headers.get("content-md5", ""), headers.get("content-type", ""),
                          date, canon + resource]).encode()

    def _v1_sign(self, secret: str, data: bytes) -> str:
        return base64.b64encode(hmac.new(secret.encode(), data, hashlib.sha1).digest()).decode()

    def _check_v1_header(self, method: str, bucket: str, key: str, params: list[tuple[str, str]],
                         headers: dict[str, str], auth: str) -> None:
        key_id, _, sig = auth[4:].partition(":")
        secret = self._secret(key_id)
        self._check_token(headers.get("x-oss-security-token"))
        date = headers.get("x-oss-date") or headers.get("date", "")
        try:
            sent = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            raise _Denied(403, "AccessDenied", "Invalid date.") from None
        if abs(sent - self.now()) > _MAX_SKEW:
            raise _Denied(403, "RequestTimeTooSkewed", "The difference between the request "
                          "time and the current time is too large.")
        expected = self._v1_sign(secret, self._v1_string(method, bucket, key, params, headers, date))
        if not hmac.compare_digest(expected, sig):
            raise self._mismatch()

    def _check_v1_url(self, method: str, bucket: str, key: str, params: list[tuple[str, str]],
                      headers: dict[str, str]) -> None:
        q = dict(params)
        secret = self._secret(q.get("OSSAccessKeyId", ""))
        self._check_token(q.get("security-token"))
        expires = q.get("Expires", "")
        if not expires.isdigit() or int(expires) < self.now():
            raise _Denied(403, "AccessDenied", "Request has expired.")
        signed = [(k, v) for k, v in params if k not in _V1_URL_PARAMS]
        expected = self._v1_sign(secret, self._v1_string(method, bucket, key, signed, headers, expires))
        if not hmac.compare_digest(expected, q.get("Signature", "")):
            raise self._mismatch()

    # V4 ---------------------------------------------------------------------
    def _v4_signature(self, secret: str, method: str, bucket: str, key: str,
                      params: list[tuple[str, str]], headers: dict[str, str],
                      additional: list[str], date_time: str, scope: str) -> str:
        uri = _v4_encode(f"/{bucket}/{key}", keep_slash=True)
        query = "&".join(
            f"{k}={v}" if v else k
            for k, v in sorted((_v4_encode(k, False), _v4_encode(v, False)) for k, v in params))
        signed = sorted((k, v) for k, v in headers.items()
                        if k.startswith("x-oss-") or k in ("content-type", "content-md5")
                        or k in additional)
        canon_headers = "".join(f"{k}:{v}\n" for k, v in signed)
        payload = headers.get("x-oss-content-sha256", "UNSIGNED-PAYLOAD")
        canonical = "\n".join([method, uri, query, canon_headers, ";".join(sorted(additional)),
                               payload])
        to_sign = "\n".join(["OSS4-HMAC-SHA256", date_time, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        date, region, product, _ = scope.split("/")
        k = hmac.new(("aliyun_v4" + secret).encode(), date.encode(), hashlib.sha256).digest()
        for part in (region, product, "aliyun_v4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        return hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()

    def _parse_credential(self, credential: str, date_time: str) -> tuple[str, str]:
        key_id, _, scope = credential.partition("/")
        parts = scope.split("/")
        if len(parts) != 4 or parts[3] != "aliyun_v4_request" or parts[2] != "oss":
            raise _Denied(403, "AccessDenied", f"Invalid credential scope {scope!r}.")
        if parts[0] != date_time[:8]:
            raise _Denied(403, "AccessDenied", "Credential date does not match x-oss-date.")
        if parts[1] != self.region:
            raise _Denied(403, "AccessDenied", f"Invalid signing region {parts[1]!r}, "
                          f"expected {self.region!r}.")
        return key_id, scope

    def _v4_time(self, date_time: str) -> float:
        try:
            return datetime.strptime(date_time, "%Y%m%dT%H%M%SZ").replace(
                tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise _Denied(403, "AccessDenied", "Invalid x-oss-date.") from None

    def _check_v4_header(self, method: str, bucket: str, key: str, params: list[tuple[str, str]],
                         headers: dict[str, str], auth: str) -> None:
        fields = dict(part.strip().partition("=")[::2]
                      for part in auth[len("OSS4-HMAC-SHA256 "):].split(","))
        date_time = headers.get("x-oss-date", "")
        if abs(self._v4_time(date_time) - self.now()) > _MAX_SKEW:
            raise _Denied(403, "RequestTimeTooSkewed", "The difference between the request "
                          "time and the current time is too large.")
        key_id, scope = self._parse_credential(fields.get("Credential", ""), date_time)
        secret = self._secret(key_id)
        self._check_token(headers.get("x-oss-security-token"))
        additional = [h for h in fields.get("AdditionalHeaders", "").split(";") if h]
        expected = self._v4_signature(secret, method, bucket, key, params, headers, additional,
                                      date_time, scope)
        if not hmac.compare_digest(expected, fields.get("Signature", "")):
            raise self._mismatch()

    def _check_v4_url(self, method: str, bucket: str, key: str, params: list[tuple[str, str]],
                      headers: dict[str, str]) -> None:
        q = dict(params)
        date_time = q.get("x-oss-date", "")
        expires = q.get("x-oss-expires", "")
        if not expires.isdigit() or self._v4_time(date_time) + int(expires) < self.now():
            raise _Denied(403, "AccessDenied", "Request has expired.")
        key_id, scope = self._parse_credential(q.get("x-oss-credential", ""), date_time)
        secret = self._secret(key_id)
        self._check_token(q.get("x-oss-security-token"))
        additional = [h for h in q.get("x-oss-additional-headers", "").split(";") if h]
        signed = [(k, v) for k, v in params if k != "x-oss-signature"]
        expected = self._v4_signature(secret, method, bucket, key, signed, headers, additional,
                                      date_time, scope)
        if not hmac.compare_digest(expected, q.get("x-oss-signature", "")):
            raise self._mismatch()


class _Handler(BaseHTTPRequestHandler):
    oss: FakeOss
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               send_body: bool = True) -> None:
        self.send_response(status)
        self.send_header("x-oss-request-id", uuid.uuid4().hex)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, send_body: bool = True) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code>'
                f"<Message>{escape(message)}</Message><RequestId>{uuid.uuid4().hex}</RequestId>"
                f"<HostId>127.0.0.1</HostId></Error>").encode()
        self._reply(status, body, {"Content-Type": "application/xml"}, send_body)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self, method: str) -> None:
        oss = self.oss
        body = self._read_body() if method == "PUT" else b""
        send_body = method != "HEAD"
        split = urlsplit(self.path)
        bucket, _, raw_key = split.path.lstrip("/").partition("/")
        key = unquote(raw_key)
        params = parse_qsl(split.query, keep_blank_values=True)
        headers = {k.lower(): v for k, v in self.headers.items()}
        with oss._lock:
            oss.requests.append((method, self.path))
            if oss.fail_next > 0:
                oss.fail_next -= 1
                return self._error(503, "ServiceUnavailable", "Please retry.", send_body)
        try:
            oss.authenticate(method, bucket, key, params, headers)
        except _Denied as e:
            return self._error(e.status, e.code, e.message, send_body)
        if bucket not in oss.buckets:
            return self._error(404, "NoSuchBucket", "The specified bucket does not exist.",
                               send_body)
        if not key:
            return self._error(400, "InvalidArgument", "Bucket operations are not supported.",
                               send_body)
        if method == "PUT":
            obj = FakeObject(body, headers.get("content-type", "application/octet-stream"))
            with oss._lock:
                oss.objects[(bucket, key)] = obj
            return self._reply(200, headers={"ETag": f'"{obj.etag}"',
                                             "x-oss-hash-crc64ecma": str(_crc64(body))})
        if method == "DELETE":  # OSS answers 204 whether or not the object existed
            with oss._lock:
                oss.objects.pop((bucket, key), None)
            return self._reply(204, send_body=False)
        with oss._lock:
            found = oss.objects.get((bucket, key))
        if found is None:
            return self._error(404, "NoSuchKey", "The specified key does not exist.", send_body)
        self._reply(200, found.data, {"Content-Type": found.content_type,
                                      "ETag": f'"{found.etag}"',
                                      "x-oss-hash-crc64ecma": str(_crc64(found.data))},
                    send_body)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")
