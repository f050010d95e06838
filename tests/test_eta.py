"""The ETA: the estimator, forecasts over a real executor queue, deadline
admission and parsing, the prior read from a real task log.

The executor here runs a backend that waits for the test (a thread and
queue unit test: what ComfyUI would run is beside the point)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from comfy_embed.config import Settings
from comfy_embed.errors import DeadlineUnmeetable, QueueFull
from comfy_embed.eta import Estimator, Eta, parse_deadline, recent_reports
from comfy_embed.events import final_event
from comfy_embed.executor import Executor, Job, Outcome
from comfy_embed.observe.report import TaskReport
from comfy_embed.prepare.options import RunOptions
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.variants import attach_variants


# ------------------------------------------------------------------ estimator
def test_the_median_of_the_last_runs_of_a_shape() -> None:
    est = Estimator(window=3)
    assert est.estimate("a") is None  # nothing ever ran: no ETA, not a guess
    for s in (10.0, 1.0, 2.0, 3.0):  # 10 falls out of the window of 3
        est.observe("a", s)
    assert est.estimate("a") == 2.0
    est.observe("b", 7.0)
    assert est.estimate("b") == 7.0 and est.known("b") and not est.known("c")


def test_an_unknown_shape_takes_the_recent_median_or_nothing() -> None:
    median, none = Estimator(fallback="median"), Estimator(fallback="none")
    for est in (median, none):
        for shape, s in (("a", 1.0), ("b", 5.0), ("c", 9.0)):
            est.observe(shape, s)
    assert median.estimate("new") == 5.0
    assert none.estimate("new") is None
    assert none.estimate("c") == 9.0


def test_bad_measures_are_ignored() -> None:
    est = Estimator()
    for s in (float("nan"), float("inf"), -1.0):
        est.observe("a", s)
    est.observe("", 3.0)
    assert est.estimate("a") is None and est.shapes == 0


def test_the_prior_is_older_than_runs_seen_here() -> None:
    est = Estimator(window=3)
    est.observe("a", 100.0)
    taken = est.prior([("a", 1.0), ("a", 1.0), ("a", 1.0), ("b", 4.0), ("", 2.0)])
    assert taken == 4 and est.prior_runs == 4
    # Window of 3: the two newest prior runs and this instance's own.
    assert est.estimate("a") == 1.0
    est.observe("a", 100.0)
    assert est.estimate("a") == 100.0  # own runs push the prior out
    assert est.estimate("b") == 4.0


# ------------------------------------------------------------------ forecasts
class _Held:
    """A backend whose every run waits for a release of ``go`` (a queue test)."""

    def __init__(self) -> None:
        self.go = threading.Semaphore(0)
        self.running = threading.Event()

    def execute(self, prompt: dict[str, Any], prompt_id: str, outputs: list[str], sink: Any,
                stop: Callable[[], bool] | None = None,
                extra_data: dict[str, Any] | None = None) -> Outcome:
        self.running.set()
        self.go.acquire()
        return Outcome(success=prompt.get("ok", True), interrupted=False, outputs={})

    def interrupt(self) -> None:
        pass

    def directory_of(self, kind: str) -> Path:
        return Path("/nonexistent")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue() -> Iterator[tuple[Executor, _Held]]:
    backend = _Held()
    ex = Executor(lambda: backend, max_queue=8)  # type: ignore[arg-type, return-value]
    ex.start()
    ex.wait_ready(10)
    try:
        yield ex, backend
    finally:
        for _ in range(16):
            backend.go.release()
        ex.close(timeout=10)


def _job(shape: str, done: threading.Event | None = None, ok: bool = True) -> Job:
    return Job(prompt_id=f"p-{shape}-{time.monotonic_ns()}", prompt={"ok": ok}, outputs=[],
               emit=lambda kind, data: None, shape=shape,
               on_done=lambda outcome: done.set() if done is not None else None)


def _wait_running(ex: Executor, job: Job) -> None:
    for _ in range(500):
        if ex.current is job:
            return
        time.sleep(0.01)
    raise AssertionError("the job never started")


def test_forecasts_follow_the_queue(queue: tuple[Executor, _Held]) -> None:
    ex, _ = queue
    clock = _Clock()
    est = Estimator()
    est.prior([("long", 10.0), ("short", 2.0)])
    eta = Eta(ex, est, clock=clock)
    first, second, third = _job("long"), _job("short"), _job("short")
    forecasts = [eta.admit(j, RunOptions()) for j in (first,)]
    ex.submit(first)
    _wait_running(ex, first)
    assert first.started_at is not None
    clock.now = first.started_at + 4.0  # the running job is 4s into its 10
    for j in (second, third):
        forecasts.append(eta.admit(j, RunOptions()))
        ex.submit(j)
    running, f2, f3 = (f() for f in forecasts)
    assert (running.position, running.start, running.finish) == (0, 0.0, 6.0)
    assert (f2.position, f2.start, f2.finish) == (1, 6.0, 8.0)
    assert (f3.position, f3.start, f3.finish) == (2, 8.0, 10.0)
    assert eta.backlog() == 10.0
    assert f3.fields() == {"eta_start": 8.0, "eta_finish": 10.0}
    clock.now = first.started_at + 30.0  # over its estimate: counted as ending now
    assert forecasts[2]().start == 2.0
    assert second.estimate == 2.0 and third.deadline is None


def test_an_unknown_job_on_the_way_makes_the_eta_unknown(queue: tuple[Executor, _Held]) -> None:
    ex, _ = queue
    eta = Eta(ex, Estimator(fallback="none"))
    eta.estimator.observe("known", 1.0)
    mystery, after = _job("mystery"), _job("known")
    eta.admit(mystery, RunOptions())
    forecast = eta.admit(after, RunOptions())
    ex.submit(mystery)
    ex.submit(after)
    assert mystery.estimate is None
    assert forecast().start is None and forecast().finish is None
    assert eta.backlog() is None


def test_successful_runs_teach_the_estimator(queue: tuple[Executor, _Held]) -> None:
    ex, backend = queue
    eta = Eta(ex, Estimator())
    ex.on_executed = eta.learn
    ok, failed = threading.Event(), threading.Event()
    ex.submit(_job("taught", ok))
    ex.submit(_job("failed", failed, ok=False))
    backend.go.release()
    backend.go.release()
    assert ok.wait(10) and failed.wait(10)
    assert eta.estimator.known("taught") and not eta.estimator.known("failed")
    assert eta.estimator.estimate("taught") is not None


def test_a_deadline_that_cannot_be_met_is_refused(queue: tuple[Executor, _Held]) -> None:
    ex, _ = queue
    clock = _Clock()
    est = Estimator()
    est.prior([("s", 5.0)])
    eta = Eta(ex, est, clock=clock)
    ahead = [_job("s"), _job("s")]  # 5s running (just started) + 5s queued
    for j in ahead:
        eta.admit(j, RunOptions())
        ex.submit(j)
    _wait_running(ex, ahead[0])
    ahead[0].started_at = clock.now
    report = TaskReport()
    ok = _job("s")
    eta.admit(ok, RunOptions(deadline=clock.now + 15.5), report)  # finishes at 15: in time
    assert ok.deadline == clock.now + 15.5 and report.shape == "s" and report.estimate == 5.0
    with pytest.raises(DeadlineUnmeetable) as caught:
        eta.admit(_job("s"), RunOptions(deadline=clock.now + 12.0))
    e = caught.value
    assert isinstance(e, QueueFull) and e.type == "deadline_unmeetable"
    assert e.retry_after == 3  # 15s of forecast against 12s: 3s of backlog too many
    assert e.details["eta_finish"] == 15.0 and e.details["eta_start"] == 10.0
    assert e.details["position"] == 2 and e.details["deadline_in"] == 12.0
    with pytest.raises(DeadlineUnmeetable) as longer:  # longer than its whole deadline
        eta.admit(_job("s"), RunOptions(deadline=clock.now + 4.0))
    assert longer.value.retry_after == 10  # only once the queue ahead is empty
    unknown = _job("never-seen")
    Eta(ex, Estimator(fallback="none")).admit(unknown, RunOptions(deadline=clock.now + 0.1))
    assert unknown.deadline is not None  # no ETA: admitted, the queue side drops it if late


def test_variants_are_a_shape_of_their_own(queue: tuple[Executor, _Held]) -> None:
    ex, _ = queue
    eta = Eta(ex, Estimator())
    job, seeds, one = _job("s"), _job("s"), _job("s")
    eta.admit(job, RunOptions(variants=3))
    eta.admit(seeds, RunOptions(variants=(1, 2)))
    eta.admit(one, RunOptions(variants=1))
    assert (job.shape, seeds.shape, one.shape) == ("sx3", "sx2", "s")


def test_variants_asked_in_extra_data_count_too(queue: tuple[Executor, _Held]) -> None:
    """v2's only way to ask is extra_data.variants: the job's variant hook says N."""
    ex, _ = queue
    job = _job("s")
    job.prompt = {"1": {"class_type": "KSampler", "inputs": {"seed": 5}}}
    job.extra_data = {"variants": 4}
    specs = lambda class_type: {"seed": ("INT", {"min": 0, "max": 2**64 - 1})}  # noqa: E731
    assert attach_variants(job, None, specs, Settings()) is not None
    Eta(ex, Estimator()).admit(job, RunOptions())
    assert job.shape == "sx4"


# ------------------------------------------------------------------ deadlines
def test_deadline_seconds_and_rfc3339() -> None:
    wall, mono = 1_700_000_000.0, 500.0
    assert parse_deadline("30", wall=wall, mono=mono) == 530.0
    assert parse_deadline(" 2.5 ", wall=wall, mono=mono) == 502.5
    at = datetime.fromtimestamp(wall, timezone.utc) + timedelta(seconds=90)
    assert parse_deadline(at.isoformat(), wall=wall, mono=mono) == pytest.approx(590.0)
    zulu = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert parse_deadline(zulu, wall=wall, mono=mono) == pytest.approx(590.0)
    offset = at.astimezone(timezone(timedelta(hours=8))).isoformat()
    assert parse_deadline(offset, wall=wall, mono=mono) == pytest.approx(590.0)
    past = (at - timedelta(hours=1)).isoformat()
    assert parse_deadline(past, wall=wall, mono=mono) < mono  # past: unmeetable, not malformed


@pytest.mark.parametrize("bad", ["0", "-5", "nan", "inf", "1e12", "soon", "",
                                 "2026-01-01T12:00:00", "2026-13-01T00:00:00Z"])
def test_bad_deadlines_say_what_is_wrong(bad: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_deadline(bad)
    assert "seconds" in str(e.value) or "RFC 3339" in str(e.value) or "offset" in str(e.value)


# ------------------------------------------------------------------ the prior
def _finish(log: TaskLog, task_id: str, report: dict[str, Any], ok: bool = True) -> None:
    assert log.claim(task_id)
    ev = final_event(task_id, "p", {}, [] if ok else None,
                     error=None if ok else {"type": "execution_error", "message": "x"})
    ev["data"]["report"] = report
    log.append(task_id, ev)
    log.release(task_id, final=True)


def test_the_prior_comes_from_the_logs_recent_reports(tmp_path: Path) -> None:
    log = TaskLog(tmp_path, "me")
    _finish(log, "t1", {"shape": "a", "execution": 2.0})
    _finish(log, "t2", {"shape": "a", "execution": 4.0})
    _finish(log, "t3", {"shape": "b", "execution": 9.0})
    _finish(log, "t4", {"shape": "a", "execution": 99.0}, ok=False)  # failed: not learned
    _finish(log, "t5", {"execution": 1.0})  # an older version's report: no shape
    records = recent_reports(tmp_path, 100)
    assert sorted(records) == [("a", 2.0), ("a", 4.0), ("b", 9.0)]
    assert len(recent_reports(tmp_path, 2)) == 2
    assert recent_reports(tmp_path / "none", 10) == []
    est = Estimator()
    est.prior(records)
    assert est.estimate("a") == 3.0 and est.estimate("b") == 9.0
