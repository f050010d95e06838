"""Validate real Comfy API v2 responses against the official spec's schemas.

The spec is ``spec/openapi.yaml`` of the public repository
Comfy-Org/comfy-api-proxy as its PyPI source release ``comfy-api-proxy==0.1.6``
publishes it (neither SDK package ships it, and GitHub is out of reach):
:func:`spec_path` downloads that release from the registry once, checks the
file's sha256 and keeps it in a cache folder. Nothing of it is in this
repository. Every response a test hands to
:meth:`Conformance.check` is matched to its operation (method and path
template), its status must be one the operation declares, and its body (JSON
or each SSE frame) must validate against the declared schema with the
OpenAPI 3.0 validator (``nullable``, formats: ``date-time`` with a zone,
``uri`` absolute). What the spec does not declare fails, except the
deviations listed in :data:`EXTRAS` and the SDK-only operations in
:data:`SDK_ONLY`, which are checked against the SDK's own models.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import requests
import yaml
from openapi_schema_validator import OAS30Validator

SPEC_RELEASE = "comfy-api-proxy==0.1.6"
#: sha256 of that release's spec/openapi.yaml. Its schemas match the text at
#: the repository's commit 37fbee21 (which issue 23 quotes); the operations
#: differ in idempotency (37fbee21: Stripe replay with Idempotency-Replayed and
#: 409 idempotency_conflict; 0.1.6: single use) and in extra_data (0.1.6
#: declares it closed). Issue 23 asks for Stripe semantics: see EXTRAS.
SPEC_SHA256 = "799c563c608e3a97269a7516bd61bbf393ab64c15d4e105176fad8de8653a371"

#: Statuses the published spec does not declare but issue 23 asks for (the
#: spec text at comfy-api-proxy 37fbee21 declares them): (method, template,
#: status) -> why. Their bodies must still be the spec's ErrorEnvelope.
EXTRAS: dict[tuple[str, str, str], str] = {
    ("POST", "/api/v2/jobs", "409"): "idempotency_conflict (Stripe semantics, spec @37fbee21)",
    ("POST", "/api/v2/assets", "413"): "upload over the size limit (issue 23: limit as a setting)",
}

#: A malformed request (no JSON, a bad header) on any operation: the spec's
#: envelope catalogue names ``invalid_request`` as a 400, though no operation
#: declares a 400; allowed with exactly that code.
MALFORMED = ("400", "invalid_request")

#: Operations the SDKs call that the spec does not have yet (issue 23: the
#: SDKs are the contract there). Checked against the SDK's generated models.
SDK_ONLY = {("GET", "/api/v2/jobs"), ("GET", "/api/v2/jobs/{id}/workflow"),
            ("DELETE", "/api/v2/assets/{id}")}

_ZONED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def _format_checker() -> jsonschema.FormatChecker:
    checker = copy.deepcopy(OAS30Validator.FORMAT_CHECKER)

    @checker.checks("uri")
    def _absolute(value: object) -> bool:
        if not isinstance(value, str):
            return True
        parts = urlsplit(value)
        return bool(parts.scheme and parts.netloc)

    @checker.checks("date-time")
    def _zoned(value: object) -> bool:
        return not isinstance(value, str) or bool(_ZONED.match(value))

    return checker


@functools.cache
def spec_path() -> Path:
    """The official spec file, from the cache or downloaded (sdist only, no
    dependencies) by pip from the package index."""
    cached = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
        / "comfy-embed" / "comfy-api-proxy-spec" / SPEC_SHA256 / "openapi.yaml"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--no-binary", ":all:", SPEC_RELEASE, "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/spec/openapi.yaml"))
            raw = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert hashlib.sha256(raw).hexdigest() == SPEC_SHA256, f"{SPEC_RELEASE}'s spec changed"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(raw)
    return cached


class Conformance:
    """The spec, loaded once; :meth:`check` validates one response."""

    def __init__(self) -> None:
        raw = spec_path().read_bytes()
        assert hashlib.sha256(raw).hexdigest() == SPEC_SHA256, "the cached spec changed"
        self.spec: dict[str, Any] = yaml.safe_load(raw)
        self.formats = _format_checker()
        self.checked: list[str] = []
        templates = list(self.spec["paths"]) + ["/api/v2/jobs/{id}/workflow"]
        # Literal segments win over parameters (/assets/from-hash vs /assets/{id}).
        self._routes = sorted(((t, self._pattern(t)) for t in set(templates)),
                              key=lambda tp: tp[0].count("{"))

    @staticmethod
    def _pattern(template: str) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")

    # ------------------------------------------------------------ schemas
    def resolve(self, node: Any) -> Any:
        """``node`` with every ``$ref`` inlined (the spec has no cycles)."""
        if isinstance(node, dict):
            if "$ref" in node:
                target: Any = self.spec
                for part in node["$ref"].lstrip("#/").split("/"):
                    target = target[part]
                return self.resolve(target)
            out = {k: self.resolve(v) for k, v in node.items()}
            if out.get("nullable") and len(out.get("allOf", ())) == 1:
                # `allOf: [X], nullable: true` is OpenAPI 3.0's "X or null"; the
                # validator applies allOf to null too, so fold it into X.
                target = dict(out.pop("allOf")[0], nullable=True)
                return {**out, **target}
            return out
        if isinstance(node, list):
            return [self.resolve(v) for v in node]
        return node

    def schema(self, name: str) -> dict[str, Any]:
        return self.resolve({"$ref": f"#/components/schemas/{name}"})

    def validate(self, instance: Any, schema: dict[str, Any], where: str) -> None:
        errors = sorted(OAS30Validator(schema, format_checker=self.formats).iter_errors(instance),
                        key=lambda e: list(e.absolute_path))
        if errors:
            lines = [f"  at {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                     for e in errors[:8]]
            raise AssertionError(f"{where} does not conform to the spec:\n" + "\n".join(lines)
                                 + f"\nbody: {json.dumps(instance)[:1500]}")

    # ------------------------------------------------------------ operations
    def route(self, method: str, url: str) -> str:
        path = urlsplit(url).path
        for template, pattern in self._routes:
            ops = self.spec["paths"].get(template, {})
            if pattern.match(path) and (method.lower() in ops or (method, template) in SDK_ONLY):
                return template
        raise AssertionError(f"{method} {path} is no operation of the spec nor of the SDKs")

    def check(self, resp: Any) -> None:
        """Validate a fully read response (not an SSE stream: see check_sse)."""
        method = str(resp.request.method)
        template = self.route(method, str(resp.request.url))
        where = f"{method} {template} -> {resp.status_code}"
        self.checked.append(where)
        if (method, template) in SDK_ONLY:
            return self._check_sdk_only(resp, method, template, where)
        declared = self._declared(method, template, resp.status_code, where)
        self._check_headers(resp, declared, where)
        content = declared.get("content") or {}
        if "application/json" in content:
            assert resp.headers.get("content-type", "").startswith("application/json"), \
                f"{where}: content-type {resp.headers.get('content-type')!r}, not JSON"
            self.validate(resp.json(), content["application/json"]["schema"], where)
        elif "application/octet-stream" in content:
            assert resp.status_code in (200, 206), where
        elif "text/event-stream" in content:
            raise AssertionError(f"{where}: use check_sse for the event stream")

    def _declared(self, method: str, template: str, status: int, where: str) -> dict[str, Any]:
        responses = self.spec["paths"][template][method.lower()]["responses"]
        if str(status) in responses:
            return dict(self.resolve(responses[str(status)]))
        if (method, template, str(status)) in EXTRAS:
            return {"content": {"application/json": {"schema": self.schema("ErrorEnvelope")}}}
        if str(status) == MALFORMED[0]:
            envelope = self.schema("ErrorEnvelope")
            code = {"type": "string", "enum": [MALFORMED[1]]}
            envelope["properties"]["error"]["properties"]["code"] = code
            return {"content": {"application/json": {"schema": envelope}}}
        raise AssertionError(f"{where}: status not declared by the spec "
                             f"(declared: {sorted(responses)})")

    def _check_headers(self, resp: requests.Response, declared: dict[str, Any],
                       where: str) -> None:
        for name, spec in (declared.get("headers") or {}).items():
            value = resp.headers.get(name)
            if value is None:
                continue
            kind = spec.get("schema", {}).get("type")
            if kind == "integer":
                assert value.isdigit(), f"{where}: header {name}={value!r} is not an integer"
        if resp.status_code == 429:
            assert (resp.headers.get("Retry-After") or "").isdigit(), \
                f"{where}: a 429 needs an integer Retry-After"
        replayed = resp.headers.get("Idempotency-Replayed")
        if replayed is not None:
            assert replayed in ("true", "false"), f"{where}: Idempotency-Replayed={replayed!r}"

    def _check_sdk_only(self, resp: requests.Response, method: str, template: str,
                        where: str) -> None:
        if resp.status_code >= 400:
            self.validate(resp.json(), self.schema("ErrorEnvelope"), where)
        elif method == "DELETE":
            assert resp.status_code == 204 and not resp.content, f"{where}: the SDK needs 204"
        elif template.endswith("/workflow"):
            from comfy_low.models import JobWorkflowResponse
            assert resp.status_code == 200, where
            JobWorkflowResponse.model_validate(resp.json())
        else:
            self._check_list(resp.json(), where)

    def _check_list(self, body: Any, where: str) -> None:
        """``{"jobs": [...], "next_cursor": str|null|absent}`` as comfy-sdk reads it;
        each item carries the spec's JobStatus and, where the SDK reads them,
        date-times with a zone and string labels."""
        item = {"type": "object", "required": ["id", "status"], "properties": {
            "id": {"type": "string"}, "status": self.schema("JobStatus"),
            "create_time": {"type": "string", "format": "date-time"},
            "update_time": {"type": "string", "format": "date-time"},
            "deployment_id": {"type": "string", "nullable": True},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}}
        page = {"type": "object", "required": ["jobs"], "properties": {
            "jobs": {"type": "array", "items": item},
            "next_cursor": {"type": "string", "nullable": True}}}
        self.validate(body, page, where)

    def check_recorded(self, exchanges: list[Any]) -> set[str]:
        """Validate exchanges a RecordingProxy kept (SSE or not); the
        operations they reached."""
        for exchange in exchanges:
            if exchange.headers.get("content-type", "").startswith("text/event-stream"):
                self.check_sse(exchange)
            else:
                self.check(exchange)
        return {f"{e.request.method} {self.route(e.request.method, e.request.url)}"
                for e in exchanges}

    # ------------------------------------------------------------ SSE
    def check_sse(self, resp: Any) -> list[tuple[str, dict[str, Any]]]:
        """Read a whole event stream (it ends after the terminal status) and
        validate every frame against the spec's x-sse-events catalogue."""
        where = f"GET /api/v2/jobs/{{id}}/events -> {resp.status_code}"
        self.checked.append(where)
        if resp.status_code != 200:
            self._declared("GET", "/api/v2/jobs/{id}/events", resp.status_code, where)
            self.validate(resp.json(), self.schema("ErrorEnvelope"), where)
            return []
        assert resp.headers.get("content-type", "").startswith("text/event-stream"), where
        catalogue = self.spec["paths"]["/api/v2/jobs/{id}/events"]["get"]["x-sse-events"]
        frames = parse_sse(resp.iter_lines(decode_unicode=True))
        for name, data in frames:
            assert name in catalogue, f"{where}: event {name!r} is not in the catalogue"
            schema = self.resolve({"$ref": catalogue[name]["schema"]})
            self.validate(data, schema, f"{where} event {name}")
        return frames


def parse_sse(lines: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) per frame, as the SDKs' decoders read them; comments
    (keepalives) skipped; ``id:`` lines are not allowed (no replay)."""
    frames: list[tuple[str, dict[str, Any]]] = []
    name, data = "message", []
    for line in lines:
        if line == "":
            if data:
                frames.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            assert field != "id", "the spec's stream carries no event ids"
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
    if data:
        frames.append((name, json.loads("\n".join(data))))
    return frames
