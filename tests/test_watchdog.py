"""The stall watchdog (issue 28): its checks driven step by step over the
executor with a fake backend (thread mechanics only), then real servers with
the test pack's silent and deaf nodes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from comfy_embed.errors import NotAccepting, Stalled
from comfy_embed.executor import Executor, Job, Outcome, Sink
from comfy_embed.outcome import PendingWrite
from comfy_embed.tasklog.attempts import is_lost
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasks import _outcome_error
from comfy_embed.watchdog import EXIT_STALLED, Watchdog
from tests.fakes.file_server import serve_files
from tests.fakes.web_server import make_png
from tests.servers import ROOT, Server

#: Never reached by the timer thread: each test moves the clock itself.
FAR = 1000.0


class SlowBackend:
    """Runs one node ``"5"`` (its class ``prompt["5"]``'s) as the prompt's
    ``mode`` says: ``silent`` (no message, stops when interrupted), ``steps``
    (a progress message each time ``step`` is set, then success), ``deaf``
    (ignores interrupts until ``release``, bounded), ``writes`` (success with
    files still being encoded)."""

    def __init__(self) -> None:
        self.interrupted = threading.Event()
        self.started = threading.Event()
        self.step = threading.Event()
        self.stepped = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def execute(self, prompt: dict[str, Any], prompt_id: str, outputs: list[str],
                sink: Sink, stop: Callable[[], bool] | None = None,
                extra_data: dict[str, Any] | None = None) -> Outcome:
        self.interrupted.clear()
        sink("execution_start", {"prompt_id": prompt_id})
        sink("executing", {"node": "5", "prompt_id": prompt_id})
        node = {"prompt_id": prompt_id, "node_id": "5", "node_type": prompt["5"]["class_type"],
                "executed": []}
        self.started.set()
        mode = prompt["mode"]
        if mode == "silent":
            while not self.interrupted.wait(0.01):
                pass
            return Outcome(False, True, {}, node)
        if mode == "steps":
            for i in range(2):
                assert self.step.wait(10)
                self.step.clear()
                sink("progress", {"value": i + 1, "max": 2, "node": "5", "prompt_id": prompt_id})
                self.stepped.set()
        if mode == "deaf":
            self.release.wait(30)  # bounded: the test process always ends
            self.returned.set()
        writes = list(prompt.get("writes", []))
        return Outcome(True, False, {"5": {"text": ["done"]}}, writes=writes)

    def interrupt(self) -> None:
        self.interrupted.set()

    def directory_of(self, kind: str) -> Path:
        return Path("/outputs")


class Recorder:
    """A job's answers, in order."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.done = threading.Event()

    def __call__(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self.done.set()


def job(pid: str, mode: str, **prompt: Any) -> tuple[Job, Recorder]:
    answer = Recorder()
    graph = {"mode": mode, "5": {"class_type": f"Slow{mode.title()}", "inputs": {}}, **prompt}
    return Job(prompt_id=pid, prompt=graph,
               outputs=["5"], emit=lambda kind, data: None, on_done=answer,
               task_id=f"task-{pid}"), answer


@pytest.fixture
def rig() -> Iterator[tuple[Executor, SlowBackend, Watchdog, list[tuple[str, int]]]]:
    backend = SlowBackend()
    ex = Executor(lambda: backend, max_queue=8)
    recycled: list[tuple[str, int]] = []
    dog = Watchdog(ex, FAR, lambda reason, code: recycled.append((reason, code)))
    ex.start()
    ex.wait_ready(5)
    yield ex, backend, dog, recycled
    dog.stop()
    backend.release.set()
    backend.step.set()
    ex.close(timeout=5)


def test_a_silent_job_is_interrupted_and_fails_stalled_naming_its_node(rig: Any) -> None:
    ex, backend, dog, recycled = rig
    silent, answer = job("p1", "silent")
    ex.submit(silent)
    assert backend.started.wait(5)
    began = dog._beat
    dog.check(began + FAR - 1)  # not silent long enough
    assert not backend.interrupted.is_set() and not answer.done.is_set()
    dog.check(began + FAR + 0.1)
    assert answer.done.wait(5)
    outcome = answer.outcomes[0]
    assert outcome.interrupted and outcome.error is not None
    assert outcome.error["reason"] == "stalled" and outcome.error["node_id"] == "5"
    assert dog.stalled == 1 and not recycled  # it stopped: nothing to recycle
    error = _outcome_error(outcome, None, stall=FAR)
    assert isinstance(error, Stalled) and error.type == "stalled"
    assert error.message == "node 5 (SlowSilent) sent no progress for 1000s and was interrupted"
    assert error.details["node_id"] == "5" and error.details["node_type"] == "SlowSilent"
    assert error.node_errors["5"]["class_type"] == "SlowSilent"
    # The executor goes on with the next job.
    after, answered = job("p2", "quick")
    ex.submit(after)
    assert answered.done.wait(5) and answered.outcomes[0].success


def test_progress_restarts_the_clock(rig: Any) -> None:
    ex, backend, dog, recycled = rig
    stepping, answer = job("p1", "steps")
    ex.submit(stepping)
    assert backend.started.wait(5)
    began = dog._beat
    time.sleep(0.2)  # spacing between the two messages, so the clocks differ
    backend.step.set()
    assert backend.stepped.wait(5)
    beat = dog._beat
    assert beat > began
    dog.check(beat + FAR - 0.1)  # silent too long since the start, not since the progress
    assert not backend.interrupted.is_set() and dog.stalled == 0 and not recycled
    backend.step.set()
    assert answer.done.wait(5) and answer.outcomes[0].success


def test_encoding_after_the_run_is_not_a_stall(rig: Any) -> None:
    ex, backend, dog, recycled = rig
    pending: Future[None] = Future()
    write = PendingWrite("5", "SaveImage", Path("/outputs/x.png"), pending)
    encoding, answer = job("p1", "quick", writes=[write])
    ex.submit(encoding)
    assert backend.started.wait(5)
    deadline = time.monotonic() + 5
    while ex.current is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # the run returns at once; its file is still being written
    assert ex.current is None and ex.writing == 1
    dog.check(time.monotonic() + 10 * FAR)
    assert dog.stalled == 0 and not answer.done.is_set() and not recycled
    pending.set_result(None)
    assert answer.done.wait(5) and answer.outcomes[0].success


def test_a_node_ignoring_the_interrupt_recycles_and_every_job_is_answered(rig: Any) -> None:
    ex, backend, dog, recycled = rig
    deaf, stuck = job("p1", "deaf")
    ex.submit(deaf)
    assert backend.started.wait(5)
    queued = [job(f"q{i}", "quick") for i in range(2)]
    for j, _ in queued:
        ex.submit(j)
    began = dog._beat
    dog.check(began + FAR + 0.1)
    assert backend.interrupted.is_set() and not stuck.done.is_set()  # ignored
    dog.check(began + 2 * FAR)  # interrupted less than FAR ago
    assert not recycled
    dog.check(began + 2 * FAR + 0.2)
    assert len(recycled) == 1 and recycled[0][1] == EXIT_STALLED == 70
    assert "node 5 (SlowDeaf) of task task-p1" in recycled[0][0]
    assert "ignored the interrupt" in recycled[0][0]
    # The stuck job is answered now, stalled, its node named.
    assert stuck.done.wait(5)
    error = _outcome_error(stuck.outcomes[0], None, stall=FAR)
    assert isinstance(error, Stalled) and error.details["interrupt_ignored"] is True
    assert error.message.startswith("node 5 (SlowDeaf) sent no progress for 1000s and ignored")
    # The queued ones end as lost (run again elsewhere), never run here.
    for j, answer in queued:
        assert answer.done.wait(5)
        lost = _outcome_error(answer.outcomes[0], None, stall=FAR)
        assert isinstance(lost, NotAccepting) and lost.type == "not_accepting"
        assert is_lost({"data": {"error": lost.to_dict()}})
    assert ex.idle and dog.wedged is not None
    with pytest.raises(NotAccepting):  # 503: another instance takes it
        ex.submit(job("late", "quick")[0])
    # The node returns at last: its outcome is dropped, nothing runs after it.
    backend.release.set()
    assert backend.returned.wait(5)
    ex.close(timeout=5)
    assert len(stuck.outcomes) == 1 and all(len(a.outcomes) == 1 for _, a in queued)
    assert ex.idle


def test_a_job_that_returns_as_it_is_given_up_recycles_nothing(rig: Any) -> None:
    """The node returned between the decision and the give-up: nothing is
    abandoned, the instance goes on."""
    ex, backend, dog, recycled = rig
    deaf, stuck = job("p1", "deaf")
    ex.submit(deaf)
    assert backend.started.wait(5)
    dog.check(dog._beat + FAR + 0.1)  # interrupted, ignored
    backend.release.set()
    assert stuck.done.wait(5) and len(stuck.outcomes) == 1  # its own answer
    dog.wedged = "decided a moment too late"
    dog._give_up(deaf)
    assert not recycled and dog.wedged is None and len(stuck.outcomes) == 1
    after, answer = job("p2", "quick")
    ex.submit(after)
    assert answer.done.wait(5) and answer.outcomes[0].success


def test_an_idle_executor_and_a_finished_job_are_not_watched(rig: Any) -> None:
    ex, _, dog, recycled = rig
    dog.check(time.monotonic() + 10 * FAR)  # no job yet
    quick, answer = job("p1", "quick")
    ex.submit(quick)
    assert answer.done.wait(5) and answer.outcomes[0].success
    dog.check(time.monotonic() + 10 * FAR)  # it ended: nothing to interrupt
    assert dog.stalled == 0 and not recycled


# ------------------------------------------------------------- real servers
PACKS = ROOT / "tests" / "custom_nodes"


def silent(seconds: float, progress: bool = False) -> dict[str, Any]:
    return {"1": {"class_type": "EmbedTestSilentWait",
                  "inputs": {"seconds": seconds, "progress": progress}}}


def echo(text: str) -> dict[str, Any]:
    return {"1": {"class_type": "EmbedTestEcho", "inputs": {"text": text}}}


def test_real_server_fails_a_stalled_job_naming_its_node_and_keeps_serving(tmp_path: Path) -> None:
    server = Server(tmp_path, custom_nodes=1, custom_nodes_dirs=PACKS, stall_seconds=1.5)
    try:
        server.wait_ready()
        r = server.run(silent(120), headers={"X-Task-Id": "s-1"})  # two minutes, silently
        assert r.status_code == 500, r.text
        error = r.json()["data"]["error"]
        assert error["type"] == "stalled", error
        assert error["message"] == ("node 1 (EmbedTestSilentWait) sent no progress for 1.5s "
                                    "and was interrupted")
        assert error["details"]["node_id"] == "1"
        assert error["details"]["node_type"] == "EmbedTestSilentWait"
        assert error["node_errors"]["1"]["class_type"] == "EmbedTestSilentWait"
        job = requests.get(server.url + "/api/v2/jobs/s-1", timeout=10).json()  # Comfy API v2
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "stalled" and job["error"]["node_id"] == "1", job
        assert job["error"]["class_type"] == "EmbedTestSilentWait", job
        # Longer than the limit, but reporting progress all along: not stalled.
        r = server.run(silent(4, progress=True))
        assert r.status_code == 200, r.text
        assert r.json()["data"]["status"] == "success"
        # The instance goes on serving.
        assert requests.get(server.url + "/ready", timeout=5).status_code == 200
        r = server.run(echo("after"))
        assert r.status_code == 200 and r.json()["data"]["status"] == "success", r.text
    finally:
        server.stop()
    assert server.proc.returncode != EXIT_STALLED
    assert "sent no progress for 1.5s: interrupting it" in server.log_path.read_text()


def test_real_server_exits_when_a_node_ignores_the_interrupt(tmp_path: Path) -> None:
    """The deaf node holds the executor thread; two tasks wait behind it and a
    third is still being prepared (its image input is held by the file
    server). The instance says why on /ready while it drains, every accepted
    task ends with a final event, and the process exits 70."""
    log_dir = tmp_path / "tasklog"
    async_call = {"X-Fc-Invocation-Type": "Async"}
    with serve_files() as files:
        files.files["/held.png"] = make_png()
        hold = files.holds["/held.png"] = threading.Event()
        server = Server(tmp_path / "base", custom_nodes=1, custom_nodes_dirs=PACKS,
                        stall_seconds=2, task_log_dir=log_dir, url_allowlist="127.0.0.1",
                        fetch_timeout=60)
        try:
            server.wait_ready()
            deaf = {"1": {"class_type": "EmbedTestDeafWait", "inputs": {"seconds": 90}}}
            r = server.run(deaf, headers={**async_call, "X-Task-Id": "d-1"})
            assert r.status_code == 202, r.text
            for task_id in ("d-2", "d-3"):
                r = server.run(echo(task_id), headers={**async_call, "X-Task-Id": task_id})
                assert r.status_code == 202, r.text
            preparing: list[requests.Response] = []
            load = {"1": {"class_type": "LoadImage", "inputs": {"image": files.base + "/held.png"}},
                    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
            sender = threading.Thread(target=lambda: preparing.append(server.run(
                load, headers={**async_call, "X-Task-Id": "d-4"})))
            sender.start()
            ready = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and server.proc.poll() is None:
                answer = requests.get(server.url + "/ready", timeout=5)
                if answer.status_code == 503:
                    ready = answer.json()
                    break
                time.sleep(0.1)  # polling the instance until it stops accepting
            assert files.count("/held.png") == 1  # d-4 was being prepared meanwhile
            assert ready is not None and ready["status"] == "recycling", ready
            assert "node 1 (EmbedTestDeafWait) of task d-1" in ready["reason"]
            assert "ignored the interrupt" in ready["reason"]
            refused = server.run(echo("late"))
            assert refused.status_code == 503, refused.text
            hold.set()
            sender.join(60)
            code = server.proc.wait(120)
        finally:
            hold.set()
            server.stop()
    assert code == EXIT_STALLED, server.log()
    assert preparing and preparing[0].status_code == 503, preparing and preparing[0].text
    tasklog = TaskLog(log_dir, "reader")
    finals = {}
    for task_id in ("d-1", "d-2", "d-3"):
        events = tasklog.read(task_id)
        assert events and events[-1][1]["type"] == "serverless_api", (task_id, events)
        finals[task_id] = events[-1][1]["data"]
    stuck = finals["d-1"]["error"]
    assert stuck["type"] == "stalled" and stuck["details"]["interrupt_ignored"] is True, stuck
    assert stuck["details"]["node_id"] == "1"
    assert stuck["details"]["node_type"] == "EmbedTestDeafWait"
    for task_id in ("d-2", "d-3"):  # lost: a retry or the durable queue runs them elsewhere
        assert finals[task_id]["error"]["type"] == "not_accepting", finals[task_id]
        assert is_lost({"data": finals[task_id]})
