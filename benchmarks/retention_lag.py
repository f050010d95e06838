"""How late a task's data is deleted after it expires, under load (issue 29).

N image-only tasks (EmptyImage -> ImageInvert -> SaveImage, 64x64) are sent
by ``--clients`` concurrent clients, each with ``?ttl=T``, so that tasks
expire while others still run and are answered. For each task the lag is
the moment its task-log folder and output folder are both gone (watched
every 10 ms) minus its expiry: the ``final`` file's time (read as soon as
the answer arrives) plus T. Beside it, the baseline measured in the same
run: the same tasks on a second server with no ``ttl`` and the operator's
retention set to T (``COMFY_EMBED_RETENTION_HOURS=T/3600``), i.e. what the
periodic prune did before per-request retention.

    .venv/bin/python benchmarks/retention_lag.py [--tasks 1000] [--ttl 5] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def watch(folders: dict[str, list[Path]], gone: dict[str, float], stop: threading.Event) -> None:
    """Record when every folder of each task has disappeared."""
    while not stop.is_set():
        for task_id, paths in list(folders.items()):
            if task_id not in gone and not any(os.path.exists(p) for p in paths):
                gone[task_id] = time.time()
        stop.wait(0.01)


def phase(args: argparse.Namespace, wd: Path, name: str, env: dict[str, str], query: str
          ) -> dict[str, Any]:
    wd.mkdir(parents=True, exist_ok=True)
    srv = common.start_embed(wd, cache_dir=args.cache_dir, env={
        "OMP_NUM_THREADS": str(args.torch_threads or ""), "COMFY_EMBED_MAX_QUEUE": "100000",
        **env})
    try:
        srv.wait_http("/ready")
        out = Path(srv.base) / "output"
        folders: dict[str, list[Path]] = {}
        expiry: dict[str, float] = {}
        gone: dict[str, float] = {}
        failures: list[str] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(folders, gone, stop), daemon=True)
        watcher.start()
        local = threading.local()

        def one(i: int) -> None:
            if not hasattr(local, "http"):
                local.http = common.Http(srv.port)
            task_id = f"{name}-{i:06d}"
            body = json.dumps(common.image_graph(i, size=64)).encode()
            status, raw = local.http.request("POST", f"/api/serverless/run{query}", body,
                                             {"Content-Type": "application/json",
                                              "X-Task-Id": task_id})
            final = out / "serverless_api" / task_id / "final"
            try:
                finished = final.stat().st_mtime
            except FileNotFoundError:
                finished = None  # already deleted: a ttl shorter than the answer's trip
            if status != 200 or finished is None:
                failures.append(f"{task_id}: {status} {raw[:200]!r}")
                return
            expiry[task_id] = finished + args.ttl
            folders[task_id] = [final.parent, out / task_id]

        started = time.time()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.tasks)))
        sent = time.time() - started
        deadline = time.time() + args.ttl + 120
        while len(gone) < len(folders) and time.time() < deadline:
            time.sleep(0.05)
        stop.set()
        watcher.join()
        lags = [gone[t] - expiry[t] for t in folders if t in gone]
        return {"phase": name, "tasks": args.tasks, "answered_s": round(sent, 1),
                "deleted": len(lags), "not_deleted": len(folders) - len(lags),
                "failed": len(failures), "failures": failures[:5],
                "early": sum(1 for lag in lags if lag < 0),
                "lag_ms": ({**common.summary_ms(lags), "max_ms": round(max(lags) * 1000, 2)}
                           if lags else {})}
    finally:
        srv.stop()
        common.tidy_workdir(wd, args.keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--ttl", type=int, default=5, help="seconds")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--no-baseline", action="store_true")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "retention-lag")
    results = [phase(args, wd / "ttl", "ttl", {}, f"?ttl={args.ttl}")]
    if not args.no_baseline:
        results.append(phase(args, wd / "retention", "retention",
                             {"COMFY_EMBED_RETENTION_HOURS": str(args.ttl / 3600)}, ""))
    rows = [[r["phase"], r["tasks"], r["answered_s"], r["deleted"], r["not_deleted"], r["early"],
             *(r["lag_ms"].get(k, "-") for k in ("p50_ms", "p95_ms", "max_ms"))] for r in results]
    print(common.table(["phase", "tasks", "answered s", "deleted", "not deleted", "early",
                        "lag p50 ms", "lag p95 ms", "lag max ms"], rows))
    for r in results:
        for failure in r["failures"]:
            print("  failed:", failure)
    common.emit_json({"bench": "retention_lag", "machine": machine, "ttl": args.ttl,
                      "clients": args.clients, "results": results})


if __name__ == "__main__":
    main()
