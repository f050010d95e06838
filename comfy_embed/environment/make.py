"""``comfy-embed lock``: a lock file made from a ComfyUI folder or from a
ComfyUI-Manager snapshot.

From a folder: ComfyUI's git HEAD and remote; each ``custom_nodes/*`` pack's
HEAD and remote (a pack with changed tracked files, or without a remote, is
refused by name: nobody could install it again); each pack's
``requirements.txt`` pinned to the versions the environment has (a
requirement the environment lacks is refused by name: install it, then lock);
the node classes each pack declares (environment/nodes.py); the models a set
of workflows names (any string input equal to a file's path
under ``<models>/<folder>/``), hashed, with their URL when a models manifest
lists them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from comfy_embed.environment import gitrepo
from comfy_embed.environment.lockfile import Lock, ModelPin, PackPin
from comfy_embed.environment.nodes import declared_nodes
from comfy_embed.errors import InstallError

__all__ = ["installed_versions", "lock_from_folder", "lock_from_snapshot", "pin_requirements"]

_VERSIONS = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name']: d.version "
             "for d in m.distributions() if d.metadata['Name']}))")


def installed_versions(python: str = sys.executable) -> dict[str, str]:
    """``{canonical name: version}`` of what ``python``'s environment has installed."""
    done = subprocess.run([python, "-c", _VERSIONS], capture_output=True, text=True)
    if done.returncode != 0:
        raise InstallError(f"cannot list the packages of {python}: {done.stderr.strip()[-300:]}")
    return {canonicalize_name(k): v for k, v in json.loads(done.stdout).items()}


def pin_requirements(text: str, versions: dict[str, str], what: str,
                     say: Callable[[str], None] = print) -> tuple[str, ...]:
    """A requirements.txt's lines pinned (``name==version``) to ``versions``.
    A line for another platform stays as written; a direct reference
    (``pkg @ git+...``) stays as written; pip options are left out (said)."""
    pinned: list[str] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            say(f"{what}: requirements.txt option {line!r} left out of the lock")
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise InstallError(f"{what}: cannot read requirement {line!r}: {e}") from None
        if req.url or (req.marker is not None and not req.marker.evaluate()):
            pinned.append(str(req))
            continue
        name = canonicalize_name(req.name)
        have = versions.get(name)
        if have is None:
            raise InstallError(f"{what}: requirement {line!r} is not installed in this "
                               "environment, so it cannot be pinned: install it, then lock")
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            raise InstallError(f"{what}: requirement {line!r} is not met by the installed "
                               f"{name} {have}")
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        marker = f"; {req.marker}" if req.marker else ""
        pinned.append(f"{name}{extras}=={have}{marker}")
    return tuple(sorted(dict.fromkeys(pinned), key=str.lower))


def _registry(pack: Path | None, pyproject: str | None) -> tuple[str | None, str | None]:
    """The Comfy Registry id and version of a pack that publishes there
    (its pyproject.toml has ``[tool.comfy]``)."""
    if pyproject is None and pack is not None and (pack / "pyproject.toml").is_file():
        pyproject = (pack / "pyproject.toml").read_text()
    if not pyproject:
        return None, None
    try:
        data = tomllib.loads(pyproject)
    except tomllib.TOMLDecodeError:
        return None, None
    project = data.get("project") or {}
    if "comfy" not in (data.get("tool") or {}) or not isinstance(project.get("name"), str):
        return None, None
    version = project.get("version")
    return project["name"], version if isinstance(version, str) else None


def _pack_dirs(custom_nodes: Path, say: Callable[[str], None]) -> Iterable[Path]:
    if not custom_nodes.is_dir():
        return []
    out = []
    for entry in sorted(custom_nodes.iterdir()):
        if entry.name.startswith(".") or entry.name == "__pycache__" or entry.name.endswith(".disabled"):
            continue
        if entry.is_file():
            if entry.suffix == ".py":
                say(f"custom_nodes/{entry.name}: a single-file pack is not a git checkout; "
                    "left out of the lock")
            continue
        out.append(entry)
    return out


def lock_from_folder(comfyui_dir: Path, workflows: Sequence[Path] = (),
                     models_path: Path | None = None, manifest: Sequence[ModelPin] = (),
                     extra_dirs: Sequence[Path] = (), python: str = sys.executable,
                     say: Callable[[str], None] = print,
                     versions: dict[str, str] | None = None) -> Lock:
    """The lock of a ComfyUI folder as it stands (see the module's docstring);
    requirements are pinned to ``python``'s installed versions (or ``versions``)."""
    comfyui_dir = comfyui_dir.expanduser().resolve()
    commit = gitrepo.head(comfyui_dir)
    versions = installed_versions(python) if versions is None else versions
    packs = []
    for folder in [comfyui_dir / "custom_nodes", *extra_dirs]:
        for pack in _pack_dirs(folder, say):
            what = f"pack {pack.name}"
            head = gitrepo.head(pack)
            if head is None:
                raise InstallError(f"{what} ({pack}) is not a git checkout: it cannot be pinned")
            url = gitrepo.remote(pack)
            if url is None:
                raise InstallError(f"{what} ({pack}) has no git remote: nobody could fetch it")
            if changed := gitrepo.changes(pack):
                raise InstallError(f"{what} has local changes ({changed[0]}"
                                   f"{', ...' if len(changed) > 1 else ''}): commit or discard them")
            req = pack / "requirements.txt"
            reqs = pin_requirements(req.read_text(), versions, what, say) if req.is_file() else ()
            rid, rver = _registry(pack, None)
            packs.append(PackPin(pack.name, url, head, reqs, rid, rver,
                                 tuple(sorted(declared_nodes(pack)))))
    models = _models_used(workflows, models_path or comfyui_dir / "models", manifest)
    return Lock(commit, gitrepo.remote(comfyui_dir) if commit else None, tuple(packs), (),
                tuple(models))


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _models_used(workflows: Sequence[Path], models: Path, manifest: Sequence[ModelPin]) -> list[ModelPin]:
    names: set[str] = set()
    for wf in workflows:
        try:
            names.update(s.replace("\\", "/") for s in _strings(json.loads(wf.read_text())))
        except (OSError, ValueError) as e:
            raise InstallError(f"workflow {wf}: {e}") from None
    known = {(m.folder, m.name): m for m in manifest}
    pins = []
    for folder in sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []:
        for name in sorted(names):
            path = folder / name
            if ".." in Path(name).parts or not path.is_file():
                continue
            sha = _sha256(path)
            entry = known.get((folder.name, name))
            url = entry.url if entry is not None and entry.sha256 == sha else None
            pins.append(ModelPin(folder.name, name, sha, url, path.stat().st_size))
    return pins


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lock_from_snapshot(snapshot: Path, python: str = sys.executable,
                       say: Callable[[str], None] = print) -> Lock:
    """The lock of a ComfyUI-Manager snapshot (``{"comfyui": commit,
    "git_custom_nodes": {url: {"hash", "disabled"}}, "cnr_custom_nodes":
    {id: version}, "pips": {line: ...}}``). Each git pack is cloned (into a
    temporary folder) to read its requirements at its commit, which also
    proves the commit exists; they are pinned to the snapshot's pips, else to
    this environment's versions."""
    try:
        raw = json.loads(snapshot.read_text())
    except (OSError, ValueError) as e:
        raise InstallError(f"snapshot {snapshot}: {e}") from None
    if not isinstance(raw, dict):
        raise InstallError(f"snapshot {snapshot}: expected a JSON object")
    pips = _snapshot_pips(raw.get("pips") or {})
    versions = {**installed_versions(python), **pips}
    packs = []
    with tempfile.TemporaryDirectory(prefix="comfy-embed-lock-") as tmp:
        for i, (url, info) in enumerate(sorted((raw.get("git_custom_nodes") or {}).items())):
            if isinstance(info, dict) and info.get("disabled"):
                continue
            commit = info.get("hash") if isinstance(info, dict) else None
            name = url.rstrip("/").removesuffix(".git").rsplit("/", 1)[-1]
            what = f"pack {name} ({url})"
            if not isinstance(commit, str):
                raise InstallError(f"snapshot {snapshot}: {what} has no commit hash")
            clone = Path(tmp) / str(i)
            gitrepo.clone(url, clone, what)
            if not gitrepo.has_commit(clone, commit):
                gitrepo.checkout(clone, url, commit, what)  # fetches it, or names it unknown
            full = gitrepo.git("rev-parse", f"{commit}^{{commit}}", cwd=clone, what=what)
            text = gitrepo.show(clone, full, "requirements.txt")
            reqs = pin_requirements(text, versions, f"pack {name}", say) if text else ()
            rid, rver = _registry(None, gitrepo.show(clone, full, "pyproject.toml"))
            gitrepo.checkout(clone, url, full, what)
            packs.append(PackPin(name, url, full, reqs, rid, rver,
                                 tuple(sorted(declared_nodes(clone)))))
    for rid, version in sorted((raw.get("cnr_custom_nodes") or {}).items()):
        say(f"registry pack {rid} {version}: the snapshot gives no git URL and commit; "
            "add it to the lock as [[packs]] with url and commit")
    commit = raw.get("comfyui")
    # The snapshot's pips are its whole environment (torch included): they
    # pin the packs' requirements but are not copied into [pip].
    return Lock(commit if isinstance(commit, str) and len(commit) == 40 else None, None,
                tuple(packs))


def _snapshot_pips(pips: Any) -> dict[str, str]:
    """``{canonical name: version}`` of the snapshot's pinned pips."""
    out: dict[str, str] = {}
    for line in pips if isinstance(pips, (dict, list)) else []:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        spec = str(req.specifier)
        if spec.startswith("==") and "," not in spec:
            out[canonicalize_name(req.name)] = spec[2:]
    return out
