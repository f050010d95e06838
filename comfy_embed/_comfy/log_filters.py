"""Filters for the records ComfyUI logs through the root logger: one line for
the optional node modules that did not import, and short records instead of
whole state-dict key lists."""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["QuietImportFailures", "ShortRecords"]


class QuietImportFailures(logging.Filter):
    """ComfyUI logs a traceback and a 'pip install' plea for every optional
    node module whose package is missing (the audio nodes without
    torchaudio). Collect those into one line instead; other records pass."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.levelno != logging.WARNING or record.name != "root":
            return True
        if "torchaudio missing" in msg:
            self.failed.add("torchaudio")
            return False
        if "No module named" in msg or "IMPORT FAILED" in msg:
            name = msg.split("IMPORT FAILED:")[-1].strip() if "IMPORT FAILED" in msg else ""
            if name:
                self.failed.add(name)
            return False
        return not any(x in msg for x in ("nodes did not import correctly", "new missing dependencies",
                                          "pip install -r requirements", "Traceback"))\
            and msg.strip() != ""

    def __enter__(self) -> "QuietImportFailures":
        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeFilter(self)


#: Python reprs of string lists, as ComfyUI prints missing / unexpected keys.
_KEY_LIST = re.compile(r"\[(?:'[^'\n]*',\s*)+'[^'\n]*'\]")


class ShortRecords(logging.Filter):
    """ComfyUI logs whole state-dict key lists ('Missing VAE keys [...]' is
    60 names for the tiny checkpoint, thousands for a mismatched model): keep
    the first names and the count, and cap any other record from ComfyUI, so
    one log line stays readable in a terminal and a log pipeline."""

    def __init__(self, limit: int = 600, keep: int = 3) -> None:
        super().__init__()
        self.limit, self.keep = limit, keep

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root":  # ComfyUI logs through the root logger
            return True
        if getattr(record, "comfy_embed_short", False):
            return True  # another instance of this filter did it already
        record.comfy_embed_short = True
        msg = record.getMessage()
        if len(msg) <= self.limit:
            return True
        msg = _KEY_LIST.sub(self._shorten, msg)
        # Per line: a traceback stays whole, one endless line does not.
        msg = "\n".join(line if len(line) <= self.limit else
                        f"{line[:self.limit]}... ({len(line) - self.limit} more characters)"
                        for line in msg.split("\n"))
        record.msg, record.args = msg, None
        return True

    def _shorten(self, match: re.Match[str]) -> str:
        names = re.findall(r"'([^'\n]*)'", match.group(0))
        if len(names) <= self.keep:
            return match.group(0)
        return f"[{', '.join(names[:self.keep])}, ... {len(names) - self.keep} more]"
