"""The house plan, enforced: every module of comfy_embed sits on a floor, no
module imports one on a higher floor, no import circle exists anywhere, and
each third-party SDK stays in its room. Read from the source (ast), function
bodies and ``TYPE_CHECKING`` blocks included, so a violation is named with
its file."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "comfy_embed"
ROOT = PACKAGE.parent

#: Top-level modules that are ComfyUI's own (vendor/ComfyUI).
COMFYUI = {"comfy", "comfy_execution", "comfy_extras", "comfy_api", "comfy_api_nodes",
           "execution", "folder_paths", "nodes", "latent_preview", "node_helpers", "server",
           "utils", "torch", "torchvision"}
#: Third-party packages, and the only files (prefixes) that may import them.
ROOMS = {"starlette": ("api/",), "oss2": ("storage/",), "boto3": ("storage/",),
         "botocore": ("storage/",), "prometheus_client": ("observe/metrics.py",),
         "redis": ("queue/",)}

#: The floors, lowest first; a name covers a module or a package. A module
#: imports only from its own floor or below, and never in a circle. The
#: request path reads upwards: api -> service -> runtime -> tasks ->
#: executor -> _comfy, with what they use below them.
FLOORS: list[tuple[str, ...]] = [
    # the version, read by pyproject.toml, the OpenAPI document and the CLI
    ("version",),
    # the ground: settings, errors, event shapes, ids, background work
    ("config", "errors", "events", "taskid", "background", "examples", "net"),
    # leaf concerns that know nothing of a request's path
    ("observe", "storage", "prepare", "tasklog", "assets"),
    ("results", "inputs"),
    # the durable queue on Redis Streams (issue 24), optional
    ("queue",),
    # the lock file: making, installing, drift (comfy-embed lock / install)
    ("environment",),
    ("outcome",),
    # fair share between API keys: per-key FIFOs served round-robin (issue 28)
    ("scheduling",),
    ("_comfy",),
    # the engine's boot on its executor thread: models, ComfyUI, kept models
    ("startup",),
    ("executor",),
    # the measured ETA and deadline admission (issue 28)
    ("eta",),
    # N variants of one request: the job's run hook and the answer's groups
    ("variants",),
    # the stall watchdog: interrupts a silent job, recycles a wedged instance (issue 28)
    ("watchdog",),
    ("tasks",),
    ("runtime",),
    ("dryrun", "webhooks"),
    ("service",),
    ("api",),
    # installing ComfyUI for an installed wheel (comfy-embed install-comfyui)
    ("install",),
    # entry points and the public surface
    ("cli", ""),
]


def module_name(path: Path) -> str:
    """``comfy_embed.x.y`` of a source file (a package is its ``__init__``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> list[tuple[str, Path]]:
    return [(p.relative_to(PACKAGE).as_posix(), p) for p in sorted(PACKAGE.rglob("*.py"))]


@cache
def modules() -> frozenset[str]:
    return frozenset(module_name(p) for _, p in sources())


def imports_of(path: Path) -> set[str]:
    """Absolute module names a file imports (relative ones resolved); a name
    imported from a package is listed as ``package.name`` too."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                module = node.module or ""
            else:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def edges_of(path: Path) -> set[str]:
    """The modules of comfy_embed a file imports: ``from package import
    module`` is an import of that module, not of the package; a name that is
    not a module is an import of the module it comes from."""
    known = modules()
    package = list(path.relative_to(ROOT).with_suffix("").parts)[:-1]

    def owner(name: str) -> str:  # the nearest module a dotted name lies in
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(owner(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.update(owner(f"{module}.{a.name}") for a in node.names)
    return {m for m in found if m.startswith("comfy_embed.") and m != module_name(path)}


def floor_of(module: str) -> int:
    """The floor of ``comfy_embed.x.y``: the longest name in FLOORS that covers it."""
    rest = module.removeprefix("comfy_embed").removeprefix(".")
    best, length = -1, -1
    for i, names in enumerate(FLOORS):
        for name in names:
            covers = rest == name or (name and rest.startswith(name + ".")) or (not name and not rest)
            if covers and len(name) > length:
                best, length = i, len(name)
    return best


def graph() -> dict[str, set[str]]:
    return {module_name(p): edges_of(p) for _, p in sources()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor() -> None:
    homeless = sorted(m for m in modules() if floor_of(m) < 0)
    assert not homeless, f"modules on no floor of FLOORS: {homeless}"


def test_no_import_reaches_a_higher_floor() -> None:
    bad = [f"{m} (floor {floor_of(m)}) imports {o} (floor {floor_of(o)})"
           for m, targets in graph().items() for o in sorted(targets) if floor_of(o) > floor_of(m)]
    assert not bad, "\n".join(bad)


def test_no_import_circle() -> None:
    assert circles(graph()) == []


def test_the_circle_check_sees_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package, rooms", sorted(ROOMS.items()))
def test_each_sdk_stays_in_its_room(package: str, rooms: tuple[str, ...]) -> None:
    for where, path in sources():
        if any(n.split(".")[0] == package for n in imports_of(path)):
            assert where.startswith(rooms), f"{where} imports {package} (only {rooms} may)"


def test_only_the_comfy_boundary_imports_comfyui() -> None:
    for where, path in sources():
        found = {n for n in imports_of(path) if n.split(".")[0] in COMFYUI}
        if found:
            assert where.startswith("_comfy/"), f"{where} imports ComfyUI's {sorted(found)}"


def test_only_entry_points_import_the_api() -> None:
    for where, path in sources():
        if where.startswith("api/") or where == "cli.py":
            continue
        found = {n for n in imports_of(path) if n.startswith("comfy_embed.api")}
        assert not found, f"{where} imports {sorted(found)}"


def test_config_imports_nothing_of_the_package() -> None:
    for path in (PACKAGE / "config").glob("*.py"):
        outside = {m for m in edges_of(path) if not m.startswith("comfy_embed.config")}
        assert not outside, f"config/{path.name} imports {sorted(outside)}"


def test_no_module_over_600_lines() -> None:
    long = [f"{where}: {n}" for where, path in sources()
            if (n := len(path.read_text().splitlines())) > 600]
    assert not long, long


def test_no_function_over_80_lines() -> None:
    """Functions and methods, from ``def`` to their last line."""
    long = [f"{where} {node.name}: {n}" for where, path in sources()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (n := (node.end_lineno or node.lineno) - node.lineno + 1) > 80]
    assert not long, long


def _readme_layout() -> set[str]:
    """The paths under ``comfy_embed/`` that the README's Layout block lists
    (nesting read from the indentation, two spaces a level)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```")]
    stack: list[tuple[int, str]] = []
    listed = set()
    for line in block.splitlines():
        name = line.strip().split(" ")[0] if line.strip() else ""
        if not (name.endswith("/") or name.endswith(".py")):
            continue
        depth = len(line) - len(line.lstrip(" "))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        path = "".join(n for _, n in stack) + name
        listed.add(path)
        if name.endswith("/"):
            stack.append((depth, name))
    return listed


def test_readme_layout_lists_every_module() -> None:
    listed = _readme_layout()
    expected = {f"comfy_embed/{where}" for where, _ in sources()
                if not where.endswith("/__init__.py") and not where.startswith("examples/")}
    assert not expected - listed, f"README's Layout misses {sorted(expected - listed)}"
    stale = {p for p in listed if p.startswith("comfy_embed/") and not (ROOT / p).exists()}
    assert not stale, f"README's Layout lists what does not exist: {sorted(stale)}"
