"""Fixtures of the task log's tests."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest


@pytest.fixture
def no_hardlinks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without hard links (ossfs, SMB): ``os.link`` refused."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
