"""A request's retention as the service reads it: ?ttl= bounded by the
operator's maximum and the retention period, ?keep= defaulting to
COMFY_EMBED_KEEP, each bad value a 400 naming its parameter. Deleting,
sweeping and expires_at end to end: tests/api/serverless/test_retention.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from comfy_embed.config import Settings
from comfy_embed.errors import InvalidParameter
from comfy_embed.service.retention import Retention
from comfy_embed.tasklog.expiry import Policy


def retention(tmp_path: Path, **settings: Any) -> Retention:
    service: Any = SimpleNamespace(settings=Settings(base_dir=tmp_path, **settings))
    return Retention(service)


def test_ttl_is_bounded(tmp_path: Path) -> None:
    r = retention(tmp_path)  # 24 h retention, no maximum of its own
    assert r.max_ttl == 24 * 3600
    assert r.policy("60", None) == Policy(60.0, "all")
    assert r.policy(None, None) == Policy() and r.policy("", None) == Policy()
    with pytest.raises(InvalidParameter, match="ttl 86401 is over"):
        r.policy("86401", None)
    for bad in ("-1", "1.5", "soon", "1" * 13):
        with pytest.raises(InvalidParameter, match="ttl must be"):
            r.policy(bad, None)
    assert retention(tmp_path, max_ttl=30).max_ttl == 30
    # A maximum over the retention period is the retention period.
    assert retention(tmp_path, max_ttl=10**9, retention_hours=1).max_ttl == 3600
    # Retention off: the operator's maximum alone, or none.
    assert retention(tmp_path, retention_hours=0).max_ttl is None
    assert retention(tmp_path, retention_hours=0, max_ttl=5).max_ttl == 5


def test_keep(tmp_path: Path) -> None:
    assert retention(tmp_path).policy(None, "nothing") == Policy(None, "nothing")
    assert retention(tmp_path, keep="nothing").policy(None, None) == Policy(None, "nothing")
    assert retention(tmp_path, keep="nothing").policy(None, "all") == Policy()
    with pytest.raises(InvalidParameter, match="keep must be"):
        retention(tmp_path).policy(None, "some")
