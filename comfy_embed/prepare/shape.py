"""A workflow's shape: what decides how long it runs, without what the caller typed.

Two requests have the same shape when they run the same node types, linked
the same way, with the same widget values (steps, width, height, batch,
sampler, model names...), whatever their seeds, their texts (prompts,
filename prefixes) and their input files or URLs. Node ids do not count
either: each node is hashed with the hashes of the nodes that feed it
(a Merkle hash over the graph), and the shape is the hash of the sorted node
hashes, so a graph exported by the editor and the same graph written by
hand share their shape.

The ETA (:mod:`comfy_embed.eta`) learns execution time per shape. The hash
is stable across processes and versions of Python (it is written into the
task's report and read back from the shared log at the next boot).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from comfy_embed.prepare.graph import SEED_INPUTS, media_kind

__all__ = ["ABSTRACT", "workflow_shape"]

SpecLookup = Callable[[str], dict[str, tuple[Any, dict[str, Any]]]]

#: What an abstracted value (seed, text, input file) is replaced by.
ABSTRACT = "*"
_SEEDS = frozenset(SEED_INPUTS)
_DIGEST = 8  # bytes: 16 hex characters


def _is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _abstract(class_type: str, name: str, value: Any,
              specs: dict[str, tuple[Any, dict[str, Any]]]) -> Any:
    """The value as the shape sees it: seeds, free text and media inputs
    become :data:`ABSTRACT`; numbers, booleans and combo choices stay."""
    if name in _SEEDS:
        return ABSTRACT
    if isinstance(value, str):
        kind, opts = specs.get(name, (None, {}))
        if isinstance(kind, (list, tuple)) or kind == "COMBO":
            # A choice among a list (a model, a sampler): it changes the run,
            # unless it names an uploaded file (LoadImage's image).
            return ABSTRACT if media_kind(class_type, name, opts) else value
        return ABSTRACT  # STRING, or an input the node does not declare
    if isinstance(value, (dict, list)):
        return type(value).__name__  # a structured constant: its kind, not its content
    return value


def workflow_shape(prompt: dict[str, Any], specs: SpecLookup) -> str:
    """The shape of an API-format graph (``{node_id: {"class_type", "inputs"}}``)
    as 16 hex characters. ``specs(class_type)`` gives a node's input specs
    (``{name: (type, options)}``, {} if unknown). Pure: the graph is not
    changed. A link to a missing node or a cycle (both refused later by
    validation) hashes as a marker rather than failing."""
    memo: dict[str, str] = {}
    visiting: set[str] = set()

    def node_hash(node_id: str) -> str:
        done = memo.get(node_id)
        if done is not None:
            return done
        node = prompt.get(node_id)
        if not isinstance(node, dict):
            return "missing"
        if node_id in visiting:
            return "cycle"
        visiting.add(node_id)
        class_type = str(node.get("class_type", ""))
        inputs = node.get("inputs")
        parts: list[str] = [class_type]
        if isinstance(inputs, dict):
            node_specs = specs(class_type)
            for name in sorted(inputs):
                value = inputs[name]
                if _is_link(value):
                    parts.append(f"{name}<{node_hash(value[0])}:{value[1]}")
                else:
                    parts.append(f"{name}={_abstract(class_type, name, value, node_specs)!r}")
        visiting.discard(node_id)
        digest = hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"),
                                 digest_size=_DIGEST).hexdigest()
        memo[node_id] = digest
        return digest

    nodes = sorted(node_hash(str(n)) for n in prompt)
    return hashlib.blake2b("\x1e".join(nodes).encode(), digest_size=_DIGEST).hexdigest()
