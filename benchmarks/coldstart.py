"""Cold start: process start to ready, and to the first answered request.

Variants, started one at a time, ``--repeats`` rounds, order rotated:

  embed          python server.py: spawn -> GET /health 200 (listening) ->
                 POST /initialize answered (ready: Function Compute's start-up
                 hook, answered once warm) -> first POST /api/serverless/run
                 answered;
  embed-preload  the same with COMFY_EMBED_PRELOAD=<tiny checkpoint> (the
                 model loads before /ready instead of in the first request);
  native         vendor/ComfyUI/main.py --cpu: spawn -> GET /system_stats 200
                 (it has no readiness endpoint: listening is ready) -> first
                 POST /prompt answered (ws completion, /history, /view).

The first request is the tiny-checkpoint text-to-image graph (64x64, 4
steps), so it includes loading the model; a second request gives the warm
time. Where the time goes comes from the servers' own output lines, stamped
on arrival (comfy-embed's "ComfyUI booted ... {torch, import, nodes}" line;
native's start-up messages), and from one extra comfy-embed start under
``python -X importtime`` (import seconds per package).

    .venv/bin/python benchmarks/coldstart.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

VARIANTS = ("embed", "embed-preload", "native")


def _poll(srv: common.Server, path: str, timeout: float = 300.0, interval: float = 0.025) -> float:
    """Seconds from spawn to the first 200 of GET ``path``."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.name} exited:\n{srv.tail()}")
        try:
            st, _ = common.Http(srv.port, timeout=5).request("GET", path)
            if st == 200:
                return time.perf_counter() - srv.t0
        except OSError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{srv.name}: {path} not answered in {timeout}s\n{srv.tail()}")


def _graph(i: int) -> dict[str, Any]:
    return common.t2i_graph(i, size=64, steps=4)


def one_start(variant: str, wd: Path, cache: Path, i: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if variant.startswith("embed"):
        env = {"COMFY_EMBED_PRELOAD": common.TINY} if variant == "embed-preload" else {}
        srv = common.start_embed(wd, cache_dir=cache, env=env, timestamps=True)
        try:
            out["listening"] = _poll(srv, "/health")
            # Function Compute's start-up hook: answers once ComfyUI is warm
            # (no polling load on the booting process).
            st, body = common.Http(srv.port).request("POST", "/initialize")
            if st != 200:
                raise RuntimeError(f"/initialize: {st} {body[:300]!r}")
            out["ready"] = time.perf_counter() - srv.t0
            client = common.EmbedClient(srv.port)
            client.run(_graph(i))
            out["first_request"] = time.perf_counter() - srv.t0
            out["warm_request"], _ = common.timed(lambda: client.run(_graph(i + 1)))
            client.close()
            booted = srv.first_line("ComfyUI booted")
            for t, line in srv.lines:
                if "ComfyUI booted" in line:
                    m = re.search(r"\((\{.*\})\)", line)
                    if m:
                        out["boot"] = {k: round(v, 3) for k, v in ast.literal_eval(m.group(1)).items()}
                    break
            out["log"] = {"server process started": srv.first_line("Started server process"),
                          "ComfyUI booted": booted}
        finally:
            srv.stop()
    else:
        srv = common.start_native(wd, models_dir=cache, timestamps=True)
        try:
            out["listening"] = out["ready"] = _poll(srv, "/system_stats")
            native = common.NativeClient(srv.port)
            native.run(_graph(i))
            out["first_request"] = time.perf_counter() - srv.t0
            out["warm_request"], _ = common.timed(lambda: native.run(_graph(i + 1)))
            native.close()
            out["log"] = {"torch + model management ('Total VRAM')": srv.first_line("Total VRAM"),
                          "server object ('[Prompt Server]')": srv.first_line("[Prompt Server]"),
                          "nodes loaded ('Starting server')": srv.first_line("Starting server"),
                          "listening ('To see the GUI')": srv.first_line("To see the GUI")}
        finally:
            srv.stop()
    out["first_request_only"] = out["first_request"] - out["ready"]
    return out


def import_profile(wd: Path, cache: Path, top: int = 14) -> list[tuple[str, float]]:
    """comfy-embed started under -X importtime (all threads, ComfyUI's boot
    included): seconds of import work per top-level package (self times
    summed, so nothing counts twice; the profiler itself adds some)."""
    srv = common.start_embed(wd, cache_dir=cache, args=["-X", "importtime", "server.py"],
                             timestamps=True)
    try:
        _poll(srv, "/ready", interval=0.2)
    finally:
        srv.stop()
    per_package: dict[str, float] = {}
    for _, line in srv.lines:
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(\S+)", line)
        if m:
            pkg = m.group(3).split(".")[0]
            per_package[pkg] = per_package.get(pkg, 0.0) + int(m.group(1)) / 1e6
    rows = sorted(per_package.items(), key=lambda r: -r[1])
    total = sum(v for _, v in rows)
    return [(k, round(v, 3)) for k, v in rows[:top]] + [("(all imports)", round(total, 3))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-importtime", action="store_true")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "coldstart")
    variants = [v for v in args.variants.split(",") if v]
    print(f"{args.repeats} rounds of {variants}; logs in {wd}", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    watch = common.CpuWatch()
    for r in range(args.repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            res = one_start(v, wd, args.cache_dir, 1000 * r)
            runs[v].append(res)
            print(f"  round {r + 1} {v:<14} listening {res['listening']:.2f}s  ready {res['ready']:.2f}s  "
                  f"first answer {res['first_request']:.2f}s", flush=True)
    foreign = watch.foreign_cores()
    imports = [] if args.no_importtime or "embed" not in variants else import_profile(wd, args.cache_dir)

    def med(v: str, key: str) -> float:
        return round(common.percentile([x[key] for x in runs[v]], 50), 3)

    figures: dict[str, Any] = {}
    rows = []
    for v in variants:
        f = figures[v] = {k: med(v, k) for k in ("listening", "ready", "first_request",
                                                 "first_request_only", "warm_request")}
        f["log_seconds"] = {k: round(common.percentile([x["log"][k] for x in runs[v]
                                                        if x["log"].get(k) is not None], 50), 3)
                            for k in runs[v][0]["log"]}
        if v.startswith("embed") and runs[v][0].get("boot"):
            f["boot"] = {k: round(common.percentile([x["boot"][k] for x in runs[v]], 50), 3)
                         for k in runs[v][0]["boot"]}
        rows.append([v, f["listening"], f["ready"], f["first_request"], f["first_request_only"],
                     round(f["warm_request"] * 1000, 1)])
    print()
    print(common.table(["variant", "listening s", "ready s", "first answer s",
                        "first req only s", "warm req ms"], rows))
    if "native" in figures:
        print()
        for v in variants:
            if v.startswith("embed"):
                n = figures["native"]
                f = figures[v]
                f["ready_over_native"] = round(f["ready"] / n["ready"], 3)
                f["first_request_over_native"] = round(f["first_request"] / n["first_request"], 3)
                print(f"  {v}: ready {f['ready_over_native']:.3f}x native, first answer "
                      f"{f['first_request_over_native']:.3f}x native   (issue 14's goals: ready <= 0.7, "
                      "first answer <= 0.8)")
    print("\nwhere the time goes (median seconds since spawn, from the servers' output):")
    for v in variants:
        f = figures[v]
        parts = [f"{k} {t:.2f}" for k, t in f["log_seconds"].items()]
        print(f"  {v}: " + "; ".join(parts))
        if "boot" in f:
            b = f["boot"]
            print(f"    ComfyUI boot on the executor thread: torch+args {b.get('torch', 0):.2f}s, "
                  f"ComfyUI imports {b.get('import', 0):.2f}s, extra nodes {b.get('nodes', 0):.2f}s "
                  f"(total {b.get('total', 0):.2f}s)")
        print(f"    first request beyond a warm one (model load etc.): "
              f"{f['first_request_only'] - f['warm_request']:.2f}s")
    if imports:
        print("\ncomfy-embed under -X importtime: import seconds per package (self time):")
        for name, s in imports:
            print(f"  {s:7.3f}s  {name}")
    print(f"\nother processes kept {foreign:.2f} cores busy during the rounds")
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "coldstart", "machine": machine,
                      "config": {"repeats": args.repeats, "first_graph": "t2i_tiny 64x64 4 steps",
                                 "torch_threads": args.torch_threads},
                      "foreign_cores": foreign, "figures": figures,
                      "imports_top_s": imports, "runs": runs})


if __name__ == "__main__":
    main()
