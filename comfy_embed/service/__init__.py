"""Tasks as every API surface sees them: claimed in the shared task log,
run on this instance, readable and cancellable from any instance.

- :mod:`.lifecycle`: :class:`~.lifecycle.TaskService` and its handles.
- :mod:`.claim`: claiming a task id in the log while the engine prepares it.
- :mod:`.blocking`: where the request path's small file calls run.
"""
