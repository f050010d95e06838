"""A custom-node pack that fails to import: comfy-embed must name it at
start-up and in /ready, with its error, and go on serving."""

raise ImportError("embed_broken_pack needs the package 'not_installed_anywhere'")
