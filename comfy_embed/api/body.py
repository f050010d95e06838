"""Reading a request body under a size limit, and the boolean query flags."""

from __future__ import annotations

from starlette.requests import Request

from ..errors import PayloadTooLarge

__all__ = ["read_limited", "flag"]


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with PayloadTooLarge as soon as it passes ``limit``
    (announced length or bytes received): never buffered whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def flag(value: str | None) -> bool:
    """SPEC: boolean flags accept true/false/1/0 (and yes/no)."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
