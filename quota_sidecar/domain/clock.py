"""Clocks for the engine.

In production the authoritative "now" is Redis' own clock (TIME inside each
script), so every sidecar agrees on time and on the daily window whatever its
own clock says. The sidecar's local clock is only used to propose candidate
windows (yesterday, today, tomorrow in the account's zone); the script picks
the one that contains Redis' now.

Tests inject a ManualClock: its time is pinned into every script, so windows,
hold TTLs and lot expiry are driven deterministically.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def local_now_ms(self) -> int:
        """Best local guess of now, for proposing windows and default lot expiry."""

    def pinned_now_ms(self) -> int:
        """The time scripts must use, or 0 to let Redis' clock decide."""


class RedisClock:
    """Redis decides; the local clock only proposes windows."""

    def local_now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def pinned_now_ms(self) -> int:
        return 0


class ManualClock:
    """A clock that only moves when told to (tests, simulations)."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def local_now_ms(self) -> int:
        return self.now_ms

    def pinned_now_ms(self) -> int:
        return self.now_ms

    def advance(self, *, ms: int = 0, seconds: float = 0, hours: float = 0, days: float = 0) -> None:
        delta_ms = ms + round(seconds * 1000) + round(hours * 3_600_000) + round(days * 86_400_000)
        assert delta_ms >= 0, "time only moves forward"
        self.now_ms += delta_ms

    def set(self, now_ms: int) -> None:
        self.now_ms = now_ms
