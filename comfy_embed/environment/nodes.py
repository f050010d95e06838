"""The node classes a pack declares, read from its source without importing it.

A pack maps node names to classes in dict literals assigned to
``NODE_CLASS_MAPPINGS`` or to a name ending in ``CLASS_MAPPINGS`` (packs that
split their nodes by module merge such dicts), or one at a time
(``NODE_CLASS_MAPPINGS["Name"] = ...``). Their string keys are what a
workflow's ``class_type`` names; packs that build the mapping otherwise
(loops, registries) are not seen. This is how a lock knows which pack a
missing node comes from, even when the pack failed to import.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

__all__ = ["declared_nodes"]

#: Source files larger than this are not parsed (generated data, vendored code).
_MAX_BYTES = 2 * 1024 * 1024


def _mapping_name(target: ast.expr) -> str | None:
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        return target.attr
    return None


def _keys(node: ast.AST) -> set[str]:
    """The string keys of a module's ``*CLASS_MAPPINGS`` dicts."""
    found: set[str] = set()
    for item in ast.walk(node):
        if isinstance(item, (ast.Assign, ast.AnnAssign)):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            value = item.value
            for target in targets:
                if isinstance(target, ast.Subscript):
                    name = _mapping_name(target.value)
                    key = target.slice
                    if (name and name.endswith("CLASS_MAPPINGS") and isinstance(key, ast.Constant)
                            and isinstance(key.value, str)):
                        found.add(key.value)
                elif (_mapping_name(target) or "").endswith("CLASS_MAPPINGS") and isinstance(
                        value, ast.Dict):
                    found.update(k.value for k in value.keys
                                 if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return found


def declared_nodes(pack: Path) -> frozenset[str]:
    """The node names ``pack`` (a folder or a single .py file) declares."""
    files = [pack] if pack.is_file() else sorted(pack.rglob("*.py"))
    found: set[str] = set()
    for path in files:
        try:
            if path.stat().st_size > _MAX_BYTES or "site-packages" in path.parts:
                continue
            with warnings.catch_warnings():  # a pack's invalid escapes are its own business
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), str(path))
        except (OSError, SyntaxError, ValueError):
            continue
        found |= _keys(tree)
    return frozenset(found)
