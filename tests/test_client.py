"""The worker client library against a real sidecar (gRPC server on a real Redis, ManualClock)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_proxy import FaultProxy
from quota_fixtures import Sidecar

from quota_sidecar.client import Denied, InvalidRequest, QuotaClient, ReservationError, SyncQuotaClient
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.model import JobParams
from quota_sidecar.server.app import create_server
from quota_sidecar.server.settings import Settings

pytestmark = pytest.mark.all_redis_versions

VIDEO = {"duration_seconds": 10, "resolution": "720p"}
ROOT = Path(__file__).resolve().parent.parent


def target(sidecar: Sidecar) -> str:
    return f"127.0.0.1:{sidecar.port}"


async def test_job_commits_on_success_with_actual_params(sidecar: Sidecar) -> None:
    await sidecar.engine.grant("ann", 10, "p1")
    await sidecar.engine.set_account("ann", "pro")
    async with QuotaClient(target(sidecar)) as client:
        for _ in range(100):  # use up the free allowance so the job is funded by credits
            await client.commit("ann", (await client.reserve("ann", "sora", VIDEO)).reservation_id)
        async with client.job("ann", "sora", {"duration_seconds": 25, "resolution": "720p"}) as job:
            assert job.funding == "credits" and job.credits_held == 3
            job.actual = {"duration_seconds": 8, "resolution": "720p"}
        assert job.commit_result is not None and job.commit_result.credits_charged == 1
        assert job.commit_result.credits_refunded == 2
        balance = await client.balance("ann")
    assert balance.credit_balance == 9 and balance.holds == ()


async def test_job_releases_on_exception(sidecar: Sidecar) -> None:
    async with QuotaClient(target(sidecar)) as client:
        with pytest.raises(RuntimeError):
            async with client.job("bob", "sora", VIDEO) as job:
                assert job.funding == "free" and job.free_used == 1
                raise RuntimeError("render failed")
        assert job.release_result is not None and job.release_result.free_refunded == 1
        balance = await client.balance("bob")
    assert balance.holds == () and balance.free["sora"][0] == 0


async def test_job_releases_on_cancellation(sidecar: Sidecar) -> None:
    async with QuotaClient(target(sidecar)) as client:
        inside = asyncio.Event()
        jobs = []

        async def worker() -> None:
            async with client.job("cy", "sora", VIDEO) as job:
                jobs.append(job)
                inside.set()
                await asyncio.Event().wait()  # a render that never ends by itself

        task = asyncio.create_task(worker())
        await asyncio.wait_for(inside.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert jobs[0].release_result is not None
        assert (await client.balance("cy")).holds == ()


async def test_background_extender_moves_the_expiry(sidecar: Sidecar, clock: ManualClock) -> None:
    ticks: asyncio.Queue[None] = asyncio.Queue()
    second_tick = asyncio.Event()
    calls = 0

    async def gated_sleep(seconds: float) -> None:
        # The first tick passes at once (one extension); the second parks until the block ends.
        nonlocal calls
        calls += 1
        if calls >= 2:
            second_tick.set()
            await ticks.get()

    async with QuotaClient(target(sidecar), sleep=gated_sleep) as client:
        async with client.job("dee", "sora", VIDEO, ttl_seconds=60) as job:
            first_expiry = job.expires_at
            assert first_expiry is not None
            clock.advance(seconds=45)  # past half the TTL, as the extender's interval would be
            await asyncio.wait_for(second_tick.wait(), 10)
            assert job.extensions == 1 and job.expires_at is not None
            assert (job.expires_at - first_expiry).total_seconds() == 45
            clock.advance(seconds=30)  # beyond the original TTL: the extended hold is still alive
        assert job.commit_result is not None and job.commit_result.free_charged == 1


async def test_denial_carries_the_purchase_prompt(sidecar: Sidecar) -> None:
    await sidecar.engine.grant("eve", 1, "p1")
    async with QuotaClient(target(sidecar)) as client:
        for _ in range(30):
            async with client.job("eve", "sora", VIDEO):
                pass
        with pytest.raises(Denied) as denied:
            async with client.job("eve", "sora", {"duration_seconds": 15, "resolution": "720p"}):
                raise AssertionError("must not run")
    d = denied.value
    assert d.reason == "PURCHASE_REQUIRED" and d.credits_short == 1 and d.free_resets_at is not None
    assert [(o.pack_id, o.quantity, o.price_minor_units, o.currency) for o in d.offers] == [("pack_10", 1, 400, "USD")]


async def test_typed_errors(sidecar: Sidecar) -> None:
    async with QuotaClient(target(sidecar)) as client:
        with pytest.raises(InvalidRequest) as bad:
            await client.reserve("fay", "sora", {"duration_seconds": -1, "resolution": "720p"})
        assert bad.value.field.startswith("params.duration_seconds")
        with pytest.raises(InvalidRequest):
            await client.reserve("fay", "sora", {"duration": 10})
        r = await client.reserve("fay", "sora", VIDEO)
        await client.release("fay", r.reservation_id)
        with pytest.raises(ReservationError) as conflict:
            await client.commit("fay", r.reservation_id)
        assert conflict.value.reason == "ALREADY_RELEASED"
        with pytest.raises(ReservationError) as missing:
            await client.release("fay", "nope")
        assert missing.value.reason == "RESERVATION_NOT_FOUND"


async def test_retry_after_dropped_connection_reuses_the_reservation_id(
        sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch) -> None:
    async with FaultProxy("127.0.0.1", sidecar.port) as proxy:
        engine = sidecar.engine
        real = engine.check_and_reserve
        seen: list[str] = []

        async def reserve_then_drop(account_id: str, product: str, reservation_id: str, *args, **kw):  # type: ignore[no-untyped-def]
            # The decision is made and held in Redis, then the connection dies before the
            # response leaves: the client cannot know, and retries.
            decision = await real(account_id, product, reservation_id, *args, **kw)
            seen.append(reservation_id)
            if len(seen) == 1:
                await proxy.cut()
            return decision

        monkeypatch.setattr(engine, "check_and_reserve", reserve_then_drop)
        async with QuotaClient(f"127.0.0.1:{proxy.port}", backoff=0.01) as client:
            r = await client.reserve("gus", "sora", VIDEO)
            balance = await client.balance("gus")
    assert len(seen) == 2 and seen[0] == seen[1] == r.reservation_id
    assert r.replayed and r.free_used == 1
    assert [h.reservation_id for h in balance.holds] == [r.reservation_id] and balance.free["sora"][0] == 1


async def test_sync_client_commits_and_releases_from_a_thread(sidecar: Sidecar) -> None:
    def work() -> tuple[int, int]:
        with SyncQuotaClient(target(sidecar)) as client:
            with client.job("hal", "sora", VIDEO) as job:
                assert job.funding == "free"
            try:
                with client.job("hal", "sora", VIDEO):
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                pass
            b = client.balance("hal")
            return b.free["sora"][0], len(b.holds)

    assert await asyncio.to_thread(work) == (1, 0)


async def test_sync_client_extends_while_the_callers_thread_is_busy(sidecar: Sidecar) -> None:
    def work() -> tuple[int, bool]:
        with SyncQuotaClient(target(sidecar), extend_every=0.02) as client:
            with client.job("ian", "sora", VIDEO, ttl_seconds=60) as job:
                # The caller's thread is busy (here: polling); the client's own thread extends.
                deadline = time.monotonic() + 10
                while job.extensions < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                extensions = job.extensions
            return extensions, job.commit_result is not None

    extensions, committed = await asyncio.to_thread(work)
    assert extensions >= 2 and committed


@pytest.mark.slow
async def test_unconfirmed_commit_is_retried_in_the_background_until_it_lands(sidecar: Sidecar) -> None:
    """The sidecar is unreachable through every attempt of the commit that ends the job: the block
    still ends normally, the job says its settlement is pending, and the client commits it as
    soon as the sidecar answers again instead of leaving the hold to expire."""
    back = asyncio.Event()
    never = asyncio.Event()

    async def sleep(seconds: float) -> None:
        # By what is asked: the extender's tick (extend_every) never comes, the retries of the
        # commit itself (backoff 0.01) run at once, the background retry (max_backoff) waits for `back`.
        if seconds == 600:
            await never.wait()
        elif seconds == 5:
            await back.wait()

    async with FaultProxy("127.0.0.1", sidecar.port) as proxy:
        async with QuotaClient(f"127.0.0.1:{proxy.port}", attempts=2, timeout=2, sleep=sleep, backoff=0.01,
                               max_backoff=5, extend_every=600) as client:
            async with client.job("jan", "sora", VIDEO) as job:
                await proxy.refuse()
                await proxy.cut()
            assert job.settlement_pending and job.commit_result is None and client.pending_settlements == 1
            assert len((await sidecar.engine.balance("jan")).holds) == 1  # not committed, not expired
            assert not await client.drain(timeout=0.05)
            await proxy.refuse(False)
            back.set()
            assert await client.drain(timeout=10)
    assert not job.settlement_pending and job.settlement_error is None
    assert job.commit_result is not None and job.commit_result.free_charged == 1
    balance = await sidecar.engine.balance("jan")
    assert balance.holds == () and balance.allowances[0].free_used == 1


WORKER = """
import sys
from quota_sidecar.client import SyncQuotaClient
client = SyncQuotaClient(sys.argv[1])
with client.job("ivy", "sora", {"duration_seconds": 10, "resolution": "720p"}, ttl_seconds=60) as job:
    print(job.reservation_id, flush=True)
    sys.stdin.read()  # rendering until killed
"""


async def test_worker_killed_mid_job_hold_expires_and_is_refunded(sidecar: Sidecar, clock: ManualClock) -> None:
    await sidecar.engine.grant("ivy", 5, "p1")
    for i in range(30):
        await sidecar.engine.check_and_reserve("ivy", "sora", f"free{i}", JobParams(duration_seconds=10, resolution="720p"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, target(sidecar), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        reservation_id = line.decode().strip()
        async with QuotaClient(target(sidecar)) as client:
            held = await client.balance("ivy")
            assert [h.reservation_id for h in held.holds if h.funding == "credits"] == [reservation_id]
            assert held.credit_balance == 4
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
            clock.advance(seconds=61)
            after = await client.balance("ivy")
        assert reservation_id not in [h.reservation_id for h in after.holds] and after.credit_balance == 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_unix_socket_target(engine: QuotaEngine, tmp_path: Path) -> None:
    path = tmp_path / "quota.sock"
    server, _ = create_server(Settings(listen=(f"unix:{path}",)), engine)
    await server.start()
    try:
        async with QuotaClient(f"unix:{path}") as client:
            async with client.job("uma", "codex", {"units": 1}) as job:
                assert job.funding == "free"
            assert job.commit_result is not None and job.commit_result.free_charged == 1
    finally:
        await server.stop(None)
