"""A stand-in for ComfyUI, for tests of the thread, queue and API mechanics
ONLY (framing, status codes, cancel, drain): every test of what a graph
does runs real ComfyUI.

It knows four node types and sends ComfyUI-shaped messages in ComfyUI's
order (``execution_start``, ``execution_cached``, ``executing``,
``progress``, ``executed``, ``execution_success`` / ``_error`` /
``_interrupted``, then ``executing`` with node None). Like ComfyUI it clears
its interrupt flag when a prompt starts and checks it before every node.

- ``FakeImage``: no output; ``FakeSave``: writes a 2x2 PNG under its
  ``filename_prefix`` and reports it as SaveImage does;
- ``FakeWait``: sends one ``progress``, sets ``running`` and waits for
  ``gate`` (or an interrupt);
- ``FakeFail``: raises, as a failing node does.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from comfy_embed.config import Settings
from comfy_embed.errors import WorkflowInvalid, node_error
from comfy_embed.executor import Outcome, Sink

__all__ = ["FakeComfy", "fake_graph"]

NODE_TYPES = {"FakeImage", "FakeSave", "FakeWait", "FakeFail", "LoadImage"}


def fake_graph(*kinds: str, prefix: str = "fake") -> dict[str, Any]:
    """A graph of the given node types in order, ending with a FakeSave."""
    graph: dict[str, Any] = {}
    for i, kind in enumerate([*kinds, "FakeSave"], start=1):
        inputs: dict[str, Any] = {"seed": 5} if kind == "FakeImage" else {}
        if kind == "FakeSave":
            inputs["filename_prefix"] = prefix
        graph[str(i)] = {"class_type": kind, "inputs": inputs}
    return graph


class _Interrupted(Exception):
    pass


class FakeComfy:
    """What the engine asks of :class:`comfy_embed._comfy.comfy.Comfy`, faked."""

    device = "fake"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        folders = settings.comfy
        for path in (folders.input_path, folders.output_path, folders.temp_path):
            path.mkdir(parents=True, exist_ok=True)
        #: FakeWait nodes wait for this.
        self.gate = threading.Event()
        #: Set when a FakeWait node starts waiting.
        self.running = threading.Event()
        self._interrupt = threading.Event()
        self.executed: list[str] = []

    @classmethod
    def booter(cls) -> tuple[Callable[[Settings], Any], Callable[[], "FakeComfy"]]:
        """``(boot, get)``: ``boot`` for ``Engine(boot=...)``; ``get()`` the
        instance it built, once the executor booted it."""
        built: list[FakeComfy] = []

        def boot(settings: Settings) -> FakeComfy:
            built.append(cls(settings))
            return built[0]

        return boot, lambda: built[0]

    # --- what the engine looks up ----------------------------------------------
    @property
    def input_dir(self) -> Path:
        return self.settings.comfy.input_path

    def directory_of(self, kind: str) -> Path:
        return {"output": self.settings.comfy.output_path, "temp": self.settings.comfy.temp_path,
                "input": self.settings.comfy.input_path}[kind]

    def has_node(self, class_type: str) -> bool:
        return class_type in NODE_TYPES

    def is_loader(self, class_type: str) -> bool:
        return False  # no fake node loads a model

    def input_names(self, class_type: str) -> frozenset[str] | None:
        return None  # inputs are left as sent

    def input_specs(self, class_type: str) -> dict[str, tuple[Any, dict[str, Any]]]:
        if class_type == "LoadImage":
            return {"image": (["x.png"], {"image_upload": True})}
        if class_type == "FakeImage":
            return {"seed": ("INT", {"min": 0, "max": 1000})}
        return {}

    def validate(self, prompt: dict[str, Any], prompt_id: str,
                 targets: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        errors: dict[str, Any] = {}
        for node_id, node in prompt.items():
            if not self.has_node(node["class_type"]):
                errors.update(node_error(node_id, node["class_type"], "class_type",
                                         "no such node type", type="invalid_node"))
        if errors:
            raise WorkflowInvalid(f"unknown node types: {sorted(errors)}", type="invalid_prompt",
                                  node_errors=errors)
        outputs = [n for n, node in prompt.items() if node["class_type"] == "FakeSave"]
        if not outputs:
            raise WorkflowInvalid("Prompt has no outputs", type="prompt_no_outputs")
        return copy.deepcopy(prompt), outputs

    async def validate_here(self, prompt: dict[str, Any], prompt_id: str,
                            targets: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
        return self.validate(prompt, prompt_id, targets)

    # --- the executor thread ------------------------------------------------------
    def interrupt(self) -> None:
        self._interrupt.set()

    def execute(self, prompt: dict[str, Any], prompt_id: str, outputs: list[str],
                sink: Sink, stop: Callable[[], bool] | None = None,
                extra_data: dict[str, Any] | None = None) -> Outcome:
        messages: list[tuple[str, dict]] = []

        def send(kind: str, data: dict[str, Any]) -> None:
            data = {**data, "prompt_id": prompt_id}
            messages.append((kind, data))
            sink(kind, data)

        self._interrupt.clear()  # as ComfyUI's execute_async starts
        ui: dict[str, Any] = {}
        node_id: str | None = None
        try:
            send("execution_start", {"timestamp": int(time.time() * 1000)})
            if stop is not None and stop():
                raise _Interrupted()
            send("execution_cached", {"nodes": []})
            for node_id, node in prompt.items():
                if self._interrupt.is_set():
                    raise _Interrupted()
                send("executing", {"node": node_id, "display_node": node_id})
                ui_out = self._run_node(node_id, node, send)
                if ui_out is not None:
                    ui[node_id] = ui_out
                    send("executed", {"node": node_id, "display_node": node_id, "output": ui_out})
            send("execution_success", {})
            return Outcome(True, False, ui, None, messages)
        except _Interrupted:
            data = {"prompt_id": prompt_id, "node_id": node_id, "node_type":
                    prompt[node_id]["class_type"] if node_id else None, "executed": []}
            send("execution_interrupted", data)
            return Outcome(False, True, {}, data, messages)
        except Exception as e:
            assert node_id is not None
            data = {"prompt_id": prompt_id, "node_id": node_id,
                    "node_type": prompt[node_id]["class_type"], "executed": [],
                    "exception_message": str(e), "exception_type": type(e).__name__,
                    "traceback": [], "current_inputs": {}, "current_outputs": []}
            send("execution_error", data)
            return Outcome(False, False, {}, data, messages)
        finally:
            sink("executing", {"node": None, "prompt_id": prompt_id})

    def _run_node(self, node_id: str, node: dict[str, Any], send: Sink) -> Any:
        kind = node["class_type"]
        self.executed.append(kind)
        if kind == "FakeFail":
            raise ValueError("fake node failed on purpose")
        if kind == "FakeWait":
            send("progress", {"value": 1, "max": 2, "node": node_id})
            self.running.set()
            while not self.gate.wait(0.01):
                if self._interrupt.is_set():
                    raise _Interrupted()
            send("progress", {"value": 2, "max": 2, "node": node_id})
        if kind == "FakeSave":
            sub, _, name = node["inputs"]["filename_prefix"].rpartition("/")
            folder = self.settings.comfy.output_path / sub
            folder.mkdir(parents=True, exist_ok=True)
            filename = f"{name}_00001_.png"
            Image.new("RGB", (2, 2), (10, 20, 30)).save(folder / filename)
            return {"images": [{"filename": filename, "subfolder": sub, "type": "output"}]}
        return None
