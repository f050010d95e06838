"""Access keys for object storage, as a request or the environment gives them.

No SDK here: the API reads per-request credentials without importing any
storage backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

__all__ = ["Credentials", "credentials_from_headers", "credentials_from_env"]


@dataclass(frozen=True)
class Credentials:
    """An access key pair, with the STS token when the pair is temporary.

    ``expiration`` (UTC), when known, caps the lifetime of signed links: a
    link signed with an STS token stops working when the token expires.
    """

    access_key_id: str
    access_key_secret: str
    security_token: str | None = None
    expiration: datetime | None = None

    def __repr__(self) -> str:  # never print the secret or token
        return f"Credentials(access_key_id={self.access_key_id!r}, ...)"


def credentials_from_headers(headers: Mapping[str, str]) -> Credentials | None:
    """Credentials from Function Compute's ``x-fc-access-key-*`` request headers.

    Header names are matched case-insensitively; None unless both the id and
    the secret are present.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    key_id = lower.get("x-fc-access-key-id", "").strip()
    secret = lower.get("x-fc-access-key-secret", "").strip()
    if not key_id or not secret:
        return None
    token = lower.get("x-fc-security-token", "").strip() or None
    return Credentials(key_id, secret, token)


def credentials_from_env(env: Mapping[str, str],
                         chain: tuple[tuple[str, str, str], ...]) -> Credentials | None:
    """The first complete ``(id, secret, token)`` variable set of ``chain``
    found in ``env``; None when none is complete."""
    for id_var, secret_var, token_var in chain:
        key_id = env.get(id_var, "").strip()
        secret = env.get(secret_var, "").strip()
        if key_id and secret:
            return Credentials(key_id, secret, env.get(token_var, "").strip() or None)
    return None
