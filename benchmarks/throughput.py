"""Throughput, pipelining and memory under concurrent clients.

For comfy-embed (benchmarks/embed_server.py: ``python server.py`` plus a stats
endpoint reporting the executor thread's busy seconds) and, as the baseline in
the same run, native ComfyUI (main.py --cpu; the native client flow per
request: /prompt, /ws, /history, /view; its executor busy time is summed from
the execution_start/execution_success timestamps in /history):

  phases at 1, 8 and 16 concurrent clients (``--requests`` each, default 300),
  then 8 clients until ``--total`` requests (default 1000) have been served;
  both servers stay up and take turns within each phase (``--rounds``
  slices, order rotating), so a slow spell of the shared machine hits both;
  requests/s, p50/p95 latency, errors (must be 0), executor busy fraction
  (busy seconds / wall seconds of the phase), and the server process's RSS
  after warm-up and after the ``--total`` requests.

Graph: ``image512`` (EmptyImage 512x512 -> ImageInvert -> SaveImage; colour
varies per request), comfy-embed with output_base64=true. With ``--content
noise`` the 512x512 image is random noise (LoadImage of a noise PNG blended
with the varying colour), so each PNG is ~0.8 MB as a real picture would be.

At 1 client the executor idles while the answer is encoded, sent and a new
request arrives; with 8+ clients the next job should already be queued, so a
busy fraction near 1 shows that encoding/upload of job N overlaps the
execution of job N+1.

    .venv/bin/python benchmarks/throughput.py [--requests 300] [--total 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

NOISE = "bench-noise.png"


def noise_graph(i: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": NOISE}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1,
                                                      "color": (i * 2654435761 + 12345) % 0xFFFFFF}},
        "3": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["2", 0],
                                                      "blend_factor": 0.25, "blend_mode": "normal"}},
        "4": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench", "images": ["3", 0]}},
    }


def write_noise(folder: Path) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(folder / NOISE)


def run_phase(make_client: Callable[[], Any], graph: Callable[[int], dict[str, Any]], start: int,
              requests: int, clients: int) -> dict[str, Any]:
    """``requests`` requests spread over ``clients`` threads, each with its
    own connection(s); returns wall time, latencies, errors, native histories."""
    lock = threading.Lock()
    next_i = [start]
    lat: list[float] = []
    errors: list[str] = []
    histories: list[dict[str, Any]] = []
    conns = [make_client() for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)

    def loop(client: Any) -> None:
        barrier.wait()
        while True:
            with lock:
                i = next_i[0]
                if i >= start + requests:
                    return
                next_i[0] += 1
            t = time.perf_counter()
            try:
                out = client.run(graph(i))
                dt = time.perf_counter() - t
                with lock:
                    lat.append(dt)
                    if "history" in out:
                        histories.append(out["history"])
            except Exception as e:  # counted, never fatal
                with lock:
                    errors.append(repr(e)[:300])

    threads = [threading.Thread(target=loop, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    return {"wall": wall, "latencies": lat, "errors": errors, "histories": histories}


def native_busy(histories: list[dict[str, Any]]) -> float:
    """Seconds between execution_start and the end message of each prompt."""
    total = 0.0
    for h in histories:
        msgs = {m[0]: m[1] for m in h.get("status", {}).get("messages", [])}
        s = msgs.get("execution_start", {}).get("timestamp")
        e = (msgs.get("execution_success") or msgs.get("execution_error") or {}).get("timestamp")
        if s is not None and e is not None:
            total += (e - s) / 1000.0
    return total


class Target:
    """One server under test: its process, clients and executor busy time."""

    def __init__(self, kind: str, args: argparse.Namespace, wd: Path) -> None:
        self.kind = kind
        if kind == "embed":
            self.srv = common.start_embed(wd, cache_dir=args.cache_dir,
                                          args=["benchmarks/embed_server.py"],
                                          env={"COMFY_EMBED_MAX_QUEUE": "256"})
            ready = "/ready"
        else:
            self.srv = common.start_native(wd, models_dir=args.cache_dir)
            ready = "/system_stats"
        self.srv.wait_http(ready)
        if args.content == "noise":
            assert self.srv.base is not None
            write_noise(self.srv.base / "input")
        self.stats = common.Http(self.srv.port) if kind == "embed" else None
        self.served = 0
        self.watch = common.CpuWatch()

    def busy(self) -> float:
        assert self.stats is not None
        _, raw = self.stats.request("GET", "/_bench/stats")
        return json.loads(raw)["busy_seconds"]

    def make_client(self) -> Any:
        port = self.srv.port
        return common.EmbedClient(port) if self.kind == "embed" else common.NativeClient(port)

    def run(self, graph: Callable[[int], dict[str, Any]], n: int, clients: int) -> dict[str, Any]:
        """One slice of a phase; with the executor's busy seconds during it."""
        b0 = self.busy() if self.kind == "embed" else 0.0
        res = run_phase(self.make_client, graph, self.served, n, clients)
        self.served += n
        res["busy"] = (self.busy() - b0) if self.kind == "embed" else native_busy(res["histories"])
        return res

    def stop(self) -> None:
        if self.stats is not None:
            self.stats.close()
        self.srv.stop()


def _phase_figures(clients: int, slices: list[dict[str, Any]], rss_mb: float) -> dict[str, Any]:
    lat = [x for r in slices for x in r["latencies"]]
    wall = sum(r["wall"] for r in slices)
    busy = sum(r["busy"] for r in slices)
    errors = [e for r in slices for e in r["errors"]]
    return {"clients": clients, "requests": len(lat) + len(errors), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": round(wall, 2), "rps": round(len(lat) / wall, 2),
            "p50_ms": round(common.percentile(lat, 50) * 1000, 2) if lat else None,
            "p95_ms": round(common.percentile(lat, 95) * 1000, 2) if lat else None,
            "busy_fraction": round(busy / wall, 3),
            "executor_ms_per_job": round(busy / max(len(lat), 1) * 1000, 2),
            "rss_mb_after": round(rss_mb, 1)}


def bench_servers(kinds: list[str], args: argparse.Namespace, wd: Path,
                  graph: Callable[[int], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every phase in ``args.rounds`` slices, the servers taking turns slice
    by slice (order rotating), so that a slow spell of the machine hits them
    alike rather than whichever ran second."""
    targets: dict[str, Target] = {}
    try:
        for kind in kinds:  # booted one at a time, then all stay up
            targets[kind] = Target(kind, args, wd)
        rss0: dict[str, float] = {}
        for kind, t in targets.items():
            warm = t.run(graph, args.warmup, 1)
            if warm["errors"]:
                raise RuntimeError(f"{kind} warm-up failed: {warm['errors'][:3]}")
            rss0[kind] = t.srv.rss_mb()
        plan = [(f"c{c}", c, args.requests) for c in (1, 8, 16)]
        plan.append(("fill-c8", 8, max(args.total - len(plan) * args.requests, 0)))
        for t in targets.values():
            t.watch = common.CpuWatch()
        phases: dict[str, dict[str, Any]] = {k: {} for k in targets}
        turn = 0
        for name, clients, n in plan:
            if n <= 0:
                continue
            rounds = max(1, min(args.rounds, n // max(clients, 1)))
            slices: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
            for r in range(rounds):
                size = n // rounds + (1 if r < n % rounds else 0)
                order = list(targets)[turn % len(targets):] + list(targets)[:turn % len(targets)]
                turn += 1
                for kind in order:
                    slices[kind].append(targets[kind].run(graph, size, clients))
            for kind, t in targets.items():
                f = phases[kind][name] = _phase_figures(clients, slices[kind], t.srv.rss_mb())
                print(f"  {kind:<6} {name:<8} {f['rps']:7.1f} req/s  p95 {f['p95_ms']} ms  "
                      f"errors {f['errors']}  busy {f['busy_fraction']:.2f}", flush=True)
        out = {}
        for kind, t in targets.items():
            rss1 = t.srv.rss_mb()
            out[kind] = {"phases": phases[kind], "served": t.served, "rss_mb_before": round(rss0[kind], 1),
                         "rss_mb_after": round(rss1, 1), "rss_growth_mb": round(rss1 - rss0[kind], 1),
                         "foreign_cores": t.watch.foreign_cores()}
        return out
    finally:
        for t in targets.values():
            t.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300, help="requests per concurrency phase")
    ap.add_argument("--total", type=int, default=1000, help="requests served before the second RSS reading")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--content", choices=("flat", "noise"), default="flat")
    ap.add_argument("--servers", default="embed,native")
    ap.add_argument("--rounds", type=int, default=3,
                    help="slices per phase; the servers take turns slice by slice")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "throughput")
    graph = noise_graph if args.content == "noise" else common.image_graph
    servers = [s for s in args.servers.split(",") if s]
    print(f"graph image512 ({args.content}); phases 1/8/16 clients x {args.requests}, "
          f"then to {args.total} requests; logs in {wd}", flush=True)
    results = bench_servers(servers, args, wd, graph)

    rows = []
    for s in servers:
        for name, p in results[s]["phases"].items():
            rows.append([s, name, p["clients"], p["requests"], p["rps"], p["p50_ms"], p["p95_ms"],
                         p["errors"], p["busy_fraction"], p["executor_ms_per_job"]])
    print()
    print(common.table(["server", "phase", "clients", "requests", "req/s", "p50 ms", "p95 ms", "errors",
                        "busy", "exec ms/job"], rows))
    print()
    for s in servers:
        r = results[s]
        print(f"  {s}: RSS {r['rss_mb_before']:.0f} MB after warm-up -> {r['rss_mb_after']:.0f} MB after "
              f"{r['served']} requests: {r['rss_growth_mb']:+.1f} MB (goal < 50 MB); other processes "
              f"kept {r['foreign_cores']:.2f} cores busy")
    if "embed" in results and "native" in results:
        print()
        for name in results["embed"]["phases"]:
            e, n = results["embed"]["phases"][name], results["native"]["phases"].get(name)
            if n:
                e["rps_over_native"] = round(e["rps"] / n["rps"], 3)
                e["p95_over_native"] = round(e["p95_ms"] / n["p95_ms"], 3)
                print(f"  {name}: comfy-embed req/s {e['rps_over_native']:.3f}x native, "
                      f"p95 {e['p95_over_native']:.3f}x native")
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "throughput", "machine": machine,
                      "config": {"requests": args.requests, "total": args.total, "content": args.content,
                                 "rounds": args.rounds,
                                 "torch_threads": args.torch_threads},
                      "figures": results})


if __name__ == "__main__":
    main()
