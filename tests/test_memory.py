"""The /proc readers in comfy_embed.memory: they keep their files open, so
they must still read fresh figures each call, and a forked child must read
its own process, not the parent's."""

import os

import pytest

from comfy_embed import memory

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
