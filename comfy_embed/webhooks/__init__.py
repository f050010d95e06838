"""Webhooks: a task's end (and progress) POSTed to a URL, signed, retried,
and delivered by any instance.

- :mod:`.request`: the webhook a run asks for, its payload and signature (pure).
- :mod:`.delivery`: the delivery loop: attempts, back-off, leases, recovery.
"""
