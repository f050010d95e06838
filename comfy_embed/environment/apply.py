"""``comfy-embed install``: a lock installed into this environment.

All or nothing, in three steps: (1) the lock is checked (conflicting pins
named) and every pack that is not already at its commit is cloned and
checked out into a staging folder beside ``custom_nodes`` (a bad URL or an
unknown commit is named here); (2) the requirements the environment does not
meet yet are installed by one pip call; (3) only then are the staged packs
renamed into place (a pack at another commit is replaced; one with local
changes, or a folder that is not a git checkout, is refused in step 1). A
failure in (1) or (2) removes the staging folder: custom_nodes is untouched.
Run twice, the second run finds everything in place and does nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from comfy_embed.config import Settings
from comfy_embed.environment import gitrepo
from comfy_embed.environment.lockfile import Lock, conflicts
from comfy_embed.environment.make import installed_versions
from comfy_embed.errors import InstallError, ModelDownloadError

__all__ = ["LockInstalled", "fetch_models", "install_lock", "unmet"]


@dataclass
class LockInstalled:
    """What :func:`install_lock` did."""

    #: Packs checked out (new, or moved to the lock's commit).
    packs: list[str] = field(default_factory=list)
    #: Packs already at their commit.
    unchanged: list[str] = field(default_factory=list)
    #: Requirements pip installed.
    installed: list[str] = field(default_factory=list)


def unmet(requirements: list[str], versions: dict[str, str]) -> list[str]:
    """The requirements that the installed ``versions`` do not meet."""
    out = []
    for line in requirements:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = versions.get(canonicalize_name(req.name))
        if req.url or have is None or not req.specifier.contains(have, prereleases=True):
            out.append(line)
    return list(dict.fromkeys(out))


def install_lock(lock: Lock, custom_nodes: Path, python: str = sys.executable,
                 requirements: bool = True, say: Callable[[str], None] = print) -> LockInstalled:
    """Install ``lock``'s packs into ``custom_nodes`` and their requirements
    (and ``[pip]``) into ``python``'s environment; InstallError naming the
    entry at fault, with nothing changed."""
    if found := conflicts(lock):
        raise InstallError("conflicting pins, nothing installed: " + "; ".join(found))
    base = lock.path.parent.resolve() if lock.path else Path.cwd()
    custom_nodes = custom_nodes.expanduser().resolve()
    done = LockInstalled()
    todo = []
    for pack in lock.packs:
        target = custom_nodes / pack.name
        what = f"pack {pack.name}"
        if target.exists():
            head = gitrepo.head(target)
            if head is None:
                raise InstallError(f"{what}: {target} exists and is not a git checkout; "
                                   "nothing installed (move it away first)")
            if changed := gitrepo.changes(target):
                raise InstallError(f"{what}: {target} has local changes ({changed[0]}); "
                                   "nothing installed")
            if head == pack.commit:
                done.unchanged.append(pack.name)
                continue
        todo.append(pack)
    custom_nodes.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".comfy-embed-install-", dir=custom_nodes))
    try:
        for pack in todo:
            what = f"pack {pack.name}"
            url = gitrepo.source(pack.url, base)
            say(f"{what}: {url} at {pack.commit[:12]}")
            gitrepo.clone(url, staging / pack.name, what)
            gitrepo.checkout(staging / pack.name, url, pack.commit, what)
        if requirements:
            wanted = [r for p in lock.packs for r in p.requirements] + list(lock.pip)
            missing = unmet(wanted, installed_versions(python))
            if missing:
                say(f"pip install {' '.join(missing)}")
                pip = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check",
                                      *missing])
                if pip.returncode != 0:
                    raise InstallError(f"pip install {' '.join(missing)} failed (status "
                                       f"{pip.returncode}; its output is above): no pack installed")
                done.installed = missing
        for pack in todo:
            target = custom_nodes / pack.name
            if target.exists():
                os.rename(target, staging / f"{pack.name}.old")
            os.rename(staging / pack.name, target)
            done.packs.append(pack.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done


def fetch_models(settings: Settings, lock: Lock, strict: bool = True) -> list[Path]:
    """The lock's models fetched into the models folder by the models manifest's
    machinery (verified, atomic, one download across instances). ``strict``:
    a model without a URL must already be there (else the boot's drift check
    names it)."""
    models = settings.comfy.models_path
    missing = [m.label for m in lock.models if not m.url and not (models / m.folder / m.name).is_file()]
    if missing and strict:
        raise InstallError(f"model {missing[0]} is not in {models} and the lock gives no url")
    entries = [{"url": m.url, "sha256": m.sha256, "folder": m.folder, "name": m.name,
                **({"size": m.size} if m.size else {})} for m in lock.models if m.url]
    if not entries:
        return []
    from comfy_embed.inputs.models import ensure_models

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"models": entries}, f)
    try:
        return ensure_models(settings.replace(models_manifest=Path(f.name)))
    except ModelDownloadError as e:
        if not strict:  # at boot: the manifest's error, which /ready shows
            raise
        raise InstallError(str(e)) from None
    finally:
        os.unlink(f.name)
