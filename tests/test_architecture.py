"""The import graph keeps the request path one-way (api -> service -> runtime
-> executor -> the ComfyUI boundary) and each third-party SDK in one room.
Read from the source (ast), so a violation is named with its file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "comfy_embed"
ROOT = PACKAGE.parent

#: Top-level modules that are ComfyUI's own (vendor/ComfyUI).
COMFYUI = {"comfy", "comfy_execution", "comfy_extras", "comfy_api", "comfy_api_nodes",
           "execution", "folder_paths", "nodes", "latent_preview", "node_helpers", "server",
           "utils", "torch", "torchvision"}
#: Third-party packages, and the only files (prefixes) that may import them.
ROOMS = {"starlette": ("api/",), "oss2": ("storage/",), "boto3": ("storage/",),
         "botocore": ("storage/",), "prometheus_client": ("observe.py",)}
#: The request path, lowest first: a module never imports one above it
#: (``tasks``, the Task, knows the engine above it only as a Protocol).
LAYERS = ["_comfy", "executor", "tasks", "runtime", "service", "api"]


def imports_of(path: Path) -> set[str]:
    """Absolute module names a file imports (relative ones resolved)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                names.add(node.module or "")
                continue
            base = package[:len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def sources() -> list[tuple[str, Path]]:
    return [(p.relative_to(PACKAGE).as_posix(), p) for p in sorted(PACKAGE.rglob("*.py"))]


def _layer(module: str) -> int | None:
    """The layer of ``comfy_embed.x.y`` (``_comfy`` includes ``_comfy_*``)."""
    if not module.startswith("comfy_embed."):
        return None
    head = module.split(".")[1]
    for i, name in enumerate(LAYERS):
        if head == name or (name == "_comfy" and head.startswith("_comfy")):
            return i
    return None


@pytest.mark.parametrize("package, rooms", sorted(ROOMS.items()))
def test_each_sdk_stays_in_its_room(package: str, rooms: tuple[str, ...]) -> None:
    for where, path in sources():
        if any(n.split(".")[0] == package for n in imports_of(path)):
            assert where.startswith(rooms), f"{where} imports {package} (only {rooms} may)"


def test_only_the_comfy_boundary_imports_comfyui() -> None:
    for where, path in sources():
        found = {n for n in imports_of(path) if n.split(".")[0] in COMFYUI}
        if found:
            assert where.startswith("_comfy"), f"{where} imports ComfyUI's {sorted(found)}"


def test_the_request_path_points_down() -> None:
    for where, path in sources():
        own = _layer("comfy_embed." + where.removesuffix(".py").replace("/", "."))
        if own is None:
            continue
        for name in imports_of(path):
            other = _layer(name)
            assert other is None or other <= own, \
                f"{where} ({LAYERS[own]}) imports {name} ({LAYERS[other]}), a layer above it"


def test_only_entry_points_import_the_api() -> None:
    for where, path in sources():
        if where.startswith("api/") or where == "cli.py":
            continue
        found = {n for n in imports_of(path) if n.startswith("comfy_embed.api")}
        assert not found, f"{where} imports {sorted(found)}"


#: Small modules every layer may use; they import no layer themselves, so
#: they never turn the request path around (``outcome`` sits below the
#: executor only because the ComfyUI boundary builds an Outcome too).
SHARED = ["background.py", "outcome.py", "events.py", "errors.py"]


@pytest.mark.parametrize("where", SHARED)
def test_shared_modules_import_no_layer(where: str) -> None:
    found = {n for n in imports_of(PACKAGE / where) if _layer(n) is not None}
    assert not found, f"{where} imports {sorted(found)}, a layer of the request path"
