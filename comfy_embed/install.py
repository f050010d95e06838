"""``comfy-embed install-comfyui``: ComfyUI for comfy-embed installed from a wheel.

A wheel bundles no ComfyUI (its code is GPL-3.0 and its own project's; its
git history and the models are large). This checks a ComfyUI commit (by
default the one comfy-embed is tested with, ``places.COMFYUI_COMMIT``) out of
a repository (by default ComfyUI's on GitHub; ``--from`` takes any git URL or
local path, a mirror say) into a folder (by default ``<cache_dir>/ComfyUI``,
where an installed comfy-embed looks for it), then installs those of its
``requirements.txt`` that comfy-embed needs and the environment lacks.

Nothing here imports ComfyUI: it only runs git and pip.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from comfy_embed.config.places import COMFYUI_COMMIT, COMFYUI_REPOSITORY
from comfy_embed.errors import InstallError

__all__ = ["NOT_NEEDED", "InstallError", "Installed", "install_comfyui", "missing_requirements"]

#: ComfyUI's requirements that comfy-embed does not install, and why.
NOT_NEEDED: dict[str, str] = {
    "comfyui-frontend-package": "the web UI, which comfy-embed does not serve",
    "comfyui-workflow-templates": "the web UI's templates",
    "comfyui-embedded-docs": "the web UI's node documentation",
    "alembic": "ComfyUI's server database, which comfy-embed does not use",
    "sqlalchemy": "ComfyUI's server database, which comfy-embed does not use",
    "torch": "yours to choose: pip install 'comfy-embed[torch]', or your own CUDA build",
    "torchvision": "yours to choose, with torch",
    "torchaudio": "yours to choose, with torch",
}


@dataclass
class Installed:
    """What ``install_comfyui`` did."""

    folder: Path
    commit: str
    #: Requirements pip installed (empty when all were already satisfied).
    installed: list[str] = field(default_factory=list)
    #: ComfyUI's requirements left out, by name (see NOT_NEEDED).
    left_out: list[str] = field(default_factory=list)


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError:
        raise InstallError("git is not installed: comfy-embed install-comfyui needs it") from None
    if done.returncode != 0:
        raise InstallError(f"git {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def _has_commit(folder: Path, commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=folder,
                          capture_output=True).returncode == 0


def _source(source: str) -> str:
    """A local path made absolute (git runs in the target folder); a URL as is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if "://" not in source and path.exists() else source


def checkout(folder: Path, commit: str = COMFYUI_COMMIT, source: str = COMFYUI_REPOSITORY,
             say: Callable[[str], None] = print) -> str:
    """Clone ``source`` into ``folder`` (unless it is a clone already), fetch
    ``commit`` if missing, and check it out; the full commit id."""
    source = _source(source)
    if (folder / ".git").exists():
        # Someone's own ComfyUI (--dir): never overwrite their edits.
        changed = _git("status", "--porcelain", "--untracked-files=no", cwd=folder)
        if changed:
            raise InstallError(f"{folder} has local changes ({changed.splitlines()[0].strip()}"
                               f"{', ...' if len(changed.splitlines()) > 1 else ''}): commit or "
                               "discard them, or choose another folder (--dir)")
    else:
        if folder.exists() and any(folder.iterdir()):
            raise InstallError(f"{folder} exists and is not a git checkout: choose another "
                               "folder (--dir) or empty it")
        folder.parent.mkdir(parents=True, exist_ok=True)
        say(f"cloning {source} into {folder}")
        _git("clone", "--quiet", "--no-checkout", source, str(folder))
    if not _has_commit(folder, commit):
        say(f"fetching {commit} from {source}")
        _git("fetch", "--quiet", "--tags", source, cwd=folder)
        if not _has_commit(folder, commit):
            raise InstallError(f"commit {commit} is not in {source}")
    _git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--force", "--detach", commit,
         cwd=folder)
    if not (folder / "execution.py").is_file():
        raise InstallError(f"{source} at {commit} is not ComfyUI: no execution.py")
    return _git("rev-parse", "HEAD", cwd=folder)


def missing_requirements(requirements_txt: Path) -> tuple[list[str], list[str]]:
    """ComfyUI's requirements that this environment lacks, and the names left
    out (NOT_NEEDED). A requirement is met by any installed version its
    specifier allows; one for another platform or Python is met."""
    missing: list[str] = []
    left_out: list[str] = []
    for line in requirements_txt.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            raise InstallError(f"{requirements_txt}: cannot read {line!r}: {e}") from None
        name = canonicalize_name(req.name)
        if name in NOT_NEEDED:
            left_out.append(name)
        elif req.marker is None or req.marker.evaluate():
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(line)
                continue
            if not req.specifier.contains(have, prereleases=True):
                missing.append(line)
    return missing, left_out


def install_comfyui(folder: Path, commit: str = COMFYUI_COMMIT,
                    source: str = COMFYUI_REPOSITORY, requirements: bool = True,
                    say: Callable[[str], None] = print) -> Installed:
    """Check ComfyUI ``commit`` out of ``source`` into ``folder`` and install
    the requirements comfy-embed needs that are missing (pip, into this
    Python). Raises InstallError naming the step that failed."""
    if shutil.which("git") is None:
        raise InstallError("git is not installed: comfy-embed install-comfyui needs it")
    folder = folder.expanduser().resolve()
    done = Installed(folder, checkout(folder, commit, source, say))
    req_file = folder / "requirements.txt"
    if requirements and req_file.is_file():
        missing, done.left_out = missing_requirements(req_file)
        if missing:
            say(f"installing ComfyUI's requirements: {' '.join(missing)}")
            pip = subprocess.run([sys.executable, "-m", "pip", "install", *missing])
            if pip.returncode != 0:
                raise InstallError(f"pip install {' '.join(missing)} failed (status "
                                   f"{pip.returncode}); its output is above")
            done.installed = missing
    return done
