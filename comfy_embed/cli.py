"""``comfy-embed run workflow.json`` / ``serve`` / ``demo`` / ``install-comfyui`` / ``lock`` /
``install`` / ``--version``."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import anyio

from comfy_embed.config import Settings, SettingsError
from comfy_embed.config.places import (
    COMFYUI_COMMIT,
    COMFYUI_REPOSITORY,
    installed_comfyui,
)
from comfy_embed.errors import ComfyEmbedError, InstallError
from comfy_embed.events import final_event
from comfy_embed.observe.logs import configure_logging
from comfy_embed.version import __version__

__all__ = ["main"]


def _node_names(graph: Any) -> dict[str, str]:
    """``{node_id: class_type}``, for progress lines that say what runs."""
    if not isinstance(graph, dict):
        return {}
    return {str(k): str(v.get("class_type", "?")) for k, v in graph.items() if isinstance(v, dict)}


def _progress(ev: dict[str, Any], names: dict[str, str]) -> None:
    """One line per node, one bar (redrawn in place) per sampler."""
    data = ev["data"]
    if ev["type"] == "progress":
        width = 30
        done = int(width * data["value"] / max(data["max"], 1))
        sys.stderr.write(f"\r  [{'#' * done}{'.' * (width - done)}] "
                         f"{data['value']}/{data['max']}")
        if data["value"] >= data["max"]:
            sys.stderr.write("\n")
    elif ev["type"] == "executing" and data.get("node"):
        node = str(data["node"])
        sys.stderr.write(f"  running node {node} ({names.get(node, '?')})\n")
    sys.stderr.flush()


async def _run(settings: Settings, graph: Any, out: Path | None, want_base64: bool,
               show_progress: bool) -> dict[str, Any]:
    from comfy_embed.runtime import Engine, RunOptions

    engine = Engine(settings)
    names = _node_names(graph)
    try:
        await engine.wait_ready()
        async with engine.background.open():  # the result is assembled in it
            task = await engine.submit(graph, RunOptions(output_base64=want_base64))
            async for _, ev in task.stream():
                if show_progress:
                    _progress(ev, names)
            final = await task.result()
    finally:
        engine.close()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for r in final["data"]["results"]:
            c = r["output"]["comfy"]
            src = settings.comfy.output_path / c["dir"] / c["subfolder"] / c["filename"]
            shutil.copy2(src, out / c["filename"])
            r["output"]["copied_to"] = str(out / c["filename"])
    return final


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        graph = json.loads(Path(args.workflow).read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"cannot read {args.workflow}: {e}", file=sys.stderr)
        return 2
    try:
        final = anyio.run(_run, settings, graph, Path(args.out) if args.out else None,
                          args.base64, sys.stderr.isatty() or args.progress)
    except ComfyEmbedError as e:
        print(json.dumps(final_event("", None, {}, error=e.to_dict()), indent=2, default=str))
        return 1
    print(json.dumps(final, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    """The default text-to-image graph on the tiny random-weights checkpoint."""
    graph = json.loads(resources.files("comfy_embed.examples").joinpath("text_to_image.json").read_text())
    graph["5"]["inputs"].update(width=args.size, height=args.size)
    graph["3"]["inputs"]["steps"] = args.steps
    settings = settings.replace(tiny_checkpoint=True)
    final = anyio.run(_run, settings, graph, Path(args.out), False, True)
    for r in final["data"]["results"]:
        print(f"wrote {r['output']['copied_to']} (seed {final['data']['seeds'].get('3')})")
    print("(random weights: expect coloured noise, not a picture)")
    return 0


def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import time

    import uvicorn

    from comfy_embed.api.app import ServerControl, create_app
    from comfy_embed.runtime import Engine

    if args.host:
        settings = settings.replace(host=args.host)
    if args.port:
        settings = settings.replace(port=args.port)
    engine = Engine(settings)
    control = ServerControl()
    app = create_app(settings, engine, control)

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT drain like /pre-stop: new runs are refused (503) at
        once, open requests get ``drain_seconds``, then the app's shutdown
        cancels what is left, each task ending with a final event."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.accepting = False
            if control.stop_requested_at is None:
                control.stop_requested_at = time.monotonic()
            super().handle_exit(sig, frame)

    # log_config=None: uvicorn's records go through the root handler set up
    # in main() (text or JSON, with task ids), not its own formatters.
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            log_level="info", log_config=None,
                            timeout_graceful_shutdown=max(1, round(settings.server.drain_seconds)))
    server = DrainingServer(config)
    # How the app stops the server itself (the memory guard, after draining).
    control.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    # Non-zero when the memory guard recycled the instance (guard.EXIT_RECYCLE).
    return control.exit_code


def _cmd_install_comfyui(args: argparse.Namespace, settings: Settings) -> int:
    """ComfyUI checked out into the cache folder (or --dir), its missing requirements installed."""
    from comfy_embed.install import NOT_NEEDED, install_comfyui

    folder = Path(args.dir) if args.dir else installed_comfyui(settings.comfy.cache_dir)
    try:
        done = install_comfyui(folder, args.commit, args.source, not args.no_requirements,
                               say=lambda line: print(line, file=sys.stderr))
    except InstallError as e:
        print(f"comfy-embed install-comfyui: {e}", file=sys.stderr)
        return 1
    print(f"ComfyUI {done.commit} is in {done.folder}")
    for name in done.left_out:
        print(f"  left out: {name} ({NOT_NEEDED[name]})")
    if importlib.util.find_spec("torch") is None:
        print("torch is not installed: pip install 'comfy-embed[torch]' (or your own CUDA build)")
    if done.folder != settings.comfy.comfyui_dir.expanduser().resolve():
        print(f"comfy-embed looks for ComfyUI in {settings.comfy.comfyui_dir}: set "
              f"COMFY_EMBED_COMFYUI_DIR={done.folder} (or Settings(comfyui_dir=...)) to use this one")
    return 0


def _cmd_lock(args: argparse.Namespace, settings: Settings) -> int:
    """A lock file from a ComfyUI folder (or a ComfyUI-Manager snapshot)."""
    from comfy_embed.environment.lockfile import ModelPin, dump_lock
    from comfy_embed.environment.make import lock_from_folder, lock_from_snapshot

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    try:
        if args.snapshot:
            lock = lock_from_snapshot(Path(args.snapshot), args.python, say)
        else:
            manifest: list[ModelPin] = []
            if settings.models.manifest:
                from comfy_embed.inputs.models import load_manifest
                manifest = [ModelPin(m.folder, m.name, m.sha256, m.url, m.size)
                            for m in load_manifest(settings.models.manifest)]
            comfyui = Path(args.comfyui) if args.comfyui else settings.comfy.comfyui_dir
            lock = lock_from_folder(comfyui, [Path(w) for w in args.workflow],
                                    Path(args.models) if args.models else settings.comfy.models_path,
                                    manifest, list(settings.comfy.custom_nodes_dirs), args.python, say)
    except (InstallError, ValueError) as e:
        print(f"comfy-embed lock: {e}", file=sys.stderr)
        return 1
    text = dump_lock(lock)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
        say(f"wrote {args.out}: {len(lock.packs)} packs, {len(lock.models)} models")
    return 0


def _cmd_install(args: argparse.Namespace, settings: Settings) -> int:
    """A lock's packs into custom_nodes, their requirements into this Python."""
    from comfy_embed.environment.apply import fetch_models, install_lock
    from comfy_embed.environment.lockfile import read_lock

    def say(line: str) -> None:
        print(line, file=sys.stderr)

    comfyui = Path(args.comfyui) if args.comfyui else settings.comfy.comfyui_dir
    try:
        lock = read_lock(Path(args.lock))
        done = install_lock(lock, Path(args.custom_nodes) if args.custom_nodes
                            else comfyui / "custom_nodes", args.python, not args.no_requirements, say)
        models = fetch_models(settings, lock) if args.models else []
    except InstallError as e:
        print(f"comfy-embed install: {e}", file=sys.stderr)
        return 1
    print(f"installed {args.lock}: {len(done.packs)} packs checked out, "
          f"{len(done.unchanged)} already at their commit, {len(done.installed)} requirements "
          f"installed, {len(models)} models in place")
    from comfy_embed.environment.gitrepo import head
    have = head(comfyui)
    if lock.comfyui_commit and have != lock.comfyui_commit:
        print(f"note: ComfyUI in {comfyui} is at {have}, the lock says {lock.comfyui_commit}: "
              f"comfy-embed install-comfyui --commit {lock.comfyui_commit}", file=sys.stderr)
    return 0


def _parsers_lock(sub: Any) -> None:
    p_lock = sub.add_parser("lock", help="write a lock file of a ComfyUI folder or a "
                                         "ComfyUI-Manager snapshot")
    p_lock.add_argument("--comfyui", help="the ComfyUI folder (default: COMFY_EMBED_COMFYUI_DIR)")
    p_lock.add_argument("--snapshot", help="a ComfyUI-Manager snapshot (JSON) instead of a folder")
    p_lock.add_argument("--workflow", action="append", default=[],
                        help="an API-format workflow whose models the lock pins (repeatable)")
    p_lock.add_argument("--models", help="the models folder (default: the settings')")
    p_lock.add_argument("--python", default=sys.executable,
                        help="the Python whose installed versions pin the requirements")
    p_lock.add_argument("-o", "--out", default="comfy-embed.lock", help="where to write it ('-': stdout)")
    p_ins = sub.add_parser("install", help="install a lock file's packs, requirements (and models)")
    p_ins.add_argument("lock", nargs="?", default="comfy-embed.lock")
    p_ins.add_argument("--comfyui", help="the ComfyUI folder (default: COMFY_EMBED_COMFYUI_DIR)")
    p_ins.add_argument("--custom-nodes", help="where the packs go (default: <comfyui>/custom_nodes)")
    p_ins.add_argument("--python", default=sys.executable, help="the Python pip installs into")
    p_ins.add_argument("--no-requirements", action="store_true", help="do not pip-install")
    p_ins.add_argument("--models", action="store_true",
                       help="also fetch the lock's models into the models folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="comfy-embed")
    parser.add_argument("--version", action="version", version=f"comfy-embed {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run one API-format workflow and print the result")
    p_run.add_argument("workflow")
    p_run.add_argument("--out", help="copy the output files into this folder")
    p_run.add_argument("--base64", action="store_true", help="inline outputs as base64")
    p_run.add_argument("--progress", action="store_true", help="progress even when not a terminal")
    p_serve = sub.add_parser("serve", help="start the serverless HTTP API")
    p_serve.add_argument("--host")
    p_serve.add_argument("--port", type=int)
    p_demo = sub.add_parser("demo", help="text-to-image with a tiny locally built checkpoint")
    p_demo.add_argument("--out", default="demo-output")
    p_demo.add_argument("--size", type=int, default=256)
    p_demo.add_argument("--steps", type=int, default=8)
    p_inst = sub.add_parser("install-comfyui",
                            help="check ComfyUI out into the cache folder, with its requirements")
    p_inst.add_argument("--commit", default=COMFYUI_COMMIT,
                        help="the commit (default: the one comfy-embed is tested with)")
    p_inst.add_argument("--from", dest="source", default=COMFYUI_REPOSITORY,
                        help="a git URL or local path (a mirror) to clone from")
    p_inst.add_argument("--dir", help="where to put it (default: <COMFY_EMBED_CACHE_DIR>/ComfyUI)")
    p_inst.add_argument("--no-requirements", action="store_true",
                        help="do not pip-install ComfyUI's missing requirements")
    _parsers_lock(sub)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:  # a bad setting stops start-up, naming the variable
        print(f"comfy-embed: bad setting: {e}", file=sys.stderr)
        return 2
    # The server logs to stdout (as FC and Kubernetes collect it); `run`
    # prints its result there, so its log goes to stderr.
    configure_logging(settings.observe.log_format,
                      logging.INFO if args.cmd == "serve" else logging.WARNING,
                      sys.stdout if args.cmd == "serve" else sys.stderr)
    commands = {"run": _cmd_run, "serve": _cmd_serve, "demo": _cmd_demo,
                "install-comfyui": _cmd_install_comfyui, "lock": _cmd_lock, "install": _cmd_install}
    return commands[args.cmd](args, settings)


if __name__ == "__main__":
    sys.exit(main())
