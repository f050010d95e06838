"""Output encoding off the executor thread (issue 30): comfy-embed with its
encode pool, comfy-embed without it (``COMFY_EMBED_ENCODE_WORKERS=0``, PNGs
encoded on the executor thread as natively) and native ComfyUI, in one run.

Phases, the servers taking turns slice by slice (order rotating) as in
throughput.py:

  ``tex1024-c8``: textured 1024x1024 PNG outputs (EmptyImage, colour varying
  per request, then ImageAddNoise with the request's seed, then SaveImage) at
  8 clients: requests/s and executor milliseconds per job (comfy-embed: the
  executor thread's busy seconds from /_bench/stats; native: execution_start
  to execution_success in /history, both on the executor thread);
  ``image512-c1``: the overhead graph (EmptyImage 512 -> ImageInvert ->
  SaveImage) at 1 client: p50 latency, so the pool is seen not to slow the
  common small answer (HTTP minus raw: benchmarks/overhead.py).

Done when (issue 30), on a quiet machine: tex1024-c8 requests/s at least
1.5x native and executor ms/job at most 0.5x native's; image512-c1 p50 not
above native's. Nothing asserts on time here: the figures are printed.

    .venv/bin/python benchmarks/encode_pool.py [--requests 48] [--small 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from throughput import native_busy, run_phase


def textured_graph(i: int, size: int = 1024) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": size, "height": size, "batch_size": 1,
                         "color": (i * 2654435761 + 12345) % 0xFFFFFF}},
        "2": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": i,
                                                         "strength": 0.5}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "tex"}},
    }


#: name -> (server kind, extra environment)
TARGETS: dict[str, tuple[str, dict[str, str]]] = {
    "embed": ("embed", {}),
    "embed-nopool": ("embed", {"COMFY_EMBED_ENCODE_WORKERS": "0"}),
    "native": ("native", {}),
}


class Target:
    def __init__(self, name: str, args: argparse.Namespace, wd: Path) -> None:
        self.name = name
        self.kind, env = TARGETS[name]
        if self.kind == "embed":
            self.srv = common.start_embed(wd, cache_dir=args.cache_dir,
                                          args=["benchmarks/embed_server.py"],
                                          env={"COMFY_EMBED_MAX_QUEUE": "256", **env})
            self.srv.wait_http("/ready")
            self.stats: common.Http | None = common.Http(self.srv.port)
        else:
            self.srv = common.start_native(wd, models_dir=args.cache_dir)
            self.srv.wait_http("/system_stats")
            self.stats = None
        self.served = 0

    def busy(self) -> float:
        assert self.stats is not None
        _, raw = self.stats.request("GET", "/_bench/stats")
        return float(json.loads(raw)["busy_seconds"])

    def make_client(self) -> Any:
        port = self.srv.port
        return common.EmbedClient(port) if self.kind == "embed" else common.NativeClient(port)

    def run(self, graph: Callable[[int], dict[str, Any]], n: int, clients: int) -> dict[str, Any]:
        b0 = self.busy() if self.stats else 0.0
        res = run_phase(self.make_client, graph, self.served, n, clients)
        self.served += n
        res["busy"] = (self.busy() - b0) if self.stats else native_busy(res["histories"])
        return res

    def stop(self) -> None:
        if self.stats is not None:
            self.stats.close()
        self.srv.stop()


def figures(clients: int, slices: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for r in slices for x in r["latencies"]]
    errors = [e for r in slices for e in r["errors"]]
    wall = sum(r["wall"] for r in slices)
    busy = sum(r["busy"] for r in slices)
    return {"clients": clients, "requests": len(lat) + len(errors), "errors": len(errors),
            "error_samples": errors[:3], "rps": round(len(lat) / wall, 3) if wall else None,
            "p50_ms": round(common.percentile(lat, 50) * 1000, 2) if lat else None,
            "p95_ms": round(common.percentile(lat, 95) * 1000, 2) if lat else None,
            "executor_ms_per_job": round(busy / max(len(lat), 1) * 1000, 2),
            "busy_fraction": round(busy / wall, 3) if wall else None}


def bench(names: list[str], args: argparse.Namespace, wd: Path) -> dict[str, dict[str, Any]]:
    targets: dict[str, Target] = {}
    plan = [("tex1024-c8", textured_graph, 8, args.requests),
            ("image512-c1", common.image_graph, 1, args.small)]
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    try:
        for name in names:
            targets[name] = Target(name, args, wd)
        for t in targets.values():  # warm: first PNGs, first 1024 tensors
            for graph, clients in ((textured_graph, 2), (common.image_graph, 1)):
                warm = t.run(graph, args.warmup, clients)
                if warm["errors"]:
                    raise RuntimeError(f"{t.name} warm-up failed: {warm['errors'][:3]}")
        turn = 0
        for phase, graph, clients, n in plan:
            slices: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
            rounds = max(1, min(args.rounds, n // clients))
            for r in range(rounds):
                size = n // rounds + (1 if r < n % rounds else 0)
                order = list(targets)[turn % len(targets):] + list(targets)[:turn % len(targets)]
                turn += 1
                for name in order:
                    slices[name].append(targets[name].run(graph, size, clients))
            for name in targets:
                f = out[name][phase] = figures(clients, slices[name])
                print(f"  {name:<13} {phase:<12} {f['rps']:7.2f} req/s  p50 {f['p50_ms']} ms  "
                      f"exec {f['executor_ms_per_job']} ms/job  errors {f['errors']}", flush=True)
        return out
    finally:
        for t in targets.values():
            t.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48, help="tex1024 requests per server")
    ap.add_argument("--small", type=int, default=60, help="image512 requests per server")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", default="embed,embed-nopool,native")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "encode-pool")
    names = [s for s in args.servers.split(",") if s]
    print(f"tex1024 at 8 clients x {args.requests}, image512 at 1 client x {args.small}; "
          f"logs in {wd}", flush=True)
    results = bench(names, args, wd)
    rows = [[n, phase, p["requests"], p["rps"], p["p50_ms"], p["p95_ms"], p["executor_ms_per_job"],
             p["errors"]] for n in names for phase, p in results[n].items()]
    print()
    print(common.table(["server", "phase", "requests", "req/s", "p50 ms", "p95 ms", "exec ms/job",
                        "errors"], rows))
    ratios: dict[str, dict[str, float]] = {}
    if "native" in results:
        nat = results["native"]
        for n in names:
            if n == "native":
                continue
            t, s = results[n]["tex1024-c8"], results[n]["image512-c1"]
            ratios[n] = {"tex1024_rps_over_native": round(t["rps"] / nat["tex1024-c8"]["rps"], 3),
                         "tex1024_exec_over_native": round(
                             t["executor_ms_per_job"] / nat["tex1024-c8"]["executor_ms_per_job"], 3),
                         "image512_p50_over_native": round(s["p50_ms"] / nat["image512-c1"]["p50_ms"], 3)}
            r = ratios[n]
            print(f"  {n}: tex1024 req/s {r['tex1024_rps_over_native']:.3f}x native (goal >= 1.5), "
                  f"exec ms/job {r['tex1024_exec_over_native']:.3f}x (goal <= 0.5); "
                  f"image512 p50 {r['image512_p50_over_native']:.3f}x (goal <= 1.0)")
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "encode_pool", "machine": machine,
                      "config": {"requests": args.requests, "small": args.small, "rounds": args.rounds,
                                 "torch_threads": args.torch_threads},
                      "figures": results, "ratios": ratios})


if __name__ == "__main__":
    main()
