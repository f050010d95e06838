"""Webhooks in process: Standard Webhooks signatures checked by the
``standardwebhooks`` library, the payload, the delivery lease, and the
delivery loop (give-up, an attempt cut off mid-send, a rival's live lease,
drain) against a real loopback receiver. The real-server tests are in
tests/api/serverless/test_webhooks.py."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import anyio
import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

import comfy_embed.net
from comfy_embed.background import Background
from comfy_embed.config import Settings
from comfy_embed.events import final_event
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.webhooks.delivery import Webhooks
from comfy_embed.webhooks.request import (
    WebhookRequest,
    envelope_webhook,
    payload_body,
    secret_key,
    sign,
)

from tests.conftest import image_only
from tests.fakes.webhook_receiver import SECRET, Receiver, serve_receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as r:
        yield r


# ------------------------------------------------------------------ unit level
@pytest.mark.parametrize("secret", [SECRET, "a plain shared secret"])
def test_signature_verifies_with_standardwebhooks(secret: str) -> None:
    body = payload_body({"type": "serverless_api", "data": {"status": "success", "results": []}})
    ts = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts),
               "webhook-signature": sign(secret_key(secret), "msg_1", ts, body)}
    # The libraries take whsec_ secrets as they are and raw keys as bytes.
    verifier = Webhook(secret if secret.startswith("whsec_") else secret.encode())
    assert verifier.verify(body, headers)["data"]["status"] == "success"
    with pytest.raises(WebhookVerificationError):
        verifier.verify(body.replace(b"success", b"error"), headers)
    with pytest.raises(WebhookVerificationError):
        verifier.verify(body, {**headers, "webhook-id": "msg_2"})


def test_payload_drops_base64_unless_asked() -> None:
    final = {"type": "serverless_api", "data": {"status": "success", "results": [
        {"node_id": "9", "index": 0, "output": {"comfy": {"filename": "a.png"},
                                                "base64": {"data": "iVBOR"}}}]}}
    assert b"iVBOR" not in payload_body(final)
    assert b'"filename":"a.png"' in payload_body(final)
    assert b"iVBOR" in payload_body(final, include_base64=True)
    assert "base64" in final["data"]["results"][0]["output"]  # the event itself is untouched


def test_envelope_webhook_is_read_without_changing_the_body() -> None:
    graph = image_only()
    body, url = envelope_webhook(
        json.dumps({"prompt": graph, "extra_data": {"webhook": "http://x/y"}}).encode())
    assert url == "http://x/y" and body["prompt"] == graph
    raw = b'{"1": {"class_type": "X"}}'
    assert envelope_webhook(raw) == (raw, None)
    bare = {"extra_data": {"class_type": "X", "inputs": {"webhook": "http://x/y"}}}
    assert envelope_webhook(json.dumps(bare))[1] is None  # a node called extra_data


def test_delivery_lease_is_exclusive_and_taken_over_after_expiry(tmp_path: Path) -> None:
    now = [1_000_000.0]
    a = TaskLog(tmp_path, "instance-a", lease_seconds=30, clock=lambda: now[0])
    b = TaskLog(tmp_path, "instance-b", lease_seconds=30, clock=lambda: now[0])
    da, db = DeliveryLog(a), DeliveryLog(b)
    assert a.claim("t1")
    assert da.register("t1", {"url": "http://x", "id": "msg_1", "events": ["completed"]})
    assert not db.register("t1", {"url": "http://other", "id": "msg_2"})  # recorded once
    assert db.pending() == []  # no final event yet
    a.append("t1", {"type": "serverless_api", "data": {"status": "success"}})
    assert db.pending() == ["t1"]
    assert da.claim("t1") == 1
    assert db.claim("t1") is None and db.pending() == []  # held: never delivered twice
    assert da.begin_attempt("t1", 1, {"at": now[0]})
    assert not db.begin_attempt("t1", 1, {"at": now[0]})  # attempt 1 goes out once
    now[0] += 29
    assert da.renew("t1", 1)
    now[0] += 31  # instance a stopped renewing
    assert db.pending() == ["t1"]
    assert db.claim("t1") == 2
    assert not da.renew("t1", 1) and not da.holds("t1", 1)
    da.release("t1", 1)  # a stale holder's release does not free b's lease
    assert db.claim("t1") is None and da.claim("t1") is None
    state = db.state("t1")
    assert state is not None and state["request"]["id"] == "msg_1"
    assert state["lease"]["instance_id"] == "instance-b" and state["lease"]["generation"] == 2
    assert [x["attempt"] for x in state["attempts"]] == [1]
    assert db.finish("t1", {"state": "delivered"}) and not da.finish("t1", {"state": "failed"})
    now[0] += 100
    assert db.pending() == []
    assert a.read("t1")[-1][1]["type"] == "serverless_api"  # the event log is untouched


# ------------------------------------------- delivery mechanics, in process
def _hooks(tmp_path: Path, instance: str = "here", **settings: Any) -> tuple[Webhooks, TaskLog]:
    s = Settings(base_dir=tmp_path, url_allowlist=("127.0.0.1",), webhook_secret=SECRET,
                 **{"webhook_backoff": 0.05, "webhook_timeout": 0.5, "lease_seconds": 1.0,
                    **settings})
    tasklog = TaskLog(tmp_path / "log", instance, lease_seconds=s.tasklog.lease_seconds)
    return Webhooks(s, tasklog), tasklog


async def _finished_task(hooks: Webhooks, tasklog: TaskLog, url: str) -> str:
    task_id = "t-" + uuid.uuid4().hex[:8]
    assert tasklog.claim(task_id)
    await hooks.register(task_id, WebhookRequest(url=url))
    tasklog.append(task_id, final_event(task_id, "p", {}, []))
    return task_id


async def _done(hooks: Webhooks, task_id: str) -> dict[str, Any]:
    with anyio.fail_after(30):
        while not (state := await hooks.status(task_id) or {}).get("done"):
            await anyio.sleep(0.02)
    return state


@pytest.mark.anyio
async def test_gives_up_after_max_attempts(tmp_path: Path, receiver: Receiver) -> None:
    hooks, tasklog = _hooks(tmp_path, webhook_max_attempts=2)
    path, url = receiver.new_hook("down")
    receiver.script(path, 503, 503, 503)
    task_id = await _finished_task(hooks, tasklog, url)
    hooks.finished(task_id)
    state = await _done(hooks, task_id)
    assert state["state"] == "failed" and state["done"]["reason"] == "gave up after 2 attempts"
    assert [(a["status"], a["outcome"]) for a in state["attempts"]] == [(503, "retry"), (503, "failed")]
    assert [c.answered for c in receiver.at(path)] == [503, 503]


@pytest.mark.anyio
async def test_attempt_cut_off_mid_send_is_retried_after_its_timeout(
        tmp_path: Path, receiver: Receiver) -> None:
    """An instance reserved attempt 1 and died while sending it (no outcome):
    the next instance waits until that attempt surely ended, then sends
    attempt 2 with the same id."""
    hooks, tasklog = _hooks(tmp_path)
    path, url = receiver.new_hook("cut")
    task_id = await _finished_task(hooks, tasklog, url)
    reserved_at = time.time()
    assert hooks.deliveries.begin_attempt(task_id, 1, {"at": reserved_at, "instance_id": "dead"})
    assert await hooks.resume_pending() == [task_id]
    state = await _done(hooks, task_id)
    first, second = state["attempts"]
    assert "outcome" not in first and second["outcome"] == "delivered"
    assert second["at"] >= reserved_at + hooks.settings.webhooks.timeout
    [call] = receiver.wait(path, 1)
    assert call.verified and call.webhook_id == state["webhook_id"]


@pytest.mark.anyio
async def test_no_resend_when_the_cut_off_attempt_turns_out_delivered(
        tmp_path: Path, receiver: Receiver) -> None:
    """The sender of attempt 1 was only slow: its outcome (delivered) lands
    while the next instance waits for that attempt to end, so nothing is sent again."""
    hooks, tasklog = _hooks(tmp_path)
    path, url = receiver.new_hook("slow")
    task_id = await _finished_task(hooks, tasklog, url)
    slow = DeliveryLog(TaskLog(tasklog.root, "slow", lease_seconds=1.0))
    assert slow.begin_attempt(task_id, 1, {"at": time.time(), "instance_id": "slow"})
    assert await hooks.resume_pending() == [task_id]
    with anyio.fail_after(30):
        while task_id not in hooks._waiting:  # the resumer waits for attempt 1 to end
            await anyio.sleep(0.01)
    slow.end_attempt(task_id, 1, {"status": 200, "outcome": "delivered"})
    slow.finish(task_id, {"state": "delivered", "attempts": 1})
    with anyio.fail_after(30):
        while hooks._active:
            await anyio.sleep(0.02)
    state = await hooks.status(task_id)
    assert state is not None and state["state"] == "delivered"
    assert [a["attempt"] for a in state["attempts"]] == [1]
    assert receiver.at(path) == []


@pytest.mark.anyio
async def test_a_delivery_leased_by_a_live_instance_is_left_alone(
        tmp_path: Path, receiver: Receiver) -> None:
    hooks, tasklog = _hooks(tmp_path, lease_seconds=60.0)
    path, url = receiver.new_hook("leased")
    task_id = await _finished_task(hooks, tasklog, url)
    rival = DeliveryLog(TaskLog(tasklog.root, "rival", lease_seconds=60.0))
    assert rival.claim(task_id) == 1
    assert await hooks.resume_pending() == []
    hooks.finished(task_id)  # the fast path also finds the lease taken
    with anyio.fail_after(10):
        while hooks._active:
            await anyio.sleep(0.02)
    state = await hooks.status(task_id)
    assert state is not None and state["state"] == "pending" and state["attempts"] == []
    assert receiver.at(path) == []


@pytest.mark.anyio
async def test_drain_hands_waiting_deliveries_back(tmp_path: Path, receiver: Receiver) -> None:
    hooks, tasklog = _hooks(tmp_path, webhook_backoff=600.0)
    path, url = receiver.new_hook("drain")
    receiver.script(path, 500)
    task_id = await _finished_task(hooks, tasklog, url)
    hooks.finished(task_id)
    with anyio.fail_after(30):
        while (await hooks.status(task_id) or {}).get("state") != "retrying":
            await anyio.sleep(0.02)
    await hooks.drain()
    state = await hooks.status(task_id)
    assert state is not None and state["state"] == "retrying" and not hooks._active
    # Released: another instance may resume it at once, not after the lease.
    other = DeliveryLog(TaskLog(tasklog.root, "other", lease_seconds=1.0))
    assert other.pending() == [task_id]


@pytest.mark.anyio
async def test_a_task_closed_as_lost_gets_its_failed_webhook(tmp_path: Path,
                                                             receiver: Receiver) -> None:
    """The instance running the task died: recovery closes it with task_lost,
    and the webhook recorded at submit time reports that failure."""
    hooks, tasklog = _hooks(tmp_path)
    path, url = receiver.new_hook("lost")
    task_id = "lost-" + uuid.uuid4().hex[:8]
    dead = TaskLog(tasklog.root, "dead", lease_seconds=1.0, clock=lambda: time.time() - 60)
    assert dead.claim(task_id)  # its lease was last renewed a minute ago
    await Webhooks(hooks.settings, dead).register(task_id, WebhookRequest(url=url))
    assert await hooks.resume_pending() == []  # no final event yet: nothing to send
    assert tasklog.recover_orphans() == [task_id]
    assert await hooks.resume_pending() == [task_id]
    state = await _done(hooks, task_id)
    assert state["state"] == "delivered"
    [call] = receiver.wait(path, 1)
    assert call.verified and call.payload["data"]["error"]["type"] == "task_lost"


@pytest.mark.anyio
async def test_attempts_share_one_client_closed_with_the_engine_group(
        tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[httpx.AsyncClient] = []
    factory = comfy_embed.net.new_client

    def counting(timeout: float) -> httpx.AsyncClient:
        made.append(factory(timeout))
        return made[-1]

    monkeypatch.setattr("comfy_embed.net.new_client", counting)
    hooks, tasklog = _hooks(tmp_path, webhook_max_attempts=3)
    engine = Background("engine")
    hooks = Webhooks(hooks.settings, tasklog, engine.part("webhooks"))
    path, url = receiver.new_hook("shared")
    receiver.script(path, 503, 503, 200)
    async with engine.open():
        task_id = await _finished_task(hooks, tasklog, url)
        hooks.finished(task_id)
        state = await _done(hooks, task_id)
        assert state["state"] == "delivered" and len(state["attempts"]) == 3
        assert len(made) == 1 and not made[0].is_closed
    assert made[0].is_closed
