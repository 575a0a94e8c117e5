"""What the store reports about each Redis round trip, without knowing who listens.

The server's Telemetry (quota_sidecar.server.telemetry) implements ScriptObserver with
Prometheus metrics and OpenTelemetry spans; tools and tests get NoObserver. Kept here so
that storage never imports the server.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol


class ScriptObserver(Protocol):
    def redis_call(self, script: str, items: int = 1, operation: str = "EVALSHA") -> ContextManager[object]:
        """Wraps one round trip running ``items`` scripts named ``script`` by ``operation`` (the
        command sent: FCALL or EVALSHA); an exception escaping the block is the round trip's failure."""


class NoObserver:
    """Reports nothing (one shared context manager: the hot path allocates nothing)."""

    _NOTHING = contextlib.nullcontext()

    def redis_call(self, script: str, items: int = 1, operation: str = "EVALSHA") -> ContextManager[object]:
        return self._NOTHING
