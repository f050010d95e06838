"""Per-request overhead: four ways to run the same graphs, measured round-robin.

  (a) raw      ComfyUI's PromptExecutor called directly: validate_prompt +
               execute_async on the loop comfy_embed._comfy.comfy boots, in a
               dedicated thread as native's prompt_worker runs it (no queue,
               no HTTP, no events; timed inside that thread, so without the
               hand-off to it), in a child process with comfy-embed's heap
               setting (COMFY_EMBED_HEAP_KEEP_BYTES);
  (b) library  comfy_embed.run_workflow(graph), timed inside a child process;
  (c) http     comfy-embed's server (python server.py): POST
               /api/serverless/run?output_base64=true, image bytes decoded;
  (d) native   vendor/ComfyUI/main.py --cpu: POST /prompt, wait on /ws for
               ``executing`` node=null, GET /history/<id>, GET /view per image.

Graphs: ``image512`` (EmptyImage 512x512 -> ImageInvert -> SaveImage) and
``t2i_tiny`` (the default text-to-image graph on the tiny random-weights
checkpoint, 64x64, 4 steps). Request i changes the colour / the seed the same
way on every path, so ComfyUI's cache never answers without work. All four run
at once, idle when not their turn; graph by graph (ComfyUI's default cache
keeps only what the next prompt shares: alternating graphs would reload the
checkpoint every time), after a warm-up, the paths take turns in blocks of
``--block`` requests (order rotating), one request at a time, so that a slow
spell of the machine hits all paths alike. The first request of a block
finds its process idle for a while (cold caches): ``--block 1`` shows that
case for every request.

Then a breakdown of (c): benchmarks/embed_server.py --instrument marks each
stage of the request path (claim, validate, queue, execute, render, task-log
persistence, response) on the same clock as the client.

``--rtt-ms R`` puts a TCP proxy adding R ms per round trip in front of (c)
and (d): a client across a network, where native's 3+ round trips per
request (POST /prompt, ws message, /history, /view per image) weigh.

    .venv/bin/python benchmarks/overhead.py [--n 40] [--rtt-ms 30]
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PATHS = ("raw", "library", "http", "native")


def _graph(name: str, i: int, args: argparse.Namespace) -> dict[str, Any]:
    if name == "image512":
        return common.image_graph(i, size=args.image_size)
    return common.t2i_graph(i, size=args.t2i_size, steps=args.t2i_steps)


# ------------------------------------------------------------ child workers
def _worker(args: argparse.Namespace) -> None:
    """Boot, then answer one line per graph with the seconds the run took in here."""
    def boot() -> tuple[Callable[[dict[str, Any]], dict[str, Any]], dict[str, Any]]:
        from comfy_embed.config import Settings

        settings = Settings.from_env(base_dir=Path(args.workdir), tiny_checkpoint=True,
                                     cache_dir=Path(args.cache_dir), device="cpu")
        if args.worker == "raw":
            return _raw_runner(settings)
        from comfy_embed import run_workflow

        def run(graph: dict[str, Any]) -> dict[str, Any]:
            t0 = time.perf_counter()
            final = run_workflow(graph, settings=settings)
            dt = time.perf_counter() - t0
            if final["data"]["status"] != "success":
                raise RuntimeError(final)
            return {"dt": dt}

        run(common.image_graph(-99, size=8))  # boots ComfyUI
        return run, {}

    common.serve_lines(boot)


def _raw_runner(settings: Any) -> tuple[Callable[[dict[str, Any]], dict[str, Any]], dict[str, Any]]:
    from comfy_embed._comfy.checkpoint import ensure_tiny_checkpoint
    from comfy_embed._comfy.comfy import Comfy
    from comfy_embed.observe import memory

    # The heap setting that (b) and (c) boot with (comfy_embed.runtime), so
    # that (c) - (a) is the request path's cost alone, not glibc's page faults.
    memory.keep_freed_heap(settings.observe.heap_keep_bytes)
    comfy = Comfy.boot(settings)
    ensure_tiny_checkpoint(comfy, settings)
    import execution  # ComfyUI's own module, importable once booted

    # Not on the main thread: glibc trims the main thread's heap after each
    # large free, so every run there page-faulted its image buffers afresh
    # (about 2,200 minor faults and +5 ms per image512 run, against 14 faults
    # in a thread). Native ComfyUI and comfy-embed both execute in a thread.
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prompt_worker")

    def run(graph: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        pid = str(uuid.uuid4())
        ok, err, outputs, node_errors = comfy.loop.run_until_complete(
            execution.validate_prompt(pid, graph, None))
        if not ok:
            raise RuntimeError(f"invalid: {err} {node_errors}")
        t1 = time.perf_counter()
        ex = comfy.executor
        comfy.loop.run_until_complete(ex.execute_async(graph, pid, {"client_id": "bench"}, outputs))
        t2 = time.perf_counter()
        if not ex.success:
            raise RuntimeError(f"failed: {ex.status_messages[-1:]}")
        # Not part of (a): what (c) adds per image on top of the PNG that
        # SaveImage wrote (read the file, base64 it).
        enc = 0.0
        for ui in ex.history_result["outputs"].values():
            for img in ui.get("images", []):
                p = comfy.directory_of(img["type"]) / img["subfolder"] / img["filename"]
                t = time.perf_counter()
                base64.b64encode(p.read_bytes())
                enc += time.perf_counter() - t
        return {"dt": t2 - t0, "validate": t1 - t0, "execute": t2 - t1, "encode": enc}

    return (lambda graph: worker.submit(run, graph).result()), {"boot_seconds": comfy.boot_seconds}


def _start_worker(kind: str, args: argparse.Namespace, wd: Path) -> common.LineWorker:
    cmd = [common.PYTHON, __file__, "--worker", kind, "--workdir", str(wd / kind),
           "--cache-dir", str(args.cache_dir)]
    return common.LineWorker(kind, cmd, wd / f"{kind}.log")


# ------------------------------------------------------------- breakdown
STAGES = [  # (label, from mark, to mark)
    ("client -> handler", "c_send", "req"),
    ("parse, seeds, inputs, claim on the loop", "req", "validate0"),
    ("validate (ComfyUI)", "validate0", "validate1"),
    ("claim wait, queue -> executor thread", "validate1", "execute0"),
    ("execute (ComfyUI)", "execute0", "execute1"),
    ("executor -> loop, render (base64)", "execute1", "final"),
    ("task log persistence wait", "final", "persisted"),
    ("response built", "persisted", "resp"),
    ("send + client decode", "resp", "c_done"),
]


#: The persistence wait in parts (the last extend's marks: append0/1 of its final write).
PERSIST_STAGES = [
    ("  final -> its writer runs", "final", "last_write"),
    ("  stamps, to the write", "last_write", "final_append0"),
    ("  the final write", "final_append0", "final_append1"),
    ("  lease release, back to the loop", "final_append1", "persisted"),
]


def _breakdown(args: argparse.Namespace, wd: Path) -> dict[str, Any]:
    """Per-stage p50 of (c), one request at a time, on the instrumented server."""
    out: dict[str, Any] = {}
    with common.start_embed(wd, cache_dir=args.cache_dir, env=args.http_env,
                            args=["benchmarks/embed_server.py", "--instrument"]) as srv:
        srv.wait_http("/ready")
        client = common.EmbedClient(srv.port)
        stats = common.Http(srv.port)
        try:
            for g in args.graphs:
                for w in range(args.warmup):
                    client.run(_graph(g, -1 - w, args))
                stats.request("GET", "/_bench/stats")
                per_stage: dict[str, list[float]] = {}
                for label, _, _ in STAGES:
                    per_stage[label] = []
                    if label == "task log persistence wait":
                        per_stage.update({p[0]: [] for p in PERSIST_STAGES})
                per_stage["claim task log (loop or worker thread)"] = []
                per_stage["task log writes (sum, loop or threads)"] = []
                per_stage["total (client)"] = []
                threaded: list[int] = []
                for i in range(args.n):
                    tid = f"bd-{g}-{i}-{uuid.uuid4().hex[:6]}"
                    t0 = time.perf_counter()
                    client.run(_graph(g, i, args), task_id=tid)
                    t1 = time.perf_counter()
                    _, raw = stats.request("GET", "/_bench/stats")
                    marks: dict[str, float] = {"c_send": t0, "c_done": t1}
                    appends: dict[str, float] = {}
                    for name, t, key in json.loads(raw)["marks"]:
                        if key not in (tid, None):
                            continue
                        if name == "append0":
                            appends["open"] = t
                            marks["final_append0"] = t  # the last one wins: the final's
                        elif name == "append1":
                            marks["final_append1"] = t
                            appends["sum"] = appends.get("sum", 0.0) + t - appends.pop("open", t)
                        else:
                            marks.setdefault(name, t)
                    for label, a, b in STAGES:
                        if a in marks and b in marks:
                            per_stage[label].append(marks[b] - marks[a])
                    for label, a, b in PERSIST_STAGES:
                        if a in marks and b in marks:
                            per_stage[label].append(marks[b] - marks[a])
                    if "claim0" in marks and "claim1" in marks:
                        per_stage["claim task log (loop or worker thread)"].append(
                            marks["claim1"] - marks["claim0"])
                    per_stage["task log writes (sum, loop or threads)"].append(appends.get("sum", 0.0))
                    per_stage["total (client)"].append(t1 - t0)
                    threaded.append(sum(1 for name, _, key in json.loads(raw)["marks"]
                                        if name == "io_in_thread" and key in (tid, None)))
                out[g] = {k: round(common.percentile(v, 50) * 1000, 3) for k, v in per_stage.items() if v}
                # Not ms: the share of requests whose task-log calls went to worker threads.
                out[g]["requests with task-log calls in threads (share)"] = round(
                    sum(1 for n in threaded if n) / max(1, len(threaded)), 3)
        finally:
            client.close()
            stats.close()
    return out


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="measured requests per graph and path")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--graphs", default="image512,t2i_tiny")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--t2i-size", type=int, default=64)
    ap.add_argument("--t2i-steps", type=int, default=4)
    ap.add_argument("--block", type=int, default=10,
                    help="consecutive requests per path before the next path's turn")
    ap.add_argument("--rtt-ms", type=float, default=0.0,
                    help="emulate a client this far away (ms round trip) for (c) and (d): "
                         "a delaying TCP proxy on 127.0.0.1")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--http-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the (c) server, e.g. "
                         "COMFY_EMBED_TASK_LOG_DIR=/dev/shm/tasks (repeatable)")
    common.add_common_args(ap)
    ap.add_argument("--worker", choices=("raw", "library"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    args.graphs = [g for g in args.graphs.split(",") if g]
    args.http_env = dict(kv.split("=", 1) for kv in args.http_env)
    paths = [p for p in args.paths.split(",") if p]

    machine, wd = common.start_run(args, "overhead")
    print(f"graphs {args.graphs}; {args.n} requests each after {args.warmup} warm-up; "
          f"t2i {args.t2i_size}x{args.t2i_size} {args.t2i_steps} steps; logs in {wd}", flush=True)

    runners: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
    closers: list[Callable[[], None]] = []
    timings: dict[str, dict[str, list[float]]] = {p: {g: [] for g in args.graphs} for p in paths}
    detail: dict[str, dict[str, list[float]]] = {"validate": {g: [] for g in args.graphs},
                                                 "execute": {g: [] for g in args.graphs},
                                                 "encode": {g: [] for g in args.graphs}}
    info: dict[str, Any] = {}
    tasklog: dict[str, dict[str, float]] = {}
    log_dir = wd
    try:
        for path in paths:  # boot one at a time
            t = time.perf_counter()
            if path in ("raw", "library"):
                w = _start_worker(path, args, wd)
                closers.append(w.stop)
                info[path] = w.info
                runners[path] = w.call
            elif path == "http":
                srv = common.start_embed(wd, cache_dir=args.cache_dir, env=args.http_env)
                log_dir = Path(args.http_env.get("COMFY_EMBED_TASK_LOG_DIR") or
                               (srv.base or wd) / "output" / "serverless_api")
                closers.append(srv.stop)
                srv.wait_http("/ready")
                ec = common.EmbedClient(_via_proxy(srv.port, args, closers))
                closers.append(ec.close)
                runners[path] = _client_runner(ec.run)
            elif path == "native":
                nsrv = common.start_native(wd, models_dir=args.cache_dir)
                closers.append(nsrv.stop)
                nsrv.wait_http("/system_stats")
                nc = common.NativeClient(_via_proxy(nsrv.port, args, closers))
                closers.append(nc.close)
                runners[path] = _client_runner(nc.run)
            else:
                raise SystemExit(f"unknown path {path}")
            print(f"  {path}: up in {time.perf_counter() - t:.1f}s", flush=True)
        watch = common.CpuWatch()
        t_meas = time.perf_counter()
        # Graph by graph: ComfyUI's default (classic) cache keeps only what
        # the next prompt shares, so alternating graphs would reload the
        # checkpoint on every text-to-image request.
        for g in args.graphs:
            logged = _tree_usage(log_dir) if "http" in paths else (0, 0)
            for k in range(args.warmup):
                for p in paths:
                    r = runners[p](_graph(g, -1 - k, args))
                    if "error" in r:
                        raise RuntimeError(f"{p} {g} warm-up: {r['error']}")
            for b, start in enumerate(range(0, args.n, args.block)):
                k = b % len(paths)
                for p in paths[k:] + paths[:k]:
                    for i in range(start, min(start + args.block, args.n)):
                        r = runners[p](_graph(g, i, args))
                        if "error" in r:
                            raise RuntimeError(f"{p} {g} #{i}: {r['error']}")
                        timings[p][g].append(r["dt"])
                        if p == "raw":
                            for key in detail:
                                detail[key][g].append(r[key])
            if "http" in paths:
                files, size = (a - b for a, b in zip(_tree_usage(log_dir), logged))
                requests = args.warmup + args.n
                tasklog[g] = {"files_per_request": round(files / requests, 2),
                              "bytes_per_request": round(size / requests)}
        foreign = watch.foreign_cores()
        print(f"  measured in {time.perf_counter() - t_meas:.1f}s; "
              f"other processes kept {foreign:.2f} cores busy meanwhile", flush=True)
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception as e:
                print(f"cleanup: {e!r}", file=sys.stderr)

    breakdown = ({} if args.no_breakdown or "http" not in paths or args.rtt_ms
                 else _breakdown(args, wd))

    figures: dict[str, Any] = {}
    rows = []
    for g in args.graphs:
        f = figures[g] = {p: common.summary_ms(timings[p][g]) for p in paths}
        for p in paths:
            rows.append([g, p, f[p]["p50_ms"], f[p]["p95_ms"], f[p]["mean_ms"], f[p]["min_ms"]])
        if "raw" in f:
            f["raw_validate_p50_ms"] = round(common.percentile(detail["validate"][g], 50) * 1000, 3)
            f["raw_execute_p50_ms"] = round(common.percentile(detail["execute"][g], 50) * 1000, 3)
            f["encode_p50_ms"] = round(common.percentile(detail["encode"][g], 50) * 1000, 3)
        if "http" in f and "native" in f:
            f["http_over_native_p50"] = round(f["http"]["p50_ms"] / f["native"]["p50_ms"], 3)
            f["http_over_native_p95"] = round(f["http"]["p95_ms"] / f["native"]["p95_ms"], 3)
        for p in ("library", "http", "native"):
            if p in f and "raw" in f:
                f[f"{p}_minus_raw_p50_ms"] = round(f[p]["p50_ms"] - f["raw"]["p50_ms"], 2)
    print()
    if args.rtt_ms:
        print(f"(c) and (d) through a proxy adding {args.rtt_ms:g} ms per round trip")
    print(common.table(["graph", "path", "p50 ms", "p95 ms", "mean ms", "min ms"], rows))
    print()
    for g in args.graphs:
        f = figures[g]
        print(f"{g}:")
        if "http_over_native_p50" in f:
            print(f"  (c)/(d)  p50 {f['http_over_native_p50']:.3f}  p95 {f['http_over_native_p95']:.3f}"
                  f"   (issue 14's goal: p50 <= 1.0)")
        if "http_minus_raw_p50_ms" in f:
            print(f"  (c)-(a)  p50 {f['http_minus_raw_p50_ms']:+.2f} ms   (issue 14's goal: <= 3 ms; "
                  f"image encoding {f['encode_p50_ms']:.2f} ms of it)")
        for p, tag in (("library", "(b)-(a)"), ("native", "(d)-(a)")):
            if f"{p}_minus_raw_p50_ms" in f:
                print(f"  {tag}  p50 {f[f'{p}_minus_raw_p50_ms']:+.2f} ms")
        if g in tasklog:
            f["tasklog"] = tasklog[g]
            print(f"  task log per (c) request: {tasklog[g]['files_per_request']:g} files, "
                  f"{tasklog[g]['bytes_per_request']} bytes")
        if "raw" in f:
            print(f"  (a) = validate {f['raw_validate_p50_ms']:.2f} ms + execute "
                  f"{f['raw_execute_p50_ms']:.2f} ms (p50)")
    if breakdown:
        print("\nwhere (c)'s time goes (instrumented server, one request at a time with a stats"
              "\nread between requests, so work left after an answer does not delay the next;"
              "\np50 ms per stage):")
        labels = list(next(iter(breakdown.values())))
        print(common.table(["stage", *args.graphs],
                           [[lab, *[breakdown[g].get(lab, "") for g in args.graphs]] for lab in labels]))
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "overhead", "machine": machine,
                      "config": {"n": args.n, "warmup": args.warmup, "image_size": args.image_size,
                                 "t2i_size": args.t2i_size, "t2i_steps": args.t2i_steps,
                                 "torch_threads": args.torch_threads, "block": args.block,
                                 "http_env": args.http_env, "rtt_ms": args.rtt_ms},
                      "foreign_cores": foreign, "figures": figures, "breakdown_http_p50_ms": breakdown,
                      "workers": info})


def _tree_usage(root: Path) -> tuple[int, int]:
    """Files and bytes under ``root`` (the task log of the http path)."""
    files = size = 0
    for p in root.rglob("*") if root.is_dir() else ():
        try:
            if p.is_file():
                files += 1
                size += p.stat().st_size
        except FileNotFoundError:
            pass
    return files, size


def _via_proxy(port: int, args: argparse.Namespace, closers: list[Callable[[], None]]) -> int:
    if not args.rtt_ms:
        return port
    proxy = common.DelayProxy(port, args.rtt_ms / 2)
    closers.append(proxy.close)
    return proxy.port


def _client_runner(run: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def timed(graph: dict[str, Any]) -> dict[str, Any]:
        t = time.perf_counter()
        try:
            run(graph)
        except Exception as e:
            return {"error": repr(e)}
        return {"dt": time.perf_counter() - t}
    return timed


if __name__ == "__main__":
    main()
