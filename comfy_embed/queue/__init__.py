"""The durable queue on an existing engine (Redis Streams), optional: the
only package that imports the Redis client."""

from comfy_embed.queue.streams import QueueUnavailable, StreamQueue, Work

__all__ = ["QueueUnavailable", "StreamQueue", "Work"]
