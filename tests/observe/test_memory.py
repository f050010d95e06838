"""The /proc readers in comfy_embed.observe.memory: they keep their files open, so
they must still read fresh figures each call, and a forked child must read
its own process, not the parent's."""

import os

import pytest

from comfy_embed.observe import memory

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux /proc")


def test_figures_are_read_fresh_each_call() -> None:
    assert memory.reset_peak_rss()
    before = memory.rss_bytes()
    block = bytearray(64 * 1024 * 1024)  # touched: zero pages are still written by bytearray
    block[::4096] = b"x" * len(block[::4096])
    assert memory.rss_bytes() > before + 32 * 1024 * 1024
    peak = memory.peak_rss_bytes()
    assert peak >= memory.rss_bytes() - 1024 * 1024
    del block
    assert memory.rss_bytes() < peak - 32 * 1024 * 1024
    assert memory.peak_rss_bytes() > peak - 1024 * 1024  # the high-water mark stays
    assert memory.reset_peak_rss()
    assert memory.peak_rss_bytes() < peak - 32 * 1024 * 1024  # and resets


def test_a_forked_child_reads_its_own_process() -> None:
    memory.rss_bytes(), memory.peak_rss_bytes()  # the parent's files are open
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: grow by 64 MB and report what it reads before and after
        try:
            os.close(read)
            before = memory.rss_bytes()
            block = bytearray(64 * 1024 * 1024)
            block[::4096] = b"x" * len(block[::4096])
            os.write(write, f"{before} {memory.rss_bytes()} {memory.peak_rss_bytes()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    before, after, peak = map(int, os.read(read, 100).split())
    os.close(read)
    os.waitpid(pid, 0)
    # Read through the parent's files, the child would have seen the parent,
    # which did not grow.
    assert after > before + 32 * 1024 * 1024
    assert peak >= after - 1024 * 1024


_HEAP_CYCLES = """
import resource, sys
from comfy_embed.observe import memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_heap(512 << 20)
else:
    assert not memory.keep_freed_heap(0)

def job():  # a job's image buffers: allocated, touched, freed
    buffers = [bytearray(900 << 10) for _ in range(3)]
    for b in buffers:
        b[::4096] = b"x" * len(range(0, len(b), 4096))

warm = bytearray(1 << 20)
del warm  # glibc's sliding thresholds now: mmap at 1 MiB, trim at 2 MiB
job()
before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
for _ in range(20):
    job()
print((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 20)
"""


def _faults_per_job(mode: str) -> float:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _HEAP_CYCLES, mode], capture_output=True,
                         text=True, timeout=60, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's mallopt")
def test_kept_heap_serves_the_next_jobs_buffers_without_page_faults() -> None:
    # glibc by default trims the heap after each job (2.7 MiB freed is over
    # its 2 MiB trim threshold), so each job faults its pages in again.
    assert _faults_per_job("default") > 300
    assert _faults_per_job("keep") < 20


_KEEP_THEN_TRIM = """
from comfy_embed.observe import memory
assert memory.keep_freed_heap(512 << 20)
buffers = [bytearray(1 << 20) for _ in range(40)]
for b in buffers:
    b[::4096] = b"x" * len(range(0, len(b), 4096))
before = memory.rss_bytes()
del buffers, b
kept = memory.rss_bytes()
memory.trim_heap()
print(before >> 20, kept >> 20, memory.rss_bytes() >> 20)
"""


@pytest.mark.skipif(memory._glibc() is None, reason="glibc's malloc_trim")
def test_trim_heap_gives_the_kept_memory_back() -> None:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _KEEP_THEN_TRIM], capture_output=True,
                         text=True, timeout=60, check=True)
    before, kept, trimmed = (int(x) for x in out.stdout.split())
    assert kept > before - 8  # 40 MiB freed, kept by the heap
    assert trimmed < kept - 32  # and given back
