"""Container entry point: the serverless API on $FC_SERVER_PORT (default 9000).

Configuration comes from COMFY_EMBED_* environment variables (see README).
"""

from __future__ import annotations

import sys

from comfy_embed.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
