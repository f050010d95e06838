"""Comfy API v2 submit-and-poll against the Function Compute paths, one server, one run.

Four ways a client gets the same graph's images from one comfy-embed server
(python server.py), each on its own keep-alive connection, one request at a
time, taking turns in blocks of ``--block`` requests (order rotating) so that
a slow spell of the machine hits all paths alike:

  fc_sync    POST /api/serverless/run?output_base64=true (the answer carries
             the images);
  fc_poll    POST /api/serverless/run?output_base64=true with
             X-Fc-Invocation-Type: Async (202), then GET
             /api/serverless/status?task_id= every ``--poll-ms`` until the
             final event (it carries the images);
  v2_poll    POST /api/v2/jobs (201), then GET /api/v2/jobs/{id} every
             ``--poll-ms`` until a terminal status, then GET
             /api/v2/assets/{id}/content per output (what comfy-sdk's
             ``run`` + ``to_bytes`` do, without its 0.5 s first poll wait);
  v2_stream  POST /api/v2/jobs, then GET /api/v2/jobs/{id}/events until the
             terminal status, then the outputs' content.

Issue 23's goal: v2_poll within 1 ms (p50) of fc_poll, its like-for-like FC
path; fc_sync is shown for reference. The poll interval adds up to one
interval to both poll paths alike. Nothing here asserts on time.

    .venv/bin/python benchmarks/v2_submit.py [--n 40] [--graphs image512,t2i_tiny]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

PATHS = ("fc_sync", "fc_poll", "v2_poll", "v2_stream")
TERMINAL = {"succeeded", "failed", "canceled", "expired"}
JSON = {"Content-Type": "application/json"}


def _graph(name: str, i: int, args: argparse.Namespace) -> dict[str, Any]:
    if name == "image512":
        return common.image_graph(i, size=args.image_size)
    return common.t2i_graph(i, size=args.t2i_size, steps=args.t2i_steps)


class Client:
    """The four request patterns over one keep-alive connection each."""

    def __init__(self, port: int, poll_s: float) -> None:
        self.port, self.poll_s = port, poll_s
        self.http = {p: common.Http(port) for p in PATHS}

    def close(self) -> None:
        for h in self.http.values():
            h.close()

    def _json(self, path: str, method: str, url: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, Any]:
        raw = json.dumps(body).encode() if body is not None else None
        status, data = self.http[path].request(method, url, raw, {**JSON, **(headers or {})})
        return status, json.loads(data) if data else None

    def fc_sync(self, graph: dict[str, Any]) -> list[bytes]:
        status, final = self._json("fc_sync", "POST", "/api/serverless/run?output_base64=true",
                                   graph)
        return _fc_images(status, final)

    def fc_poll(self, graph: dict[str, Any]) -> list[bytes]:
        task_id = f"bench-{uuid.uuid4().hex}"
        status, _ = self._json("fc_poll", "POST", "/api/serverless/run?output_base64=true", graph,
                               {"X-Fc-Invocation-Type": "Async", "X-Task-Id": task_id})
        if status != 202:
            raise common.RequestFailed(f"fc async submit: HTTP {status}")
        while True:
            status, events = self._json("fc_poll", "GET",
                                        f"/api/serverless/status?task_id={task_id}")
            if status == 200 and events and events[-1]["type"] == "serverless_api":
                return _fc_images(200, events[-1])
            time.sleep(self.poll_s)

    def _v2_submit(self, path: str, graph: dict[str, Any]) -> dict[str, Any]:
        status, job = self._json(path, "POST", "/api/v2/jobs", {"workflow": graph})
        if status != 201:
            raise common.RequestFailed(f"v2 submit: HTTP {status} {json.dumps(job)[:300]}")
        return dict(job)

    def _v2_outputs(self, path: str, job: dict[str, Any]) -> list[bytes]:
        if job["status"] != "succeeded":
            raise common.RequestFailed(f"v2 job ended {job['status']}: {job.get('error')}")
        images = []
        for out in job["outputs"]:
            status, data = self.http[path].request("GET", f"/api/v2/assets/{out['id']}/content")
            if status != 200:
                raise common.RequestFailed(f"v2 content: HTTP {status}")
            images.append(data)
        return images

    def v2_poll(self, graph: dict[str, Any]) -> list[bytes]:
        job = self._v2_submit("v2_poll", graph)
        while job["status"] not in TERMINAL:
            time.sleep(self.poll_s)
            _, job = self._json("v2_poll", "GET", f"/api/v2/jobs/{job['id']}")
        return self._v2_outputs("v2_poll", job)

    def v2_stream(self, graph: dict[str, Any]) -> list[bytes]:
        job = self._v2_submit("v2_stream", graph)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("GET", f"/api/v2/jobs/{job['id']}/events",
                         headers={"Accept": "text/event-stream"})
            r = conn.getresponse()
            event = ""
            while True:
                line = r.readline()
                if not line:
                    break
                if line.startswith(b"event:"):
                    event = line[6:].strip().decode()
                elif (line.startswith(b"data:") and event == "status"
                      and json.loads(line[5:])["status"] in TERMINAL):
                    break
        finally:
            conn.close()
        _, job = self._json("v2_stream", "GET", f"/api/v2/jobs/{job['id']}")
        return self._v2_outputs("v2_stream", job)


def _fc_images(status: int, final: Any) -> list[bytes]:
    if status != 200 or final.get("data", {}).get("status") != "success":
        raise common.RequestFailed(f"HTTP {status}: {json.dumps(final)[:300]}")
    return [base64.b64decode(r["output"]["base64"]["data"]) for r in final["data"]["results"]]


def _measure(client: Client, args: argparse.Namespace,
             paths: list[str]) -> dict[str, dict[str, list[float]]]:
    timings: dict[str, dict[str, list[float]]] = {p: {g: [] for g in args.graphs} for p in paths}
    runners: dict[str, Callable[[dict[str, Any]], list[bytes]]] = {
        p: getattr(client, p) for p in paths}
    for g in args.graphs:  # graph by graph: ComfyUI's cache keeps what the next prompt shares
        for k in range(args.warmup):
            for p in paths:
                runners[p](_graph(g, -1 - k, args))
        for b, start in enumerate(range(0, args.n, args.block)):
            k = b % len(paths)
            for p in paths[k:] + paths[:k]:
                for i in range(start, min(start + args.block, args.n)):
                    t0 = time.perf_counter()
                    images = runners[p](_graph(g, i, args))
                    timings[p][g].append(time.perf_counter() - t0)
                    if not images:
                        raise common.RequestFailed(f"{p} {g} #{i}: no image")
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="measured requests per graph and path")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--graphs", default="image512,t2i_tiny")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--t2i-size", type=int, default=64)
    ap.add_argument("--t2i-steps", type=int, default=4)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--poll-ms", type=float, default=2.0,
                    help="interval between two polls of fc_poll and v2_poll")
    ap.add_argument("--http-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the server (repeatable)")
    common.add_common_args(ap)
    args = ap.parse_args()
    args.graphs = [g for g in args.graphs.split(",") if g]
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    env = dict(kv.split("=", 1) for kv in args.http_env)

    machine, wd = common.start_run(args, "v2_submit")
    print(f"graphs {args.graphs}; {args.n} requests each after {args.warmup} warm-up; "
          f"poll every {args.poll_ms:g} ms; logs in {wd}", flush=True)
    with common.start_embed(wd, cache_dir=args.cache_dir, env=env) as srv:
        srv.wait_http("/ready")
        client = Client(srv.port, args.poll_ms / 1000)
        watch = common.CpuWatch()
        try:
            timings = _measure(client, args, paths)
        finally:
            client.close()
        foreign = watch.foreign_cores()
    print(f"other processes kept {foreign:.2f} cores busy meanwhile")

    figures: dict[str, Any] = {}
    rows = []
    for g in args.graphs:
        f = figures[g] = {p: common.summary_ms(timings[p][g]) for p in paths}
        for p in paths:
            rows.append([g, p, f[p]["p50_ms"], f[p]["p95_ms"], f[p]["mean_ms"], f[p]["min_ms"]])
        for v2, fc in (("v2_poll", "fc_poll"), ("v2_poll", "fc_sync"), ("v2_stream", "fc_sync")):
            if v2 in f and fc in f:
                f[f"{v2}_minus_{fc}_p50_ms"] = round(f[v2]["p50_ms"] - f[fc]["p50_ms"], 2)
    print()
    print(common.table(["graph", "path", "p50 ms", "p95 ms", "mean ms", "min ms"], rows))
    for g in args.graphs:
        if "v2_poll_minus_fc_poll_p50_ms" in figures[g]:
            print(f"{g}: v2_poll - fc_poll p50 {figures[g]['v2_poll_minus_fc_poll_p50_ms']:+.2f} ms"
                  "   (issue 23's goal: within 1 ms)")
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "v2_submit", "machine": machine,
                      "config": {"n": args.n, "warmup": args.warmup, "graphs": args.graphs,
                                 "paths": paths, "image_size": args.image_size,
                                 "t2i_size": args.t2i_size, "t2i_steps": args.t2i_steps,
                                 "block": args.block, "poll_ms": args.poll_ms, "http_env": env,
                                 "torch_threads": args.torch_threads},
                      "foreign_cores": foreign, "figures": figures})


if __name__ == "__main__":
    main()
