"""Custom-node packs: their prestartup scripts and their loading, one pack at
a time, so that each failure is known by name.

Nothing here imports ComfyUI: ``_comfy.py`` passes in ComfyUI's ``nodes``
module and its event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["PackStatus", "load_packs", "run_prestartup_scripts"]


@dataclass
class PackStatus:
    """How one custom-node pack (a folder or file in custom_nodes) loaded."""

    name: str
    path: str
    loaded: bool
    seconds: float
    #: Node classes the pack added.
    nodes: int = 0
    #: The last line of the import error (the traceback is logged once).
    error: str | None = None
    #: Whether its prestartup_script.py ran (None: it has none).
    prestartup: bool | None = None


def load_packs(nodes: Any, folders: list[str], prestartup: dict[str, bool],
               loop: asyncio.AbstractEventLoop) -> list[PackStatus]:
    """Load every pack as native ComfyUI does, one by one, so that each
    failure is known by name: its traceback is logged once, and the
    summary (and /ready) name it."""
    base = set(nodes.NODE_CLASS_MAPPINGS)
    packs: list[PackStatus] = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(os.path.realpath(folder))):
            path = os.path.join(folder, entry)
            if entry == "__pycache__" or entry.startswith(".") or entry.endswith(".disabled"):
                continue
            if os.path.isfile(path) and not entry.endswith(".py"):
                continue
            before = set(nodes.NODE_CLASS_MAPPINGS)
            t = time.perf_counter()
            with _Captured() as captured:
                ok = loop.run_until_complete(
                    nodes.load_custom_node(path, base, module_parent="custom_nodes"))
            status = PackStatus(entry, path, bool(ok), time.perf_counter() - t,
                                nodes=len(set(nodes.NODE_CLASS_MAPPINGS) - before),
                                prestartup=prestartup.get(path))
            if not ok:
                status.error = captured.reason() or "the pack did not load"
                log.warning("custom node pack %s failed to load:\n%s", entry,
                            captured.text() or status.error)
            elif captured.lines:
                log.debug("custom node pack %s logged while loading:\n%s", entry, captured.text())
            packs.append(status)
    loaded = [p for p in packs if p.loaded]
    failed = [p for p in packs if not p.loaded]
    log.info("custom node packs: %d loaded%s%s", len(loaded),
             " (" + ", ".join(f"{p.name}: {p.nodes} nodes" for p in loaded) + ")" if loaded else "",
             "; FAILED: " + ", ".join(f"{p.name} ({p.error})" for p in failed) if failed else "")
    return packs


class _Captured(logging.Handler):
    """Collects what ComfyUI logs while one pack loads (its traceback), so it
    can be logged once under the pack's name."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def text(self) -> str:
        return "\n".join(self.lines).strip()

    def reason(self) -> str | None:
        """The last line of the traceback: the exception itself."""
        for line in reversed(self.text().splitlines()):
            line = line.strip()
            if line and not line.startswith(("Cannot import", "Traceback")):
                return line[:300]
        return None

    def __enter__(self) -> "_Captured":
        root = logging.getLogger()
        root.addHandler(self)
        # Keep ComfyUI's own copy of the traceback off the console.
        self._quiet = _Silence(self)
        for handler in root.handlers:
            if handler is not self:
                handler.addFilter(self._quiet)
        return self

    def __exit__(self, *exc: Any) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        for handler in root.handlers:
            handler.removeFilter(self._quiet)


class _Silence(logging.Filter):
    """Drops root warnings that a :class:`_Captured` collects."""

    def __init__(self, captured: _Captured) -> None:
        super().__init__()
        self.captured = captured

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.levelno >= logging.WARNING)


def run_prestartup_scripts(folders: list[str]) -> dict[str, bool]:
    """Run each pack's ``prestartup_script.py`` (as native main.py does before
    importing nodes); ``{pack_path: succeeded}``."""
    ran: dict[str, bool] = {}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            script = os.path.join(path, "prestartup_script.py")
            if entry.endswith(".disabled") or not os.path.isfile(script):
                continue
            try:
                spec = importlib.util.spec_from_file_location(os.path.splitext(script)[0], script)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                ran[path] = True
            except Exception:
                log.warning("prestartup script of custom node pack %s failed:\n%s",
                            entry, traceback.format_exc())
                ran[path] = False
    return ran
