"""N variants of one request against N separate requests (issue 28), one server, one run.

One comfy-embed server (python server.py, the tiny checkpoint, CPU unless
``--device``) gets the same text-to-image work three ways, for each N:

  variants     one POST /api/serverless/run?variants=N&output_base64=true:
               the graph run N times in one task (fresh seeds), one answer;
  separate     N POST /api/serverless/run?output_base64=true one after
               another from one keep-alive client, each with its own seed;
  concurrent   the same N requests sent at once, from N clients (they queue
               in the executor and run one after another);
  interleaved  ``separate``, with another caller's small job (an image,
               no model) run before each: a busy server, where N separate
               requests do not follow one another and ComfyUI's cache
               lets the loader's output go between them.

Each round gives every way a prompt text of its own (so each pays one text
encode, as a caller with a new prompt would) and rotates their order, so a
slow spell of the machine hits all alike. Printed per N: the median total
seconds of each way over the rounds (for ``interleaved``, the other
caller's jobs included), each way's ratio to ``variants`` (separate /
variants: how much longer N requests take), and the executor seconds of
the N pictures alone (the answers' ``execution_time`` summed: the other
caller's jobs left out; each runs from its job's start to its answer, so
for ``concurrent`` they overlap). Every answer is checked for N distinct pictures.
Nothing asserts on time.

    .venv/bin/python benchmarks/variants.py [--n 4,8] [--rounds 3] [--steps 8] [--size 64]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

WAYS = ("variants", "separate", "concurrent", "interleaved")
JSON = {"Content-Type": "application/json"}


def _graph(args: argparse.Namespace, text: str) -> dict[str, Any]:
    """The text-to-image graph with ``text`` and a random seed (-1)."""
    g = common.t2i_graph(0, size=args.size, steps=args.steps)
    g["3"]["inputs"]["seed"] = -1
    g["6"]["inputs"]["text"] = text
    return g


def _pictures(status: int, body: bytes, executed: list[float]) -> list[bytes]:
    """The answer's pictures; its ``execution_time`` appended to ``executed``."""
    final = json.loads(body)
    data = final.get("data") or {}
    if status != 200 or data.get("status") != "success":
        raise common.RequestFailed(f"HTTP {status}: {body[:400]!r}")
    executed.append(float(data["execution_time"]))
    return [base64.b64decode(r["output"]["base64"]["data"]) for r in data["results"]]


def one_way(way: str, port: int, n: int, args: argparse.Namespace, text: str
            ) -> tuple[float, float]:
    """Seconds for N pictures ``way``, and the executor's seconds for them;
    checks that N distinct ones came back."""
    pictures: list[bytes] = []
    executed: list[float] = []
    start = time.perf_counter()
    if way == "variants":
        http = common.Http(port)
        status, body = http.request("POST", f"/api/serverless/run?variants={n}&output_base64=true",
                                    json.dumps(_graph(args, text)).encode(), JSON)
        pictures = _pictures(status, body, executed)
        http.close()
    elif way in ("separate", "interleaved"):
        http = common.Http(port)
        for k in range(n):
            if way == "interleaved":  # another caller's job, not counted in ``executed``
                status, body = http.request("POST", "/api/serverless/run", json.dumps(
                    common.image_graph(k + int(time.time()), size=64)).encode(), JSON)
                if status != 200:
                    raise common.RequestFailed(f"the other job: HTTP {status}: {body[:300]!r}")
            status, body = http.request("POST", "/api/serverless/run?output_base64=true",
                                        json.dumps(_graph(args, text)).encode(), JSON)
            pictures += _pictures(status, body, executed)
        http.close()
    else:
        got: list[list[bytes]] = [[] for _ in range(n)]
        errors: list[Exception] = []

        def one(k: int) -> None:
            http = common.Http(port)
            try:
                status, body = http.request("POST", "/api/serverless/run?output_base64=true",
                                            json.dumps(_graph(args, text)).encode(), JSON)
                got[k] = _pictures(status, body, executed)
            except (common.RequestFailed, OSError, ValueError) as e:  # reported below
                errors.append(e)
            finally:
                http.close()
        threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        pictures = [p for ps in got for p in ps]
    seconds = time.perf_counter() - start
    if len(pictures) != n or len(set(pictures)) != n:
        raise common.RequestFailed(f"{way}: {len(pictures)} pictures, {len(set(pictures))} distinct")
    return seconds, sum(executed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", default="4,8", help="variant counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "variants")
    counts = [int(x) for x in args.n.split(",")]
    env = {"COMFY_EMBED_MAX_VARIANTS": str(max(counts)),
           "COMFY_EMBED_MAX_QUEUE": str(max(counts) + 8),
           "OMP_NUM_THREADS": str(args.torch_threads or "")}
    srv = common.start_embed(wd, cache_dir=args.cache_dir, env=env, device=args.device)
    times: dict[int, dict[str, list[float]]] = {n: {w: [] for w in WAYS} for n in counts}
    execs: dict[int, dict[str, list[float]]] = {n: {w: [] for w in WAYS} for n in counts}
    try:
        srv.wait_http("/ready")
        one_way("separate", srv.port, 1, args, "warm-up")  # the checkpoint loaded once
        for r in range(args.rounds):
            for n in counts:
                order = WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]
                for way in order:
                    seconds, ex = one_way(way, srv.port, n, args, f"round {r} n {n} {way}")
                    times[n][way].append(seconds)
                    execs[n][way].append(ex)
                    print(f"round {r + 1} N={n} {way:<11} {seconds:.3f} s (executor {ex:.3f} s)",
                          flush=True)
    finally:
        srv.stop()
    rows, results = [], []
    for n in counts:
        med = {w: statistics.median(times[n][w]) for w in WAYS}
        ex = {w: statistics.median(execs[n][w]) for w in WAYS}
        for w in WAYS:
            rows.append([n, w, f"{med[w]:.3f}", f"{med[w] / med['variants']:.3f}",
                         f"{ex[w]:.3f}", f"{ex[w] / ex['variants']:.3f}",
                         " ".join(f"{t:.2f}" for t in times[n][w])])
        results.append({"n": n, "median_s": med, "seconds": times[n], "executor_s": execs[n],
                        "ratio_to_variants": {w: med[w] / med["variants"] for w in WAYS},
                        "executor_ratio_to_variants": {w: ex[w] / ex["variants"] for w in WAYS}})
    print()
    print(f"{args.steps} steps, {args.size}x{args.size}, tiny checkpoint, {args.device}; "
          f"median of {args.rounds} rounds")
    print(common.table(["N", "way", "total s", "x variants", "executor s", "x variants",
                        "each round (total s)"], rows))
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "variants", "machine": machine, "steps": args.steps,
                      "size": args.size, "device": args.device, "results": results})


if __name__ == "__main__":
    main()
