"""Reading this process's memory: resident set now and at its peak, and CUDA.

Cheap enough to call per job on the executor thread (one to eight
microseconds on Linux): the /proc files stay open and are re-read with
``pread``, rather than opened, wrapped in a file object and closed each time
(10-18 us a call, more under load; py-spy put ~75 us of GIL time per job in
``reset_peak_rss`` alone at 8 clients).

The peak is Linux's high-water mark (``VmHWM``), which ``reset_peak_rss``
sets back to the current RSS so that one job's peak can be measured; where
/proc is missing the figures fall back to psutil and the peak to the larger
of the readings taken.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

__all__ = ["rss_bytes", "reset_peak_rss", "peak_rss_bytes", "cuda_in_use",
           "reset_peak_vram", "peak_vram_bytes", "vram_bytes", "keep_freed_heap", "trim_heap"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HAS_PROC = os.path.exists("/proc/self/statm")


class _ProcFile:
    """One /proc/self file held open; reopened after a fork (/proc/self was
    resolved to the parent's pid when it was opened)."""

    def __init__(self, name: str, flags: int) -> None:
        self.name, self.flags = name, flags
        self._fd: int | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def fd(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            with self._lock:
                if self._fd is None or self._pid != pid:
                    # After a fork the inherited fd is the parent's file: leave it
                    # to the parent and open our own.
                    self._fd = os.open(f"/proc/self/{self.name}", self.flags | os.O_CLOEXEC)
                    self._pid = pid
        return self._fd

    def read(self, size: int = 4096) -> bytes:
        return os.pread(self.fd(), size, 0)  # a /proc file is regenerated at offset 0


_STATM = _ProcFile("statm", os.O_RDONLY)
_STATUS = _ProcFile("status", os.O_RDONLY)
_CLEAR_REFS = _ProcFile("clear_refs", os.O_WRONLY)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    if _HAS_PROC:
        return int(_STATM.read(256).split()[1]) * _PAGE
    import psutil
    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Set the peak RSS back to the current RSS; False if the OS cannot."""
    if not _HAS_PROC:
        return False
    try:
        os.write(_CLEAR_REFS.fd(), b"5")  # 5: reset the peak RSS only (proc(5), Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak RSS since start or since the last :func:`reset_peak_rss`."""
    if _HAS_PROC:
        data = _STATUS.read(8192)
        at = data.find(b"VmHWM:")
        if at >= 0:
            return int(data[at + 6:data.index(b"\n", at)].split()[0]) * 1024
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


# ------------------------------------------------------------ the C heap
#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest mmap threshold glibc accepts on 64-bit (half its heap size).
_MMAP_THRESHOLD_MAX = 32 * 2**20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's name; musl has no such file
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_heap(keep_bytes: int) -> bool:
    """Let glibc keep up to ``keep_bytes`` of freed memory in its heaps for
    the next job, and serve buffers under 32 MiB from them; False where this
    is not glibc (or ``keep_bytes`` is 0).

    By default glibc hands a freed image buffer back to the OS at once
    (trimming the heap, or unmapping it) and the next job page-faults the
    same amount afresh: in some processes, depending on which heap the
    executor thread draws from, about 9,000 faults and +20 ms for one
    1024x1024 image (benchmarks/RESULTS.md, issue 14). Setting the trim
    threshold turns off glibc's sliding mmap threshold, so both are set.
    """
    libc = _glibc()
    if libc is None or keep_bytes <= 0:
        return False
    keep = min(keep_bytes, 2**31 - 1)  # mallopt takes an int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                and libc.mallopt(_M_TRIM_THRESHOLD, keep))


def trim_heap() -> None:
    """Give the C heap's free memory back to the OS now (glibc's
    ``malloc_trim``), so that what :func:`keep_freed_heap` keeps does not
    count against a memory watermark."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
