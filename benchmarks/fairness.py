"""Fair share between API keys (issue 28): one key floods, the other sends one job at a time.

Two comfy-embed servers in turn, both with the same two API keys, the test
pack loaded (tests/custom_nodes) and ``COMFY_EMBED_KEY_QUEUE`` above the flood:

  fair   fair share on (the default with keys): one FIFO per key, round-robin;
  fifo   the baseline, ``COMFY_EMBED_FAIR_SHARE=false``: one FIFO for all.

Key A (the flood) keeps ``--flood`` jobs waiting the whole time (async runs of
EmbedTestSilentWait, ``--job-seconds`` each; it tops the queue up as it
drains, reading ``X-Queue-Depth``). Key B sends ``--trickle`` + 1 jobs one at
a time (sync runs of EmbedTestEcho, each sent as soon as the last answered).
Each B job reads ComfyUI's execution counter when it runs
(``info.number``: the how-many-th execution of the server it is), so

  between = number(B job k) - number(B job k-1) - 1

is how many of A's jobs ran between two consecutive B jobs: those that ran
between B's submit and its start, plus the one (if any) that started while
B's client was between two requests. Counts, not wall time: the figure
means the same on a busy machine. Issue 28's promise: at most one.

    .venv/bin/python benchmarks/fairness.py [--flood 100] [--trickle 10] [--job-seconds 0.2]

The FIFO mode takes about (trickle + 1) x flood x job-seconds (220 s by default).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

FLOOD_KEY, TRICKLE_KEY = "bench-flood-key-0001", "bench-trickle-key-0002"


def _wait(graph_seconds: float, i: int) -> dict[str, Any]:
    # A different duration per job (by a microsecond): ComfyUI's cache never answers it.
    return {"1": {"class_type": "EmbedTestSilentWait",
                  "inputs": {"seconds": graph_seconds + i * 1e-6, "progress": False}}}


class Flooder(threading.Thread):
    """Key A: keeps ``flood`` jobs waiting (queued plus running, read from
    ``X-Queue-Depth``, minus the one B may have waiting) until stopped."""

    def __init__(self, url: str, flood: int, job_seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.flood, self.job_seconds = url, flood, job_seconds
        self.stop = threading.Event()
        self.sent = self.refused = 0
        self.error: str | None = None

    def run(self) -> None:
        s = requests.Session()
        s.headers["X-Api-Key"] = FLOOD_KEY
        depth = 0
        while not self.stop.is_set():
            if depth >= self.flood + 1:  # full: look again shortly
                self.stop.wait(0.02)
                depth = int(s.get(f"{self.url}/health", timeout=30).headers["X-Queue-Depth"])
                continue
            r = s.post(f"{self.url}/api/serverless/run", json=_wait(self.job_seconds, self.sent),
                       headers={"X-Fc-Invocation-Type": "Async"}, timeout=60)
            if r.status_code == 429:
                self.refused += 1
                depth = self.flood + 1
                continue
            if r.status_code != 202:
                self.error = f"{r.status_code} {r.text[:300]}"
                return
            self.sent += 1
            depth = int(r.headers["X-Queue-Depth"])


def trickle(url: str, n: int) -> list[int]:
    """Key B: ``n`` sync runs one after another; the execution number of each."""
    s = requests.Session()
    s.headers["X-Api-Key"] = TRICKLE_KEY
    numbers = []
    for k in range(n):
        text = f"b-{k}-{time.time_ns()}"
        graph = {"1": {"class_type": "EmbedTestEcho", "inputs": {"text": text}}}
        r = s.post(f"{url}/api/serverless/run", json=graph, timeout=3600)
        r.raise_for_status()
        numbers.append(int(r.json()["data"]["outputs"]["1"]["info"][0]["number"]))
    return numbers


def one_mode(args: argparse.Namespace, wd: Path, fair: bool) -> dict[str, Any]:
    env = {"COMFY_EMBED_API_KEYS": f"{FLOOD_KEY},{TRICKLE_KEY}",
           "COMFY_EMBED_CUSTOM_NODES": "1",
           "COMFY_EMBED_CUSTOM_NODES_DIRS": str(common.ROOT / "tests" / "custom_nodes"),
           "COMFY_EMBED_KEY_QUEUE": str(args.flood + 10),
           "COMFY_EMBED_MAX_QUEUE": str(args.flood + 20),
           "COMFY_EMBED_FAIR_SHARE": "true" if fair else "false",
           "OMP_NUM_THREADS": str(args.torch_threads or "")}
    srv = common.start_embed(wd, cache_dir=args.cache_dir, env=env)
    flooder: Flooder | None = None
    try:
        srv.wait_http("/health")
        url = f"http://127.0.0.1:{srv.port}"
        while requests.get(f"{url}/ready", headers={"X-Api-Key": FLOOD_KEY},
                           timeout=5).status_code != 200:
            time.sleep(0.2)
        flooder = Flooder(url, args.flood, args.job_seconds)
        flooder.start()
        while flooder.sent < args.flood and flooder.error is None:  # the flood is in place
            time.sleep(0.05)
        numbers = trickle(url, args.trickle + 1)
    finally:
        if flooder is not None:
            flooder.stop.set()
            flooder.join(30)
        srv.stop()
    if flooder.error:
        raise RuntimeError(f"the flood was refused: {flooder.error}")
    between = [b - a - 1 for a, b in zip(numbers, numbers[1:])]
    return {"mode": "fair" if fair else "fifo", "trickle_numbers": numbers, "between": between,
            "max": max(between), "p50": common.percentile(between, 50),
            "flood_sent": flooder.sent, "flood_refused_429": flooder.refused}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flood", type=int, default=100, help="jobs key A keeps waiting")
    ap.add_argument("--trickle", type=int, default=10, help="B jobs measured (one more is sent)")
    # Long against B's client turning round (a keep-alive request): else, on a
    # loaded machine, a second A job may start before B's next one is sent.
    ap.add_argument("--job-seconds", type=float, default=0.2, help="seconds each A job runs")
    ap.add_argument("--modes", default="fair,fifo")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "fairness")
    results = [one_mode(args, wd, mode == "fair") for mode in args.modes.split(",")]
    print()
    print(f"A keeps {args.flood} jobs of {args.job_seconds}s waiting; B sends one at a time.")
    print("A's jobs run between two of B's (B's submit to its start, plus the one")
    print("running when B sent it):")
    print(common.table(["mode", "B jobs", "max", "p50", "each", "A sent", "A 429s"],
                       [[r["mode"], len(r["between"]), r["max"], r["p50"],
                         ",".join(map(str, r["between"])), r["flood_sent"],
                         r["flood_refused_429"]] for r in results]))
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "fairness", "machine": machine, "flood": args.flood,
                      "job_seconds": args.job_seconds, "results": results})


if __name__ == "__main__":
    main()
