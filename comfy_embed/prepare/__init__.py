"""Preparing a request for the executor: from a body to a runnable graph.

- :mod:`.graph`: parsing, limits, random seeds, media inputs, output isolation.
- :mod:`.options`: :class:`~.options.RunOptions`, how a run's result is delivered.
- :mod:`.pipeline`: :class:`~.pipeline.Preparer`, the steps a run and the dry
  run share, over ComfyUI's node definitions and an input fetcher passed in.
"""
