"""The measured ETA's error: predicted against actual finish, mixed step counts.

One comfy-embed server (python server.py) runs the tiny checkpoint's
text-to-image graph at ``--size`` px with step counts from ``--steps``
(2, 5, 10, 20 by default: four shapes). First each step count runs
``--learn`` times, one at a time (the instance learns each shape; the first
run also loads the model). Then ``--bursts`` bursts of ``--burst`` async
requests (``X-Fc-Invocation-Type: Async``), the step counts drawn at random
(``--seed``), each burst sent at once and waited for before the next, so
jobs queue 0 to burst-1 deep behind each other.

For every measured job:

  predicted  the 202 answer's ``eta_finish``: seconds from its admission
             until it should finish (the remaining estimate of the running
             job, plus those queued ahead, plus its own);
  actual     its report's ``queued + execution``: from admission (the end of
             validation) until its execution ended, timed by the server.

Both count from the same instant, so no client timing enters the figure.
The baseline, from the same run: a shape-blind ETA, ``(position + 1) x the
median execution of every learning run`` (what a queue length times a
typical job gives). Printed: median and p90 of |predicted - actual| in
seconds and relative to actual, for the ETA and for the baseline, plus the
cost of computing the shape (microseconds, this process, the same graph).
Nothing here asserts on time.

    .venv/bin/python benchmarks/eta.py [--bursts 6] [--burst 4] [--steps 2,5,10,20]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

JSON = {"Content-Type": "application/json"}


def _final(http: common.Http, task_id: str, timeout: float = 600.0) -> dict[str, Any]:
    """Poll /status until the final event (its ``data``)."""
    end = time.monotonic() + timeout
    since = 0
    while time.monotonic() < end:
        status, body = http.request("GET", f"/api/serverless/status?task_id={task_id}&since={since}")
        if status != 200:
            raise common.RequestFailed(f"status {status}: {body[:200]!r}")
        for ev in json.loads(body):
            since = max(since, int(ev.get("id") or since))
            if ev["type"] == "serverless_api":
                if ev["data"].get("status") != "success":
                    raise common.RequestFailed(f"task {task_id} failed: {ev['data'].get('error')}")
                return ev["data"]
        time.sleep(0.02)
    raise common.RequestFailed(f"task {task_id}: no final event in {timeout}s")


def _learn(http: common.Http, steps: list[int], args: argparse.Namespace
           ) -> list[tuple[int, float]]:
    """Each step count ``args.learn`` times, synchronously: (steps, execution seconds)."""
    seconds = []
    i = 0
    for _ in range(args.learn):
        for s in steps:
            i += 1
            graph = common.t2i_graph(90_000 + i, size=args.size, steps=s)
            status, body = http.request("POST", "/api/serverless/run",
                                        json.dumps(graph).encode(), JSON)
            if status != 200:
                raise common.RequestFailed(f"learning run: {status} {body[:200]!r}")
            seconds.append((s, float(json.loads(body)["data"]["report"]["execution"])))
    return seconds


def _bursts(http: common.Http, steps: list[int], args: argparse.Namespace,
            typical: float) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    i = 0
    for _ in range(args.bursts):
        sent = []
        for _ in range(args.burst):
            i += 1
            s = rng.choice(steps)
            graph = common.t2i_graph(i, size=args.size, steps=s)
            status, body = http.request("POST", "/api/serverless/run", json.dumps(graph).encode(),
                                        {**JSON, "X-Fc-Invocation-Type": "Async"})
            if status != 202:
                raise common.RequestFailed(f"async run: {status} {body[:200]!r}")
            sent.append((s, json.loads(body)))
        for s, answer in sent:
            report = _final(http, answer["task_id"])["report"]
            actual = report["queued"] + report["execution"]
            position = answer["position"] or 0
            rows.append({"steps": s, "position": position, "predicted": answer["eta_finish"],
                         "predicted_start": answer["eta_start"], "actual": actual,
                         "actual_start": report["queued"], "execution": report["execution"],
                         "estimate": report.get("estimate"),
                         "baseline": (position + 1) * typical})
    return rows


def _errors(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    known = [r for r in rows if r[key] is not None]
    abs_s = [abs(r[key] - r["actual"]) for r in known]
    rel = [abs(r[key] - r["actual"]) / r["actual"] for r in known if r["actual"] > 0]
    signed = [r[key] - r["actual"] for r in known]
    return {"n": len(known), "unknown": len(rows) - len(known),
            "abs_p50_s": round(common.percentile(abs_s, 50), 4),
            "abs_p90_s": round(common.percentile(abs_s, 90), 4),
            "rel_p50": round(common.percentile(rel, 50), 4),
            "rel_p90": round(common.percentile(rel, 90), 4),
            "bias_p50_s": round(common.percentile(signed, 50), 4)}


def _shape_cost(args: argparse.Namespace) -> dict[str, float]:
    """Microseconds of one ``workflow_shape`` of the measured graph (specs
    from a dict, as the booted ComfyUI answers them from its node table)."""
    from comfy_embed.prepare.shape import workflow_shape
    specs = {"KSampler": {"seed": ("INT", {}), "steps": ("INT", {}), "cfg": ("FLOAT", {}),
                          "sampler_name": (["euler"], {}), "scheduler": (["normal"], {}),
                          "denoise": ("FLOAT", {})},
             "CheckpointLoaderSimple": {"ckpt_name": ([common.TINY], {})},
             "EmptyLatentImage": {"width": ("INT", {}), "height": ("INT", {}),
                                  "batch_size": ("INT", {})},
             "CLIPTextEncode": {"text": ("STRING", {})}, "SaveImage": {"filename_prefix": ("STRING", {})}}
    graph = common.t2i_graph(1, size=args.size, steps=5)
    look = specs.get
    n = 2000
    runs = timeit.repeat(lambda: workflow_shape(graph, lambda c: look(c, {})), number=n, repeat=5)
    return {"p50_us": round(statistics.median(runs) / n * 1e6, 2),
            "min_us": round(min(runs) / n * 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="2,5,10,20", help="step counts (one shape each)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--learn", type=int, default=3, help="learning runs per step count")
    ap.add_argument("--bursts", type=int, default=6)
    ap.add_argument("--burst", type=int, default=4, help="async requests sent at once")
    ap.add_argument("--seed", type=int, default=28)
    common.add_common_args(ap)
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",") if s]

    machine, wd = common.start_run(args, "eta")
    print(f"steps {steps} at {args.size}px; {args.learn} learning runs each; {args.bursts} "
          f"bursts of {args.burst}; logs in {wd}", flush=True)
    with common.start_embed(wd, cache_dir=args.cache_dir) as srv:
        srv.wait_http("/ready")
        http = common.Http(srv.port)
        watch = common.CpuWatch()
        try:
            learned = _learn(http, steps, args)
            # The first run loads the model: the shape-blind baseline takes the median.
            typical = statistics.median(t for _, t in learned)
            rows = _bursts(http, steps, args, typical)
        finally:
            http.close()
        foreign = watch.foreign_cores()
    print(f"other processes kept {foreign:.2f} cores busy meanwhile")

    eta, base = _errors(rows, "predicted"), _errors(rows, "baseline")
    start = _errors([{**r, "predicted": r["predicted_start"], "actual": r["actual_start"]}
                     for r in rows if r["actual_start"] > 0], "predicted")
    by_steps = {}
    for s in steps:
        mine = [r for r in rows if r["steps"] == s]
        if mine:
            by_steps[s] = {"n": len(mine), "learned_p50_s": round(
                statistics.median(t for k, t in learned if k == s), 4), "execution_p50_s": round(
                statistics.median(r["execution"] for r in mine), 4),
                **{k: v for k, v in _errors(mine, "predicted").items() if k != "n"}}
    cost = _shape_cost(args)
    print()
    print(common.table(["predictor", "n", "|err| p50 s", "|err| p90 s", "rel p50", "rel p90",
                        "bias p50 s"],
                       [[name, e["n"], e["abs_p50_s"], e["abs_p90_s"], e["rel_p50"], e["rel_p90"],
                         e["bias_p50_s"]]
                        for name, e in (("eta finish", eta), ("baseline finish", base),
                                        ("eta start (queued)", start))]))
    print()
    print(common.table(["steps", "n", "learned p50 s", "execution p50 s", "|err| p50 s",
                        "|err| p90 s"],
                       [[s, f["n"], f["learned_p50_s"], f["execution_p50_s"], f["abs_p50_s"],
                         f["abs_p90_s"]]
                        for s, f in by_steps.items()]))
    print(f"\nshape hash of the graph: {cost['p50_us']} us (min {cost['min_us']} us)")
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "eta", "machine": machine,
                      "config": {"steps": steps, "size": args.size, "learn": args.learn,
                                 "bursts": args.bursts, "burst": args.burst, "seed": args.seed,
                                 "torch_threads": args.torch_threads},
                      "foreign_cores": foreign,
                      "figures": {"eta_finish": eta, "baseline_finish": base, "eta_start": start,
                                  "by_steps": by_steps, "shape_us": cost,
                                  "learning_median_s": round(typical, 4)}})


if __name__ == "__main__":
    main()
