"""What a newcomer sees: ``comfy-embed demo`` / ``run`` on a terminal show one
progress bar (ours, not ComfyUI's tqdm bar interleaved with it) and no
multi-kilobyte log lines. Run on a pseudo-terminal, as a user would."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.conftest import text_to_image

ROOT = Path(__file__).resolve().parent.parent
#: tqdm's bar: " 50%|█████     | 2/4 [00:01<00:01,  1.9it/s]".
TQDM = re.compile(r"\d+%\||it/s\]|s/it\]")


def run_on_terminal(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str]:
    """Run a command with stdin/stdout/stderr on a 100x30 pseudo-terminal
    (tqdm draws nothing without a terminal width); return (rc, output)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=follower, stdout=follower,
                            stderr=follower, close_fds=True, start_new_session=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    return rc, b"".join(chunks).decode("utf-8", "replace")


def _env(tmp_path: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
            "COMFY_EMBED_BASE_DIR": str(tmp_path / "data"), "COMFY_EMBED_DEVICE": "cpu",
            "COMFY_EMBED_TINY_CHECKPOINT": "true", "TERM": "xterm"}


def check_clean_output(output: str, steps: int) -> None:
    """No tqdm bar, our bar at ``steps``/``steps``, KSampler named, short lines."""
    assert not TQDM.search(output), f"ComfyUI's tqdm bar is on the terminal:\n{output[-3000:]}"
    # Our bar, redrawn in place with carriage returns, reaching the last step.
    bars = re.findall(r"\[[#.]{30}\] (\d+)/(\d+)", output)
    assert bars and bars[-1] == (str(steps), str(steps)), output[-3000:]
    assert "running node 3 (KSampler)" in output
    # The tiny checkpoint carries every VAE key ComfyUI expects.
    assert "Missing VAE keys" not in output
    lines = re.split(r"[\r\n]+", output)
    longest = max(lines, key=len)
    assert len(longest) < 400, f"a {len(longest)}-character line: {longest[:300]}..."


@pytest.mark.server  # boots real ComfyUI in a subprocess
def test_run_on_a_terminal_shows_one_progress_bar_and_short_lines(tmp_path: Path) -> None:
    # `comfy-embed demo` (scripts/demo) is checked the same way in test_readme.
    steps = 3
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(text_to_image(steps=steps, size=64)))
    args = [sys.executable, "-m", "comfy_embed.cli", "run", str(wf), "--out", str(tmp_path / "out")]
    rc, output = run_on_terminal(args, _env(tmp_path))
    assert rc == 0, output[-3000:]
    check_clean_output(output, steps)
    assert [p.suffix for p in (tmp_path / "out").iterdir()] == [".png"]


def test_long_comfyui_log_records_are_shortened() -> None:
    """Key lists keep three names and a count; any other endless line is cut;
    tracebacks (many short lines) and other loggers' records stay whole."""
    import logging

    from comfy_embed._comfy.log_filters import ShortRecords as _ShortRecords

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    # Two instances (as when ComfyUI was booted in this process before):
    # a record is shortened once, not cut again.
    root, handler, short, again = logging.getLogger(), Keep(), _ShortRecords(), _ShortRecords()
    root.addHandler(handler)
    root.addFilter(short)
    root.addFilter(again)
    try:
        keys = [f"taesd_encoder.{i}.weight" for i in range(60)]
        logging.warning("Missing VAE keys %s", keys)
        logging.warning("x" * 5000)
        trace = "Traceback (most recent call last):\n" + "\n".join(f"  line {i}" for i in range(200))
        logging.error(trace)
        logging.getLogger("comfy_embed.other").warning("y" * 5000)
    finally:
        root.removeFilter(short)
        root.removeFilter(again)
        root.removeHandler(handler)
    assert seen[0] == ("Missing VAE keys [taesd_encoder.0.weight, taesd_encoder.1.weight, "
                       "taesd_encoder.2.weight, ... 57 more]")
    assert seen[1] == "x" * 600 + "... (4400 more characters)"
    assert seen[2] == trace
    assert seen[3] == "y" * 5000
