"""The stand-in for ComfyUI's ``server`` module that nodes and packs import.

Registered as ``sys.modules["server"]`` at boot, so ``import server``,
``from server import PromptServer, BinaryEventTypes`` and ``server.web`` /
``server.uuid`` work as with ComfyUI's own server, with no web server behind
them. It imports nothing from ComfyUI (``_comfy.py`` wires it in).

What custom-node packs use, and what it does here:

- ``routes`` (a real aiohttp ``RouteTableDef``, ``routes.static`` included)
  and ``app`` (a real, never started ``web.Application``): recorded, not served;
- ``send_sync`` / ``send`` / ``send_json``: JSON messages go to the running
  prompt's event stream; ``send_progress_text`` and binary TEXT messages
  become ``progress_text`` events; binary previews have no JSON form and are
  dropped;
- ``prompt_queue``: native's read methods (``currently_running``,
  ``get_current_queue``, ``get_tasks_remaining``, ``get_history``, flags)
  over comfy-embed's own queue; ``put`` refuses (a node cannot requeue);
- ``add_on_prompt_handler``: handlers run on every submitted request, as on
  native ``POST /prompt``, and may rewrite it;
- ``client_id``, ``last_node_id``, ``last_prompt_id``, ``number``, ``loop``,
  ``supports``, ``sockets_metadata``.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json  # noqa: F401  (packs read server.json like native's module globals)
import logging
import os  # noqa: F401
import struct
import threading
import traceback
import uuid  # noqa: F401  (VideoHelperSuite calls server.uuid.uuid4())
from typing import Any, Callable

from aiohttp import web

from comfy_embed.results import jsonable

log = logging.getLogger(__name__)

__all__ = ["BinaryEventTypes", "PromptServer", "PromptQueueView", "web"]

#: Receives every message for the running prompt: (type, data).
Sink = Callable[[str, dict], None]
#: ``(number, prompt_id, prompt, extra_data, outputs_to_execute)``, native's queue item.
QueueItem = tuple
#: Finished prompts kept for ``prompt_queue.get_history`` (outputs only, small).
_HISTORY = 16


class BinaryEventTypes:
    """ComfyUI's binary websocket message types (``protocol.py``)."""

    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


class PromptQueueView:
    """Native ``PromptQueue``'s read surface over comfy-embed's executor queue.

    ``pending`` (set by the runtime) lists the queued items; the running one is
    in ``currently_running`` while it executes, as natively (VideoHelperSuite
    reads its extra_data there).
    """

    def __init__(self) -> None:
        self.mutex = threading.RLock()
        self.currently_running: dict[int, QueueItem] = {}
        self.history: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.flags: dict[str, Any] = {}
        self.pending: Callable[[], list[QueueItem]] = list

    # -- what the executor side calls
    def started(self, item: QueueItem) -> None:
        with self.mutex:
            self.currently_running = {0: item}

    def finished(self, item: QueueItem, outputs: dict[str, Any], status: dict[str, Any]) -> None:
        with self.mutex:
            self.currently_running = {}
            self.history[item[1]] = {"prompt": item, "outputs": outputs, "status": status}
            while len(self.history) > _HISTORY:
                self.history.popitem(last=False)

    # -- native's read methods
    def get_current_queue(self) -> tuple[list[QueueItem], list[QueueItem]]:
        with self.mutex:
            return list(self.currently_running.values()), copy.deepcopy(self.pending())

    def get_current_queue_volatile(self) -> tuple[list[QueueItem], list[QueueItem]]:
        with self.mutex:
            return list(self.currently_running.values()), list(self.pending())

    def get_tasks_remaining(self) -> int:
        with self.mutex:
            return len(self.pending()) + len(self.currently_running)

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None,
                    offset: int = -1, map_function: Callable[[Any], Any] | None = None
                    ) -> dict[str, Any]:
        with self.mutex:
            fn = map_function or copy.deepcopy
            if prompt_id is not None:
                return {prompt_id: fn(self.history[prompt_id])} if prompt_id in self.history else {}
            keys = list(self.history)
            if offset < 0 and max_items is not None:
                offset = len(keys) - max_items
            keys = keys[max(offset, 0):]
            if max_items is not None:
                keys = keys[:max_items]
            return {k: fn(self.history[k]) for k in keys}

    def set_flag(self, name: str, data: Any) -> None:
        with self.mutex:
            self.flags[name] = data

    def get_flags(self, reset: bool = True) -> dict[str, Any]:
        with self.mutex:
            flags = self.flags
            if reset:
                self.flags = {}
                return flags
            return dict(flags)

    # -- writes native allows and comfy-embed does not
    def put(self, item: Any) -> None:
        raise NotImplementedError("comfy-embed runs one request per task: a node cannot queue "
                                  "another prompt (prompt_queue.put)")

    def wipe_queue(self) -> None:
        raise NotImplementedError("comfy-embed's queue is managed by its API (cancel a task instead)")

    def delete_queue_item(self, function: Callable[[Any], bool]) -> bool:
        raise NotImplementedError("comfy-embed's queue is managed by its API (cancel a task instead)")


class PromptServer:
    """What nodes, packs and the executor call on ComfyUI's PromptServer."""

    instance: "PromptServer"

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets: dict[str, Any] = {}
        self.sockets_metadata: dict[str, Any] = {}
        self.sink: Sink | None = None
        self.routes = web.RouteTableDef()
        self.app = web.Application(client_max_size=1024 ** 2)
        self.supports = ["custom_nodes_from_web"]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.number = 0
        self.prompt_queue = PromptQueueView()
        self.on_prompt_handlers: list[Callable[[dict[str, Any]], dict[str, Any]]] = []
        self.user_manager: Any = None
        PromptServer.instance = self

    # -- messages
    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        sink = self.sink
        if sink is None:
            return
        if isinstance(event, str):
            # Packs send whatever they like; the task log and SSE need JSON.
            sink(event, jsonable(data))
        elif event == BinaryEventTypes.TEXT and isinstance(data, (bytes, bytearray)):
            node_id, text = _unpack_text(bytes(data))
            sink("progress_text", {"node": node_id, "text": text,
                                   "prompt_id": self.last_prompt_id})
        # Binary previews have no JSON form in the serverless contract.

    async def send(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    async def send_json(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    async def send_bytes(self, event: Any, data: Any, sid: str | None = None) -> None:
        self.send_sync(event, data, sid)

    def send_progress_text(self, text: str | bytes, node_id: str, sid: str | None = None) -> None:
        """Native packs text as a binary message; here it is a JSON event."""
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        if self.sink is not None:
            self.sink("progress_text", {"node": str(node_id), "text": text,
                                        "prompt_id": self.last_prompt_id})

    def queue_updated(self) -> None:
        pass

    # -- the request path
    def add_on_prompt_handler(self, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.on_prompt_handlers.append(handler)

    def trigger_on_prompt(self, json_data: dict[str, Any]) -> dict[str, Any]:
        """Run every on-prompt handler over the request, as native ``POST
        /prompt`` does: a handler may rewrite it; a failing one is logged and
        skipped."""
        for handler in self.on_prompt_handlers:
            try:
                json_data = handler(json_data)
            except Exception:
                log.warning("on-prompt handler %s failed:\n%s",
                            getattr(handler, "__qualname__", handler), traceback.format_exc())
        return json_data

    # -- what comfy-embed reports about packs
    def route_paths(self) -> list[str]:
        """Paths that packs registered (recorded only: nothing serves them)."""
        paths: set[str] = set()
        for route in list(self.routes) + list(self.app.router.routes()):
            # StaticDef: prefix (its path is the folder); RouteDef: path;
            # an app route: its resource.
            path = getattr(route, "prefix", None) or getattr(route, "path", None)
            resource = getattr(route, "resource", None)
            if path is None and resource is not None:
                path = resource.canonical
            if path:
                paths.add(str(path))
        return sorted(paths)


def _unpack_text(message: bytes) -> tuple[str, str]:
    """Native's TEXT message: ``>I`` node-id length, node id, UTF-8 text."""
    if len(message) < 4:
        return "", message.decode("utf-8", "replace")
    (n,) = struct.unpack(">I", message[:4])
    return (message[4:4 + n].decode("utf-8", "replace"),
            message[4 + n:].decode("utf-8", "replace"))
