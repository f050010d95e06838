"""One owner of a task from submit to final event (issue 13, Lifecycle):
the engine's registry is the one idempotency registry, persistence is an
observer that sets ``Task.final_written``, and what follows a run lives in a
task group that shutdown drains. With the fake ComfyUI of
tests/fakes/comfy_backend.py: these are thread, queue and lifecycle
mechanics, the same whatever a graph does."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import anyio
import pytest

from comfy_embed import tasks as task_module
from comfy_embed.config import Settings
from comfy_embed.errors import NotAccepting, TaskIdConflict, WorkflowInvalid
from comfy_embed.runtime import Engine, Task
from comfy_embed.service.lifecycle import TaskService
from comfy_embed.tasklog.attempts import is_lost
from comfy_embed.tasklog.log import TaskLog

from tests.fakes.comfy_backend import FakeComfy, fake_graph
from tests.api.serverless.test_inprocess import App, open_app


class SlowValidation(FakeComfy):
    """Validation waits for ``validating_gate``: a retry can arrive meanwhile."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.validating = threading.Event()
        self.validating_gate = threading.Event()
        self.validations = 0

    def validate(self, prompt: dict[str, Any], prompt_id: str,
                 targets: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        self.validations += 1
        self.validating.set()
        assert self.validating_gate.wait(10)
        return super().validate(prompt, prompt_id, targets)

    async def validate_here(self, prompt: dict[str, Any], prompt_id: str,
                            targets: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        # On the loop (small graphs): the wait must not block it.
        self.validations += 1
        self.validating.set()
        assert await anyio.to_thread.run_sync(self.validating_gate.wait, 10)
        return FakeComfy.validate(self, prompt, prompt_id, targets)


@pytest.fixture
async def fake_engine(tmp_path: Path) -> AsyncIterator[tuple[Engine, SlowValidation]]:
    settings = Settings(base_dir=tmp_path, max_queue=4)
    boot, fake = SlowValidation.booter()
    engine = Engine(settings, boot=boot)
    await engine.wait_ready()
    comfy = fake()
    assert isinstance(comfy, SlowValidation)
    comfy.validating_gate.set()
    yield engine, comfy
    comfy.gate.set()
    await anyio.to_thread.run_sync(engine.close)


def service_of(engine: Engine, tmp_path: Path) -> TaskService:
    return TaskService(engine, engine.settings, TaskLog(tmp_path / "log", "here"))


async def race_during_validation(comfy: SlowValidation, first: Any, second: Any) -> None:
    """Start ``first``; once it is validating start ``second``; when that one
    waits (in the engine's registry), let validation finish; return when both
    ended."""
    comfy.validating_gate.clear()
    comfy.validating.clear()
    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.to_thread.run_sync(comfy.validating.wait)
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        comfy.validating_gate.set()


# ------------------------------------------------------- one registry
@pytest.mark.anyio
async def test_a_retry_while_the_first_is_validating_gets_the_same_task(
        fake_engine: tuple[Engine, SlowValidation], tmp_path: Path) -> None:
    eng, comfy = fake_engine
    service = service_of(eng, tmp_path)
    handles: dict[str, Any] = {}

    async def start(name: str) -> None:
        handles[name] = await service.start(fake_graph("FakeImage"), task_id="retry-1")

    with anyio.fail_after(10):
        await race_during_validation(comfy, lambda: start("first"), lambda: start("retry"))
        first, retry = handles["first"], handles["retry"]
        assert first.task is not None and retry.task is first.task
        assert comfy.validations == 1  # prepared once, not twice
        final = await retry.final()
    assert final["data"]["status"] == "success" and final["data"]["task_id"] == "retry-1"
    service.close()


@pytest.mark.anyio
async def test_engine_submits_of_one_id_prepare_it_once(fake_engine: tuple[Engine, SlowValidation]) -> None:
    eng, comfy = fake_engine
    tasks: list[Task] = []

    async def submit() -> None:
        tasks.append(await eng.submit(fake_graph("FakeImage"), task_id="same"))

    with anyio.fail_after(10):
        await race_during_validation(comfy, submit, submit)
        assert len(tasks) == 2 and tasks[0] is tasks[1] and comfy.validations == 1
        await tasks[0].wait()


@pytest.mark.anyio
async def test_a_refused_first_submit_lets_the_waiting_retry_run(
        fake_engine: tuple[Engine, SlowValidation]) -> None:
    eng, comfy = fake_engine
    bad = {**fake_graph(), "9": {"class_type": "NoSuchNode", "inputs": {}}}
    outcome: dict[str, Any] = {}

    async def first() -> None:
        try:
            await eng.submit(bad, task_id="fixed")
        except Exception as e:
            outcome["first"] = e

    async def retry() -> None:
        outcome["retry"] = await eng.submit(fake_graph("FakeImage"), task_id="fixed")

    with anyio.fail_after(10):
        await race_during_validation(comfy, first, retry)
        assert type(outcome["first"]).__name__ == "WorkflowInvalid"
        final = await outcome["retry"].wait()
    assert final["data"]["status"] == "success"


# ------------------------------------------------------ refusals raised
@pytest.mark.anyio
async def test_a_refused_request_raises_its_error_and_leaves_no_claim(
        fake_engine: tuple[Engine, SlowValidation], tmp_path: Path) -> None:
    eng, comfy = fake_engine
    service = service_of(eng, tmp_path)
    with anyio.fail_after(10):
        with pytest.raises(WorkflowInvalid) as bad_id:
            await service.start(fake_graph("FakeImage"), task_id="no spaces!")
        assert bad_id.value.type == "invalid_task_id"
        with pytest.raises(WorkflowInvalid):
            await service.start({"1": {"class_type": "NoSuchNode", "inputs": {}}}, task_id="bad-1")
        assert not await anyio.to_thread.run_sync(service.tasklog.exists, "bad-1")
        comfy.gate.clear()
        running = await service.start(fake_graph("FakeWait"), task_id="owned", owner_key="k1")
        with pytest.raises(TaskIdConflict):  # live here, created with another key
            await service.start(fake_graph("FakeWait"), task_id="owned", owner_key="k2")
        eng.accepting = False
        with pytest.raises(NotAccepting):
            await service.start(fake_graph("FakeImage"), task_id="late")
        comfy.gate.set()
        assert running.task is not None
        await running.task.wait()
    service.close()


@pytest.mark.anyio
async def test_drain_waits_for_the_last_job_on_events_not_a_timer(
        fake_engine: tuple[Engine, SlowValidation], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    eng, comfy = fake_engine
    service = service_of(eng, tmp_path)
    comfy.gate.clear()
    handle = await service.start(fake_graph("FakeWait"), task_id="drained")

    async def no_sleep(*args: Any, **kw: Any) -> None:
        raise AssertionError("drain polled with a sleep")

    monkeypatch.setattr(anyio, "sleep", no_sleep)
    drained = anyio.Event()

    async def drain() -> None:
        await service.drain()
        drained.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await anyio.to_thread.run_sync(comfy.running.wait, 10)
            await anyio.wait_all_tasks_blocked()
            assert not drained.is_set() and not eng.idle
            comfy.gate.set()  # the job ends: its end wakes the drain
        assert drained.is_set() and eng.idle
    assert handle.task is not None and handle.task.final is not None
    service.close()


# ------------------------------------------------ persistence as observer
@pytest.mark.anyio
async def test_the_service_observes_the_engine_and_sets_final_written(
        fake_engine: tuple[Engine, SlowValidation], tmp_path: Path) -> None:
    eng, comfy = fake_engine
    service = service_of(eng, tmp_path)
    assert service in eng.observers
    comfy.gate.clear()
    with anyio.fail_after(10):
        handle = await service.start(fake_graph("FakeWait"), task_id="durable-1")
        task = handle.task
        assert task is not None and not hasattr(task, "persisted")  # nothing grafted on
        assert not task.final_written.is_set()
        comfy.gate.set()
        await task.wait()
        await task.final_written.wait()
    # Set by the writer once the final event is on disk, not before.
    logged = await anyio.to_thread.run_sync(service.tasklog.read, "durable-1", 0)
    assert task.final is not None and logged[-1][1]["type"] == "serverless_api"
    assert logged[-1][1]["data"]["status"] == task.final["data"]["status"] == "success"
    # After its answer, the writer made the next claims' folders (spares.py):
    # the next task's folder is one of them, its final written into its file.
    spares = service.tasklog.root / "@spare"
    with anyio.fail_after(10):
        while not spares.is_dir() or len(os.listdir(spares)) < 2:
            await anyio.sleep(0.01)
        made = {os.stat(spares / n).st_ino for n in os.listdir(spares)}
        second = (await service.start(fake_graph("FakeImage"), task_id="durable-2")).task
        assert second is not None
        await second.final_written.wait()
    folder = service.tasklog.root / "durable-2"
    assert os.stat(folder).st_ino in made
    assert sorted(os.listdir(folder)) == ["final", "owner.json"]
    service.close()
    assert service not in eng.observers
    # Without an observer that persists it, a task's final event is as
    # durable as it gets at once (library use: run_workflow, Engine.run).
    final = await eng.run(fake_graph("FakeImage"), task_id="library-1")
    library = eng.get("library-1")
    assert final["data"]["status"] == "success" and library is not None
    assert library.final_written.is_set()
    assert not await anyio.to_thread.run_sync(service.tasklog.exists, "library-1")


@pytest.mark.anyio
async def test_the_last_write_releases_the_lease_and_a_failed_release_writes_nothing_twice(
        fake_engine: tuple[Engine, SlowValidation], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The final event and the lease's release share one worker-thread hop;
    a release that fails there neither loses nor repeats the final event."""
    eng, _ = fake_engine
    service = service_of(eng, tmp_path)
    with anyio.fail_after(10):
        task = (await service.start(fake_graph("FakeImage"), task_id="lease-1")).task
        assert task is not None
        await task.final_written.wait()
        while service.tasklog.owns("lease-1"):  # the writer's last step, just after the event
            await anyio.sleep(0.01)
    assert service.tasklog.read("lease-1", 0)[-1][1]["data"]["status"] == "success"

    tries: list[str] = []

    def failing_release(task_id: str, **kw: Any) -> None:
        tries.append(task_id)
        raise PermissionError("read-only lease")

    monkeypatch.setattr(service.tasklog, "release", failing_release)
    with anyio.fail_after(10):
        task = (await service.start(fake_graph("FakeImage"), task_id="lease-2")).task
        assert task is not None
        await task.final_written.wait()
        while len(tries) < 2:  # in the last write's hop, then once more on its own
            await anyio.sleep(0.01)
    logged = service.tasklog.read("lease-2", 0)
    assert [ev["type"] for _, ev in logged].count("serverless_api") == 1
    assert logged[-1][1]["data"]["status"] == "success" and tries == ["lease-2"] * 2
    service.close()


@pytest.mark.anyio
async def test_flush_waits_for_the_writer_and_answers_while_the_log_refuses_writes(
        fake_engine: tuple[Engine, SlowValidation], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """FC's pre-freeze hook: flush() returns once what was published is
    written, and also while the log refuses writes (a full disk), whose
    writer goes on retrying on its own."""
    eng, comfy = fake_engine
    service = service_of(eng, tmp_path)
    comfy.gate.clear()
    with anyio.fail_after(10):
        task = (await service.start(fake_graph("FakeWait"), task_id="flush-ok")).task
        assert task is not None
        await anyio.to_thread.run_sync(comfy.running.wait, 10)  # its progress is published
        while not any(ev["type"] == "progress" for ev in task.events):
            await task.changed()
        published = task.last_seq
        await service.flush()  # woken by the write, not by a timer
        logged = await anyio.to_thread.run_sync(service.tasklog.read, "flush-ok", 0)
        assert logged and logged[-1][0] >= published

        def full(*args: Any, **kw: Any) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(service.tasklog, "extend", full)
        eng.cancel("flush-ok")
        await task.wait()
        await service.flush()
        assert "flush-ok" in service.writers.failing
        monkeypatch.undo()  # the disk has room again: the writer catches up
        await task.final_written.wait()
        while "flush-ok" in service.writers.persisting:
            await anyio.sleep(0.01)
    assert service.tasklog.read("flush-ok", 0)[-1][1]["type"] == "serverless_api"
    service.close()


# -------------------------------------------------- background ownership
@pytest.mark.anyio
async def test_library_run_owns_its_background_work(fake_engine: tuple[Engine, SlowValidation]) -> None:
    eng, _ = fake_engine
    assert not eng.background.attached
    final = await eng.run(fake_graph("FakeImage"))
    assert final["data"]["status"] == "success"
    # The group Engine.run opened is closed, with nothing left running.
    assert not eng.background.attached and eng.background.live == 0
    # A bare submit outside any group still ends (a tracked loop task).
    task = await eng.submit(fake_graph("FakeImage"))
    with anyio.fail_after(10):
        assert (await task.wait())["data"]["status"] == "success"
        await eng.background.drain()


@pytest.fixture
def slow_render(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, threading.Event]]:
    """Assembling a result waits for ``gate`` (as a slow upload would)."""
    events = {"rendering": threading.Event(), "gate": threading.Event()}
    real = task_module.render_results

    async def render(files: Any, **kw: Any) -> list[dict[str, Any]]:
        events["rendering"].set()
        await anyio.to_thread.run_sync(events["gate"].wait, abandon_on_cancel=True)
        return await real(files, **kw)

    monkeypatch.setattr(task_module, "render_results", render)
    # Not built on the spot, as a result that needs an upload is not.
    monkeypatch.setattr(task_module, "render_inline", lambda files, **kw: None)
    yield events
    events["gate"].set()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    yield from open_app(tmp_path)


def test_shutdown_waits_for_a_result_being_assembled(app: App, slow_render: Any) -> None:
    app.submit_async(fake_graph("FakeImage"), "assembling")
    assert slow_render["rendering"].wait(10)
    assert app.engine.executor.idle  # the run is over; only its result is in flight
    portal = app.client.portal
    assert portal is not None
    shutdown = portal.start_task_soon(app.client.app.state.service.shutdown, 30)
    assert not shutdown.done()
    slow_render["gate"].set()
    assert shutdown.result(20) == []  # nothing had to be cancelled
    events = app.status("assembling")
    assert events[-1]["type"] == "serverless_api" and events[-1]["data"]["status"] == "success"


def test_shutdown_past_its_grace_cancels_the_result_and_logs_its_final(
        app: App, slow_render: Any) -> None:
    app.submit_async(fake_graph("FakeImage"), "stuck")
    assert slow_render["rendering"].wait(10)
    portal = app.client.portal
    assert portal is not None
    service = app.client.app.state.service
    assert portal.call(service.shutdown, 0.2) == ["stuck"]
    # The result's assembly was cancelled in the engine's task group: the
    # task ended with its own final event, which its writer persisted.
    task = app.engine.get("stuck")
    assert task is not None and task.final is not None and task.final_written.is_set()
    final = app.status("stuck")[-1]
    assert final["type"] == "serverless_api" and final["data"]["error"] == task.final["data"]["error"]
    assert final["data"]["error"]["type"] == "execution_interrupted"
    assert "before the result was assembled" in final["data"]["error"]["message"]
    assert app.engine.background.live == 0
    # Lost to the drain, not cancelled by its caller: a retry runs it again (issue 24).
    assert is_lost(final) and final["data"]["attempt"] == 1


def test_a_task_lost_to_a_drain_runs_again_on_retry(tmp_path: Path, slow_render: Any) -> None:
    """Issue 24: the instance that replaces a drained one runs its retry as attempt 2."""
    for first in open_app(tmp_path):
        first.submit_async(fake_graph("FakeImage"), "drained")
        assert slow_render["rendering"].wait(10)
        portal = first.client.portal
        assert portal is not None
        assert portal.call(first.client.app.state.service.shutdown, 0.2) == ["drained"]
    slow_render["gate"].set()
    for second in open_app(tmp_path):
        r = second.run(fake_graph("FakeImage"), headers={"X-Task-Id": "drained"})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert data["status"] == "success" and data["attempt"] == 2
        assert [a["error"] and a["error"]["type"] for a in data["attempts"]] == [
            "execution_interrupted", None]
        # Finished: a further retry is answered from the log, not run.
        again = second.run(fake_graph("FakeImage"), headers={"X-Task-Id": "drained"})
        assert again.json()["data"] == second.status("drained")[-1]["data"]
        assert again.json()["data"]["attempt"] == 2


# ------------------------------------------------ waiting for the end only
@pytest.mark.anyio
async def test_end_or_wake_sleeps_through_progress(fake_engine: tuple[Engine, SlowValidation]) -> None:
    """The sync answer and the log writer's batch wait for the final event
    (or a wake), not for every event the run publishes."""
    from comfy_embed.events import event

    eng, comfy = fake_engine
    comfy.gate.clear()  # FakeWait waits for it: nothing ends the run meanwhile
    task = await eng.submit(fake_graph("FakeWait"))
    returned: list[str] = []

    async def waiter(name: str) -> None:
        await task.end_or_wake()
        returned.append(name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter, "first")
            await anyio.wait_all_tasks_blocked()
            task._publish(event("progress", {"node": "1", "value": 1, "max": 2}))
            await anyio.wait_all_tasks_blocked()
            assert returned == [] and task.final is None
            task.wake()
            await anyio.wait_all_tasks_blocked()
            assert returned == ["first"]
            tg.start_soon(waiter, "second")
            await anyio.wait_all_tasks_blocked()
            comfy.gate.set()  # the run ends: its final event
            assert (await task.wait())["data"]["status"] == "success"
        assert returned == ["first", "second"]
        await task.end_or_wake()  # after the end it returns at once
