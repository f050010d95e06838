"""Hostile-traffic load test: 16 clients, good and bad requests mixed.

One comfy-embed server (``python server.py``, CPU, tiny checkpoint). Two
phases with the same clients:

  baseline  good requests only (sync, async + status polling, stream,
            WebSocket, inline base64 image), ``--duration`` / 4 seconds;
  mixed     the same good requests interleaved with bad ones (malformed and
            deeply nested JSON, 5,000-digit integers, 800 KB file names,
            ``../`` prefixes, denied nodes, too many nodes, bad parameters
            and task ids, unknown nodes; issue 25's: 40 URL inputs, a
            4096-picture batch with a 1 MB undeclared input, /validate of
            100,000 nodes and of VAESave, a '.' prefix, WebcamCapture
            reading another task's output), ``--duration`` seconds.

Per phase: requests, unexpected answers ("errors": a 5xx, a dropped
connection, a bad request not answered 4xx, a good one not answered 200),
p50/p99 latency of the good requests, and at the end the server's RSS, files
under its folders before, after the load and after a retention pass
(``--retention-hours``), and lost tasks: accepted tasks whose status did not
show a final event once their answer was in (async: within 10 minutes of
polling); must be 0.

    .venv/bin/python benchmarks/load.py [--duration 120] [--clients 16]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import websocket

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

API = "/api/serverless"


def count_files(base: Path) -> int:
    """Files the server made under its folders (its own log excluded)."""
    n = 0
    for sub in ("input", "output", "temp"):
        for _, _, files in os.walk(base / sub):
            n += len(files)
    return n


class Load:
    """The requests one client can send; each returns (kind, good, status, seconds)."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.url = url
        self.ws_url = url.replace("http://", "ws://") + API + "/ws"
        self.rng = rng
        self.s = requests.Session()
        self.accepted: list[str] = []  # task ids answered 200/202: each must end
        self.lost: list[str] = []  # accepted, but status showed no final event

    def check_final(self, tid: str) -> None:
        """Once a task's answer is in, its final event must be in the log
        (read back now: retention may delete it later in a long run)."""
        self.accepted.append(tid)
        ev = self.s.get(f"{self.url}{API}/status", params={"task_id": tid}, timeout=60).json()
        if not ev or ev[-1]["type"] != "serverless_api":
            self.lost.append(tid)

    # ----------------------------------------------------------- good ones
    def graph(self) -> dict[str, Any]:
        i = self.rng.randrange(1 << 30)
        return (common.image_graph(i, size=64) if self.rng.random() < 0.7
                else common.t2i_graph(i, size=64, steps=2))

    def sync(self) -> int:
        tid = "ld-" + uuid.uuid4().hex
        r = self.s.post(f"{self.url}{API}/run", json=self.graph(), headers={"X-Task-Id": tid},
                        timeout=600)
        if r.status_code == 200:
            self.check_final(tid)
        return r.status_code

    def inline_image(self) -> int:
        data = base64.b64encode(_png(self.rng.randrange(256))).decode()
        g = {"1": {"class_type": "LoadImage", "inputs": {"image": data}},
             "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "in", "images": ["1", 0]}}}
        tid = "ld-" + uuid.uuid4().hex
        r = self.s.post(f"{self.url}{API}/run", json=g, headers={"X-Task-Id": tid}, timeout=600)
        if r.status_code == 200:
            self.check_final(tid)
        return r.status_code

    def async_poll(self) -> int:
        tid = "ld-" + uuid.uuid4().hex
        r = self.s.post(f"{self.url}{API}/run", json=self.graph(),
                        headers={"X-Task-Id": tid, "X-Fc-Invocation-Type": "Async"}, timeout=60)
        if r.status_code != 202:
            return r.status_code
        self.accepted.append(tid)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ev = self.s.get(f"{self.url}{API}/status", params={"task_id": tid}, timeout=60).json()
            if ev and ev[-1]["type"] == "serverless_api":
                return 200 if ev[-1]["data"]["status"] == "success" else 500
            time.sleep(0.2)
        self.lost.append(tid)
        return 599

    def stream(self) -> int:
        tid = "ld-" + uuid.uuid4().hex
        with self.s.post(f"{self.url}{API}/run?stream=1", json=self.graph(),
                         headers={"X-Task-Id": tid}, stream=True, timeout=600) as r:
            if r.status_code != 200:
                return r.status_code
            for line in r.iter_lines(decode_unicode=True):
                if line and line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if ev["type"] == "serverless_api":
                        self.check_final(tid)
                        return 200 if ev["data"]["status"] == "success" else 500
        self.accepted.append(tid)
        self.lost.append(tid)  # the stream ended without its final event
        return 598

    def ws(self) -> int:
        conn = websocket.create_connection(self.ws_url, timeout=600)
        try:
            conn.send(json.dumps(self.graph()))
            while True:
                ev = json.loads(conn.recv())
                if ev["type"] == "serverless_api":
                    self.check_final(ev["data"]["task_id"])
                    return 200 if ev["data"]["status"] == "success" else 500
        finally:
            conn.close()

    # ------------------------------------------------------------ bad ones
    def _bad_body(self, body: bytes, params: str = "") -> int:
        tid = "bad-" + uuid.uuid4().hex
        r = self.s.post(f"{self.url}{API}/run{params}", data=body,
                        headers={"X-Task-Id": tid, "Content-Type": "application/json"}, timeout=60)
        if r.status_code in (200, 202):  # a bad request accepted: must still end
            self.check_final(tid)
        return r.status_code

    def _validate(self, body: dict[str, Any]) -> int:
        """A dry run: 200 with ``valid`` false counts as the refusal it is."""
        r = self.s.post(f"{self.url}{API}/validate", json=body, timeout=60)
        if r.status_code != 200:
            return r.status_code
        return 400 if r.json()["valid"] is False else 200

    def bad_round3(self, choice: int) -> int:
        """Issue 25's cases (hostile callers, round 3)."""
        g = common.image_graph(1, size=64)
        if choice == 0:  # too many URL inputs: refused before any is fetched
            urls = {str(10 + i): {"class_type": "LoadImage",
                                  "inputs": {"image": f"http://10.0.0.{i}/x.png"}} for i in range(40)}
            return self._bad_body(json.dumps({**g, **urls}).encode())
        if choice == 1:  # a batch whose output would fill the disk
            g["1"]["inputs"].update(batch_size=4096, width=1024, height=1024)
            g["1"]["inputs"]["junk"] = "j" * 1_000_000
            return self._bad_body(json.dumps(g).encode())
        if choice == 2:  # /validate applies the node limit
            return self._validate({str(i): {"class_type": "EmptyImage", "inputs": {}}
                                   for i in range(100_000)})
        if choice == 3:  # /validate applies the denylist
            return self._validate({
                "1": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
                "2": {"class_type": "VAESave", "inputs": {"vae": ["1", 0], "filename_prefix": "v"}}})
        if choice == 4:  # a prefix that normalises to the output root
            g["3"]["inputs"]["filename_prefix"] = "."
            return self._bad_body(json.dumps(g).encode())
        # another task's output through a node without an upload marker
        return self._bad_body(json.dumps({
            "1": {"class_type": "WebcamCapture",
                  "inputs": {"image": "victim/ComfyUI_00001_.png [output]", "width": 0,
                             "height": 0, "capture_on_queue": False}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}).encode(),
            "?output_base64=1")

    def bad(self) -> int:
        g = common.image_graph(1, size=64)
        choice = self.rng.randrange(17)
        if choice >= 11:
            return self.bad_round3(choice - 11)
        if choice == 0:
            return self._bad_body(b"{bad json")
        if choice == 1:
            return self._bad_body(b"[" * 50_000 + b"]" * 50_000)
        if choice == 2:
            return self._bad_body(b'{"1": {"class_type": "EmptyImage", "inputs": {"width": '
                                  + b"9" * 5000 + b"}}}")
        if choice == 3:
            return self._bad_body(json.dumps({
                "1": {"class_type": "LoadImage", "inputs": {"image": "abcdefg/" * 100_000}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}).encode())
        if choice == 4:
            g["3"]["inputs"]["filename_prefix"] = "../serverless_api/victim/x"
            return self._bad_body(json.dumps(g).encode())
        if choice == 5:
            return self._bad_body(json.dumps({
                "1": {"class_type": "LoadImageSetFromFolderNode", "inputs": {"folder": "serverless"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}}}).encode())
        if choice == 6:
            big = {str(i): {"class_type": "EmptyImage", "inputs": {}} for i in range(2000)}
            return self._bad_body(json.dumps(big).encode())
        if choice == 7:
            return self._bad_body(json.dumps(g).encode(), "?quality=" + "9" * 5000)
        if choice == 8:
            return self.s.get(f"{self.url}{API}/status",
                              params={"task_id": "../../etc", "since": "²"}, timeout=60).status_code
        if choice == 9:
            return self._bad_body(json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}).encode())
        conn = websocket.create_connection(self.ws_url + "?task_id=../../etc", timeout=60)
        try:
            ev = json.loads(conn.recv())
            return 400 if ev["data"]["status"] == "error" else 200
        finally:
            conn.close()


def _png(shade: int) -> bytes:
    from io import BytesIO

    from PIL import Image
    buf = BytesIO()
    Image.new("RGB", (32, 32), (shade, 255 - shade, 128)).save(buf, "PNG")
    return buf.getvalue()


def phase(url: str, clients: int, seconds: float, bad_share: float, seed: int
          ) -> tuple[dict[str, Any], list[str], list[str]]:
    """Run ``clients`` threads for ``seconds``; figures, the accepted task ids
    and those of them whose final event was not in the log when answered."""
    good_ms: list[float] = []
    counts = {"good": 0, "bad": 0, "errors": 0}
    errors: list[str] = []
    accepted: list[str] = []
    lost: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        load = Load(url, random.Random(seed * 1000 + n))
        kinds: list[tuple[str, Callable[[], int]]] = [
            ("sync", load.sync), ("async", load.async_poll), ("stream", load.stream),
            ("ws", load.ws), ("inline", load.inline_image)]
        try:
            while time.monotonic() < stop:
                is_bad = load.rng.random() < bad_share
                kind, fn = ("bad", load.bad) if is_bad else load.rng.choice(kinds)
                t0 = time.perf_counter()
                try:
                    code = fn()
                except Exception as e:  # a dropped connection is an error
                    code, why = -1, f"{kind}: {type(e).__name__}: {e}"[:200]
                else:
                    why = f"{kind}: HTTP {code}"
                dt = time.perf_counter() - t0
                ok = (400 <= code < 500 and code != 429) if is_bad else code == 200
                with lock:
                    counts["bad" if is_bad else "good"] += 1
                    if not is_bad and ok:
                        good_ms.append(dt)
                    if not ok:
                        counts["errors"] += 1
                        errors.append(why)
        finally:
            with lock:
                accepted.extend(load.accepted)
                lost.extend(load.lost)
            load.s.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    fig = {**counts, "wall_s": round(wall, 1),
           "good_per_s": round(len(good_ms) / wall, 2),
           "p50_ms": round(common.percentile([x * 1000 for x in good_ms], 50), 1),
           "p99_ms": round(common.percentile([x * 1000 for x in good_ms], 99), 1),
           "error_samples": sorted(set(errors))[:10]}
    return fig, accepted, lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of the mixed phase")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--bad-share", type=float, default=0.4, help="share of bad requests (mixed)")
    ap.add_argument("--retention-hours", type=float, default=0.02,
                    help="the server's retention (72 s by default, so a pass is seen)")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "load")
    env = {"COMFY_EMBED_RETENTION_HOURS": str(args.retention_hours),
           "COMFY_EMBED_MAX_QUEUE": str(4 * args.clients),
           "OMP_NUM_THREADS": str(args.torch_threads or "")}
    server = common.start_embed(wd, cache_dir=args.cache_dir, env=env)
    try:
        server.wait_http("/ready")
        url = f"http://127.0.0.1:{server.port}"
        assert server.base is not None
        requests.post(f"{url}{API}/run", json=common.image_graph(0, size=64), timeout=600)
        files_before = count_files(server.base)
        rss_before = server.rss_mb()
        base_fig, base_ids, base_lost = phase(url, args.clients, args.duration / 4, 0.0, 1)
        mixed_fig, mixed_ids, mixed_lost = phase(url, args.clients, args.duration,
                                                 args.bad_share, 2)
        rss_after = server.rss_mb()
        lost = base_lost + mixed_lost
        files_after = count_files(server.base)
        # Retention: wait one period plus its check interval, then count again.
        time.sleep(args.retention_hours * 3600 * 1.3 + 2)
        files_retained = count_files(server.base)
        log_lines = sum(1 for _, line in server.lines)
        tracebacks = sum(1 for _, line in server.lines if line.startswith("Traceback"))
    finally:
        server.stop()
    rows = [[name, f["good"], f["bad"], f["errors"], f["good_per_s"], f["p50_ms"], f["p99_ms"]]
            for name, f in (("baseline (good only)", base_fig), ("mixed (hostile)", mixed_fig))]
    print(common.table(["phase", "good", "bad", "errors", "good/s", "p50 ms", "p99 ms"], rows))
    for name, f in (("baseline", base_fig), ("mixed", mixed_fig)):
        if f["error_samples"]:
            print(f"{name} error samples: {f['error_samples']}")
    print(f"accepted tasks {len(base_ids) + len(mixed_ids)}, lost {len(lost)}")
    print(f"RSS MB: {rss_before:.0f} before, {rss_after:.0f} after")
    print(f"files: {files_before} before, {files_after} after the load, "
          f"{files_retained} after a retention pass ({args.retention_hours} h)")
    print(f"server log: {log_lines} lines, {tracebacks} tracebacks")
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"benchmark": "load", "machine": machine, "clients": args.clients,
                      "duration_s": args.duration, "bad_share": args.bad_share,
                      "baseline": base_fig, "mixed": mixed_fig,
                      "accepted": len(base_ids) + len(mixed_ids), "lost": len(lost),
                      "lost_ids": lost[:10], "rss_mb_before": round(rss_before),
                      "rss_mb_after": round(rss_after), "files_before": files_before,
                      "files_after": files_after, "files_after_retention": files_retained,
                      "log_lines": log_lines, "tracebacks": tracebacks})


if __name__ == "__main__":
    main()
