"""Reading this process's memory: resident set now and at its peak, and CUDA.

Cheap enough to call per job (a few microseconds on Linux: /proc reads, no
psutil object). The peak is Linux's high-water mark (``VmHWM``), which
``reset_peak_rss`` sets back to the current RSS so that one job's peak can be
measured; where /proc is missing the figures fall back to psutil and the
peak to the larger of the readings taken.
"""

from __future__ import annotations

import os
import sys

__all__ = ["rss_bytes", "reset_peak_rss", "peak_rss_bytes", "cuda_in_use",
           "reset_peak_vram", "peak_vram_bytes", "vram_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HAS_PROC = os.path.exists("/proc/self/statm")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    if _HAS_PROC:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    import psutil
    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Set the peak RSS back to the current RSS; False if the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS only (proc(5), Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak RSS since start or since the last :func:`reset_peak_rss`."""
    if _HAS_PROC:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    return rss_bytes()


def cuda_in_use() -> bool:
    """Whether torch is imported and has initialised CUDA (never initialise it here)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def reset_peak_vram() -> None:
    if cuda_in_use():
        sys.modules["torch"].cuda.reset_peak_memory_stats()


def peak_vram_bytes() -> int | None:
    """Peak CUDA memory allocated since the last :func:`reset_peak_vram`; None off CUDA."""
    if not cuda_in_use():
        return None
    return int(sys.modules["torch"].cuda.max_memory_allocated())


def vram_bytes() -> tuple[int, int] | None:
    """(allocated, reserved) CUDA memory now; None off CUDA."""
    if not cuda_in_use():
        return None
    cuda = sys.modules["torch"].cuda
    return int(cuda.memory_allocated()), int(cuda.memory_reserved())
