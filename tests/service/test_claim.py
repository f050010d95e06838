"""The claim of a task id and the engine's gate on it (comfy_embed.service.claim):
what the gate lets through, and which errors the claim answers with itself."""

from __future__ import annotations

import errno
from typing import Any

import anyio
import pytest

from comfy_embed.errors import StorageUnavailable, TaskIdConflict
from comfy_embed.service.claim import Claim, Unclaimed
from comfy_embed.webhooks.request import WebhookRequest

pytestmark = pytest.mark.anyio


class Webhooks:
    """Notes the webhooks recorded."""

    def __init__(self) -> None:
        self.registered: list[tuple[str, WebhookRequest]] = []

    async def register(self, task_id: str, webhook: WebhookRequest) -> None:
        self.registered.append((task_id, webhook))


def claim_of(outcome: Any, webhook: WebhookRequest | None = None
             ) -> tuple[Claim, Webhooks, set[str]]:
    async def take() -> bool:
        if isinstance(outcome, Exception):
            raise outcome
        return bool(outcome)

    hooks, ids = Webhooks(), set[str]()
    return Claim("t-1", take, webhook=webhook, webhooks=hooks, claimed_ids=ids), hooks, ids  # type: ignore[arg-type]


async def test_the_gate_waits_for_the_claim_then_records_the_webhook() -> None:
    hook = WebhookRequest(url="https://example.com/hook")
    claim, hooks, ids = claim_of(True, hook)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(claim.before_writes)
            await anyio.wait_all_tasks_blocked()
            assert ids == set() and hooks.registered == []  # waiting: the claim has not run
            await claim.run()
    assert claim.claimed and claim.registered and claim.refusal() is None
    assert hooks.registered == [("t-1", hook)] and ids == {"t-1"}


@pytest.mark.parametrize("outcome", [False, OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("unexpected")])
async def test_the_gate_refuses_a_request_that_did_not_claim_the_id(outcome: Any) -> None:
    claim, hooks, ids = claim_of(outcome, WebhookRequest(url="https://example.com/hook"))
    await claim.run()
    with pytest.raises(Unclaimed):
        await claim.before_writes()
    assert hooks.registered == [] and ids == set() and not claim.registered


async def test_the_claim_answers_for_a_folder_in_the_way_and_an_unusable_log() -> None:
    claim, _, _ = claim_of(FileExistsError("the output folder already has a folder named t-1"))
    await claim.run()
    assert isinstance(claim.refusal(), TaskIdConflict)
    claim, _, _ = claim_of(PermissionError(errno.EROFS, "Read-only file system"))
    await claim.run()
    refusal = claim.refusal()
    assert isinstance(refusal, StorageUnavailable) and "Read-only" in refusal.message
    claim, _, _ = claim_of(RuntimeError("unexpected"))
    await claim.run()
    assert claim.refusal() is None and isinstance(claim.error, RuntimeError)  # the service's to handle
