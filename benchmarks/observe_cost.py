"""What metrics and the per-task report cost per request (goal: < 0.5 ms p50).

In one process, real ComfyUI (CPU, tiny checkpoint) runs each graph a few
times through ``Engine.run`` (the library path): that request time is the
baseline. Then the observability work of one of those requests is replayed on
its recorded events, many times, and timed alone:

  report   TaskReport: the marks, each ComfyUI message, the peak-RSS reset
           and read (/proc), finish(); the loader look-up of the prompt;
           the report serialised once (it rides in the final event);
  metrics  the histograms and counters a finished task updates (report,
           outcome, task-log writes), the ``X-Queue-Depth`` read, the
           task-id log context around the job;
  total    both, as one request pays them.

Also: one ``/metrics`` scrape (rendering the registry), which is per scrape,
not per request.

    .venv/bin/python benchmarks/observe_cost.py [--n 5000] [--runs 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import anyio
import common


def _graphs(i: int) -> dict[str, dict[str, Any]]:
    return {"image512": common.image_graph(i, size=512),
            "t2i_tiny": common.t2i_graph(i, size=64, steps=4)}


def _replay(engine: Any, prompt: dict[str, Any], events: list[dict[str, Any]],
            flushes: int) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """Three callables doing one request's report work, metrics work, and both."""
    from comfy_embed.events import dumps
    from comfy_embed.observe.logs import task_context
    from comfy_embed.observe.report import TaskReport, loader_nodes

    comfy, metrics, executor = engine.comfy, engine.metrics, engine.executor
    pairs = [(ev["type"], ev["data"]) for ev in events]

    def report() -> dict[str, Any]:
        r = TaskReport()
        r.mark_prepared()
        r.mark_validated(prompt, loader_nodes(prompt, comfy.is_loader))
        r.started()
        for kind, data in pairs:
            r.on_event(kind, data)
        r.executed()
        r.mark_render()
        r.mark_render(end=True)
        out = r.finish()
        dumps(out)
        return out

    sample = report()

    def metric_work(rep: dict[str, Any] = sample) -> None:
        with task_context("bench"):
            metrics.task_report(rep)
            metrics.task_ended(None)
            for _ in range(flushes):
                metrics.task_log_write.observe(0.001)
            executor.queue_remaining  # the X-Queue-Depth header of its answer

    def both() -> None:
        metric_work(report())

    return report, metric_work, both


def _us(seconds: list[float]) -> dict[str, float]:
    """n, p50, p99 and mean in microseconds (the costs here are far below 1 ms)."""
    us = [x * 1e6 for x in seconds]
    return {"n": len(us), "p50_us": round(common.percentile(us, 50), 1),
            "p99_us": round(common.percentile(us, 99), 1), "mean_us": round(sum(us) / len(us), 1)}


def _time(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


async def _requests(engine: Any, name: str, runs: int) -> tuple[list[float], Any]:
    times, task = [], None
    for i in range(runs + 2):
        graph = _graphs(1000 + i)[name]
        t0 = time.perf_counter()
        final = await engine.run(graph, task_id=f"bench-{name}-{i}")
        if i >= 2:  # the first two warm up (the checkpoint load among them)
            times.append(time.perf_counter() - t0)
        task = engine.get(final["data"]["task_id"])
    return times, task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="replays per measurement")
    ap.add_argument("--runs", type=int, default=20, help="real requests per graph (baseline)")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "observe-cost")

    from comfy_embed.config import Settings
    from comfy_embed.runtime import Engine

    engine = Engine(Settings(base_dir=wd, cache_dir=args.cache_dir, tiny_checkpoint=True,
                             device="cpu")).start()
    engine.executor.wait_ready(600)
    rows, out = [], {"machine": machine, "graphs": {}}
    try:
        for name in ("image512", "t2i_tiny"):
            request_s, task = anyio.run(_requests, engine, name, args.runs)
            prompt = task.request.prompt
            flushes = 2  # the live log: at least one event segment and the final
            report, metric_work, both = _replay(engine, prompt, list(task.events), flushes)
            for fn in (report, metric_work, both):  # warm
                _time(fn, 200)
            figures = {"request": common.summary_ms(request_s),
                       "report": _us(_time(report, args.n)),
                       "metrics": _us(_time(metric_work, args.n)),
                       "total": _us(_time(both, args.n)),
                       "events": len(task.events)}
            out["graphs"][name] = figures
            request_ms = figures["request"]["p50_ms"]
            total_us = figures["total"]["p50_us"]
            rows.append([name, figures["events"], request_ms, figures["report"]["p50_us"],
                         figures["metrics"]["p50_us"], total_us, figures["total"]["p99_us"],
                         f"{100 * total_us / 1000 / request_ms:.2f} %"])
        scrape = _us(_time(engine.metrics.render_text, 500))
        out["scrape"] = scrape
    finally:
        engine.close()
        common.tidy_workdir(wd, args.keep)
    print(common.table(["graph", "events", "request p50 ms (baseline)", "report p50 us",
                        "metrics p50 us", "total p50 us", "total p99 us", "total / request"],
                       rows))
    print(f"/metrics scrape: p50 {scrape['p50_us']:.0f} us, p99 {scrape['p99_us']:.0f} us")
    common.emit_json({"benchmark": "observe_cost", **out})


if __name__ == "__main__":
    main()
