"""``python -m comfy_embed.environment LOCK CUSTOM_NODES``: a lock installed with
only this package, the settings and the errors importable (the Dockerfile's
lock layer runs it before the rest of comfy-embed is copied in)."""

from __future__ import annotations

import sys
from pathlib import Path

from comfy_embed.environment.apply import install_lock
from comfy_embed.environment.lockfile import read_lock
from comfy_embed.errors import InstallError


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m comfy_embed.environment LOCK CUSTOM_NODES", file=sys.stderr)
        return 2
    try:
        done = install_lock(read_lock(Path(argv[0])), Path(argv[1]),
                            say=lambda line: print(line, file=sys.stderr))
    except InstallError as e:
        print(f"comfy-embed install: {e}", file=sys.stderr)
        return 1
    print(f"{len(done.packs)} packs checked out, {len(done.installed)} requirements installed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
