"""A task's events folded into a Comfy API v2 job (pure: no server)."""

from __future__ import annotations

from pathlib import Path

from comfy_embed.events import event, final_event, queue_event
from comfy_embed.service.jobview import (
    JobRecord,
    OutputRef,
    file_path,
    job_state,
    output_asset_id,
    output_kind,
    parse_output_asset_id,
)

RECORD = JobRecord.of("job_1", 1000.0, {"a": "b"},
                      {"3": {"class_type": "KSampler"}, "9": {"class_type": "SaveImage"}})


def seq(*events: dict) -> list[tuple[int, dict]]:
    return list(enumerate(events, 1))


def test_queued_then_running_with_progress() -> None:
    st = job_state(seq(queue_event("p", 2)), RECORD)
    assert (st.status, st.queue_position, st.progress) == ("queued", 2, None)
    st = job_state(seq(queue_event("p", 2), event("execution_start", {"timestamp": 1500_000}),
                       event("progress_state", {"nodes": {
                           "3": {"state": "running", "value": 5, "max": 20},
                           "1": {"state": "finished", "value": 1, "max": 1}}})), RECORD)
    assert st.status == "running" and st.queue_position is None and st.started_at == 1500.0
    p = st.progress
    assert p is not None
    assert (p["nodes_done"], p["nodes_total"], p["current_node"], p["step"], p["steps"]) == \
        (1, 2, "3", 5, 20)
    assert p["current_node_class"] == "KSampler" and p["message"] == "KSampler 5/20"
    assert p["value"] == round((1 + 5 / 20) / 2, 4)
    assert job_state(seq(event("execution_start", {})), RECORD,
                     cancel_requested=True).status == "canceling"


def test_outputs_while_running_and_at_the_end() -> None:
    executed = event("executed", {"node": "9", "output": {"images": [
        {"filename": "a.png", "subfolder": "job_1", "type": "output"},
        {"filename": "b.png", "subfolder": "job_1", "type": "temp"}], "text": ["x"]}})
    st = job_state(seq(event("execution_start", {}), executed), RECORD)
    assert [(o.node_id, o.index, o.file) for o in st.outputs] == [
        ("9", "0", ("output", "job_1/a.png")), ("9", "1", ("temp", "job_1/b.png"))]
    results = [{"node_id": "9", "index": i, "output": {"comfy": {
        "filename": n, "subfolder": "job_1", "dir": d}, "media_type": "image/png"}}
        for i, (n, d) in enumerate([("a.png", "."), ("b.png", "../temp")])]
    final = final_event("job_1", "p", {}, results, outputs={"5": {"text": ["16"]}})
    final["data"].update(report={"queued": 0.5, "execution": 1.25, "end_to_end": 2.0},
                         expires_at="2026-12-07T00:00:00Z")
    st = job_state(seq(event("execution_start", {}), executed, final), RECORD)
    assert st.status == "succeeded" and st.progress and st.progress["value"] == 1.0
    assert [(o.node_id, o.index) for o in st.outputs] == [("9", "0"), ("9", "1"), ("5", "t0")]
    assert st.outputs[1].file == ("output", "../temp/job_1/b.png")
    assert st.outputs[2].text == b"16" and st.outputs[2].content_type == "text/plain"
    assert st.metrics == {"queue_ms": 500, "execution_ms": 1250, "total_ms": 2000}
    assert st.completed_at == 1002.0 and st.expires_at == "2026-12-07T00:00:00Z"


def test_failed_and_canceled() -> None:
    err = {"type": "execution_error", "message": "boom", "node_id": "3", "node_type": "KSampler",
           "traceback": ["a\n", "b\n"], "node_errors": {}}
    st = job_state(seq(final_event("job_1", None, {}, error=err)), RECORD)
    assert st.status == "failed" and st.outputs == []
    assert st.error == {"code": "execution_error", "message": "boom", "node_id": "3",
                        "class_type": "KSampler", "traceback": "a\nb\n"}
    # As a failed run's error comes (tasks.py): the node and traceback in details.
    err = {"type": "execution_error", "message": "node 3 (KSampler) failed: boom",
           "node_errors": {"3": {"errors": [], "class_type": "KSampler"}},
           "details": {"node_id": "3", "node_type": "KSampler", "traceback": ["x\n"]}}
    st = job_state(seq(final_event("job_1", None, {}, error=err)), RECORD)
    assert st.error is not None and st.error["traceback"] == "x\n"
    assert (st.error["node_id"], st.error["class_type"]) == ("3", "KSampler")
    cancelled = final_event("job_1", None, {}, error={"type": "execution_interrupted",
                                                      "message": "cancelled"})
    st = job_state(seq(cancelled), RECORD, cancel_requested=True)
    assert st.status == "canceled" and st.error is None


def test_output_ids_round_trip_and_kinds() -> None:
    for node in ("9", "12:3", "ünï"):
        asset_id = output_asset_id("job_x.y", node, "t2")
        assert parse_output_asset_id(asset_id) == ("job_x.y", node, "t2")
    assert parse_output_asset_id("asset_" + "0" * 32) is None
    assert parse_output_asset_id("asset_out.job.zz.0") is None
    assert [output_kind(t) for t in ("image/png", "video/mp4", "audio/flac", "text/plain",
                                     "application/json", "application/zip")] == \
        ["image", "video", "audio", "text", "text", "file"]
    assert output_kind("application/octet-stream", "x.latent") == "latent"


def test_output_files_stay_in_the_jobs_own_folders(tmp_path: Path) -> None:
    folders = {"output": tmp_path / "out", "temp": tmp_path / "temp", "input": tmp_path / "in"}
    for folder in folders.values():
        folder.mkdir()
    mine = OutputRef("9", "0", "a.png", "image/png", file=("output", "./job_1/a.png"))
    assert file_path(mine, folders, "job_1") == (tmp_path / "out" / "job_1" / "a.png").resolve()
    preview = OutputRef("9", "1", "p.png", "image/png", file=("output", "../temp/p.png"))
    assert file_path(preview, folders, "job_1") == (tmp_path / "temp" / "p.png").resolve()
    for role, rel in [("output", "job_2/a.png"),  # another job's
                      ("output", "serverless_api/@v2/assets/blobs/ab/ab"),  # the shared log
                      ("input", "serverless/t/x.png"),  # other callers' inputs
                      ("output", "../../etc/passwd"), ("output", "/etc/passwd"),
                      ("output", "job_1/../../x")]:
        bad = OutputRef("9", "0", "x", "image/png", file=(role, rel))
        assert file_path(bad, folders, "job_1") is None, rel
    text = OutputRef("5", "t0", "text.txt", "text/plain", text=b"x")
    assert file_path(text, folders, "job_1") is None

def test_a_job_run_again_lists_its_attempts() -> None:
    final = final_event("job_1", None, {})
    final["data"].update(attempt=2, attempts=[
        {"attempt": 1, "status": "error", "error": {"type": "task_lost", "message": "m"},
         "finished_at": "2026-01-01T00:00:00Z"},
        {"attempt": 2, "status": "success", "error": None, "finished_at": "2026-01-01T00:00:09Z"}])
    st = job_state(seq(final), RECORD)
    assert st.status == "succeeded"
    assert st.attempts is not None and [a["attempt"] for a in st.attempts] == [1, 2]
    assert job_state(seq(final_event("job_1", None, {})), RECORD).attempts is None


def test_variants_progress_covers_the_whole_job() -> None:
    def tagged(kind: str, data: dict, variant: int) -> dict:
        return event(kind, {**data, "variant": variant, "variants": 2})
    running = {"nodes": {"3": {"state": "running", "value": 5, "max": 20},
                         "1": {"state": "finished", "value": 1, "max": 1}}}
    first = [event("variant", {"variant": 1, "variants": 2, "seeds": {"3": 1}}),
             tagged("execution_start", {"timestamp": 1500_000}, 1),
             tagged("progress_state", running, 1),
             tagged("executed", {"node": "9", "output": {"images": [
                 {"filename": "a.png", "subfolder": "job_1/v1", "type": "output"}]}}, 1)]
    st = job_state(seq(*first), RECORD)
    p = st.progress
    assert p is not None and (p["variant"], p["variants"]) == (1, 2)
    assert p["value"] == round((1 + 5 / 20) / 2 / 2, 4)
    assert p["message"] == "variant 1/2: KSampler 5/20"
    second = [event("variant", {"variant": 2, "variants": 2, "seeds": {"3": 2}}),
              tagged("execution_start", {"timestamp": 1600_000}, 2)]
    st = job_state(seq(*first, *second), RECORD)
    p = st.progress
    # Variant 1's progress is done; variant 2 has not reported yet.
    assert p is not None and p["variant"] == 2 and p["value"] == 0.5
    assert st.started_at == 1500.0  # the job started with its first variant
    later = [tagged("progress_state", running, 2),
             tagged("executed", {"node": "9", "output": {"images": [
                 {"filename": "b.png", "subfolder": "job_1/v2", "type": "output"}]}}, 2)]
    st = job_state(seq(*first, *second, *later), RECORD)
    assert st.progress is not None and st.progress["value"] == round(0.5 + (1 + 5 / 20) / 2 / 2, 4)
    # Live outputs: one index sequence per node across variants (distinct asset ids).
    assert [(o.index, o.file) for o in st.outputs] == [
        ("0", ("output", "job_1/v1/a.png")), ("1", ("output", "job_1/v2/b.png"))]
