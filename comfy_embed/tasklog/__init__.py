"""The task log: every task's events on a filesystem that instances share.

- :mod:`.files`: the log's file names, encoding and atomic, exclusive publishing.
- :mod:`.blobs`: base64 image data kept as output-file references or a sidecar blob.
- :mod:`.leases`: leases as files whose mtime is the last renewal (tasks' and deliveries').
- :mod:`.writer`: writing a task's chain of segments and its one final file.
- :mod:`.reader`: reading a task's events back while other instances write.
- :mod:`.log`: :class:`~.log.TaskLog` (claims, leases, events, finals, records, orphans).
- :mod:`.delivery`: :class:`~.delivery.DeliveryLog` (webhook delivery state, as records).
- :mod:`.index`: indexes that keep periodic scans cheap.
- :mod:`.retention`: deleting what is older than the retention period.
"""
