"""The ComfyUI boundary: the only package that imports ComfyUI.

- :mod:`.comfy`: :class:`~.comfy.Comfy`, boot, validation and execution on
  the executor thread.
- :mod:`.server`: the stand-in for ComfyUI's ``server`` module.
- :mod:`.packs`: custom-node packs, loaded one at a time.
- :mod:`.lazy_modules`: deferred imports that keep boot short.
- :mod:`.checkpoint`: the tiny random-weights checkpoint of the demo and tests.

Importing this package imports no ComfyUI module: boot does.
"""
