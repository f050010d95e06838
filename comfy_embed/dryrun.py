"""The dry run behind ``POST /api/serverless/validate``: every check a run
makes, and what it would load, without queueing or executing anything.

Reports, all at once rather than stopping at the first problem: node classes
that are not installed, model files that are missing (with the closest names
available), media inputs that cannot be used, ComfyUI's own validation errors,
and the model files the run would load. Parsing (with the run's limits) and
media inputs go through the same preparation steps as a run
(:class:`comfy_embed.prepare.pipeline.Preparer`).
"""

from __future__ import annotations

import difflib
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from comfy_embed.errors import ComfyEmbedError, WorkflowInvalid
from comfy_embed.prepare.graph import randomize_seeds
from comfy_embed.storage.credentials import Credentials
from comfy_embed.tasks import scrub_paths, server_folders
from comfy_embed.variants import asked, checked_plan

if TYPE_CHECKING:
    from comfy_embed.runtime import Engine

__all__ = ["dry_run", "MODEL_INPUTS"]

#: Loader inputs and the model folder they name (nodes of ComfyUI and of
#: common packs); other combo inputs count when their choices are files of a
#: model folder.
MODEL_INPUTS: dict[str, str] = {
    "ckpt_name": "checkpoints", "lora_name": "loras", "vae_name": "vae",
    "control_net_name": "controlnet", "unet_name": "diffusion_models",
    "clip_name": "text_encoders", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
    "clip_name3": "text_encoders", "clip_name4": "text_encoders",
    "style_model_name": "style_models", "gligen_name": "gligen",
    "hypernetwork_name": "hypernetworks", "upscale_model_name": "upscale_models",
    "model_name": "upscale_models", "photomaker_model_name": "photomaker",
}
_NONE = {"none", "None", ""}


async def dry_run(engine: "Engine", body: Any,
                  credentials: Credentials | None = None, variants: Any = None) -> dict[str, Any]:
    """The report: ``valid``, ``error`` (as a run would answer it),
    ``node_errors``, ``missing_nodes``, ``missing_models``, ``models``,
    ``outputs``. ``variants``: the ``?variants=`` asked (else the body's
    ``extra_data.variants``), checked as a run would."""
    report: dict[str, Any] = {"valid": False, "error": None, "node_errors": {},
                              "missing_nodes": [], "missing_models": [], "models": [],
                              "outputs": []}
    await engine.wait_ready()
    comfy = engine.comfy
    preparer = engine.preparer
    try:
        # On-prompt handlers are not called: a dry run must have no side effects.
        request = preparer.parse(body, handlers=False)
    except WorkflowInvalid as e:
        report.update(error=e.to_dict(), node_errors=e.node_errors)
        return report
    prompt = request.prompt
    # Seeds of -1 are drawn as a run draws them (ComfyUI refuses -1 itself):
    # the bundled example sends -1.
    randomize_seeds(prompt, comfy.input_specs)
    report["missing_nodes"] = [
        {"node_id": nid, "class_type": node["class_type"]}
        for nid, node in prompt.items() if not comfy.has_node(node["class_type"])]
    for missing in report["missing_nodes"]:
        # The lock knows which pack declares it: named, with why it is missing.
        pack = engine.fingerprint.pack_for(missing["class_type"]) if engine.fingerprint else None
        if pack is not None:
            missing["pack"] = pack
    files = await anyio.to_thread.run_sync(comfy.model_files)
    _models(report, prompt, comfy, files, server_folders(engine.settings))
    await _mark_manifest_models(engine, report)

    errors: list[ComfyEmbedError] = []
    # Inputs fetched for the check go to a folder of their own, deleted after.
    folder = "validate-" + uuid.uuid4().hex
    try:
        await preparer.materialise(prompt, credentials, folder)
    except ComfyEmbedError as e:
        errors.append(e)
        report["node_errors"].update(e.node_errors)
    try:
        await _check(comfy, prompt, request.targets, report, errors)
    finally:
        engine.drop_inputs(folder)
    wanted = asked(variants, request.extra_data)
    if wanted is not None:
        try:
            checked_plan(wanted, prompt, comfy.input_specs, folder, engine.settings)
        except ComfyEmbedError as e:
            errors.append(e)
            report["node_errors"].update(e.node_errors)
    if errors:
        first = errors[0]
        report["error"] = {**first.to_dict(), "node_errors": report["node_errors"]}
    report["valid"] = not errors and not report["missing_models"]
    if report["missing_models"] and report["error"] is None:
        names = ", ".join(m["name"] for m in report["missing_models"])
        report["error"] = {"type": "missing_models", "message": f"model files not found: {names}",
                           "node_errors": report["node_errors"]}
    return report


async def _check(comfy: Any, prompt: dict[str, Any], targets: list[str] | None,
                 report: dict[str, Any], errors: list[ComfyEmbedError]) -> None:
    """ComfyUI's own validation, its errors merged into ``report``."""
    if report["missing_nodes"]:
        # ComfyUI's validation stops at the first unknown node type; the
        # run's own check names every one.
        try:
            await anyio.to_thread.run_sync(comfy.validate, prompt, str(uuid.uuid4()), targets)
        except WorkflowInvalid as e:
            errors.insert(0, e)
            report["node_errors"].update(e.node_errors)
    else:
        _, ok, error, outputs, node_errors = await anyio.to_thread.run_sync(
            comfy.check, prompt, str(uuid.uuid4()), targets)
        report["outputs"] = sorted(outputs)
        for node_id, entry in node_errors.items():
            # A refused media input also fails ComfyUI's own check (no such
            # file): keep the error that says why.
            report["node_errors"].setdefault(node_id, entry)
        if not ok or node_errors:
            try:
                await anyio.to_thread.run_sync(comfy.validate, prompt, str(uuid.uuid4()), targets)
            except WorkflowInvalid as e:  # the same error a run would answer with
                errors.append(e)


async def _mark_manifest_models(engine: "Engine", report: dict[str, Any]) -> None:
    """A missing model that the manifest fetches on first use says so (the
    run would download it; until then ComfyUI's own check still fails)."""
    s = engine.settings
    if not report["missing_models"] or not s.models.manifest or s.models.fetch != "first_use":
        return
    from comfy_embed.inputs.models import load_manifest

    urls = {(e.folder, e.name): e.url
            for e in await anyio.to_thread.run_sync(load_manifest, s.models.manifest)}
    for missing in report["missing_models"]:
        url = urls.get((missing["folder"], missing["name"]))
        if url:
            missing["manifest_url"] = url


def _models(report: dict[str, Any], prompt: dict[str, Any], comfy: Any,
            files: dict[str, list[str]], roles: dict[str, Path]) -> None:
    """Fill ``models`` (files the run would load) and ``missing_models``."""
    for node_id, node in prompt.items():
        options = comfy.input_options(node["class_type"])
        for name, value in node["inputs"].items():
            if not isinstance(value, str) or value in _NONE or name not in options:
                continue
            folder = _folder_of(name, options[name], files)
            if folder is None:
                continue
            where = {"node_id": node_id, "class_type": node["class_type"], "input": name,
                     "folder": folder, "name": value}
            if value in options[name] or value in files.get(folder, []):
                path = comfy.model_path(folder, value)
                size = os.path.getsize(path) if path and os.path.exists(path) else None
                report["models"].append({**where, "path": _shown(path, folder, value, roles),
                                         "bytes": size})
            else:
                choices = [c for c in files.get(folder) or options[name] if isinstance(c, str)]
                report["missing_models"].append(
                    {**where, "closest": difflib.get_close_matches(value, choices, n=3, cutoff=0.3)})


def _shown(path: str | None, folder: str, name: str, roles: dict[str, Path]) -> str | None:
    """A model's path as a client may see it: under a server folder by its
    role (``<models>/checkpoints/x``), elsewhere (extra model paths, the
    cache) by its model folder (``<checkpoints>/x``); never absolute."""
    if path is None:
        return None
    shown = scrub_paths(path, roles)
    return shown if not os.path.isabs(shown) else f"<{folder}>/{name}"


def _folder_of(name: str, options: list[Any], files: dict[str, list[str]]) -> str | None:
    if name in MODEL_INPUTS:
        return MODEL_INPUTS[name]
    real = {o for o in options if isinstance(o, str) and o not in _NONE}
    if not real:
        return None
    for folder, names in files.items():
        if names and real <= set(names):
            return folder
    return None
