"""Webhooks: a task's end (and progress) POSTed to a URL, signed, retried,
and delivered by any instance.

- :mod:`.delivery`: the request, its signature and the delivery loop.
"""
