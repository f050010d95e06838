"""Observing the instance: metrics, per-task reports, logs, memory.

- :mod:`.metrics`: Prometheus metrics (the only prometheus-client import).
- :mod:`.report`: where one task's time and memory went.
- :mod:`.logs`: log records carrying the task id; text or JSON.
- :mod:`.memory`: this process's RSS, VRAM and C heap.
- :mod:`.guard`: memory watermarks and the out-of-memory policy.
- :mod:`.folders`: whether the folders the service writes are usable.
"""
