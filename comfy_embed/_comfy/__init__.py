"""The ComfyUI boundary: the only package that imports ComfyUI.

- :mod:`.comfy`: :class:`~.comfy.Comfy`, ComfyUI booted: validation, execution, look-ups.
- :mod:`.boot`: the boot steps (path, args, stand-in server, folders, nodes), in their order.
- :mod:`.progress`: the progress hook and the throttled ``progress_state`` messages.
- :mod:`.log_filters`: ComfyUI's log records, shortened and its import failures summed up.
- :mod:`.server`: the stand-in for ComfyUI's ``server`` module.
- :mod:`.packs`: custom-node packs, loaded one at a time.
- :mod:`.lazy_modules`: deferred imports that keep boot short.
- :mod:`.checkpoint`: the tiny random-weights checkpoint of the demo and tests.

Importing this package imports no ComfyUI module: boot does.
"""
