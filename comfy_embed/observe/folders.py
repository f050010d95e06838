"""Whether the folders the service writes are usable right now.

A full disk, a read-only remount or a vanished NAS must show in ``/ready``
(so a load balancer stops sending work) and clear by itself when the folder
is usable again: the probe writes, syncs and deletes a small file each time.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

log = logging.getLogger("comfy_embed")

__all__ = ["unusable_reason", "FolderProbe"]

#: Bytes written by a probe: enough that a full filesystem refuses it.
_PROBE_BYTES = 4096


def unusable_reason(folder: Path) -> str | None:
    """Why ``folder`` cannot take a new file now, as the OS error's text
    (None: it can). The path is left out: the caller names the folder."""
    probe = folder / f".probe-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        return e.strerror or type(e).__name__
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


class FolderProbe:
    """Checks several folders, at most once per ``interval`` seconds."""

    def __init__(self, folders: dict[str, Path], interval: float = 2.0) -> None:
        self.folders = folders
        self.interval = interval
        self._checked_at = float("-inf")
        self._reason: str | None = None

    def reason(self) -> str | None:
        """The first unusable folder, named by its role (public: ``/ready``
        answers it), as ``"<what> folder not writable (<error>)"``, or None.
        Its path goes to the server log, once each time the verdict changes."""
        now = time.monotonic()
        if now - self._checked_at >= self.interval:
            reason = None
            for what, folder in self.folders.items():
                why = unusable_reason(folder)
                if why:
                    reason = f"{what} folder not writable ({why})"
                    if reason != self._reason:
                        log.warning("%s folder %s is not writable: %s", what, folder, why)
                    break
            self._reason = reason
            self._checked_at = now
        return self._reason

    def suspect(self) -> None:
        """A write just failed: the next :meth:`reason` checks at once, and
        until then :attr:`last` says the folders are unusable."""
        self._checked_at = float("-inf")
        if self._reason is None:
            self._reason = "output folder not writable (a write failed)"

    @property
    def last(self) -> str | None:
        """The cached verdict, with no filesystem call (None: usable when last checked)."""
        return self._reason
