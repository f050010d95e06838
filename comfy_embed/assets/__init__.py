"""Comfy API v2 assets: records over content-addressed blobs (blake3), in the
shared task-log folder so every instance sees them."""
