"""What a workflow reads from outside the instance, by URL.

- :mod:`.fetch`: image and media inputs (file names, http(s), ``oss://``,
  ``s3://``, base64) turned into files a loader node can open.
- :mod:`.media`: recognising and probing audio and video bytes.
- :mod:`.models`: models by URL, fetched into the models folder once.
"""
