"""A task's events seen as a Comfy API v2 job: status, queue position, the
latest progress snapshot, outputs (each an asset), error, metrics in ms.

Pure functions over the task's ``(seq, event)`` list (from memory or the
shared task log) and the job's record: nothing here reads a file but the
output files' sizes, so any instance computes the same view.
"""

from __future__ import annotations

import datetime as dt
import json
import mimetypes
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_embed.events import FINAL, dumps_bytes, loads
from comfy_embed.prepare.graph import node_order

__all__ = [
    "CANCELLED_TYPES",
    "JobRecord",
    "JobState",
    "OutputRef",
    "file_path",
    "iso",
    "job_state",
    "output_asset_id",
    "output_kind",
    "parse_output_asset_id",
    "text_content",
]

#: Error types of a task that was cancelled rather than failed.
CANCELLED_TYPES = frozenset({"execution_interrupted", "cancelled"})
_TERMINAL = frozenset({"succeeded", "failed", "canceled", "expired"})
_OUT_PREFIX = "asset_out."


def iso(ts: float | None) -> str | None:
    """Unix seconds as ISO-8601 UTC with a zone (``...Z``)."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobRecord:
    """What v2 records beside a task when it creates it (immutable)."""

    job_id: str
    created_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    nodes_total: int = 0
    #: node id -> class_type (progress messages name the class).
    classes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, job_id: str, created_at: float, metadata: dict[str, str],
           workflow: dict[str, Any]) -> JobRecord:
        classes = {str(k): str(v.get("class_type", "")) for k, v in workflow.items()
                   if isinstance(v, dict)}
        return cls(job_id, created_at, metadata, len(workflow), classes)

    def to_json(self, workflow: dict[str, Any]) -> bytes:
        """The record file: this, and the workflow as submitted."""
        # orjson and a light zlib level: this is on every submit's path.
        return zlib.compress(dumps_bytes({
            "id": self.job_id, "created_at": self.created_at, "metadata": self.metadata,
            "nodes_total": self.nodes_total, "classes": self.classes,
            "workflow": workflow}), 1)

    @classmethod
    def parse(cls, raw: bytes) -> tuple[JobRecord, dict[str, Any]]:
        """The record and the workflow of a record file."""
        d = loads(zlib.decompress(raw))
        record = cls(str(d["id"]), float(d["created_at"]), dict(d.get("metadata") or {}),
                     int(d.get("nodes_total") or 0), dict(d.get("classes") or {}))
        workflow = d.get("workflow")
        return record, workflow if isinstance(workflow, dict) else {}


def output_asset_id(job_id: str, node_id: str, index: str) -> str:
    """The asset id of one output: it names its job, node and place, so any
    instance finds the output from the id alone (no record per output)."""
    return f"{_OUT_PREFIX}{job_id}.{node_id.encode().hex()}.{index}"


def parse_output_asset_id(asset_id: str) -> tuple[str, str, str] | None:
    """``(job_id, node_id, index)`` of an output asset id, else None."""
    if not asset_id.startswith(_OUT_PREFIX):
        return None
    parts = asset_id[len(_OUT_PREFIX):].rsplit(".", 2)
    if len(parts) != 3 or not parts[0]:
        return None
    try:
        node_id = bytes.fromhex(parts[1]).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return parts[0], node_id, parts[2]


def output_kind(content_type: str, name: str = "") -> str:
    """The spec's normalised output type of a media type (and file name)."""
    if name.endswith(".latent"):  # SaveLatent's safetensors file
        return "latent"
    major = content_type.split("/", 1)[0]
    if major in ("image", "video", "audio"):
        return major
    if major == "text" or content_type == "application/json":
        return "text"
    return "file"


def text_content(value: Any) -> bytes:
    """A text output's bytes: strings joined by lines, anything else as JSON."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value).encode()
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, default=str).encode()


@dataclass
class OutputRef:
    """One output of a job: a file (``rel`` path under a server folder) or a
    text value; ``remote`` is its object-storage entry when uploaded."""

    node_id: str
    index: str
    name: str
    content_type: str
    #: ``(folder role, relative path)``: role "output", "temp" or "input".
    file: tuple[str, str] | None = None
    text: bytes | None = None
    remote: dict[str, Any] | None = None
    #: The store that holds ``remote`` ("oss", "s3": the result's key).
    store: str | None = None

    def asset_id(self, job_id: str) -> str:
        return output_asset_id(job_id, self.node_id, self.index)


@dataclass
class JobState:
    """The view of one job at one moment (see :func:`job_state`)."""

    status: str = "queued"
    queue_position: int | None = 0
    progress: dict[str, Any] | None = None
    outputs: list[OutputRef] = field(default_factory=list)
    error: dict[str, Any] | None = None
    started_at: float | None = None
    completed_at: float | None = None
    metrics: dict[str, int | None] = field(default_factory=dict)
    last_seq: int = 0
    #: The final event's ``expires_at`` (issue 29's stamp), when it has one.
    expires_at: str | None = None
    #: When a task of the FC API (no v2 record) was submitted, from its report.
    created_at: float | None = None
    #: Every attempt of a task that was run again after a lost one (issue 24).
    attempts: list[dict[str, Any]] | None = None

    @property
    def terminal(self) -> bool:
        return self.status in _TERMINAL


def _file_outputs(node_id: str, ui: dict[str, Any], index: int = 0) -> Iterable[OutputRef]:
    """The files of one node's ``executed`` UI output, indexed as results are
    (from ``index``: the node's files of earlier variants come first)."""
    for value in ui.values():
        if not isinstance(value, list):
            continue
        for item in value:
            if isinstance(item, dict) and "filename" in item:
                name = str(item["filename"])
                role = str(item.get("type") or "output")
                rel = "/".join(p for p in (str(item.get("subfolder") or ""), name) if p)
                yield OutputRef(node_id, str(index), name, _guess(name), file=(role, rel))
                index += 1


def _guess(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def _final_outputs(data: dict[str, Any]) -> list[OutputRef]:
    """Outputs of a finished task: every result file, then every text value."""
    found: list[OutputRef] = []
    for r in data.get("results") or ():
        out = r.get("output") or {}
        comfy = out.get("comfy") or {}
        name = str(comfy.get("filename", ""))
        rel = "/".join(p for p in (str(comfy.get("dir") or "."), str(comfy.get("subfolder") or ""),
                                   name) if p)
        store = next((k for k in ("oss", "s3") if isinstance(out.get(k), dict)), None)
        found.append(OutputRef(str(r.get("node_id")), str(r.get("index")), name,
                               str(out.get("media_type") or _guess(name)), file=("output", rel),
                               remote=out[store] if store else None, store=store))
    values = data.get("outputs") or {}
    for node_id in sorted(values, key=node_order):
        for k, key in enumerate(sorted(values[node_id] or {})):
            text = text_content(values[node_id][key])
            found.append(OutputRef(str(node_id), f"t{k}", f"{key}.txt", "text/plain", text=text))
    return found


def _progress(state: dict[str, Any] | None, step: dict[str, Any] | None, total: int,
              classes: dict[str, str], success: bool) -> dict[str, Any] | None:
    """The spec's Progress snapshot from ComfyUI's latest ``progress_state``
    (every node's state) and latest ``progress`` (the sampler's steps)."""
    if state is None and step is None and not success:
        return None
    nodes = (state or {}).get("nodes") or {}
    done = sum(1 for n in nodes.values() if isinstance(n, dict) and n.get("state") == "finished")
    total = max(total, len(nodes), done, 1)
    current = running = None
    for node_id, n in nodes.items():
        if isinstance(n, dict) and n.get("state") == "running":
            current, running = str(n.get("display_node_id") or node_id), n
    cur_step = steps = None
    src = running or (step if step and not success else None)
    if src is not None:
        cur_step, steps = src.get("value"), src.get("max")
        if current is None and src is step:
            current = str(step.get("node")) if step.get("node") is not None else None
    frac = (done + ((cur_step or 0) / steps if isinstance(steps, (int, float)) and steps else 0))
    value = 1.0 if success else min(1.0, max(0.0, frac / total))
    cls = classes.get(current or "") if current else None
    message = None
    if cls and isinstance(cur_step, (int, float)) and steps:
        message = f"{cls} {int(cur_step)}/{int(steps)}"
    return {"value": round(value, 4), "nodes_done": total if success else done,
            "nodes_total": total, "current_node": None if success else current,
            "current_node_class": None if success else cls,
            "step": int(cur_step) if isinstance(cur_step, (int, float)) and not success else None,
            "steps": int(steps) if isinstance(steps, (int, float)) and not success else None,
            "message": None if success else message}


def _across(progress: dict[str, Any], variant: int, variants: int) -> dict[str, Any]:
    """N variants: the progress of the whole job (variant ``variant`` of
    ``variants`` at ``progress``), its variant named."""
    value = min(1.0, (variant - 1 + progress.get("value", 0.0)) / variants)
    message = progress.get("message")
    return {**progress, "value": round(value, 4), "variant": variant, "variants": variants,
            "message": f"variant {variant}/{variants}: {message}" if message else message}


def _ms(report: dict[str, Any], *keys: str) -> int | None:
    total = 0.0
    for key in keys:
        value = report.get(key)
        if not isinstance(value, (int, float)):
            return None
        total += value
    return int(round(total * 1000))


def _error(error: dict[str, Any]) -> dict[str, Any]:
    """The spec's JobError of a final event's ``data.error``."""
    node_errors = error.get("node_errors") or {}
    raw = error.get("details")
    details: dict[str, Any] = raw if isinstance(raw, dict) else {}
    node_id = error.get("node_id") or details.get("node_id")
    class_type = error.get("node_type") or error.get("class_type") or details.get("node_type")
    if node_id is None and isinstance(node_errors, dict) and node_errors:
        node_id = next(iter(node_errors))
        entry = node_errors[node_id]
        class_type = class_type or (entry.get("class_type") if isinstance(entry, dict) else None)
    tb = error.get("traceback") or details.get("traceback")
    return {"code": str(error.get("type") or "execution_error"),
            "message": str(error.get("message") or ""),
            "node_id": None if node_id is None else str(node_id),
            "class_type": None if class_type is None else str(class_type),
            "traceback": "".join(tb) if isinstance(tb, list) else tb if isinstance(tb, str) else None}


def job_state(events: list[tuple[int, dict[str, Any]]], record: JobRecord | None, *,
              classes: dict[str, str] | None = None, cancel_requested: bool = False,
              final_at: float | None = None) -> JobState:
    """Fold a task's events into its v2 view. ``classes``: node id -> class
    (for progress messages); ``cancel_requested``: some instance asked to
    cancel it; ``final_at``: when its final event was written (Unix s)."""
    st = JobState()
    total = record.nodes_total if record else 0
    created = record.created_at if record else None
    state: dict[str, Any] | None = None
    step: dict[str, Any] | None = None
    live: list[OutputRef] = []
    variant = (1, 1)  # N variants: (the one running, how many); its events name it
    for seq, ev in events:
        st.last_seq = seq
        kind, data = ev.get("type"), ev.get("data") or {}
        if isinstance(data.get("variants"), int) and isinstance(data.get("variant"), int):
            if data["variant"] != variant[0]:
                state = step = None  # a new variant: the last one's progress is done
            variant = (data["variant"], data["variants"])
        if kind == "queue":
            st.queue_position = int(data.get("position") or 0)
        elif kind == "execution_start":
            st.status, st.queue_position = "running", None
            ts = data.get("timestamp")
            if st.started_at is None:  # N variants: each starts; the job started with the first
                st.started_at = ts / 1000 if isinstance(ts, (int, float)) else None
        elif kind == "progress_state":
            state = data
        elif kind == "progress":
            step = data
        elif kind == "executed" and isinstance(data.get("output"), dict):
            node = str(data.get("node"))
            live.extend(_file_outputs(node, data["output"],
                                      sum(1 for o in live if o.node_id == node)))
        elif kind == FINAL:
            _finish(st, data, created, final_at, bool(record and record.nodes_total))
    if not st.terminal:
        st.outputs = live
        if cancel_requested:
            st.status = "canceling"
    st.progress = _progress(state, step, total, classes or (record.classes if record else {}),
                            st.status == "succeeded")
    if variant[1] > 1 and st.status in ("running", "canceling"):
        st.progress = _across(st.progress or _progress({}, None, total, {}, False) or {},
                              *variant)
    if st.status != "queued":
        st.queue_position = None
    return st


def _finish(st: JobState, data: dict[str, Any], created: float | None,
            final_at: float | None, v2: bool) -> None:
    error = data.get("error")
    if data.get("status") == "success":
        st.status = "succeeded"
    elif isinstance(error, dict) and error.get("type") in CANCELLED_TYPES:
        st.status = "canceled"
    else:
        st.status = "failed"
    if isinstance(error, dict) and st.status == "failed":
        st.error = _error(error)
    st.outputs = _final_outputs(data)
    if isinstance(data.get("expires_at"), str):
        st.expires_at = data["expires_at"]
    if isinstance(data.get("attempts"), list):
        st.attempts = data["attempts"]
    report = data.get("report") or {}
    if isinstance(report, dict) and report:
        st.metrics = {"queue_ms": _ms(report, "queued"), "execution_ms": _ms(report, "execution"),
                      "total_ms": _ms(report, "end_to_end")}
        if created is not None:
            e2e = report.get("end_to_end")
            if st.started_at is None and isinstance(report.get("execution"), (int, float)) \
                    and report["execution"] > 0:
                lead = sum(v for k in ("prepare", "validation", "queued")
                           if isinstance(v := report.get(k), (int, float)))
                st.started_at = created + lead
            if isinstance(e2e, (int, float)):
                st.completed_at = created + e2e
    if st.completed_at is None:
        st.completed_at = final_at if final_at is not None else created
    e2e = report.get("end_to_end") if isinstance(report, dict) else None
    if v2 is False and final_at is not None and isinstance(e2e, (int, float)):
        # A task of the FC API (no v2 record): submitted end_to_end before its final.
        st.created_at, st.completed_at = final_at - e2e, final_at


def file_path(ref: OutputRef, folders: dict[str, Path], job_id: str) -> Path | None:
    """Where an output file lies on this server: in the job's own output
    folder (``<output>/<job_id>/``, where every output of a task goes) or the
    temp folder (previews). None for a text output and for a name that leads
    elsewhere: a node's UI output names its files, and a pack's node could
    name any path (other jobs' outputs, the shared task log, inputs)."""
    if ref.file is None:
        return None
    role, rel = ref.file
    path = os.path.realpath(folders.get(role, folders["output"]) / rel)
    for top in (os.path.join(os.path.realpath(folders["output"]), job_id),
                os.path.realpath(folders["temp"])):
        if path.startswith(top + os.sep):
            return Path(path)
    return None
