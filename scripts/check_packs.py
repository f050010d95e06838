"""Load real custom-node packs into comfy-embed and run one small graph of each.

    PYTHONPATH=$PWD:<site-packages of the packs' requirements> \
        .venv/bin/python scripts/check_packs.py /path/to/custom_nodes

The packs are checked out by you (from their public repositories) into a
folder outside this repository; nothing of theirs is copied here. Prints one
Markdown table row per pack: load status, node count, and what the graph did.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.servers import Server  # noqa: E402

IMAGES = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 4,
                                                  "color": 0x3366CC}}


def _vhs_load() -> dict[str, Any]:
    from tests.fakes.media import make_mp4

    return {"1": {"class_type": "VHS_LoadVideo", "inputs": {
                "video": base64.b64encode(make_mp4()).decode(), "force_rate": 0,
                "custom_width": 0, "custom_height": 0, "frame_load_cap": 0,
                "skip_first_frames": 0, "select_every_nth": 1, "format": "AnimateDiff"}},
            "2": {"class_type": "VHS_VideoCombine", "inputs": {
                "images": ["1", 0], "frame_rate": 6, "loop_count": 0, "filename_prefix": "vhs",
                "format": "image/gif", "pingpong": False, "save_output": True}}}


#: Graphs per pack, run through POST /run: (what it shows, graph).
GRAPHS: dict[str, tuple[str, dict[str, Any]]] = {
    "ComfyUI-VideoHelperSuite": ("VHS_VideoCombine writes an MP4 from 4 frames", {
        "1": IMAGES,
        "2": {"class_type": "VHS_VideoCombine", "inputs": {
            "images": ["1", 0], "frame_rate": 8, "loop_count": 0, "filename_prefix": "vhs",
            "format": "video/h264-mp4", "pingpong": False, "save_output": True,
            "pix_fmt": "yuv420p", "crf": 19, "save_metadata": True, "trim_to_audio": False}}}),
    "ComfyUI-VideoHelperSuite (2)": ("VHS_LoadVideo from a base64 MP4 input, VHS_VideoCombine to GIF",
                                     _vhs_load()),
    "ComfyUI-Crystools": ("Primitive integer into Show any to JSON", {
        "1": {"class_type": "Primitive integer [Crystools]", "inputs": {"int": 3}},
        "2": {"class_type": "Show any to JSON [Crystools]", "inputs": {"any_value": ["1", 0]}}}),
    "was-node-suite-comfyui": ("Text String into Text Concatenate into PreviewAny", {
        "1": {"class_type": "Text String", "inputs": {"text": "was"}},
        "2": {"class_type": "Text Concatenate", "inputs": {
            "delimiter": "-", "clean_whitespace": "true", "text_a": ["1", 0], "text_b": ["1", 0]}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}),
    "ComfyUI-Custom-Scripts": ("ShowText|pysssss returns its text", {
        "1": {"class_type": "ShowText|pysssss", "inputs": {"text": "hello"}}}),
    "rgthree-comfy": ("Display Any (rgthree) shows an int", {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": 7}},
        "2": {"class_type": "Display Any (rgthree)", "inputs": {"source": ["1", 0]}}}),
    "ComfyUI_essentials": ("SimpleMath+ computes a*b", {
        "1": {"class_type": "SimpleMath+", "inputs": {"value": "a*b", "a": 6, "b": 7}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}),
    "ComfyUI-KJNodes": ("INTConstant into PreviewAny", {
        "1": {"class_type": "INTConstant", "inputs": {"value": 42}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}),
    "ComfyUI-Impact-Pack": ("ImpactInt into PreviewAny", {
        "1": {"class_type": "ImpactInt", "inputs": {"value": 5}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}),
}


def main(custom_nodes: str) -> int:
    with tempfile.TemporaryDirectory() as base:
        server = Server(Path(base), custom_nodes=1, custom_nodes_dirs=custom_nodes,
                        tiny_checkpoint=0)
        try:
            server.wait_ready(600)
            packs = requests.get(server.url + "/ready", timeout=10).json()["custom_nodes"]
            summary = [line for line in server.log_path.read_text().splitlines()
                       if "custom node packs:" in line]
            print(summary[-1].split(" INFO ", 1)[-1] + "\n")
            print("| pack | loads | graph | runs |\n|---|---|---|---|")
            names = packs["loaded"] + list(packs["failed"])
            rows = sorted(names + [g for g in GRAPHS if g.split(" (")[0] in names and " (" in g])
            for name in rows:
                error = packs["failed"].get(name.split(" (")[0])
                what, graph = GRAPHS.get(name, ("", {}))
                ran = ""
                if graph and error is None:
                    r = server.run(graph, "?output_base64=false")
                    data = r.json()["data"]
                    if data["status"] == "success":
                        ran = "yes: " + json.dumps({"outputs": data["outputs"], "files": [
                            x["output"]["comfy"]["filename"] + " " + x["output"]["media_type"]
                            for x in data["results"]]})[:160]
                    else:
                        ran = "NO: " + data["error"]["message"][:160]
                print(f"| {name} | {'yes' if error is None else 'NO: ' + error[:120]} "
                      f"| {what} | {ran} |")
        finally:
            server.stop()
            print(server.log()[-1500:], file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
