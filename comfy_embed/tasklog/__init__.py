"""The task log: every task's events on a filesystem that instances share.

- :mod:`.log`: :class:`~.log.TaskLog` (claims, leases, events, finals) and
  :class:`~.log.DeliveryLog` (webhook delivery state).
- :mod:`.index`: indexes that keep periodic scans cheap.
- :mod:`.retention`: deleting what is older than the retention period.
"""
