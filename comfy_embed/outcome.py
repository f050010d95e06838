"""What one execution left behind, and the sink its messages go to.

They belong to the executor (:mod:`comfy_embed.executor` re-exports both and
fills in :attr:`Outcome.files`). They live in this tiny module because the
ComfyUI boundary builds them too, and the import graph points one way
(``executor -> _comfy``): ``_comfy`` may not import the executor.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from comfy_embed.results import OutputFile

__all__ = ["Outcome", "PendingWrite", "Sink"]

#: Receives every message ComfyUI sends for the running prompt: (type, data).
Sink = Callable[[str, dict], None]


@dataclass(eq=False)
class PendingWrite:
    """An output file still being encoded off the executor thread: its
    ``future`` ends when the file is written (or raises why it is not)."""

    node_id: str
    node_type: str
    path: Path
    future: Future[None]


@dataclass
class Outcome:
    """What one execution left behind."""

    success: bool
    interrupted: bool
    #: ``{node_id: ui_output}`` as in ComfyUI's history.
    outputs: dict[str, Any]
    #: The ``execution_error`` message data, when the run failed.
    error: dict[str, Any] | None = None
    messages: list[tuple[str, dict]] = field(default_factory=list)
    #: The output files with their absolute folders, resolved by the
    #: executor thread after a successful run (the backend knows the folders).
    files: list[OutputFile] = field(default_factory=list)
    #: Output files still being encoded in the pool (comfy_embed._comfy.writes):
    #: the executor answers the job once they are all written.
    writes: list[PendingWrite] = field(default_factory=list)
