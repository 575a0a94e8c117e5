"""--event-loop: which loop a server process runs on."""

from __future__ import annotations

import asyncio

import pytest

from quota_sidecar.domain.errors import ConfigError
from quota_sidecar.server.app import run_until_complete
from quota_sidecar.server.settings import Settings


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_and_uvloop_run_on_uvloop_and_asyncio_on_the_standard_loop() -> None:
    pytest.importorskip("uvloop", reason="uvloop is a dependency on Linux and macOS; this platform has none")
    assert run_until_complete(_loop_module(), "auto").startswith("uvloop")
    assert run_until_complete(_loop_module(), "uvloop").startswith("uvloop")
    assert run_until_complete(_loop_module(), "asyncio").startswith("asyncio")
    assert Settings().event_loop == "auto"


def test_an_unknown_event_loop_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(event_loop="trio")
    assert caught.value.field == "event_loop"
