"""The few git operations a lock needs (git itself runs them, as a subprocess)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from comfy_embed.errors import InstallError

_COMMIT = re.compile(r"[0-9a-f]{40}")

__all__ = ["changes", "checkout", "clone", "git", "has_commit", "head", "remote", "show", "source"]


def git(*args: str, cwd: Path | None = None, what: str = "") -> str:
    """Run git; InstallError naming ``what`` (the entry) and git's message."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except FileNotFoundError:
        raise InstallError("git is not installed: comfy-embed lock and install need it") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["failed"]
        message = next((x for x in lines if x.startswith(("fatal:", "error:"))), lines[-1])
        raise InstallError(f"{what + ': ' if what else ''}git {args[0]} failed: {message}")
    return done.stdout.strip()


def head(folder: Path) -> str | None:
    """The commit checked out in ``folder`` (None: not a git checkout of its own).

    Read from ``.git/HEAD`` when it is a detached commit (how ``install``
    leaves a pack), so that a server needs no git, and a checkout owned by
    another user (an image's root-owned packs, read by its server's user,
    which git itself refuses as "dubious ownership") is read all the same."""
    dot = folder / ".git"
    if not dot.exists():
        return None
    try:
        if dot.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = dot.read_text().strip()
            dot = (folder / text.removeprefix("gitdir:").strip()).resolve()
        ref = (dot / "HEAD").read_text().strip()
    except OSError:
        ref = ""
    if _COMMIT.fullmatch(ref):
        return ref
    try:
        return git("-c", "safe.directory=*", "rev-parse", "HEAD", cwd=folder)
    except InstallError:
        return None


def remote(folder: Path) -> str | None:
    """``origin``'s URL, else the first remote's; None when there is none."""
    try:
        names = git("remote", cwd=folder).split()
    except InstallError:
        return None
    if not names:
        return None
    name = "origin" if "origin" in names else names[0]
    return git("remote", "get-url", name, cwd=folder)


def changes(folder: Path) -> list[str]:
    """Tracked files changed in a checkout (untracked ones are the pack's own business)."""
    out = git("status", "--porcelain", "--untracked-files=no", cwd=folder)
    return [line.split(maxsplit=1)[-1] for line in out.splitlines() if line.strip()]


def has_commit(folder: Path, commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=folder,
                          capture_output=True).returncode == 0


def source(url: str, base: Path | None = None) -> str:
    """A local path made absolute (relative to the lock's folder); a URL as is."""
    if "://" in url or url.startswith("git@"):
        return url
    path = Path(url).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return str(path.resolve())


def clone(url: str, dest: Path, what: str) -> None:
    """Clone ``url`` into ``dest`` without checking anything out."""
    git("clone", "--quiet", "--no-checkout", url, str(dest), what=what)


def checkout(folder: Path, url: str, commit: str, what: str) -> None:
    """Check ``commit`` out in ``folder`` (detached), fetching it from ``url`` if
    the clone lacks it; InstallError naming ``what`` when the commit is unknown."""
    if not has_commit(folder, commit):
        git("fetch", "--quiet", "--tags", url, cwd=folder, what=what)
        if not has_commit(folder, commit):
            try:  # a commit no branch holds, fetched by id (GitHub allows it)
                git("fetch", "--quiet", url, commit, cwd=folder, what=what)
            except InstallError:
                pass
        if not has_commit(folder, commit):
            raise InstallError(f"{what}: commit {commit} is not in {url}")
    git("-c", "advice.detachedHead=false", "checkout", "--quiet", "--force", "--detach", commit,
        cwd=folder, what=what)


def show(folder: Path, commit: str, path: str) -> str | None:
    """A file's text at ``commit`` (None when the commit has no such file)."""
    done = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=folder, capture_output=True,
                          text=True)
    return done.stdout if done.returncode == 0 else None
