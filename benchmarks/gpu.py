"""GPU harness: SD1.5-architecture text-to-image at full size, three ways.

Builds (once, no download) a full-size SD1.5-architecture checkpoint with
random fp16 weights from ComfyUI's own model classes: UNet (model_channels
320, channel_mult 1,2,4,4, 2 res blocks, transformer depth 1, context 768),
the full KL VAE (ComfyUI's SD ddconfig) and CLIP-L; about 2.1 GB. Then, for
batch 1 and 4 of the default text-to-image graph (512x512, 20 steps, euler,
cfg 8), measures in one run on the same GPU, one path after another:

  library  comfy_embed.run_workflow(graph) in a child process (latency);
           it/s from one extra run through the Engine's event stream;
  http     comfy-embed's server (python server.py):
           POST /api/serverless/run?stream=true&output_base64=true;
  native   vendor/ComfyUI/main.py: POST /prompt, /ws, /history, /view;
  pipeline throughput at ``--clients`` (8) concurrent clients, largest batch:
           comfy-embed with its encode pool (PNGs encoded off the executor
           thread, issue 30), comfy-embed without it
           (COMFY_EMBED_ENCODE_WORKERS=0, encoded on the executor thread as
           natively) and native: req/s, images/s and executor ms per job.

Prints it/s (sampler steps per second, from progress-event arrival times),
images/s and ms/image (end to end, p50), and beside them the compute floor:
about 34.7 TFLOP per 20-step 512x512 image with CFG (scaled by steps and
pixels), i.e. about 35 ms per image on an H100 at its dense fp16 peak.

    .venv/bin/python benchmarks/gpu.py            # GPU, ~4-6 min on an H100
    .venv/bin/python benchmarks/gpu.py --tiny     # CPU check: tiny checkpoint, 64x64, 2 steps
    .venv/bin/python benchmarks/gpu.py --build-only   # just build + verify the full weights

``--budget`` (seconds, default 420) bounds the run: a path that would start
after it is skipped (and named so), leaving room in a device lease to rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

FULL = "sd15-random-fp16.safetensors"
#: Per 512x512 image, 20 steps, CFG (two UNet passes per step), fwd only.
FLOP_PER_IMAGE_512_20 = 34.7e12
#: Dense fp16/bf16 tensor-core peaks (TFLOP/s) by device-name fragment, first
#: match wins: PCIe and NVL cards run lower clocks (and the H100 PCIe has 114
#: SMs, not 132) than their SXM siblings, whose names carry no form factor
#: ("NVIDIA H100 80GB HBM3", "NVIDIA H200").
PEAKS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0), ("H800 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
    ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10", 125.0), ("4090", 165.0), ("3090", 71.0)]
#: SM counts of the PCIe forms, for names that do not say it.
PCIE_SMS = {"H100": (114, 756.0), "H800": (114, 756.0)}


# ------------------------------------------------------------ the weights
def build_full_checkpoint(path: Path, seed: int = 0) -> dict[str, Any]:
    """Write the full-size random SD1.5-architecture checkpoint (fp16).

    Modules are built on the meta device (no fp32 copy in memory); each tensor
    is drawn like comfy-embed's tiny checkpoint: norms 1, biases 0, the rest
    N(0, 0.02). Runs in a child that has booted ComfyUI's modules.
    """
    import comfy.ops
    import comfy.sd1_clip
    import safetensors.torch
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                         num_res_blocks=[2, 2, 2, 2], channel_mult=(1, 2, 4, 4),
                         transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                         transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                         transformer_depth_middle=1, context_dim=768, num_heads=8,
                         use_spatial_transformer=True, use_linear_in_transformer=False,
                         legacy=False, operations=comfy.ops.disable_weight_init)
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                    "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                    "attn_resolutions": [], "dropout": 0.0}
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.", clip)):
        n = 0
        for name, t in module.state_dict().items():
            n += t.numel()
            if not t.is_floating_point():  # none in these modules today
                raise RuntimeError(f"unexpected non-float tensor {prefix}{name}")
            if "norm" in name and name.endswith("weight"):
                sd[prefix + name] = torch.ones(t.shape, dtype=torch.float16)
            elif name.endswith(("bias", "logit_scale")):
                sd[prefix + name] = torch.zeros(t.shape, dtype=torch.float16)
            else:
                sd[prefix + name] = (torch.randn(t.shape, generator=gen) * 0.02).to(torch.float16)
        counts[prefix.rstrip(".")] = n
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    safetensors.torch.save_file(sd, str(tmp))
    os.replace(tmp, path)
    return {"parameters": counts, "bytes": path.stat().st_size}


def _verify(path: Path) -> dict[str, Any]:
    """Load it as CheckpointLoaderSimple does and report what ComfyUI saw."""
    import comfy.sd
    model, _clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True,
                                                                output_clip=True)
    unet = model.model.diffusion_model
    return {"model_config": type(model.model.model_config).__name__,
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "vae": type(vae.first_stage_model).__name__}


# --------------------------------------------------------------- workers
def _worker(args: argparse.Namespace) -> None:
    def boot() -> tuple[Callable[[dict[str, Any]], dict[str, Any]], dict[str, Any]]:
        from comfy_embed.config import Settings

        settings = Settings.from_env(base_dir=Path(args.workdir), device=args.device,
                                     tiny_checkpoint=args.tiny, cache_dir=Path(args.cache_dir),
                                     extra_model_paths=(Path(args.yaml),) if args.yaml else ())
        if args.worker == "build":
            from comfy_embed._comfy.comfy import Comfy
            Comfy.boot(settings.replace(device="cpu"))

            def build(req: dict[str, Any]) -> dict[str, Any]:
                t = time.perf_counter()
                out = build_full_checkpoint(Path(req["path"]))
                out["build_seconds"] = round(time.perf_counter() - t, 1)
                if req.get("verify"):
                    t = time.perf_counter()
                    out["detected"] = _verify(Path(req["path"]))
                    out["verify_seconds"] = round(time.perf_counter() - t, 1)
                return out
            return build, {}

        import anyio

        from comfy_embed import run_workflow
        from comfy_embed.runtime import shared_engine

        def run(req: dict[str, Any]) -> dict[str, Any]:
            if req.get("memory"):
                return common.cuda_memory()
            graph = req["graph"]
            if not req.get("stream"):
                t0 = time.perf_counter()
                final = run_workflow(graph, settings=settings)
                dt = time.perf_counter() - t0
                if final["data"]["status"] != "success":
                    raise RuntimeError(str(final)[:500])
                return {"dt": dt}

            async def streamed() -> list[tuple[float, dict[str, Any]]]:
                task = await shared_engine(settings).submit(graph)
                seen = []
                async for _, ev in task.stream():
                    seen.append((time.perf_counter(), ev))
                await task.result()
                return seen
            t0 = time.perf_counter()
            events = anyio.run(streamed)
            return {"dt": time.perf_counter() - t0, "its": common.iterations_per_second(events)}
        return run, {}

    common.serve_lines(boot)


# ------------------------------------------------------------------- main
def _peak_tflops(machine: dict[str, Any], override: float | None) -> float | None:
    if override:
        return override
    gpu = machine.get("gpu") or ""
    for key, peak in PEAKS:
        if key in gpu:
            sms, pcie_peak = PCIE_SMS.get(key, (None, None))
            if sms is not None and machine.get("gpu_sms") == sms:
                return pcie_peak
            return peak
    return None


class VramPeak:
    """Peak GPU memory of the processes under test (every GPU process but
    this one), sampled with nvidia-smi: the same gauge for all three paths,
    CUDA context and allocator cache included. None without nvidia-smi."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        total = 0.0
        for line in out.splitlines():
            pid, _, mib = line.partition(",")
            if pid.strip().isdigit() and int(pid) != os.getpid():
                try:
                    total += float(mib)
                except ValueError:
                    pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self._sample()
            if used is None:
                return
            self.peak_mib = max(self.peak_mib or 0.0, used)
            self._stop.wait(self.interval)

    def __enter__(self) -> "VramPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="CPU check: tiny checkpoint, 64x64, 2 steps, batches 1,2")
    ap.add_argument("--build-only", action="store_true", help="build and verify the full weights, then stop")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float, default=8.0)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,4; tiny 1,2)")
    ap.add_argument("--reps", type=int, help="timed runs per batch and path (default 5; tiny 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--paths", default="library,http,native,pipeline")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients of the pipeline path")
    ap.add_argument("--pipeline-requests", type=int, help="requests per server in the pipeline path "
                    "(default 24; tiny 16)")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds: paths that would start after this are skipped")
    ap.add_argument("--peak-tflops", type=float, help="device peak for the floor (default: by GPU name)")
    ap.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS of children (default: tiny 1, else torch's)")
    ap.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE,
                    help="where the weights are built (and kept for the next run)")
    ap.add_argument("--worker", choices=("library", "build"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--yaml", help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the servers' work folders")
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    tiny = args.tiny
    size = args.size or (64 if tiny else 512)
    steps = args.steps or (2 if tiny else 20)
    batches = [int(b) for b in (args.batches or ("1,2" if tiny else "1,4")).split(",")]
    reps = args.reps or (2 if tiny else 5)
    common.set_torch_threads(args.torch_threads if args.torch_threads is not None else (1 if tiny else 0))
    t_start = time.perf_counter()

    machine = common.describe_machine()
    common.print_machine(machine)
    cuda = machine["gpu"] is not None
    device = "cuda" if cuda and not tiny else "cpu"
    if not tiny and not cuda and not args.build_only:
        print("WARNING: no CUDA device: full size on CPU takes very long; use --tiny", flush=True)
    wd = common.workdir("gpu")

    build_info: dict[str, Any] = {}
    if tiny:
        ckpt = common.ensure_tiny_checkpoint(args.cache_dir)
    else:
        ckpt = args.cache_dir / FULL
        if not ckpt.exists() or args.build_only:
            print(f"building {ckpt} (random fp16, no download) ...", flush=True)
            w = common.LineWorker("build", [common.PYTHON, __file__, "--worker", "build", "--workdir",
                                            str(wd / "build"), "--cache-dir", str(args.cache_dir)],
                                  wd / "build.log")
            try:
                build_info = w.call({"path": str(ckpt), "verify": args.build_only})
            finally:
                w.stop()
            if "error" in build_info:
                raise SystemExit(f"build failed: {build_info['error']} (see {wd / 'build.log'})")
            print(f"  built: {build_info}", flush=True)
        if args.build_only:
            common.tidy_workdir(wd, args.keep)
            common.emit_json({"bench": "gpu", "machine": machine, "build": build_info,
                              "seconds": round(time.perf_counter() - t_start, 1)})
            return
    yaml = wd / "extra_model_paths.yaml"
    yaml.write_text(f"bench:\n  base_path: {ckpt.parent}\n  checkpoints: .\n")

    def graph(i: int, batch: int) -> dict[str, Any]:
        return common.t2i_graph(i, size=size, steps=steps, batch=batch, cfg=args.cfg,
                                ckpt=ckpt.name, sampler=args.sampler)

    paths = [p for p in args.paths.split(",") if p]
    results: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for path in list(paths):
        if time.perf_counter() - t_start > args.budget:
            print(f"  {path}: skipped, past the {args.budget:.0f}s budget", flush=True)
            skipped.append(path)
            paths.remove(path)
            continue
        t_path = time.perf_counter()
        if path == "pipeline":
            n = args.pipeline_requests or (16 if tiny else 24)
            results[path] = pipeline(wd, args, device, tiny, yaml, ckpt,
                                     lambda i: graph(i, max(batches)), n, max(batches))
            print(f"  {path}: done in {time.perf_counter() - t_path:.1f}s", flush=True)
            continue
        res: dict[str, Any] = {}
        memory: dict[str, Any] = {}
        sampler = VramPeak().__enter__() if device == "cuda" else None
        if path == "library":
            w = common.LineWorker("library", [common.PYTHON, __file__, "--worker", "library",
                                              "--workdir", str(wd / "library"), "--cache-dir",
                                              str(args.cache_dir), "--device", device,
                                              "--yaml", str(yaml)] + (["--tiny"] if tiny else []),
                                  wd / "library.log")
            try:
                for b in batches:
                    lat, its = [], []
                    for k in range(args.warmup):
                        _check(w.call({"graph": graph(-1 - k - 10 * b, b)}))
                    for k in range(reps):
                        lat.append(_check(w.call({"graph": graph(k + 100 * b, b)}))["dt"])
                    r = _check(w.call({"graph": graph(-500 - b, b), "stream": True}))
                    if r.get("its"):
                        its.append(r["its"])
                    res[str(b)] = {"latencies": lat, "its": its}
                memory = _check(w.call({"memory": True}))
            finally:
                w.stop()
        elif path == "http":
            env = {"COMFY_EMBED_DEVICE": device, "COMFY_EMBED_TINY_CHECKPOINT": "1" if tiny else "0",
                   "COMFY_EMBED_EXTRA_MODEL_PATHS": str(yaml)}
            with common.start_embed(wd, cache_dir=args.cache_dir, env=env, device=device,
                                    args=["benchmarks/embed_server.py"]) as srv:
                srv.wait_http("/ready", timeout=600)
                client = common.EmbedClient(srv.port)
                res = _measure(client.run_stream, graph, batches, reps, args.warmup)
                _, raw = common.Http(srv.port).request("GET", "/_bench/stats")
                memory = dict(json.loads(raw).get("cuda") or {})
        elif path == "native":
            with common.start_native(wd, models_dir=ckpt.parent, cpu=device == "cpu") as srv:
                srv.wait_http("/system_stats", timeout=600)
                native = common.NativeClient(srv.port)
                try:
                    res = _measure(native.run, graph, batches, reps, args.warmup)
                finally:
                    native.close()
            # Native logs its device line with the allocator in use
            # ("Device: cuda:0 NVIDIA ... : cudaMallocAsync").
            m = re.search(r"Device: cuda\S* .*?: (\w+)", "\n".join(line for _, line in srv.lines))
            if m:
                memory["allocator"] = m.group(1)
        else:
            raise SystemExit(f"unknown path {path}")
        if sampler is not None:
            sampler.__exit__()
            memory["peak_process_mib"] = sampler.peak_mib
        res["memory"] = memory
        results[path] = res
        print(f"  {path}: done in {time.perf_counter() - t_path:.1f}s {memory}", flush=True)

    peak = _peak_tflops(machine, args.peak_tflops)
    # The floor is for the full SD1.5 UNet; the tiny checkpoint has none.
    flop = 0.0 if tiny else FLOP_PER_IMAGE_512_20 * (steps / 20) * (size / 512) ** 2 * (1 if args.cfg != 1 else 0.5)
    floor_ms = flop / (peak * 1e12) * 1000 if peak and flop else None
    figures: dict[str, Any] = {}
    rows = []
    latency_paths = [p for p in paths if p != "pipeline"]
    for path in latency_paths:
        for b in batches:
            r = results[path][str(b)]
            p50 = common.percentile(r["latencies"], 50)
            rate = common.percentile(r["its"], 50) if r["its"] else None
            per_image_ms = p50 * 1000 / b
            f: dict[str, Any] = {"batch": b, "latency_p50_ms": round(p50 * 1000, 1),
                                 "it_s": round(rate, 3) if rate else None,
                                 "images_s": round(b / p50, 3), "ms_per_image": round(per_image_ms, 1),
                                 "n": len(r["latencies"])}
            if floor_ms:
                f["floor_ms_per_image"] = round(floor_ms, 1)
                f["floor_fraction"] = round(floor_ms / per_image_ms, 3)
            figures.setdefault(path, {})[str(b)] = f
            rows.append([path, b, f["latency_p50_ms"], f["it_s"] or "-", f["images_s"], f["ms_per_image"],
                         f.get("floor_ms_per_image", "-"), f.get("floor_fraction", "-")])
        figures[path]["memory"] = results[path]["memory"]
    print()
    print(f"{size}x{size}, {steps} steps, {args.sampler}, cfg {args.cfg}, checkpoint {ckpt.name}, "
          f"device {device}; " + ("compute floor: n/a for the tiny checkpoint" if tiny else
                                  f"compute floor {flop / 1e12:.2f} TFLOP/image"
                                  + (f" = {floor_ms:.1f} ms/image at {peak:.0f} TFLOP/s peak" if floor_ms
                                     else " (no GPU peak known: pass --peak-tflops)")))
    print(common.table(["path", "batch", "latency p50 ms", "it/s", "images/s", "ms/image",
                        "floor ms/img", "floor/actual"], rows))
    if device == "cuda":
        print()
        print(common.table(["path", "allocator", "peak process VRAM MiB (nvidia-smi)",
                            "torch peak allocated MiB", "torch peak reserved MiB"],
                           [[p, figures[p]["memory"].get("allocator", "?"),
                             figures[p]["memory"].get("peak_process_mib", "-"),
                             figures[p]["memory"].get("peak_allocated_mib", "-"),
                             figures[p]["memory"].get("peak_reserved_mib", "-")] for p in latency_paths]))
    if "native" in figures:
        print()
        for path in latency_paths:
            if path == "native":
                continue
            for b in batches:
                ratio = figures[path][str(b)]["ms_per_image"] / figures["native"][str(b)]["ms_per_image"]
                figures[path][str(b)]["vs_native"] = round(ratio, 3)
                print(f"  {path} batch {b}: ms/image {ratio:.3f}x native")
    if "pipeline" in results:
        figures["pipeline"] = results["pipeline"]
        print()
        print(f"pipeline: {args.clients} clients, batch {max(batches)}")
        print(common.table(["server", "requests", "req/s", "images/s", "p50 ms", "exec ms/job", "errors"],
                           [[k, v["requests"], v["rps"], v["images_s"], v["p50_ms"],
                             v["executor_ms_per_job"], v["errors"]]
                            for k, v in results["pipeline"].items()]))
    if skipped:
        figures["skipped"] = skipped
    total = time.perf_counter() - t_start
    print(f"total {total:.0f}s")
    common.tidy_workdir(wd, args.keep)
    common.emit_json({"bench": "gpu", "machine": machine,
                      "config": {"tiny": tiny, "size": size, "steps": steps, "cfg": args.cfg,
                                 "sampler": args.sampler, "batches": batches, "reps": reps,
                                 "device": device, "checkpoint": ckpt.name,
                                 "flop_per_image": flop, "peak_tflops": peak},
                      "build": build_info, "figures": figures, "seconds": round(total, 1)})


def pipeline(wd: Path, args: argparse.Namespace, device: str, tiny: bool, yaml: Path, ckpt: Path,
             graph: Callable[[int], dict[str, Any]], n: int, batch: int) -> dict[str, Any]:
    """Throughput at ``args.clients`` clients: comfy-embed with the encode
    pool on and off, then native; executor ms per job from comfy-embed's
    busy seconds (/_bench/stats) and native's /history timestamps."""
    from throughput import native_busy, run_phase

    out: dict[str, Any] = {}
    env = {"COMFY_EMBED_DEVICE": device, "COMFY_EMBED_TINY_CHECKPOINT": "1" if tiny else "0",
           "COMFY_EMBED_EXTRA_MODEL_PATHS": str(yaml), "COMFY_EMBED_MAX_QUEUE": "256"}
    for name, workers in (("embed-pool", "2"), ("embed-nopool", "0")):
        with common.start_embed(wd, cache_dir=args.cache_dir, device=device,
                                env={**env, "COMFY_EMBED_ENCODE_WORKERS": workers},
                                args=["benchmarks/embed_server.py"]) as srv:
            srv.wait_http("/ready", timeout=600)
            stats = common.Http(srv.port)

            def busy() -> float:
                return float(json.loads(stats.request("GET", "/_bench/stats")[1])["busy_seconds"])
            run_phase(lambda: common.EmbedClient(srv.port), graph, -1000, 2 * args.clients, args.clients)
            b0 = busy()
            r = run_phase(lambda: common.EmbedClient(srv.port), graph, 0, n, args.clients)
            out[name] = _throughput(r, busy() - b0, batch)
            stats.close()
    with common.start_native(wd, models_dir=ckpt.parent, cpu=device == "cpu") as srv:
        srv.wait_http("/system_stats", timeout=600)
        run_phase(lambda: common.NativeClient(srv.port), graph, -1000, 2 * args.clients, args.clients)
        r = run_phase(lambda: common.NativeClient(srv.port), graph, 0, n, args.clients)
        out["native"] = _throughput(r, native_busy(r["histories"]), batch)
    for name in ("embed-pool", "embed-nopool"):
        if out["native"]["rps"]:
            out[name]["rps_over_native"] = round(out[name]["rps"] / out["native"]["rps"], 3)
    return out


def _throughput(r: dict[str, Any], busy: float, batch: int) -> dict[str, Any]:
    lat = r["latencies"]
    rps = len(lat) / r["wall"] if r["wall"] else 0.0
    return {"requests": len(lat) + len(r["errors"]), "errors": len(r["errors"]),
            "error_samples": r["errors"][:3], "rps": round(rps, 3), "images_s": round(rps * batch, 3),
            "p50_ms": round(common.percentile(lat, 50) * 1000, 1) if lat else None,
            "executor_ms_per_job": round(busy / max(len(lat), 1) * 1000, 1)}


def _check(r: dict[str, Any]) -> dict[str, Any]:
    if "error" in r:
        raise RuntimeError(r["error"])
    return r


def _measure(run: Callable[[dict[str, Any]], dict[str, Any]], graph: Callable[[int, int], dict[str, Any]],
             batches: list[int], reps: int, warmup: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for b in batches:
        for k in range(warmup):
            run(graph(-1 - k - 10 * b, b))
        lat, its = [], []
        for k in range(reps):
            t = time.perf_counter()
            out = run(graph(k + 100 * b, b))
            lat.append(time.perf_counter() - t)
            if len(out["images"]) != b:
                raise RuntimeError(f"expected {b} images, got {len(out['images'])}")
            rate = common.iterations_per_second(out["events"])
            if rate:
                its.append(rate)
        res[str(b)] = {"latencies": lat, "its": its}
    return res


if __name__ == "__main__":
    main()
