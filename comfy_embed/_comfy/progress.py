"""Progress of the running prompt, from ComfyUI to its sink: the global
progress hook (``progress`` messages, and the point where an interrupt stops
a sampler mid-way) and ComfyUI's ``progress_state`` messages, throttled and
flushed before the run's end message."""

from __future__ import annotations

import time
from typing import Any, Callable

from comfy_embed.outcome import Sink

__all__ = ["ProgressRelay"]

#: ComfyUI's last message of a run: a held-back progress_state goes first.
_END_OF_RUN = frozenset({"execution_success", "execution_error", "execution_interrupted"})


def _throttled_progress(base: type, interval: float,
                        register: Callable[[Any], None]) -> type:
    """A subclass of ComfyUI's WebUIProgressHandler that sends a
    ``progress_state`` at most every ``interval`` seconds, plus the latest
    one just before the run's end message.

    Each snapshot lists every node that started, and ComfyUI sends one per
    node start, step and finish: a graph of N nodes would cost the executor
    thread O(N^2) to build them and its readers O(N^2) to store them.
    """

    class ThrottledProgressHandler(base):
        def __init__(self, server_instance: Any) -> None:
            super().__init__(server_instance)
            self._last = time.monotonic()  # a run shorter than interval sends one
            self._pending: tuple[str, Any] | None = None
            register(self)

        def _send_progress_state(self, prompt_id: str, nodes: Any) -> None:
            now = time.monotonic()
            if now - self._last >= interval:
                self._last, self._pending = now, None
                super()._send_progress_state(prompt_id, nodes)
            else:
                # ``nodes`` is the registry's live dict: flushing it later
                # sends the state as of then, which is what a reader wants.
                self._pending = (prompt_id, nodes)

        def flush(self) -> None:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._last = time.monotonic()
                super()._send_progress_state(*pending)

    return ThrottledProgressHandler


class ProgressRelay:
    """ComfyUI's progress, sent through the stand-in ``server``. Built with
    the Comfy; :meth:`install` connects it once ComfyUI's nodes are imported."""

    def __init__(self, server: Any) -> None:
        self.server = server
        #: The running prompt's progress_state sender (see _throttled_progress).
        self.handler: Any = None

    def install(self, execution: Any, interval: float) -> None:
        """Route ComfyUI's progress hook and progress_state messages here."""
        import comfy.model_management
        import comfy.utils
        from comfy_execution.progress import get_progress_state
        from comfy_execution.utils import get_executing_context

        self._mm = comfy.model_management
        self._get_executing_context = get_executing_context
        self._get_progress_state = get_progress_state
        # execute_async builds its progress handler from this module global
        # (ComfyUI's files stay as they are).
        execution.WebUIProgressHandler = _throttled_progress(
            execution.WebUIProgressHandler, interval, self._set_handler)
        comfy.utils.set_progress_bar_global_hook(self.hook)

    def _set_handler(self, handler: Any) -> None:
        self.handler = handler

    def flushing(self, sink: Sink) -> Sink:
        """``sink``, sending the latest held-back progress_state just before
        ComfyUI's end-of-run message."""
        def send(event: str, data: dict) -> None:
            if event in _END_OF_RUN and self.handler is not None:
                self.handler.flush()
            sink(event, data)
        return send

    def hook(self, value: float, total: float, preview: Any,
             prompt_id: str | None = None, node_id: str | None = None) -> None:
        """ComfyUI's global progress hook (executor thread)."""
        # What main.py's hook does, minus the binary preview message. Raising
        # here is how an interrupt stops a sampler mid-way.
        ctx = self._get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        self._mm.throw_exception_if_processing_interrupted()
        prompt_id = prompt_id or self.server.last_prompt_id
        node_id = node_id or self.server.last_node_id
        self._get_progress_state().update_progress(node_id, value, total, preview)
        self.server.send_sync("progress", {"value": value, "max": total,
                                           "prompt_id": prompt_id, "node": node_id})
