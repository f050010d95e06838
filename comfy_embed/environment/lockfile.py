"""The lock file (``comfy-embed.lock``): what an instance runs, in TOML.

```toml
version = 1

[comfyui]
commit = "<40 hex digits>"
url = "https://github.com/comfyanonymous/ComfyUI"      # optional

[[packs]]                        # one per custom-node pack, by folder name
name = "ComfyUI-VideoHelperSuite"
url = "https://github.com/Kosinkadink/ComfyUI-VideoHelperSuite"  # or a path, file://
commit = "<40 hex digits>"
registry_id = "comfyui-videohelpersuite"          # optional (Comfy Registry)
registry_version = "1.7.0"                        # optional
requirements = ["imageio-ffmpeg==0.6.0", "opencv-python==4.12.0.88"]
nodes = ["VHS_LoadVideo", "VHS_VideoCombine"]     # optional: the node classes it declares

[pip]
packages = ["numpy==1.26.4"]     # extra pip packages, pinned

[[models]]                       # the models manifest's entries
folder = "checkpoints"
name = "tiny.safetensors"
sha256 = "<64 hex digits>"
url = "https://..."              # optional: without it the file must be there
size = 123                       # optional

[warmup]
workflow = "warmup.json"         # optional, relative to the lock file
```

Reading checks every entry and names the one at fault; :func:`dump_lock`
writes the same file back byte for byte (sorted, one layout), so ``lock``
run twice on the same folder gives the same file.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from comfy_embed.errors import InstallError

__all__ = ["FORMAT", "Lock", "ModelPin", "PackPin", "conflicts", "dump_lock", "lock_hash",
           "parse_lock", "read_lock"]

#: The format's version, written as ``version``.
FORMAT = 1
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PACK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_URL_SCHEMES = ("https://", "http://", "file://", "ssh://", "git://", "git@")


@dataclass(frozen=True)
class PackPin:
    """One custom-node pack: ``custom_nodes/<name>`` at ``commit`` of ``url``."""

    name: str
    url: str
    commit: str
    requirements: tuple[str, ...] = ()
    registry_id: str | None = None
    registry_version: str | None = None
    #: The node classes the pack declares (environment/nodes.py), so that a
    #: workflow's missing node can be traced to it.
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelPin:
    """One model: ``<models>/<folder>/<name>`` whose SHA-256 is ``sha256``."""

    folder: str
    name: str
    sha256: str
    url: str | None = None
    size: int | None = None

    @property
    def label(self) -> str:
        return f"{self.folder}/{self.name}"


@dataclass(frozen=True)
class Lock:
    """A whole lock file."""

    comfyui_commit: str | None = None
    comfyui_url: str | None = None
    packs: tuple[PackPin, ...] = ()
    pip: tuple[str, ...] = ()
    models: tuple[ModelPin, ...] = ()
    warmup: str | None = None
    #: Where it was read from (relative paths in it are relative to its folder).
    path: Path | None = field(default=None, compare=False)

    def pack(self, name: str) -> PackPin | None:
        return next((p for p in self.packs if p.name == name), None)


def read_lock(path: Path) -> Lock:
    """Read and check a lock file; InstallError naming the entry at fault."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InstallError(f"lock {path}: {e.strerror or e}") from None
    return parse_lock(text, Path(path))


def lock_hash(path: Path) -> str:
    """``sha256:<hex>`` of the lock file's bytes (what a task's report records)."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_lock(text: str, path: Path | None = None) -> Lock:
    """A lock from its TOML text; InstallError naming the entry at fault."""
    where = f"lock {path}" if path else "lock"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InstallError(f"{where}: not TOML: {e}") from None
    if raw.get("version", FORMAT) != FORMAT:
        raise InstallError(f"{where}: version {raw.get('version')!r} is not {FORMAT}")
    comfy = _table(raw, "comfyui", where)
    commit = comfy.get("commit")
    if commit is not None and not (isinstance(commit, str) and _COMMIT.fullmatch(commit)):
        raise InstallError(f"{where}: comfyui.commit must be 40 hex digits, not {commit!r}")
    url = comfy.get("url")
    if url is not None:
        _check_url(url, f"{where}: comfyui.url")
    packs = tuple(_pack(item, f"{where}: packs[{i}]") for i, item in enumerate(_list(raw, "packs", where)))
    names = [p.name for p in packs]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise InstallError(f"{where}: pack {dup[0]} is listed twice")
    pip = _table(raw, "pip", where).get("packages", [])
    pip = tuple(_requirement(r, f"{where}: pip.packages") for r in _strings(pip, f"{where}: pip.packages"))
    models = tuple(_model(item, f"{where}: models[{i}]")
                   for i, item in enumerate(_list(raw, "models", where)))
    labels = [m.label for m in models]
    if dup := sorted({n for n in labels if labels.count(n) > 1}):
        raise InstallError(f"{where}: model {dup[0]} is listed twice")
    warmup = _table(raw, "warmup", where).get("workflow")
    if warmup is not None and not isinstance(warmup, str):
        raise InstallError(f"{where}: warmup.workflow must be a file name")
    return Lock(commit, url, packs, pip, models, warmup, path)


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise InstallError(f"{where}: [{key}] must be a table")
    return value


def _list(raw: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InstallError(f"{where}: {key} must be an array of tables ([[{key}]])")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InstallError(f"{where}: must be a list of strings")
    return value


def _check_url(url: Any, where: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise InstallError(f"{where}: url must be a git URL or a path")
    if "://" in url and not url.startswith(_URL_SCHEMES):
        raise InstallError(f"{where}: url {url!r} is not a git URL (https, ssh, git, file) or a path")
    return url


def _requirement(line: str, where: str) -> str:
    try:
        Requirement(line)
    except InvalidRequirement as e:
        raise InstallError(f"{where}: cannot read requirement {line!r}: {e}") from None
    return line


def _pack(item: dict[str, Any], where: str) -> PackPin:
    name = item.get("name")
    if not isinstance(name, str) or not _PACK_NAME.fullmatch(name):
        raise InstallError(f"{where}: name must be a plain folder name, not {name!r}")
    where = f"{where.rsplit(':', 1)[0]}: pack {name}"
    url = _check_url(item.get("url"), where)
    commit = item.get("commit")
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
        raise InstallError(f"{where}: commit must be 40 hex digits, not {commit!r}")
    reqs = tuple(_requirement(r, where) for r in _strings(item.get("requirements", []),
                                                          f"{where}: requirements"))
    rid, rver = item.get("registry_id"), item.get("registry_version")
    for key, value in (("registry_id", rid), ("registry_version", rver)):
        if value is not None and not isinstance(value, str):
            raise InstallError(f"{where}: {key} must be a string")
    nodes = tuple(_strings(item.get("nodes", []), f"{where}: nodes"))
    return PackPin(name, url, commit, reqs, rid, rver, nodes)


def _model(item: dict[str, Any], where: str) -> ModelPin:
    folder, name, sha = item.get("folder"), item.get("name"), item.get("sha256")
    if not isinstance(folder, str) or not _FOLDER.fullmatch(folder):
        raise InstallError(f"{where}: folder must be a plain folder name such as checkpoints")
    p = PurePosixPath(name) if isinstance(name, str) else None
    if p is None or not name or p.is_absolute() or any(x in ("", ".", "..") for x in p.parts):
        raise InstallError(f"{where}: name must be a relative file name without '..'")
    where = f"{where.rsplit(':', 1)[0]}: model {folder}/{name}"
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha.lower()):
        raise InstallError(f"{where}: sha256 must be 64 hex digits")
    url = item.get("url")
    if url is not None and (not isinstance(url, str)
                            or not url.lower().startswith(("http://", "https://"))):
        raise InstallError(f"{where}: url must be an http(s) URL")
    size = item.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InstallError(f"{where}: size must be a positive number of bytes")
    return ModelPin(folder, name, sha.lower(), url, size)


def conflicts(lock: Lock) -> list[str]:
    """Packages pinned differently by two entries (packs, [pip]), each named:
    ``"numpy: pack A wants numpy==1.26.4, pack B wants numpy==2.0.0"``."""
    wants: dict[str, list[tuple[str, Requirement]]] = {}
    owners = [(f"pack {p.name}", p.requirements) for p in lock.packs] + [("[pip]", lock.pip)]
    for owner, reqs in owners:
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate():
                continue
            wants.setdefault(canonicalize_name(req.name), []).append((owner, req))
    found = []
    for name, items in sorted(wants.items()):
        pins = {str(r.specifier) for _, r in items if r.specifier}
        exact = {s for s in pins if s.startswith("==")}
        clash = len(exact) > 1 or any(
            not r.specifier.contains(pin[2:], prereleases=True) for pin in exact
            for _, r in items if r.specifier)
        if clash:
            found.append(f"{name}: " + ", ".join(f"{o} wants {r}" for o, r in items if r.specifier))
    return found


def dump_lock(lock: Lock) -> str:
    """The lock as TOML, in one canonical layout (packs and models sorted)."""
    out = [f"# comfy-embed lock file (format {FORMAT}); see comfy_embed/environment/lockfile.py",
           f"version = {FORMAT}", ""]
    if lock.comfyui_commit or lock.comfyui_url:
        out.append("[comfyui]")
        out += [f"{k} = {_q(v)}" for k, v in (("commit", lock.comfyui_commit),
                                               ("url", lock.comfyui_url)) if v]
        out.append("")
    for p in sorted(lock.packs, key=lambda p: p.name.lower()):
        out += ["[[packs]]", f"name = {_q(p.name)}", f"url = {_q(p.url)}",
                f"commit = {_q(p.commit)}"]
        out += [f"{k} = {_q(v)}" for k, v in (("registry_id", p.registry_id),
                                               ("registry_version", p.registry_version)) if v]
        out.append(f"requirements = {_array(p.requirements)}")
        if p.nodes:
            out.append(f"nodes = {_array(p.nodes)}")
        out.append("")
    if lock.pip:
        out += ["[pip]", f"packages = {_array(lock.pip)}", ""]
    for m in sorted(lock.models, key=lambda m: m.label):
        out += ["[[models]]", f"folder = {_q(m.folder)}", f"name = {_q(m.name)}",
                f"sha256 = {_q(m.sha256)}"]
        if m.url:
            out.append(f"url = {_q(m.url)}")
        if m.size:
            out.append(f"size = {m.size}")
        out.append("")
    if lock.warmup:
        out += ["[warmup]", f"workflow = {_q(lock.warmup)}", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _q(value: object) -> str:
    """A TOML basic string."""
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c >= " " else f"\\u{ord(c):04x}" for c in escaped) + '"'


def _array(values: tuple[str, ...]) -> str:
    if not values:
        return "[]"
    return "[\n" + "".join(f"    {_q(v)},\n" for v in sorted(values, key=str.lower)) + "]"
