"""What the periodic task-log scans cost as the log grows (issue 14).

Every instance runs two scans every 15 s (half the lease): recovery of
tasks whose instance died (``TaskLog.recover_orphans``) and webhooks to
resume (``DeliveryLog.pending``); and retention (``retention.prune``)
every minute. A log keeps every finished task for the retention period
(24 h by default), so a scan that looks at every folder grows with it, and
its Python work holds the GIL that the executor thread needs.

For each size, a log of N finished tasks, 5 running tasks and 5 finished
tasks whose webhook is still undelivered, on this machine's disk; none is
old enough for retention to delete (the steady state). Timed, median of
``--runs``, for the 15-s scans together and for retention:

  index     as they run now: only the tasks in ``@index``;
  full      without the indexes' markers, i.e. listing and checking every
            folder (what a log from before the index gets once);
  previous  the per-folder work of the scans before the index, measured
            alone: recovery's scandir and stat per folder (finished tasks
            were cached), the webhook scan's stat per folder, retention's
            two stats per folder.

    .venv/bin/python benchmarks/scan_cost.py [--sizes 1000,10000,30000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from comfy_embed.taskid import valid_task_id
from comfy_embed.tasklog.delivery import DeliveryLog
from comfy_embed.tasklog.index import NameIndex
from comfy_embed.tasklog.log import TaskLog
from comfy_embed.tasklog.retention import prune

FINAL = {"type": "serverless_api", "data": {"status": "success", "results": []}}
DAY = 24 * 3600.0
HOOK = {"url": "http://127.0.0.1:9/hook", "events": "final"}


def build(root: Path, n: int) -> tuple[TaskLog, DeliveryLog]:
    tl = TaskLog(root, "bench", lease_seconds=30)
    deliveries = DeliveryLog(tl)
    tl.recover_orphans(), deliveries.pending()  # a new log: marked complete
    prune(root.parent, root.parent / "temp", tl, DAY)
    for i in range(n):
        tid = f"done-{i:06d}"
        tl.claim(tid)
        tl.extend(tid, [(1, FINAL)])
        tl.release(tid)
    for i in range(5):
        tl.claim(f"running-{i}")
        tl.claim(f"hook-{i}")
        deliveries.register(f"hook-{i}", HOOK)
        tl.extend(f"hook-{i}", [(1, FINAL)])
    return tl, deliveries


def previous_scans(root: Path) -> None:
    """The per-folder work of the scans before the index (see the docstring)."""
    with os.scandir(root) as it:
        for e in it:
            if e.is_dir() and not e.name.startswith("@"):
                e.stat()
    for name in sorted(os.listdir(root)):
        if not name.startswith("@"):
            (root / name / "webhook.json").exists()


def previous_prune(root: Path, cutoff: float) -> None:
    """Retention's per-folder work before the index, for tasks too young to delete."""
    for d in sorted(root.iterdir()):
        if valid_task_id(d.name) and d.is_dir():
            d.stat().st_mtime < cutoff


def timed(fn: Callable[[], Any], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,30000", help="finished tasks in the log")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the logs (default: a temp folder)")
    args = ap.parse_args()
    machine = common.describe_machine()
    common.print_machine(machine)
    rows, figures = [], {}
    for n in (int(x) for x in args.sizes.split(",") if x):
        base = Path(tempfile.mkdtemp(prefix="comfy-embed-scan-", dir=args.dir))
        try:
            t = time.perf_counter()
            tl, deliveries = build(base / "log", n)
            print(f"  {n} finished tasks written in {time.perf_counter() - t:.1f}s", flush=True)

            def indexed() -> None:
                assert tl.recover_orphans() == [] and len(deliveries.pending()) == 5

            def full() -> None:
                for name in ("open", "webhooks"):
                    os.unlink(NameIndex(tl.root, name).folder / ".complete")
                indexed()

            out = tl.root.parent

            def retention() -> None:
                assert prune(out, out / "temp", tl, DAY) == 0

            def retention_full() -> None:
                os.unlink(tl.done_index.folder / ".complete")
                retention()

            f = {"index_ms": round(timed(indexed, args.runs), 2),
                 "full_ms": round(timed(full, args.runs), 2),
                 "previous_ms": round(timed(lambda: previous_scans(tl.root), args.runs), 2),
                 "retention_index_ms": round(timed(retention, args.runs), 2),
                 "retention_full_ms": round(timed(retention_full, args.runs), 2),
                 "retention_previous_ms": round(timed(
                     lambda: previous_prune(tl.root, time.time() - DAY), args.runs), 2)}
            figures[str(n)] = f
            # Share of one core: the 15-s scans 4 times a minute, retention once.
            share = round((4 * f["previous_ms"] + f["retention_previous_ms"]) / 60000 * 100, 2)
            rows.append([n, f["index_ms"], f["full_ms"], f["previous_ms"], f["retention_index_ms"],
                         f["retention_full_ms"], f["retention_previous_ms"], share])
        finally:
            shutil.rmtree(base, ignore_errors=True)
    print(common.table(["finished tasks", "15-s scans: index ms", "full ms", "previous ms",
                        "retention: index ms", "full ms", "previous ms",
                        "previous: % of a core"], rows))
    common.emit_json({"bench": "scan_cost", "machine": machine,
                      "config": {"runs": args.runs, "running": 5, "undelivered_webhooks": 5},
                      "figures": figures})


if __name__ == "__main__":
    main()
