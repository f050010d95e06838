"""Models kept warm (issue 28): two checkpoints taking turns, with and without
``COMFY_EMBED_KEEP_LOADED``.

Two comfy-embed servers in turn, each with the tiny checkpoint under two
names (``A`` = tiny-sd15.safetensors, ``B`` = the same file as
other-sd15.safetensors: two models to ComfyUI):

  kept      COMFY_EMBED_KEEP_LOADED=A (loaded at boot, pinned in the node cache);
  baseline  no setting: ComfyUI's classic cache, as before.

The workload alternates A, B, A, B, ... (``--rounds`` of each; a new seed
every time, so only the loaders can be answered from the cache). Each run's
report says whether its loader read the file (``models.loaded``, with its
seconds) or found it resident. The figures: how many of A's runs read A
again, the seconds spent loading, and A's execution and end-to-end times
(p50) in each mode. Also the cost of the ``X-Loaded-Models`` header per
answer, encoded once per change against encoding it on every answer.

    .venv/bin/python benchmarks/kept_models.py [--rounds 5] [--steps 1]
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

A, B = common.TINY, "other-sd15.safetensors"


def one_mode(args: argparse.Namespace, wd: Path, kept: bool) -> dict[str, Any]:
    models = wd / ("models-kept" if kept else "models-baseline")
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    link = models / "checkpoints" / B
    if not link.exists():
        link.symlink_to(args.cache_dir / A)
    env = {"COMFY_EMBED_MODELS_DIR": str(models),
           "OMP_NUM_THREADS": str(args.torch_threads or "")}
    if kept:
        env["COMFY_EMBED_KEEP_LOADED"] = A
    srv = common.start_embed(wd, cache_dir=args.cache_dir, env=env)
    runs: list[dict[str, Any]] = []
    try:
        srv.wait_http("/health")
        url = f"http://127.0.0.1:{srv.port}"
        while requests.get(f"{url}/ready", timeout=5).status_code != 200:
            time.sleep(0.2)
        for i in range(args.rounds * 2):
            name = A if i % 2 == 0 else B
            graph = common.t2i_graph(i, steps=args.steps, ckpt=name)
            t0 = time.perf_counter()
            r = requests.post(f"{url}/api/serverless/run", json=graph, timeout=600)
            wall = time.perf_counter() - t0
            r.raise_for_status()
            report = r.json()["data"]["report"]
            loads = [e["seconds"] for e in report["models"]["loaded"] if e["name"] == name]
            runs.append({"model": "A" if name == A else "B", "read": bool(loads),
                         "load_seconds": sum(loads), "execution": report["execution"],
                         "end_to_end": wall, "loaded_after": r.headers.get("X-Loaded-Models")})
    finally:
        srv.stop()
    out: dict[str, Any] = {"mode": "kept" if kept else "baseline", "runs": runs}
    for m in ("A", "B"):
        mine = [x for x in runs if x["model"] == m][1:]  # the first run of each: cold in both
        out[m] = {"reads": sum(x["read"] for x in mine), "runs": len(mine),
                  "load_s": round(sum(x["load_seconds"] for x in mine), 3),
                  "execution_p50_ms": common.percentile([x["execution"] * 1e3 for x in mine], 50),
                  "end_to_end_p50_ms": common.percentile([x["end_to_end"] * 1e3 for x in mine], 50)}
    return out


def header_cost() -> dict[str, float]:
    """ns per answer: X-Loaded-Models encoded once per change vs every answer."""
    from comfy_embed.api.metrics import loaded_models_header
    names = ("sd15/v1-5-pruned-emaonly.safetensors", "sdxl/sd_xl_base_1.0.safetensors",
             "vae/sdxl_vae.safetensors")
    n = 100_000
    cached = timeit.timeit(lambda: loaded_models_header(names), number=n) / n
    fresh = timeit.timeit(lambda: ",".join(quote(x, safe="/") for x in names).encode(),
                          number=n) / n
    return {"cached_ns": round(cached * 1e9), "every_answer_ns": round(fresh * 1e9)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="runs of each checkpoint, alternating")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--modes", default="kept,baseline")
    common.add_common_args(ap)
    args = ap.parse_args()
    machine, wd = common.start_run(args, "kept_models")
    results = [one_mode(args, wd, mode == "kept") for mode in args.modes.split(",")]
    print()
    print(f"A and B alternate, {args.rounds} runs each (the first of each left out: cold);")
    print("reads: runs whose loader read the checkpoint file again.")
    rows = []
    for r in results:
        for m in ("A", "B"):
            s = r[m]
            rows.append([r["mode"], m, f"{s['reads']}/{s['runs']}", s["load_s"],
                         round(s["execution_p50_ms"], 1), round(s["end_to_end_p50_ms"], 1)])
    print(common.table(["mode", "model", "reads", "load s", "exec p50 ms", "e2e p50 ms"], rows))
    cost = header_cost()
    print(f"X-Loaded-Models per answer: {cost['cached_ns']} ns encoded once per change, "
          f"{cost['every_answer_ns']} ns encoded on every answer")
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "kept_models", "machine": machine, "rounds": args.rounds,
                      "steps": args.steps, "results": results, "header": cost})


if __name__ == "__main__":
    main()
