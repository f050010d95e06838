"""Claiming a task id in the shared task log while the engine prepares the
request, and the gate that makes the engine wait for it.

The claim (mkdir, owner file) runs in a worker thread while the engine
parses and validates, or first on the loop when the disk is quick. The
engine awaits :meth:`Claim.before_writes` before anything is written under
the id or the task is queued: only a request that claimed the id goes on.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

import anyio

from comfy_embed.errors import ComfyEmbedError, StorageUnavailable, TaskIdConflict
from comfy_embed.webhooks.delivery import Webhooks
from comfy_embed.webhooks.request import WebhookRequest

__all__ = ["Claim", "Unclaimed"]

log = logging.getLogger(__name__)


class Unclaimed(Exception):
    """Raised by the gate: this request did not claim the task id (a known
    task, a conflict, an unusable log); the engine refuses to go on."""


class Claim:
    """One request's claim of ``task_id``; its outcome is in ``claimed`` and
    ``error`` once ``done`` is set.

    ``take`` claims the id (True: claimed here; False: the log knows the
    task already). Passing the gate records the webhook, if any, in the
    task's folder and adds the id to ``claimed_ids`` (the ids whose log this
    service writes once the engine queues them).
    """

    def __init__(self, task_id: str, take: Callable[[], Awaitable[bool]], *,
                 webhook: WebhookRequest | None, webhooks: Webhooks,
                 claimed_ids: set[str]) -> None:
        self.task_id = task_id
        self.webhook = webhook
        self._take = take
        self._webhooks = webhooks
        self._claimed_ids = claimed_ids
        self.done = anyio.Event()
        self.claimed = False
        self.error: Exception | None = None
        #: Whether the webhook was recorded in the task's folder.
        self.registered = False

    async def run(self) -> None:
        """Claim the id; whatever happens, ``done`` is set."""
        try:
            self.claimed = await self._take()
        except Exception as e:
            self.error = e
        finally:
            self.done.set()

    async def before_writes(self) -> None:
        """The engine's gate: passes once this request claimed the id."""
        await self.done.wait()
        if self.error is not None or not self.claimed:
            raise Unclaimed()
        if self.webhook is not None:
            # Recorded before the task can end, so its end is always delivered.
            await self._webhooks.register(self.task_id, self.webhook)
            self.registered = True
        self._claimed_ids.add(self.task_id)

    def refusal(self) -> ComfyEmbedError | None:
        """The error the claim itself answers with (a folder in the way, an
        unusable log): it decides first, as if it had run before the submit."""
        error = self.error
        if isinstance(error, FileExistsError):
            # Worded as a taken id from another key is (lifecycle._check_owner):
            # the caller learns the id is taken, not by what.
            log.warning("task %s: refused: %s", self.task_id, error)
            return TaskIdConflict(f"task id {self.task_id} is already in use; "
                                  "choose another task id")
        if isinstance(error, OSError):
            log.warning("task %s: task log unusable: %s", self.task_id, error)
            return StorageUnavailable(f"the task log folder is not writable "
                                      f"({error.strerror or error}); retry later")
        return None
