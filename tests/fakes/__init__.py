"""Real servers on 127.0.0.1 that stand in for remote services in tests."""

from tests.fakes.oss_server import FakeObject, FakeOss

__all__ = ["FakeOss", "FakeObject"]
