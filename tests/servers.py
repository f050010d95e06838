"""Real comfy-embed server processes on 127.0.0.1 for the API tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``python server.py`` with COMFY_EMBED_* settings; waits for /ready."""

    def __init__(self, base: Path, raw_env: dict[str, str] | None = None, **env: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/api/serverless/ws"
        base.mkdir(parents=True, exist_ok=True)
        #: The output folder: what a result's ``comfy.dir`` is relative to.
        self.output_dir = Path(env["output_dir"]) if "output_dir" in env else base / "output"
        self.log_path = base / f"server-{self.port}.log"
        full = {**os.environ, "COMFY_EMBED_BASE_DIR": str(base), "COMFY_EMBED_HOST": "127.0.0.1",
                "COMFY_EMBED_PORT": str(self.port), "COMFY_EMBED_TINY_CHECKPOINT": "1",
                "COMFY_EMBED_DEVICE": "cpu",
                "COMFY_EMBED_CACHE_DIR": str(Path.home() / ".cache" / "comfy-embed")}
        full.update({f"COMFY_EMBED_{k.upper()}": str(v) for k, v in env.items()})
        full.update(raw_env or {})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "server.py"], cwd=ROOT, env=full,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180, headers: dict[str, str] | None = None) -> "Server":
        """Poll /ready (with ``headers``, e.g. an API key) until it answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/ready", headers=headers, timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)  # polling a process that is booting: bounded by the deadline
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()}")

    def file_of(self, comfy: dict[str, Any]) -> Path:
        """The file a result's ``output.comfy`` names on this server."""
        return self.output_dir / comfy["dir"] / comfy["subfolder"] / comfy["filename"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def run(self, graph: Any, params: str = "", headers: dict[str, str] | None = None,
            **kw: Any) -> requests.Response:
        return requests.post(f"{self.url}/api/serverless/run{params}", json=graph,
                             headers=headers or {}, timeout=120, **kw)

    def status(self, task_id: str, since: int = 0) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/serverless/status",
                         params={"task_id": task_id, "since": since}, timeout=10)
        r.raise_for_status()
        return r.json()

    def wait_final(self, task_id: str, timeout: float = 120) -> list[dict[str, Any]]:
        """Poll status until the last event is serverless_api, as clients do."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.status(task_id)
            if events and events[-1]["type"] == "serverless_api":
                return events
            time.sleep(0.1)
        raise TimeoutError(f"task {task_id} has no final event after {timeout}s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
