"""Function Compute's Serverless API under ``/api/serverless/``.

- :mod:`.runs`: POST /run (sync, stream, async), /validate, /status,
  /cancel, /webhook.
- :mod:`.ws`: the WebSocket.
"""
