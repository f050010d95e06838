"""The caller's data, the caller's rules (issue 29): per-request retention,
delete now, keep nothing, as every surface (FC, Comfy API v2) uses them.

:class:`Retention` belongs to the :class:`~comfy_embed.service.lifecycle.TaskService`
(``service.retention``). It checks a request's ``ttl``/``keep``
(:meth:`Retention.policy`), records the policy of a started task, stamps the
``expires_at`` of its final event, sweeps what is due on every upkeep tick
(on any instance) and deletes a task now (:meth:`Retention.delete`, what
``TaskService.delete`` does). What the service removes from object storage
(when ``COMFY_EMBED_DELETE_OBJECTS`` allows it) is the objects the results
uploaded: a signed link to one then answers 404, but a copy someone
downloaded, or a link through a CDN cache, cannot be recalled.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import anyio
import anyio.to_thread

from comfy_embed.config import Settings
from comfy_embed.errors import InvalidParameter, StorageError, TaskRunning
from comfy_embed.events import FINAL
from comfy_embed.runtime import Engine
from comfy_embed.storage import Credentials
from comfy_embed.taskid import valid_task_id
from comfy_embed.tasklog.expiry import (
    KEEP_ALL,
    KEEP_NOTHING,
    Policy,
    expires_at,
    task_expires_at,
    write_policy,
)
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasklog.retention import prune, sweep
from comfy_embed.tasklog.tombstone import Folders, Removal, bury, erased

log = logging.getLogger(__name__)

__all__ = ["Retention"]

#: How long a delete waits for a cancelled task to end before answering 409.
_CANCEL_WAIT = 30.0


class _Service(Protocol):
    """What Retention uses of its TaskService (lifecycle.py, which imports this)."""

    settings: Settings
    tasklog: TaskLog
    engine: Engine

    async def may_access(self, task_id: str, owner_key: str | None) -> bool: ...

    async def cancel(self, task_id: str) -> str: ...

    def handle(self, task_id: str) -> Any: ...


class Retention:
    """A service's retention work: policies, ``expires_at``, sweeps, deletes."""

    def __init__(self, service: _Service) -> None:
        self.service = service
        s = service.settings
        hours = s.tasklog.retention_hours
        #: The operator's retention period in seconds (None: kept forever).
        self.retention_seconds = hours * 3600 if hours else None
        limit = s.tasklog.max_ttl
        #: The longest ``ttl`` a request may ask (None: any).
        self.max_ttl = (limit if self.retention_seconds is None or limit is None
                        else min(limit, self.retention_seconds))
        if self.max_ttl is None:
            self.max_ttl = self.retention_seconds
        #: The policy of a task that asks none (``COMFY_EMBED_KEEP``).
        self.default = Policy(None, s.tasklog.keep)
        #: The policies of the tasks this instance runs, until their final is stamped.
        self._policies: dict[str, Policy] = {}
        self.folders = Folders(s.comfy.output_path.resolve(), s.comfy.temp_path.resolve(),
                               s.comfy.input_path.resolve())

    # ---------------------------------------------------------- a request's
    def policy(self, ttl: str | None, keep: str | None) -> Policy:
        """The policy a request asks (``?ttl=`` seconds, ``?keep=all|nothing``),
        the operator's ``COMFY_EMBED_KEEP`` by default. InvalidParameter (400)
        naming the parameter for a bad value or a ttl over the maximum."""
        keep = (keep or self.service.settings.tasklog.keep).lower()
        if keep not in (KEEP_ALL, KEEP_NOTHING):
            raise InvalidParameter("keep must be 'all' or 'nothing'")
        seconds: float | None = None
        if ttl is not None and ttl != "":
            if not (ttl.isascii() and ttl.isdigit() and len(ttl) <= 12):
                raise InvalidParameter(f"ttl must be a whole number of seconds, got {ttl[:20]!r}")
            seconds = float(ttl)
            if self.max_ttl is not None and seconds > self.max_ttl:
                raise InvalidParameter(
                    f"ttl {int(seconds)} is over this server's maximum of {self.max_ttl:g} "
                    "seconds (COMFY_EMBED_MAX_TTL, or the retention period)")
        return Policy(seconds, keep)

    def expect(self, task_id: str, policy: Policy | None) -> Policy:
        """The policy of a task about to be submitted (None: the operator's
        ``COMFY_EMBED_KEEP``, for surfaces that ask none), kept in memory for
        :meth:`stamp` before the task can end; :meth:`forget` it if the task
        does not run here."""
        if policy is None:
            policy = self.default
        if not policy.is_default:
            self._policies[task_id] = policy
        return policy

    def forget(self, task_id: str) -> None:
        """The task expected did not run here (refused, or a known one)."""
        self._policies.pop(task_id, None)

    async def started(self, task_id: str, policy: Policy) -> None:
        """Record a started task's own policy in the log, where every
        instance's sweep finds it (nothing for the default one)."""
        if policy.is_default:
            return
        try:
            await anyio.to_thread.run_sync(write_policy, self.service.tasklog, task_id, policy,
                                           time.time())
        except OSError as e:  # the task runs all the same: never a 500 for it
            log.error("task %s: cannot record its retention (%s): it follows the "
                      "operator's retention", task_id, e)

    def stamp(self, task_id: str, final: dict[str, Any]) -> Policy:
        """Put ``expires_at`` in a final event about to be written (the answer,
        the stream and the status then carry it); the task's policy."""
        policy = self._policies.pop(task_id, Policy())
        data = final.get("data")
        if isinstance(data, dict) and "expires_at" not in data:
            data["expires_at"] = expires_at(time.time(), policy, self.retention_seconds)
        return policy

    async def expires_at(self, task_id: str) -> str | None:
        """A task's ``expires_at`` read from the log (for a v2 job, or a final
        written by another instance without one)."""
        return await anyio.to_thread.run_sync(
            task_expires_at, self.service.tasklog, task_id, self.retention_seconds)

    async def fill(self, task_id: str, final: dict[str, Any]) -> None:
        """Give a final read from the log its ``expires_at`` when its writer
        put none there (a lost task closed by recovery, a tombstone)."""
        data = final.get("data")
        if isinstance(data, dict) and "expires_at" not in data:
            data["expires_at"] = await self.expires_at(task_id)

    async def erased(self, task_id: str) -> bool:
        """Whether the task's data was deleted (on any instance)."""
        return await anyio.to_thread.run_sync(erased, self.service.tasklog, task_id)

    # ------------------------------------------------------------- upkeep
    async def prune(self) -> None:
        """The operator's retention (every minute): finished tasks past the
        retention period go, with their uploads where the operator allows it."""
        s = self.service.settings
        if self.retention_seconds is None:
            return
        seconds = self.retention_seconds
        uploads: list[tuple[str, dict[str, Any]]] | None = (
            [] if s.tasklog.delete_objects else None)
        try:
            await anyio.to_thread.run_sync(
                lambda: prune(s.comfy.output_path, s.comfy.temp_path, self.service.tasklog,
                              seconds, input_dir=s.comfy.input_path, uploads=uploads))
        except Exception:
            log.exception("retention: pruning failed")
        if uploads:
            await self._delete_objects(Removal(objects=uploads), None)

    async def sweep(self) -> None:
        """Delete what is due in the expiry index (any instance's tasks)."""
        try:
            removal = await anyio.to_thread.run_sync(
                sweep, self.service.tasklog, self.folders, self.retention_seconds)
        except Exception:
            log.exception("retention: sweeping expired tasks failed")
            return
        if removal.objects:
            await self._delete_objects(removal, None)

    # ------------------------------------------------------------- delete
    async def delete(self, task_id: str, owner_key: str | None,
                     credentials: Credentials | None = None) -> dict[str, Any] | None:
        """Delete a task now: cancel it if it runs, then remove its inputs,
        outputs (and, when the operator allows it, the objects its results
        uploaded), webhook delivery state and event payloads, leaving a
        tombstone (a status then answers ``task_deleted``, a retry with its id
        does not run again). None when the task is unknown or another API
        key's (``owner_key``: the caller's key hash, None with keys off);
        TaskRunning when it did not stop in time. Deleting again is no error."""
        service = self.service
        if not valid_task_id(task_id) or not await service.may_access(task_id, owner_key):
            return None
        tasklog = service.tasklog
        if not await anyio.to_thread.run_sync(tasklog.exists, task_id):
            return None
        if not await anyio.to_thread.run_sync(tasklog.is_final, task_id):
            await service.cancel(task_id)
            with anyio.move_on_after(_CANCEL_WAIT):
                await self._ended(task_id)
        try:
            removal = await anyio.to_thread.run_sync(bury, tasklog, task_id, self.folders)
        except FileNotFoundError:
            return None
        except ValueError:
            raise TaskRunning(f"task {task_id} did not stop within {_CANCEL_WAIT:g}s of its "
                              "cancel; retry the delete") from None
        service.engine.forget(task_id)
        objects = await self._delete_objects(removal, credentials)
        return {"task_id": task_id, "status": "deleted", "files": removal.files,
                "bytes": removal.bytes, "objects": objects}

    async def _ended(self, task_id: str) -> None:
        """Until the task's final event is in the log."""
        handle = self.service.handle(task_id)
        if handle.task is not None:
            await handle.final()
            return
        async for _, ev in handle.events():
            if ev.get("type") == FINAL:
                return

    async def _delete_objects(self, removal: Removal, credentials: Credentials | None
                              ) -> dict[str, Any]:
        """Delete the uploads ``removal`` found, when the operator allows it:
        ``{"deleted": n, "kept": n, "failed": [...]}``."""
        report: dict[str, Any] = {"deleted": 0, "kept": 0, "failed": []}
        if not self.service.settings.tasklog.delete_objects:
            report["kept"] = len(removal.objects)
            return report
        for backend, entry in removal.objects:
            where = f"{backend}://{entry['bucket']}/{entry['object']}"
            try:
                store = self.service.engine.store(backend)
                await store.delete(entry["bucket"], entry["object"], credentials)
                report["deleted"] += 1
            except (StorageError, KeyError) as e:
                log.warning("retention: cannot delete %s: %s", where, e)
                report["failed"].append(where)
        return report
