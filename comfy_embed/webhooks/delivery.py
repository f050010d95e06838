"""Delivering webhooks: the end of a task (and optionally its progress)
POSTed to a URL, retried, and delivered by any instance (what is sent:
:mod:`comfy_embed.webhooks.request`).

The request is recorded in the task's folder of the shared task log when the
task is accepted; once the final event is persisted, the delivery starts on
the instance that ran the task. Every attempt is recorded beside the task's
events (:class:`~comfy_embed.tasklog.delivery.DeliveryLog`) before and after it is
sent, under a lease; if the instance dies, another one sharing the log finds
the delivery pending once the lease expires and carries on from the recorded
next try, as orphaned tasks are finished. Attempt numbers are reserved
exclusively, so one attempt is never sent twice, and ``webhook-id`` is recorded
with the request, so it is the same for every attempt on every instance.

Webhook URLs obey the image-URL rules (:class:`~comfy_embed.net.AddressPolicy`:
no private, loopback, link-local or metadata address unless allowlisted),
checked at submit time and again, pinned to the checked address, on every
attempt. Redirects are not followed. One HTTP client (per event loop) sends
every attempt; it is closed when the engine's task group closes.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Callable

import anyio
import anyio.to_thread
import httpx

from comfy_embed.background import Background, Spawned
from comfy_embed.config import webhook_secret_key
from comfy_embed.errors import WebhookRefused
from comfy_embed.events import FINAL
from comfy_embed.net import AddressPolicy, HttpClients, pinned_request
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.webhooks.request import (
    WebhookRequest,
    dumps,
    payload_body,
    redact,
    sign,
)

if TYPE_CHECKING:
    from comfy_embed.config import Settings
    from comfy_embed.tasks import Task

__all__ = ["Webhooks"]

log = logging.getLogger(__name__)



def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------ delivering
@dataclass
class _Sent:
    """How one POST ended."""

    ok: bool
    retryable: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None


class Webhooks:
    """Sends this instance's webhooks and resumes pending ones from the shared log.

    Coroutine methods run in the server's event loop; file I/O goes to worker
    threads. Deliveries and progress followers run in ``background`` (the
    engine's task group, in the server). ``clock`` and ``rng`` are for tests.
    """

    def __init__(self, settings: "Settings", tasklog: TaskLog,
                 background: Background | None = None, *,
                 clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.deliveries = DeliveryLog(tasklog)
        self.tasklog = tasklog
        self._policy = AddressPolicy(settings.inputs.url_allowlist)
        self._clients = HttpClients(settings.webhooks.timeout)
        secret = settings.webhooks.secret
        self._key = webhook_secret_key(secret) if secret else None
        self._clock = clock
        self._rng = rng
        #: Tasks registered here whose delivery has not started: (request, webhook id).
        self._local: dict[str, tuple[WebhookRequest, str]] = {}
        self._background = background or Background("webhooks")
        self._background.on_close(self._clients.aclose)
        self._active: dict[str, Spawned] = {}
        self._followers: dict[str, Spawned] = {}
        self._sending = 0
        #: Deliveries sleeping until their next try.
        self._waiting: set[str] = set()
        self._closed = False
        #: Set by drain: deliveries waiting for their next try wake and hand it back.
        self._closing = anyio.Event()
        #: Set (and replaced) whenever a send or a delivery ends: drain waits on it.
        self._settled = anyio.Event()

    # ------------------------------------------------------------ hooks
    async def check(self, request: WebhookRequest) -> None:
        """WebhookRefused if the URL rules refuse the webhook's URL (submit time)."""
        await self._policy.check(request.url, error=WebhookRefused)

    async def register(self, task_id: str, request: WebhookRequest) -> str:
        """Record the request in the task's folder (before its final event can
        be); returns the webhook id. Never raises: the task runs on even if
        its webhook cannot be recorded (logged)."""
        webhook_id = "msg_" + uuid.uuid4().hex
        record = {**request.to_record(), "id": webhook_id, "created_at": self._clock()}
        try:
            if not await anyio.to_thread.run_sync(self.deliveries.register, task_id, record):
                existing = await anyio.to_thread.run_sync(self.deliveries.request, task_id) or {}
                webhook_id = str(existing.get("id", webhook_id))
        except Exception:
            log.exception("webhook of task %s: cannot record it; it will not be sent", task_id)
            return webhook_id
        self._local[task_id] = (request, webhook_id)
        return webhook_id

    def follow(self, task: "Task") -> None:
        """Send the task's progress, rate-limited, if its webhook asked for it."""
        local = self._local.get(task.task_id)
        if local is None or "progress" not in local[0].events:
            return
        self._followers[task.task_id] = self._background.spawn(
            self._follow, task, *local, name=f"progress webhooks of {task.task_id}")

    def forget(self, task_id: str) -> None:
        """The task was never accepted (its claim is undone): no delivery."""
        self._local.pop(task_id, None)

    def finished(self, task_id: str) -> None:
        """The task's final event is persisted: start its delivery here now
        (if it has a webhook registered on this instance)."""
        if task_id in self._local and task_id not in self._active and not self._closed:
            self._start(task_id)

    async def resume_pending(self) -> list[str]:
        """Start every delivery in the shared log that nobody holds (its
        instance died, or it was released); returns their task ids."""
        if self._closed:
            return []
        try:
            pending = await anyio.to_thread.run_sync(self.deliveries.pending)
        except Exception:
            log.exception("webhooks: listing pending deliveries failed")
            return []
        started = [t for t in pending if t not in self._active]
        for task_id in started:
            log.info("webhook of task %s: resuming a pending delivery", task_id)
            self._start(task_id)
        return started

    async def drain(self) -> None:
        """Stop: let deliveries make their current attempt, then hand the ones
        waiting to retry back (leases released) for any instance to resume."""
        self._closed = True
        self._closing.set()  # deliveries waiting for their next try hand it back now
        deliveries = list(self._active.values())
        with anyio.move_on_after(self.settings.webhooks.timeout + 5):
            while self._sending or self._active:
                await self._settled.wait()
        # Ended deliveries may still be handing their lease back: wait for them too.
        spawned = deliveries + list(self._active.values()) + list(self._followers.values())
        for s in spawned:
            s.cancel()
        for s in spawned:
            await s.wait()

    async def status(self, task_id: str) -> dict[str, Any] | None:
        """The delivery state of a task as ``GET /webhook`` shows it, or None
        (unknown task, or no webhook)."""
        if not self.tasklog.valid_task_id(task_id):
            return None
        state = await anyio.to_thread.run_sync(self.deliveries.state, task_id)
        if state is None:
            return None
        request, attempts, done = state["request"], state["attempts"], state["done"]
        if done:
            phase = done.get("state", "done")
        elif not attempts:
            phase = "pending"
        elif "outcome" not in attempts[-1]:
            phase = "sending"
        else:
            phase = "retrying"
        next_try = (attempts[-1].get("next_try_at") if attempts and not done else None)
        return {"task_id": task_id, "webhook_id": request.get("id"),
                "url": redact(str(request.get("url", ""))), "events": request.get("events"),
                "state": phase, "attempts": attempts, "next_try_at": next_try,
                "done": done, "lease": state["lease"]}

    # --------------------------------------------------------- delivery
    def _start(self, task_id: str) -> None:
        self._active[task_id] = self._background.spawn(self._deliver, task_id,
                                                       name=f"webhook of {task_id}")

    async def _deliver(self, task_id: str) -> None:
        gen: int | None = None
        try:
            gen = await anyio.to_thread.run_sync(self.deliveries.claim, task_id)
            if gen is None:
                return  # another instance holds it
            follower = self._followers.get(task_id)
            if follower is not None:
                # Progress first, then the final webhook (the follower ends at the final event).
                with anyio.move_on_after(self.settings.webhooks.timeout):
                    await follower.wait()
            await self._run(task_id, gen)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception:
            log.exception("webhook of task %s: delivery failed", task_id)
        finally:
            self._active.pop(task_id, None)
            self._local.pop(task_id, None)
            self._settle()
            if gen is not None:
                try:
                    # Shielded: drain cancels a waiting delivery, and handing its
                    # lease back is what lets another instance resume it at once.
                    with anyio.move_on_after(5, shield=True):
                        await anyio.to_thread.run_sync(self.deliveries.release, task_id, gen)
                except Exception:
                    # It expires on its own: another instance resumes after the lease.
                    log.warning("webhook of task %s: could not release its lease", task_id)

    async def _final(self, task_id: str) -> dict[str, Any] | None:
        events = await anyio.to_thread.run_sync(self.tasklog.read, task_id)
        return events[-1][1] if events and events[-1][1].get("type") == FINAL else None

    async def _run(self, task_id: str, gen: int) -> None:
        """Attempt, record, wait, until delivered or given up (or the lease is lost)."""
        s = self.settings.webhooks
        body: bytes | None = None
        while True:
            state = await anyio.to_thread.run_sync(self.deliveries.state, task_id)
            if state is None or state["done"]:
                return
            request, attempts = state["request"], state["attempts"]
            if body is None:
                final = await self._final(task_id)
                if final is None:
                    return  # not finished after all: a later scan comes back
                success = (final.get("data") or {}).get("status") == "success"
                kind = "completed" if success else "failed"
                if kind not in request.get("events", ()):
                    await self._finish(task_id, "skipped", len(attempts),
                                       f"{kind} is not in webhook_events")
                    return
                body = payload_body(final, bool(request.get("base64")))
            now = self._clock()
            last = attempts[-1] if attempts else None
            number = (last["attempt"] + 1) if last else 1
            if last is None:
                due = now
            elif last.get("outcome") in ("delivered", "failed"):
                # Its sender died between the result and the done marker.
                await self._finish(task_id, last["outcome"], last["attempt"], last.get("reason"))
                return
            elif "outcome" in last:
                due = float(last.get("next_try_at") or now)
            else:
                # Reserved but no outcome: its sender died mid-attempt, or is
                # still sending. Wait until that attempt has surely ended.
                due = float(last.get("at") or now) + s.timeout + 1
            first_at = float(attempts[0].get("at") or now) if attempts else now
            if number > s.max_attempts:
                await self._finish(task_id, "failed", number - 1,
                                   f"gave up after {number - 1} attempts")
                return
            if attempts and due > first_at + s.max_age:
                await self._finish(task_id, "failed", number - 1,
                                   f"gave up: next try would be past the "
                                   f"{s.max_age:g}s limit")
                return
            if not await self._wait_until(task_id, gen, due):
                log.info("webhook of task %s: %s", task_id, "handed back at shutdown"
                         if self._closed else "another instance took the delivery over")
                return
            if due > now:
                continue  # read again: a slow sender may have recorded its outcome meanwhile
            begin: dict[str, Any] = {"at": self._clock(), "instance_id": self.tasklog.instance_id}
            if not await anyio.to_thread.run_sync(self.deliveries.begin_attempt, task_id,
                                                  number, begin):
                continue  # a rival reserved this attempt: read the state again
            sent = await self._send(str(request["url"]), str(request["id"]), body)
            record = self._outcome(number, first_at if attempts else begin["at"], sent)
            await anyio.to_thread.run_sync(self.deliveries.end_attempt, task_id, number, record)
            log.info("webhook of task %s: attempt %d: %s%s", task_id, number,
                     sent.status or sent.error, f", next try in {record['delay']:.1f}s"
                     if record["outcome"] == "retry" else f", {record['outcome']}")
            if record["outcome"] != "retry":
                await self._finish(task_id, record["outcome"], number, record.get("reason"))
                return

    def _outcome(self, number: int, first_at: float, sent: _Sent) -> dict[str, Any]:
        s = self.settings.webhooks
        now = self._clock()
        record: dict[str, Any] = {"finished_at": now, "status": sent.status, "error": sent.error}
        if sent.ok:
            record["outcome"] = "delivered"
        elif not sent.retryable:
            record.update(outcome="failed", reason=f"not retried: {sent.status or sent.error}")
        elif number >= s.max_attempts:
            record.update(outcome="failed", reason=f"gave up after {number} attempts")
        else:
            delay = self._backoff(number)
            if sent.retry_after is not None:
                delay = max(delay, sent.retry_after)
            if now + delay > first_at + s.max_age:
                record.update(outcome="failed", reason=(
                    f"gave up: next try in {delay:.0f}s would be past the "
                    f"{s.max_age:g}s limit"))
            else:
                record.update(outcome="retry", delay=delay, next_try_at=now + delay)
        return record

    def _backoff(self, number: int) -> float:
        """Exponential, with 'equal jitter': between half and all of
        base * 2**(n-1), so delays spread out yet still grow."""
        s = self.settings.webhooks
        full = min(s.backoff * 2 ** (number - 1), s.backoff_max)
        return full / 2 + self._rng() * full / 2

    async def _finish(self, task_id: str, state: str, attempts: int, reason: str | None) -> None:
        record = {"state": state, "at": self._clock(), "attempts": attempts, "reason": reason,
                  "instance_id": self.tasklog.instance_id}
        await anyio.to_thread.run_sync(self.deliveries.finish, task_id, record)
        if state == "failed":
            log.warning("webhook of task %s failed: %s", task_id, reason)

    async def _wait_until(self, task_id: str, gen: int, due: float) -> bool:
        """Wait until ``due`` while renewing the lease; False if it was lost,
        or if :meth:`drain` began meanwhile (the delivery is handed back)."""
        step = max(self.deliveries.lease_seconds / 3, 0.05)
        try:
            while True:
                if not await anyio.to_thread.run_sync(self.deliveries.renew, task_id, gen):
                    return False
                remaining = due - self._clock()
                if remaining <= 0:
                    return True
                if self._closing.is_set():
                    return False
                self._waiting.add(task_id)
                # The retry time, or the next renewal, or drain: whichever comes first.
                with anyio.move_on_after(min(remaining, step)):
                    await self._closing.wait()
        finally:
            self._waiting.discard(task_id)

    async def _send(self, url: str, msg_id: str, body: bytes) -> _Sent:
        """One signed POST to the checked, pinned address."""
        timeout = self.settings.webhooks.timeout
        timestamp = int(self._clock())
        headers = {"Content-Type": "application/json", "User-Agent": "comfy-embed-webhooks",
                   "webhook-id": msg_id, "webhook-timestamp": str(timestamp)}
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, msg_id, timestamp, body)
        self._sending += 1
        try:
            # Checked again on every attempt: DNS may answer differently now.
            # Retryable: the URL passed at submit time, so this is likely a DNS
            # hiccup; a name that now stays internal is refused until give-up.
            try:
                target, host, ip = await self._policy.check(url, error=WebhookRefused)
            except WebhookRefused as e:
                return _Sent(ok=False, retryable=True, error=e.message)
            try:
                with anyio.fail_after(timeout):
                    client = self._clients.get()
                    request = pinned_request(client, "POST", target, host, ip, headers, body)
                    response = await client.send(request, stream=True)
                    await response.aclose()
            except (TimeoutError, httpx.TimeoutException):
                return _Sent(ok=False, retryable=True, error=f"timed out after {timeout:g}s")
            except httpx.HTTPError as e:
                return _Sent(ok=False, retryable=True,
                             error=f"connection failed: {e or type(e).__name__}")
        finally:
            self._sending -= 1
            self._settle()
        code = response.status_code
        if 200 <= code < 300:
            return _Sent(ok=True, retryable=False, status=code)
        retryable = code in (408, 429) or code >= 500
        redirect = " (redirects are not followed)" if 300 <= code < 400 else ""
        return _Sent(ok=False, retryable=retryable, status=code, error=f"HTTP {code}{redirect}",
                     retry_after=_retry_after(response.headers.get("retry-after"), self._clock())
                     if retryable else None)

    def _settle(self) -> None:
        """Wake :meth:`drain`: a send or a delivery ended."""
        self._settled.set()
        self._settled = anyio.Event()

    async def _follow(self, task: "Task", request: WebhookRequest, webhook_id: str) -> None:
        """Progress webhooks: best effort, one attempt each, at most one per
        ``webhook_progress_interval``, none after the final event."""
        try:
            await self._progress(task, request, webhook_id)
        finally:
            self._followers.pop(task.task_id, None)

    async def _progress(self, task: "Task", request: WebhookRequest, webhook_id: str) -> None:
        interval = self.settings.webhooks.progress_interval
        last: float | None = None
        async for seq, ev in task.stream():
            if ev["type"] == FINAL:
                return
            if ev["type"] != "progress":
                continue
            now = time.monotonic()
            if last is not None and now - last < interval:
                continue
            last = now
            body = dumps({"type": "progress", "data": {**ev["data"], "task_id": task.task_id}})
            sent = await self._send(request.url, f"{webhook_id}_progress_{seq}", body)
            if not sent.ok:
                log.info("webhook of task %s: progress not delivered: %s", task.task_id,
                         sent.status or sent.error)
