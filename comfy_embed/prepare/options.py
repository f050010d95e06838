"""What a caller asks of a run besides its graph: one typed, frozen object.

Built once where a request comes in (the HTTP query and headers, the CLI,
``run_workflow``'s keywords) and handed down unchanged: API -> service ->
engine -> task, which reads it when it assembles the result.

A webhook is not here: it is the service's business (delivered from the
task log), and the engine never reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comfy_embed.storage.credentials import Credentials

__all__ = ["DEFAULT_OPTIONS", "RunOptions"]


@dataclass(frozen=True)
class RunOptions:
    """How a run's outputs are delivered.

    The engine checks the values before anything is queued (an unknown
    ``output_format`` or a ``quality`` out of 1-100 is WorkflowInvalid).
    """

    #: Inline every output file as base64 (``output.base64``).
    output_base64: bool = False
    #: Upload every output file to the configured object storage (``output.oss``).
    output_oss: bool = False
    #: Re-encode still images to ``png``, ``jpeg`` or ``webp`` (None: as saved).
    output_format: str | None = None
    #: Encoder quality for ``output_format`` (1-100; None: the encoder's default).
    quality: int | None = None
    #: The caller's own storage credentials (Function Compute's request
    #: headers): used for ``oss://`` inputs and uploads instead of the server's.
    credentials: Credentials | None = None
    #: Whose Comfy API v2 assets ``core/ASSET`` references may name (the
    #: API key's hash, or "anonymous"); None: a run that takes none (FC API).
    asset_owner: str | None = None
    #: Its fair-share key (comfy_embed.scheduling): the hash of the API key it
    #: was sent with, set by the task service; "": none (one FIFO).
    key: str = ""
    #: ``time.monotonic()`` by which the run must have finished (``X-Deadline``,
    #: ``?deadline=``): refused at once when the ETA says it cannot
    #: (DeadlineUnmeetable), dropped if still queued when it passes. None: none.
    deadline: float | None = None
    #: Run the graph this many times with fresh seeds, or once per entry of
    #: a tuple of seeds (an int for every seed input, or ``{node_id: seed}``);
    #: None: one plain run. ``extra_data.variants`` asks the same (this wins).
    #: See :mod:`comfy_embed.variants`.
    variants: int | tuple[Any, ...] | None = None

    @property
    def renders_inline(self) -> bool:
        """Whether the result can be assembled on the spot, with no upload
        or re-encoding to await."""
        return not self.output_oss and not self.output_format


#: A run that asks for nothing special (frozen: one object serves every such run).
DEFAULT_OPTIONS = RunOptions()
