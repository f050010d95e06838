"""Shared by the benchmark scripts: machine description, percentiles, the
graphs, starting comfy-embed and native ComfyUI servers on 127.0.0.1, and the
two clients (comfy-embed's one call; native's /prompt + /ws + /history + /view).

Nothing here asserts on time: the scripts print figures beside a baseline
measured in the same run. Every server runs in its own process group and is
killed with it, whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMFYUI = ROOT / "vendor" / "ComfyUI"
PYTHON = sys.executable
DEFAULT_CACHE = Path(os.environ.get("COMFY_EMBED_CACHE_DIR") or
                     os.path.expanduser("~/.cache/comfy-embed"))
TINY = "tiny-sd15.safetensors"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------- machine
def _git(*args: str, cwd: Path = ROOT) -> str:
    try:
        return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return "?"


def _tree_dirty() -> bool:
    """Whether tracked files differ from HEAD; True when git cannot tell (a
    figure is only recorded from a tree known to be clean)."""
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
    except Exception:
        return True
    return r.returncode != 0 or bool(r.stdout.strip())


def describe_machine() -> dict[str, Any]:
    """CPU, cores, memory, GPU, torch, ComfyUI and comfy-embed commits."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "?"
    mem_gb = None
    try:
        import psutil
        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    import torch
    gpu = None
    gpu_sms = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB) x{torch.cuda.device_count()}"
        gpu_sms = p.multi_processor_count  # tells an H100 PCIe (114) from an SXM (132)
    dirty = _tree_dirty()
    return {"cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gb": mem_gb, "gpu": gpu, "gpu_sms": gpu_sms, "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "comfyui_commit": _git("rev-parse", "HEAD", cwd=COMFYUI),
            "comfy_embed_commit": _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")}


def print_machine(m: dict[str, Any]) -> None:
    print("machine:")
    for k, v in m.items():
        print(f"  {k:<18} {v}")
    sys.stdout.flush()


# ------------------------------------------------------------------ figures
def percentile(values: Iterable[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100) of a non-empty sample."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """n, p50, p95, mean, min in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2),
            "p95_ms": round(percentile(ms, 95), 2),
            "mean_ms": round(sum(ms) / len(ms), 2) if ms else float("nan"),
            "min_ms": round(min(ms), 2) if ms else float("nan")}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)


def emit_json(payload: dict[str, Any]) -> None:
    """The last line of every script: one line of JSON."""
    sys.stdout.flush()
    print(json.dumps(payload, separators=(",", ":"), default=str))
    sys.stdout.flush()


# ------------------------------------------------------------------- graphs
def image_graph(i: int, size: int = 512, prefix: str = "bench") -> dict[str, Any]:
    """EmptyImage -> ImageInvert -> SaveImage; the colour varies with ``i`` so
    that ComfyUI's output cache never answers a request without work."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": size, "height": size, "batch_size": 1,
                         "color": (i * 2654435761 + 12345) % 0xFFFFFF}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["2", 0]}},
    }


def t2i_graph(i: int, size: int = 64, steps: int = 4, batch: int = 1, cfg: float = 8.0,
              ckpt: str = TINY, sampler: str = "euler") -> dict[str, Any]:
    """The default text-to-image graph (comfy_embed/examples/text_to_image.json)
    with seed ``1000 + i`` (varies per request, same on every path)."""
    g = json.loads((ROOT / "comfy_embed" / "examples" / "text_to_image.json").read_text())
    g["3"]["inputs"].update(seed=1000 + i, steps=steps, cfg=cfg, sampler_name=sampler)
    g["4"]["inputs"]["ckpt_name"] = ckpt
    g["5"]["inputs"].update(width=size, height=size, batch_size=batch)
    return g


GRAPHS: dict[str, Callable[[int], dict[str, Any]]] = {"image512": image_graph, "t2i_tiny": t2i_graph}


# --------------------------------------------------------- tiny checkpoint
def ensure_tiny_checkpoint(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Build comfy-embed's tiny random-weights checkpoint once (in a child
    process: ComfyUI boots once per process)."""
    path = cache_dir / TINY
    if path.exists():
        return path
    print(f"building {path} (once) ...", flush=True)
    code = ("from comfy_embed.config import Settings\n"
            "from comfy_embed._comfy.comfy import Comfy\n"
            "from comfy_embed._comfy.checkpoint import ensure_tiny_checkpoint\n"
            "import sys, tempfile\n"
            "s = Settings.from_env(base_dir=tempfile.mkdtemp(), cache_dir=sys.argv[1], device='cpu')\n"
            "ensure_tiny_checkpoint(Comfy.boot(s), s)\n")
    subprocess.run([PYTHON, "-c", code, str(cache_dir)], cwd=ROOT, check=True, timeout=600)
    return path


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A child process in its own process group, its output in ``log_path``.

    ``timestamps``: the output is piped through a thread of this process
    that keeps every line with the time it arrived (seconds since spawn:
    :attr:`lines`, for start-up breakdowns). Otherwise the child writes the
    file itself: a reader thread here would wake on every server log line
    and take this process's GIL from the client being timed.
    """

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None,
                 log_path: Path | None = None, timestamps: bool = False) -> None:
        self.name, self.port = name, port
        #: The server's base folder (input/, output/ ... under it).
        self.base: Path | None = None
        self._stamped: list[tuple[float, str]] = []
        self._path = log_path
        self._timestamps = timestamps or log_path is None
        self._log = open(log_path, "w") if log_path else None
        self.t0 = time.perf_counter()
        out = subprocess.PIPE if self._timestamps else self._log
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})},
                                     stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        if self._timestamps:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            t = time.perf_counter() - self.t0
            line = raw.decode("utf-8", "replace").rstrip()
            self._stamped.append((t, line))
            if self._log:
                self._log.write(f"{t:8.3f} {line}\n")
                self._log.flush()

    @property
    def lines(self) -> list[tuple[float, str]]:
        """Output lines so far, with their arrival times (NaN without ``timestamps``)."""
        if self._timestamps:
            return list(self._stamped)
        assert self._path is not None
        text = self._path.read_text(encoding="utf-8", errors="replace")
        return [(math.nan, line) for line in text.splitlines()]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def first_line(self, needle: str) -> float | None:
        """Seconds from spawn to the first output line containing ``needle``
        (needs ``timestamps``)."""
        for t, line in self.lines:
            if needle in line:
                return t
        return None

    def wait_http(self, path: str, timeout: float = 300.0, interval: float = 0.01) -> float:
        """Poll GET ``path`` until 200; seconds since spawn."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n" + self.tail())
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", path)
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(interval)
        raise TimeoutError(f"{self.name}: GET {path} not 200 after {timeout}s\n" + self.tail())

    def tail(self, n: int = 30) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def rss_mb(self) -> float:
        """Resident memory of the server process (children included)."""
        import psutil
        p = psutil.Process(self.pid)
        total = p.memory_info().rss
        for c in p.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._timestamps:
            self._reader.join(2)
        if self._log:
            self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_embed(workdir: Path, *, cache_dir: Path = DEFAULT_CACHE, env: dict[str, str] | None = None,
                args: list[str] | None = None, device: str = "cpu", timestamps: bool = False) -> Server:
    """comfy-embed's container entry point (``python server.py``) on 127.0.0.1;
    ``args`` replaces it (e.g. ``["benchmarks/embed_server.py"]``)."""
    port = free_port()
    base = workdir / f"embed-{port}"
    base.mkdir(parents=True, exist_ok=True)
    e = {"COMFY_EMBED_BASE_DIR": str(base), "COMFY_EMBED_HOST": "127.0.0.1",
         "COMFY_EMBED_PORT": str(port), "COMFY_EMBED_TINY_CHECKPOINT": "1",
         "COMFY_EMBED_CACHE_DIR": str(cache_dir), "COMFY_EMBED_DEVICE": device,
         "PYTHONUNBUFFERED": "1"}
    e.update(env or {})
    srv = Server("comfy-embed", [PYTHON, *(args or ["server.py"])], port, e,
                 workdir / f"embed-{port}.log", timestamps)
    srv.base = base
    return srv


def start_native(workdir: Path, *, models_dir: Path = DEFAULT_CACHE, cpu: bool = True,
                 extra_args: list[str] | None = None, timestamps: bool = False) -> Server:
    """Native ComfyUI (vendor/ComfyUI/main.py) on 127.0.0.1 with temp folders,
    no custom or API nodes, checkpoints read from ``models_dir``."""
    port = free_port()
    base = workdir / f"native-{port}"
    fe = base / "frontend"  # empty: main.py exits without a frontend package or root
    fe.mkdir(parents=True, exist_ok=True)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"bench:\n  base_path: {models_dir}\n  checkpoints: .\n")
    cmd = [PYTHON, str(COMFYUI / "main.py"), "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--front-end-root", str(fe),
           "--disable-all-custom-nodes", "--disable-api-nodes", "--disable-auto-launch",
           "--extra-model-paths-config", str(yaml), "--database-url", "sqlite:///:memory:"]
    if cpu:
        cmd.append("--cpu")
    cmd += extra_args or []
    srv = Server("native", cmd, port, {"PYTHONUNBUFFERED": "1"}, workdir / f"native-{port}.log",
                 timestamps)
    srv.base = base
    return srv


def workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"comfy-embed-bench-{prefix}-"))


# ------------------------------------------------------------------ clients
class Http:
    """One keep-alive HTTP/1.1 connection (what a serious client keeps)."""

    def __init__(self, port: int, timeout: float = 600.0) -> None:
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class RequestFailed(Exception):
    pass


class EmbedClient:
    """comfy-embed: one POST /api/serverless/run?output_base64=true; the
    image bytes come back inline."""

    def __init__(self, port: int) -> None:
        self.http = Http(port)

    def run(self, graph: dict[str, Any], task_id: str | None = None) -> dict[str, Any]:
        """Returns {"images": [bytes, ...]}; raises RequestFailed."""
        headers = {"Content-Type": "application/json"}
        if task_id:
            headers["X-Task-Id"] = task_id
        status, body = self.http.request("POST", "/api/serverless/run?output_base64=true",
                                         json.dumps(graph).encode(), headers)
        final = json.loads(body)
        if status != 200 or final.get("data", {}).get("status") != "success":
            raise RequestFailed(f"HTTP {status}: {body[:500]!r}")
        return {"images": [base64.b64decode(r["output"]["base64"]["data"])
                           for r in final["data"]["results"]]}

    def run_stream(self, graph: dict[str, Any]) -> dict[str, Any]:
        """stream=true: every event with its arrival time (for it/s)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http.port, timeout=self.http.timeout)
        try:
            conn.request("POST", "/api/serverless/run?output_base64=true&stream=true",
                         body=json.dumps(graph).encode(), headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            events: list[tuple[float, dict[str, Any]]] = []
            final: dict[str, Any] = {}
            while True:
                line = r.readline()  # de-chunks
                if not line:
                    break
                if line.startswith(b"data: "):
                    ev = json.loads(line[6:])
                    events.append((time.perf_counter(), ev))
                    if ev.get("type") == "serverless_api":
                        final = ev
                        break
        finally:
            conn.close()
        if final.get("data", {}).get("status") != "success":
            raise RequestFailed(f"stream ended with {json.dumps(final)[:500]}")
        images = [base64.b64decode(x["output"]["base64"]["data"]) for x in final["data"]["results"]]
        return {"images": images, "events": events}

    def close(self) -> None:
        self.http.close()


class NativeClient:
    """What a native ComfyUI API user does: keep /ws?clientId= open, POST
    /prompt, wait for ``executing`` with ``node: null`` for the prompt, GET
    /history/<id>, then GET /view for every image."""

    def __init__(self, port: int, timeout: float = 600.0) -> None:
        import websocket  # websocket-client

        self.port = port
        self.client_id = uuid.uuid4().hex
        self.http = Http(port, timeout)
        self.ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}/ws?clientId={self.client_id}", timeout=timeout)

    def run(self, graph: dict[str, Any]) -> dict[str, Any]:
        body = json.dumps({"prompt": graph, "client_id": self.client_id}).encode()
        status, raw = self.http.request("POST", "/prompt", body, {"Content-Type": "application/json"})
        if status != 200:
            raise RequestFailed(f"/prompt HTTP {status}: {raw[:500]!r}")
        prompt_id = json.loads(raw)["prompt_id"]
        events: list[tuple[float, dict[str, Any]]] = []
        error = None
        while True:
            msg = self.ws.recv()
            if not isinstance(msg, str):
                continue  # binary previews
            ev = json.loads(msg)
            data = ev.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            events.append((time.perf_counter(), ev))
            if ev["type"] == "execution_error":
                error = data
            if ev["type"] == "executing" and data.get("node") is None:
                break
        if error:
            raise RequestFailed(f"execution_error: {error.get('exception_message')}")
        status, raw = self.http.request("GET", f"/history/{prompt_id}")
        if status != 200:
            raise RequestFailed(f"/history HTTP {status}")
        entry = json.loads(raw)[prompt_id]
        images = []
        for node_out in entry["outputs"].values():
            for img in node_out.get("images", []):
                q = urllib.parse.urlencode({"filename": img["filename"],
                                            "subfolder": img.get("subfolder", ""),
                                            "type": img.get("type", "output")})
                st, data = self.http.request("GET", f"/view?{q}")
                if st != 200:
                    raise RequestFailed(f"/view HTTP {st}")
                images.append(data)
        return {"images": images, "events": events, "history": entry}

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.http.close()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# -------------------------------------------------------- foreign CPU load
def _system_busy() -> float:
    import psutil
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


def _own_busy() -> float:
    import psutil
    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            c = p.cpu_times()
            # children_*: children already exited and reaped (a server
            # stopped inside the window) still count as ours.
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass
    return total


class CpuWatch:
    """How many cores other processes (not this one or its children) kept
    busy during a window: other work on a shared machine skews figures."""

    def __init__(self) -> None:
        self.t0, self.sys0, self.own0 = time.perf_counter(), _system_busy(), _own_busy()

    def foreign_cores(self) -> float:
        wall = time.perf_counter() - self.t0
        foreign = (_system_busy() - self.sys0) - (_own_busy() - self.own0)
        return round(max(foreign, 0.0) / wall, 3) if wall > 0 else 0.0


def set_torch_threads(n: int) -> None:
    """Threads for torch in every child started from now on (0: its default).

    On a small shared CPU, two processes each spinning torch's intra-op
    threads slow each other down by 10x or more; one thread per process keeps
    the figures stable. Same setting for every path compared.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if n > 0:
            os.environ[var] = str(n)
        else:
            os.environ.pop(var, None)


# ------------------------------------------------------ in-process workers
class LineWorker:
    """A child process that boots, says one JSON line, then answers one JSON
    line per JSON line it reads (see :func:`serve_lines`)."""

    def __init__(self, name: str, cmd: list[str], log_path: Path) -> None:
        self.name = name
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1, start_new_session=True)
        self.info = self._read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} worker died; see {self.log.name}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"{self.name} worker: {out['error']}")
        return out

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(15)
        except Exception:
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        self.log.close()


def serve_lines(boot: Callable[[], tuple[Callable[[dict[str, Any]], dict[str, Any]], dict[str, Any]]]) -> None:
    """Child side of :class:`LineWorker`. Whatever the child prints goes to
    stderr: the protocol keeps stdout's fd for itself."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    try:
        handle, info = boot()
    except Exception as e:
        proto.write(json.dumps({"error": f"boot failed: {e!r}"}) + "\n")
        raise
    proto.write(json.dumps({"ready": True, **info}) + "\n")
    for line in sys.stdin:
        try:
            out = handle(json.loads(line))
        except Exception as e:
            out = {"error": repr(e)}
        proto.write(json.dumps(out, default=str) + "\n")


def iterations_per_second(events: list[tuple[float, dict[str, Any]]], node: str | None = None) -> float | None:
    """Sampler it/s from the arrival times of ``progress`` events: steps
    between the first and the last one seen, over the time between them."""
    pts = [(t, ev["data"]["value"]) for t, ev in events
           if ev.get("type") == "progress" and (node is None or ev["data"].get("node") == node)]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return None
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def tidy_workdir(wd: Path, keep: bool = False) -> None:
    """Delete what the servers wrote under ``wd`` (outputs, task logs), keeping
    the *.log files; everything with ``keep``."""
    import shutil

    if keep:
        print(f"kept {wd}")
        return
    for p in wd.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    print(f"server logs kept in {wd}")


# ------------------------------------------------------ emulated latency
class DelayProxy:
    """A TCP proxy on 127.0.0.1 that delivers every chunk ``one_way_ms``
    late in each direction (so a round trip costs 2 x one_way_ms), keeping
    order: a client elsewhere on a network, emulated on loopback."""

    def __init__(self, upstream_port: int, one_way_ms: float) -> None:
        import asyncio

        self.upstream, self.delay = upstream_port, one_way_ms / 1000.0
        self._writers: set[Any] = set()
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)

    def _run(self, started: threading.Event) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)

        async def pump(reader: Any, writer: Any) -> None:
            q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def deliver() -> None:
                while True:
                    due, data = await q.get()
                    if not data:
                        break
                    wait = due - self.loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()
                writer.close()

            task = asyncio.ensure_future(deliver())
            try:
                while True:
                    data = await reader.read(65536)
                    await q.put((self.loop.time() + self.delay, data))
                    if not data:
                        break
            except (ConnectionError, OSError):
                await q.put((0.0, b""))
            await task

        async def handle(cr: Any, cw: Any) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
            except OSError:
                cw.close()
                return
            self._writers.update((cw, uw))
            await asyncio.gather(pump(cr, uw), pump(ur, cw), return_exceptions=True)
            self._writers.difference_update((cw, uw))

        async def main() -> None:
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            started.set()

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    def close(self) -> None:
        import asyncio

        async def shutdown() -> None:
            # Closing the sockets ends every pump (cancelling the handlers
            # trips a bug of asyncio.streams in Python 3.11).
            self.server.close()
            for w in list(self._writers):
                w.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


def add_common_args(ap: "argparse.ArgumentParser") -> None:
    """The options every benchmark takes."""
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="OMP_NUM_THREADS of every server (0: torch's default)")
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--keep", action="store_true", help="keep the servers' work folders")


def start_run(args: "argparse.Namespace", name: str) -> tuple[dict[str, Any], Path]:
    """Thread settings, the machine printed, the tiny checkpoint built, and a
    work folder: what every benchmark does first."""
    set_torch_threads(args.torch_threads)
    machine = describe_machine()
    machine["torch_threads"] = args.torch_threads or "default"
    print_machine(machine)
    ensure_tiny_checkpoint(args.cache_dir)
    return machine, workdir(name)


def cuda_memory() -> dict[str, Any]:
    """This process's torch CUDA allocator and its peaks (MiB); {} on CPU or
    before torch is imported (never imports it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    out: dict[str, Any] = {"allocator": torch.cuda.get_allocator_backend()}
    try:
        out["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    except RuntimeError:
        pass  # some stats are not kept by every allocator
    return out
