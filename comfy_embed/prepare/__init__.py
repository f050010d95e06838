"""Preparing a request for the executor: from a body to a runnable graph.

- :mod:`.graph`: parsing, limits, random seeds, media inputs, output isolation.
"""
