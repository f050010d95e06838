"""Thread and queue mechanics of the executor, with a fake backend (the
only place a fake stands in for ComfyUI)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import pytest

from comfy_embed.errors import NotAccepting, QueueFull
from comfy_embed.executor import Executor, Job, Outcome, Sink
from comfy_embed.outcome import PendingWrite


class FakeBackend:
    """Behaves as ComfyUI does where the executor can tell: ``execute``
    clears the interrupt flag first, sends ``execution_start``, asks ``stop``,
    then checks the flag before each node. ``hooks`` run at named points of
    an execution, to land a cancel exactly there."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()
        self.interrupted = threading.Event()
        self.order: list[str] = []
        self.nodes_run: list[str] = []
        self.hooks: dict[str, Callable[[], None]] = {}

    def _hook(self, point: str) -> None:
        fn = self.hooks.pop(point, None)
        if fn is not None:
            fn()

    def execute(self, prompt: dict[str, Any], prompt_id: str, outputs: list[str],
                sink: Sink, stop: Callable[[], bool] | None = None,
                extra_data: dict[str, Any] | None = None) -> Outcome:
        self.order.append(prompt_id)
        self._hook("before_clear")
        self.interrupted.clear()  # ComfyUI: nodes.interrupt_processing(False)
        sink("execution_start", {"prompt_id": prompt_id})
        self._hook("after_clear")
        if stop is not None and stop():
            return Outcome(False, True, {}, {"prompt_id": prompt_id, "node_id": None})
        self._hook("after_stop_check")
        if prompt.get("raise"):
            raise RuntimeError("backend exploded")
        if prompt.get("block"):
            self.started.set()
            while not self.gate.wait(0.01):
                if self.interrupted.is_set():
                    self.interrupted.clear()
                    return Outcome(False, True, {}, {"prompt_id": prompt_id, "node_id": "1"})
        if self.interrupted.is_set():  # ComfyUI checks the flag before each node
            self.interrupted.clear()
            return Outcome(False, True, {}, {"prompt_id": prompt_id, "node_id": "1"})
        self.nodes_run.append(prompt_id)
        if prompt.get("fail"):  # a later node failed after a SaveImage deferred its files
            return Outcome(False, False, {}, {"prompt_id": prompt_id, "node_id": "2",
                                              "exception_message": "node 2 failed"},
                           writes=list(prompt.get("writes", [])))
        # ``writes``: files still being encoded off this thread (Outcome.writes).
        return Outcome(True, False, {"1": {"images": prompt.get("images", [])}},
                       writes=list(prompt.get("writes", [])))

    def interrupt(self) -> None:
        self.interrupted.set()

    def directory_of(self, kind: str) -> Path:
        if kind != "output":
            raise ValueError(f"unknown output type {kind!r}")
        return Path("/outputs")


def make_job(pid: str, done: dict[str, Outcome], events: list[tuple[str, str]],
             **prompt: Any) -> Job:
    finished = threading.Event()

    def on_done(o: Outcome) -> None:
        done[pid] = o
        finished.set()

    job = Job(prompt_id=pid, prompt=prompt, outputs=["1"],
              emit=lambda t, d: events.append((pid, t)), on_done=on_done)
    job.finished = finished  # type: ignore[attr-defined]
    return job


@pytest.fixture
def setup() -> Any:
    backend = FakeBackend()
    ex = Executor(lambda: backend, max_queue=2)
    ex.start()
    ex.wait_ready(5)
    yield ex, backend
    backend.gate.set()
    ex.close(timeout=5)


def test_fifo_and_events(setup: Any) -> None:
    ex, backend = setup
    ex.max_queue = 8
    done: dict[str, Outcome] = {}
    events: list[tuple[str, str]] = []
    jobs = [make_job(p, done, events) for p in "abc"]
    for j in jobs[:2]:
        ex.submit(j)
    ex.submit(jobs[2])
    for j in jobs:
        assert j.finished.wait(5)
    assert backend.order == ["a", "b", "c"]
    assert [e for e in events if e[1] == "execution_start"] == [(p, "execution_start") for p in "abc"]
    assert all(done[p].success for p in "abc")


def test_queue_bound_cancel_and_crash(setup: Any) -> None:
    ex, backend = setup
    done: dict[str, Outcome] = {}
    events: list[tuple[str, str]] = []
    running = make_job("run", done, events, block=True)
    ex.submit(running)
    assert backend.started.wait(5)
    q1, q2 = make_job("q1", done, events), make_job("q2", done, events, **{"raise": True})
    ex.submit(q1)
    ex.submit(q2)
    with pytest.raises(QueueFull):
        ex.submit(make_job("q3", done, events))
    assert ex.queue_remaining == 3
    # Cancel a queued job: it ends at once, never reaching the backend.
    assert ex.cancel("q1")
    assert q1.finished.wait(1) and done["q1"].interrupted
    assert ex.cancel("nope") is False
    # Cancel the running one: interrupted through the backend.
    assert ex.cancel("run")
    assert running.finished.wait(5) and done["run"].interrupted
    # A backend that raises fails that job only.
    assert q2.finished.wait(5) and not done["q2"].success
    assert "backend exploded" in done["q2"].error["exception_message"]
    after = make_job("after", done, events)
    ex.submit(after)
    assert after.finished.wait(5) and done["after"].success
    assert "q1" not in backend.order


def test_boot_failure_is_reported() -> None:
    def boom() -> Any:
        raise RuntimeError("no GPU today")

    ex = Executor(boom)
    ex.start()
    with pytest.raises(RuntimeError, match="no GPU today"):
        ex.wait_ready(5)
    # Nothing can be queued on a dead executor: it would wait forever.
    with pytest.raises(NotAccepting, match="failed to boot"):  # 503, not a full queue
        ex.submit(make_job("late", {}, []))


@pytest.mark.parametrize("point", ["on_start", "before_clear", "after_clear", "after_stop_check"])
def test_cancel_is_never_lost_between_dequeue_and_execution(setup: Any, point: str) -> None:
    """A cancel landing anywhere from dequeue to the first node ends the job
    interrupted: before the backend clears its interrupt flag (the flag is
    wiped, ``stop`` catches it), or after (the flag itself stops the node)."""
    ex, backend = setup
    done: dict[str, Outcome] = {}
    job = make_job("racy", done, [])
    if point == "on_start":  # dequeued, backend.execute not called yet
        job.on_start = lambda: ex.cancel("racy")
    else:
        backend.hooks[point] = lambda: ex.cancel("racy")
    ex.submit(job)
    assert job.finished.wait(5)
    assert job.cancel_reason == "cancelled"
    assert not done["racy"].success and done["racy"].interrupted
    assert done["racy"].error["reason"] == "cancelled"
    assert backend.nodes_run == []
    # The thread goes on, and the next job is not hit by a stale interrupt.
    after = make_job("next", done, [])
    ex.submit(after)
    assert after.finished.wait(5) and done["next"].success


def test_outcome_leaves_the_thread_with_its_files_resolved(setup: Any) -> None:
    """The executor thread asks the backend for the folders: the outcome
    carries absolute paths, and an output type without a folder fails the job."""
    ex, backend = setup
    done: dict[str, Outcome] = {}
    events: list[tuple[str, str]] = []
    ok = make_job("ok", done, events, images=[{"filename": "a.png", "subfolder": "s", "type": "output"},
                                             {"filename": "b.png", "subfolder": "", "type": "output"}])
    bad = make_job("bad", done, events, images=[{"filename": "c.png", "type": "nowhere"}])
    ex.submit(ok)
    ex.submit(bad)
    assert ok.finished.wait(5) and bad.finished.wait(5)
    assert done["ok"].success
    assert [f.path for f in done["ok"].files] == [Path("/outputs/s/a.png"), Path("/outputs/b.png")]
    assert not done["bad"].success and done["bad"].files == []
    assert "could not resolve the output files" in done["bad"].error["exception_message"]
    assert "nowhere" in done["bad"].error["exception_message"]


# ------------------------------------------- output files written off the thread
def pending(path: Path) -> PendingWrite:
    path.touch()  # reserved, as comfy_embed._comfy.writes does
    return PendingWrite("9", "SaveImage", path, Future())


def test_a_job_is_answered_once_its_files_are_written(setup: Any, tmp_path: Path) -> None:
    """The thread takes the next job while the files of the last one are
    being written; that job's answer waits for them (and drain sees it busy)."""
    ex, _ = setup
    done: dict[str, Outcome] = {}
    w = pending(tmp_path / "a.png")
    slow = make_job("slow", done, [], writes=[w],
                    images=[{"filename": "a.png", "subfolder": "", "type": "output"}])
    after = make_job("after", done, [])
    ex.submit(slow)
    ex.submit(after)
    assert after.finished.wait(5) and done["after"].success
    assert "slow" not in done and not ex.idle and ex.writing == 1
    w.future.set_result(None)
    assert slow.finished.wait(5) and done["slow"].success
    assert [f.filename for f in done["slow"].files] == ["a.png"]
    assert ex.idle and ex.writing == 0


def test_a_failed_write_fails_its_job_naming_the_node(setup: Any, tmp_path: Path) -> None:
    ex, _ = setup
    done: dict[str, Outcome] = {}
    ok, bad = pending(tmp_path / "ok.png"), pending(tmp_path / "bad.png")
    job = make_job("j", done, [], writes=[ok, bad])
    ex.submit(job)
    bad.future.set_exception(OSError("No space left on device"))
    assert not job.finished.wait(0.05)  # the other file is still being written
    ok.future.set_result(None)
    assert job.finished.wait(5)
    out = done["j"]
    assert not out.success and not out.interrupted
    assert out.error["node_id"] == "9" and out.error["node_type"] == "SaveImage"
    assert "bad.png" in out.error["exception_message"]
    assert "No space left" in out.error["exception_message"]


def test_cancel_while_writing_drops_what_has_not_started(setup: Any, tmp_path: Path) -> None:
    ex, _ = setup
    done: dict[str, Outcome] = {}
    running, waiting = pending(tmp_path / "r.png"), pending(tmp_path / "w.png")
    assert running.future.set_running_or_notify_cancel()
    job = make_job("c", done, [], writes=[running, waiting])
    ex.submit(job)
    while ex.writing == 0 and not job.finished.is_set():
        threading.Event().wait(0.01)
    assert ex.cancel("c", reason="user")
    assert waiting.future.cancelled() and not (tmp_path / "w.png").exists()
    assert not job.finished.is_set()  # the started write still runs
    running.future.set_result(None)
    assert job.finished.wait(5)
    assert done["c"].interrupted and not done["c"].success
    assert done["c"].error["reason"] == "user"


def test_a_failed_run_is_answered_after_its_files_too(setup: Any, tmp_path: Path) -> None:
    """Files an earlier node saved are written before the error is answered
    (retention then deletes whole files, and nothing writes after the end)."""
    ex, _ = setup
    done: dict[str, Outcome] = {}
    w = pending(tmp_path / "early.png")
    job = make_job("f", done, [], writes=[w], fail=True)
    ex.submit(job)
    while ex.writing == 0:  # the run ended; its file is still being written
        assert not job.finished.wait(0.01)
    w.future.set_result(None)
    assert job.finished.wait(5)
    assert not done["f"].success and done["f"].error["exception_message"] == "node 2 failed"


def test_close_waits_for_the_files_being_written(tmp_path: Path) -> None:
    backend = FakeBackend()
    ex = Executor(lambda: backend)
    ex.start()
    ex.wait_ready(5)
    done: dict[str, Outcome] = {}
    w = pending(tmp_path / "x.png")
    job = make_job("x", done, [], writes=[w])
    ex.submit(job)
    threading.Timer(0.2, w.future.set_result, (None,)).start()
    ex.close(timeout=30)
    assert job.finished.is_set() and done["x"].success
