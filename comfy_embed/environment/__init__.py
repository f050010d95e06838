"""The lock file: what an instance runs (ComfyUI, custom-node packs and their
pinned requirements, models), how to make one, install one, and how a running
instance differs from its lock.

- :mod:`.lockfile`: the format (TOML), read with every entry checked, written canonically.
- :mod:`.make`: ``comfy-embed lock`` from a ComfyUI folder or a ComfyUI-Manager snapshot.
- :mod:`.apply`: ``comfy-embed install``, all or nothing, idempotent.
- :mod:`.drift`: the boot-time drift check and each task's run record.
- :mod:`.gitrepo`: the git operations these need.
"""
