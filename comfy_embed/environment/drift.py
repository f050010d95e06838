"""What a running instance is, and how it differs from its lock.

:func:`drift` is checked once at boot (``/ready`` shows it); :class:`Fingerprint`
gives each task's run record (ComfyUI's commit, comfy-embed's version, each
pack's commit, the SHA-256 of each model file a task names, torch, device).
Model hashes are cached by path, size and modification time, so a file is
hashed once per change, not once per task.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_embed.config import Settings, places
from comfy_embed.environment import gitrepo
from comfy_embed.environment.lockfile import Lock, PackPin, lock_hash, read_lock
from comfy_embed.environment.nodes import declared_nodes
from comfy_embed.version import __version__

log = logging.getLogger(__name__)

__all__ = ["Fingerprint", "PackState", "differences", "drift", "instance_environment",
           "pack_states", "sha256_of"]

#: What a model file's name ends with (ComfyUI's supported_pt_extensions, and more).
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pt2", ".pth", ".bin", ".pkl", ".sft",
                  ".gguf", ".onnx")
_hashes: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def sha256_of(path: Path) -> str | None:
    """The file's SHA-256 (cached while its size and mtime stay); None if absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hashes:
            return _hashes[key]
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:  # unreadable: no hash, not an error of the run
        return None
    with _hash_lock:
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


@dataclass(frozen=True)
class PackState:
    """A pack folder found at boot: its commit and how it loaded."""

    name: str
    path: Path
    commit: str | None
    loaded: bool = True
    error: str | None = None


def pack_states(folders: Iterable[Path], loaded: dict[str, str | None]) -> list[PackState]:
    """The pack folders under ``folders`` with their git HEAD; ``loaded`` maps a
    pack's name to its import error (None: it loaded)."""
    out = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if (not entry.is_dir() or entry.name.startswith(".") or entry.name == "__pycache__"
                    or entry.name.endswith(".disabled")):
                continue
            error = loaded.get(entry.name)
            out.append(PackState(entry.name, entry, gitrepo.head(entry),
                                 entry.name not in loaded or error is None, error))
    return out


def drift(lock: Lock, comfyui_commit: str | None, packs: list[PackState],
          models_path: Path) -> dict[str, Any]:
    """``{"comfyui"?: ..., "packs": {name: why}, "models": {folder/name: why}}``:
    empty maps when the instance is what its lock says."""
    out: dict[str, Any] = {"packs": {}, "models": {}}
    if lock.comfyui_commit and comfyui_commit and comfyui_commit != lock.comfyui_commit:
        out["comfyui"] = f"at {comfyui_commit}, the lock says {lock.comfyui_commit}"
    found = {p.name: p for p in packs}
    for pin in lock.packs:
        state = found.get(pin.name)
        if state is None:
            out["packs"][pin.name] = "missing: not in custom_nodes"
        elif state.commit != pin.commit:
            out["packs"][pin.name] = f"at {state.commit or 'no git commit'}, the lock says {pin.commit}"
        elif not state.loaded:
            out["packs"][pin.name] = f"failed to import: {state.error}"
    for state in packs:
        if lock.pack(state.name) is None:
            out["packs"][state.name] = "not in the lock"
    for model in lock.models:
        sha = sha256_of(models_path / model.folder / model.name)
        if sha is None:
            out["models"][model.label] = "missing"
        elif sha != model.sha256:
            out["models"][model.label] = f"sha256 {sha}, the lock says {model.sha256}"
    return out


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """What differs between two run records: ``{key: {"recorded", "now"}}``,
    packs and models compared entry by entry."""
    out: dict[str, Any] = {}
    for key in sorted(set(recorded) | set(now)):
        a, b = recorded.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = {k: {"recorded": a.get(k), "now": b.get(k)}
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            if inner:
                out[key] = inner
        elif a != b:
            out[key] = {"recorded": a, "now": b}
    return out


@dataclass
class Fingerprint:
    """The instance's environment, read once at boot; :meth:`record` adds the
    models of one task."""

    comfyui: str | None
    packs: dict[str, str | None]
    torch: str | None
    device: str
    models_path: Path
    #: ``sha256:<hex>`` of the lock file, when the instance has one.
    lock: str | None = None
    #: How the instance differs from its lock (see :func:`drift`), when it has one.
    drift: dict[str, Any] | None = None
    #: ``name -> [(folder/name, path)]``: where ComfyUI finds a model file of
    #: that name (every model folder, extra paths included); else only
    #: ``models_path``'s folders are looked in.
    locate: Callable[[str], list[tuple[str, Path]]] | None = None
    #: The lock's warm-up workflow (a path beside the lock), if it names one.
    warmup: Path | None = None
    #: ``{node class: (pack pin, where it stands)}`` from the lock's packs.
    node_packs: dict[str, tuple[PackPin, str]] = field(default_factory=dict)

    def pack_for(self, class_type: str) -> dict[str, Any] | None:
        """The locked pack that declares ``class_type``: its name, URL,
        commit and state (``installed``, or why not: its drift); None when
        the lock knows no such node."""
        found = self.node_packs.get(class_type)
        if found is None:
            return None
        pin, state = found
        return {"name": pin.name, "url": pin.url, "commit": pin.commit, "state": state}

    @property
    def drifted(self) -> bool:
        d = self.drift or {}
        return bool(d.get("packs") or d.get("models") or d.get("comfyui"))

    def _model_files(self, prompt: dict[str, Any]) -> list[tuple[str, Path]]:
        # Only names with a model file's extension are looked up (a prompt's
        # text is not): this runs on the event loop for every task.
        names = {v for node in prompt.values() if isinstance(node, dict)
                 for v in (node.get("inputs") or {}).values()
                 if isinstance(v, str) and v.lower().endswith(MODEL_SUFFIXES)}
        if self.locate is not None:
            return [found for name in sorted(names) if name and len(name) < 512
                    for found in self.locate(name)]
        try:
            folders = sorted(p.name for p in self.models_path.iterdir() if p.is_dir())
        except OSError:
            return []
        out = []
        for name in sorted(names):
            if not name or ".." in Path(name).parts or Path(name).is_absolute():
                continue
            out += [(f"{f}/{name}", self.models_path / f / name) for f in folders
                    if (self.models_path / f / name).is_file()]
        return out

    def record(self, prompt: dict[str, Any]) -> dict[str, Any]:
        """The run record of a task whose graph is ``prompt``: every string input
        that names a file under ``<models>/<folder>/`` is a model it used."""
        models = {label: sha for label, path in self._model_files(prompt)
                  if (sha := sha256_of(path)) is not None}
        out = {"comfy_embed": __version__, "comfyui": self.comfyui, "packs": dict(self.packs),
               "models": models, "torch": self.torch, "device": self.device, "lock": self.lock}
        if self.drift is not None:
            out["drift"] = self.drift
        return out


def instance_environment(settings: Settings, loaded: dict[str, str | None] | None,
                         device: str) -> Fingerprint:
    """The instance as it booted, compared with its lock (``settings.comfy.lock``;
    a lock that cannot be read fails the boot, naming the entry).
    ``loaded``: each loaded pack's import error (None: it loaded); None when
    custom nodes are off."""
    s = settings.comfy
    folders = [s.comfyui_dir / "custom_nodes", *s.custom_nodes_dirs]
    if loaded is None:
        off = "not loaded: custom nodes are off (COMFY_EMBED_CUSTOM_NODES)"
        loaded = {p.name: off for p in pack_states(folders, {})}
    packs = pack_states(folders, loaded)
    try:
        torch: str | None = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch = None
    commit = gitrepo.head(s.comfyui_dir)
    if commit is None and s.comfyui_dir.resolve() == places.default_comfyui_dir().resolve():
        commit = places.COMFYUI_COMMIT  # the vendored copy, without its git history (an image)
    fp = Fingerprint(commit, {p.name: p.commit for p in packs}, torch, device, s.models_path)
    if s.lock is not None:
        lock = read_lock(s.lock)
        fp.lock = lock_hash(s.lock)
        fp.drift = drift(lock, commit, packs, s.models_path)
        fp.node_packs = _node_packs(lock, packs, fp.drift)
        if lock.warmup:
            fp.warmup = s.lock.parent / lock.warmup
        if fp.drifted:
            log.warning("this instance differs from its lock %s: %s", s.lock, fp.drift)
    return fp


def _node_packs(lock: Lock, packs: list[PackState],
                drift: dict[str, Any]) -> dict[str, tuple[PackPin, str]]:
    """Each node class a locked pack declares (the lock's ``nodes``, else read
    from the pack's folder), with the pack's state."""
    folders = {p.name: p.path for p in packs}
    out: dict[str, tuple[PackPin, str]] = {}
    for pin in lock.packs:
        names = pin.nodes or (declared_nodes(folders[pin.name]) if pin.name in folders else ())
        state = drift["packs"].get(pin.name, "installed")
        for name in names:
            out.setdefault(name, (pin, state))
    return out
