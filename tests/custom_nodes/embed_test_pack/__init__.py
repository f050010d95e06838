"""A small custom-node pack that uses the server surface popular packs use,
at import and at run time, for comfy-embed's tests.

At import: ``server.web``, ``PromptServer.instance.routes`` (``get`` and
``static``), ``app``, ``supports``, ``add_on_prompt_handler``. At run time:
``prompt_queue`` (``currently_running``, ``get_current_queue``,
``get_tasks_remaining``, ``get_history``), ``send_sync`` with a JSON and a
binary TEXT message, ``send_progress_text``, ``client_id``, ``number``,
``last_node_id``, and a ``ui`` output of text, numbers and JSON.
"""

import os
import struct
import threading
import time

import folder_paths
import server
from server import BinaryEventTypes, PromptServer

web = server.web
routes = PromptServer.instance.routes


@routes.get("/embed_test/hello")
async def hello(request):
    return web.json_response({"hello": "world"})


routes.static("/embed_test/files", os.path.dirname(__file__))
PromptServer.instance.app.add_routes([web.get("/embed_test/app", hello)])
SUPPORTS_WEB = "custom_nodes_from_web" in PromptServer.instance.supports


def rewrite_on_prompt(json_data):
    """Native packs rewrite prompts here (Impact Pack's wildcards do):
    EmbedTestEcho text "REWRITE_ME" becomes "rewritten"."""
    for node in json_data.get("prompt", {}).values():
        if node.get("class_type") == "EmbedTestEcho" and node["inputs"].get("text") == "REWRITE_ME":
            node["inputs"]["text"] = "rewritten"
    return json_data


def failing_on_prompt(json_data):
    raise RuntimeError("a broken on-prompt handler must not stop the request")


PromptServer.instance.add_on_prompt_handler(rewrite_on_prompt)
PromptServer.instance.add_on_prompt_handler(failing_on_prompt)


class EmbedTestEcho:
    """Echoes its text to the UI output and reports what it saw of the server."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "hello"})},
                "optional": {"after": ("STRING", {"forceInput": True})},
                "hidden": {"unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "embed_test"

    def run(self, text, after=None, unique_id=None, extra_pnginfo=None):
        srv = PromptServer.instance
        queue = srv.prompt_queue
        running, queued = queue.get_current_queue()
        (number, prompt_id, prompt, extra_data, outputs) = next(iter(queue.currently_running.values()))[:5]
        srv.send_progress_text(f"echo {text}", unique_id)
        node = str(unique_id).encode()
        srv.send_sync(BinaryEventTypes.TEXT, struct.pack(">I", len(node)) + node + b"binary text", srv.client_id)
        srv.send_sync("embed_test.echo", {"node": unique_id, "text": text}, srv.client_id)
        # Packs send values JSON cannot hold; the event stream and log must survive them.
        srv.send_sync("embed_test.odd", {"node": unique_id, "value": ValueError("odd")}, srv.client_id)
        info = {
            "prompt_id": prompt_id,
            "running": len(running),
            "remaining": queue.get_tasks_remaining(),
            "history_has_previous": len(queue.get_history(max_items=1)),
            "extra_marker": extra_data.get("embed_test_marker"),
            "client_id": srv.client_id,
            "last_node_id": srv.last_node_id,
            "number": srv.number,
            "routes": sorted(srv.route_paths()) if hasattr(srv, "route_paths") else [],
            "supports_web": SUPPORTS_WEB,
            "prestartup_ran": "embed_test_prestartup" in folder_paths.folder_names_and_paths,
            "outputs_to_execute": sorted(outputs),
        }
        return {"ui": {"text": [text], "length": [len(text)], "info": [info],
                       "odd": [ValueError("odd")]}, "result": (text,)}


class AnyName(dict):
    """An input section that admits any name, as rgthree's
    FlexibleOptionalInputType does (Power Lora Loader's ``lora_1``, ...)."""

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return ("*",)


class EmbedTestFlexible:
    """Takes inputs of any name (constants included) and echoes them."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": AnyName()}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "embed_test"

    def run(self, **kwargs):
        return {"ui": {"text": [f"{k}={kwargs[k]}" for k in sorted(kwargs)]}}


class EmbedTestSilentWait:
    """Waits ``seconds`` in small steps, checking ComfyUI's interrupt flag at
    each; with ``progress`` it reports each step (a progress bar), without it
    it sends nothing (the stall watchdog's test: silent, but interruptible)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 600.0}),
                             "progress": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "embed_test"

    def run(self, seconds, progress):
        import comfy.model_management
        import comfy.utils

        steps = max(1, int(seconds / 0.05))
        bar = comfy.utils.ProgressBar(steps) if progress else None
        for _ in range(steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            time.sleep(seconds / steps)
            if bar is not None:
                bar.update(1)
        return {"ui": {"text": [f"waited {seconds}"]}}


class EmbedTestDeafWait:
    """Blocks ``seconds`` without ever checking the interrupt flag (a node
    that hangs): a bounded wait, so that a test's process always ends."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 600.0})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "embed_test"

    def run(self, seconds):
        threading.Event().wait(seconds)
        return {"ui": {"text": [f"blocked {seconds}"]}}


class EmbedTestFailOnSeed:
    """Fails when ``seed`` equals ``fail_on``, else shows the seed (N
    variants: the one variant given that seed fails, naming this node)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                             "fail_on": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "embed_test"

    def run(self, seed, fail_on):
        if seed == fail_on:
            raise ValueError(f"seed {seed} is the failing one")
        return {"ui": {"text": [f"seed {seed}"]}}


NODE_CLASS_MAPPINGS = {"EmbedTestEcho": EmbedTestEcho, "EmbedTestFlexible": EmbedTestFlexible,
                       "EmbedTestSilentWait": EmbedTestSilentWait,
                       "EmbedTestDeafWait": EmbedTestDeafWait,
                       "EmbedTestFailOnSeed": EmbedTestFailOnSeed}
NODE_DISPLAY_NAME_MAPPINGS = {"EmbedTestEcho": "Embed test echo",
                              "EmbedTestFlexible": "Embed test flexible",
                              "EmbedTestSilentWait": "Embed test silent wait",
                              "EmbedTestDeafWait": "Embed test deaf wait",
                              "EmbedTestFailOnSeed": "Embed test fail on seed"}
