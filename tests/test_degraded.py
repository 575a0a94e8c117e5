"""Failure policy: fail_closed by default; fail_open_free allows a few journaled free jobs without Redis."""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
import yaml
from quota_fixtures import T0_MS

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc
from quota_sidecar.domain.audit import audit_all
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.degraded import DegradedMode
from quota_sidecar.domain.engine import QuotaEngine, ReserveItem
from quota_sidecar.domain.errors import PlansError, ResolutionConflict, Unavailable
from quota_sidecar.domain.model import Funding, JobParams
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.app import create_server
from quota_sidecar.server.journal import FileJournal
from quota_sidecar.server.metrics import Metrics
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

V10 = JobParams(duration_seconds=10, resolution="720p")


def fail_open_plans(allowance: int = 2) -> Plans:
    document = yaml.safe_load(importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text())
    document = copy.deepcopy(document)
    document["products"]["sora"]["on_redis_failure"] = "fail_open_free"
    document["products"]["sora"]["degraded_free_per_window"] = allowance
    return parse_plans(document)


class Rig:
    def __init__(self, redis: RedisServerProcess, store: RedisStore, engine: QuotaEngine, journal: Path) -> None:
        self.redis, self.store, self.engine, self.journal = redis, store, engine, journal


@pytest.fixture
async def rig(tmp_path: Path, redis_binary: str) -> AsyncIterator[Rig]:
    redis = RedisServerProcess(redis_binary, tmp_path / "redis", appendfsync="always")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=0.3)
    journal = tmp_path / "journal.jsonl"
    engine = QuotaEngine(fail_open_plans(), store, ManualClock(T0_MS), degraded=DegradedMode(FileJournal(str(journal))))
    try:
        yield Rig(redis, store, engine, journal)
    finally:
        await store.close()
        redis.stop()


async def test_fail_open_free_allows_a_bounded_number_of_journaled_free_jobs(rig: Rig) -> None:
    engine = rig.engine
    await engine.grant("a", 10, "p")
    rig.redis.kill()
    first = await engine.check_and_reserve("a", "sora", "d1", V10)
    second = await engine.check_and_reserve("a", "sora", "d2", V10)
    assert [(d.outcome.allowed, d.outcome.degraded, d.outcome.funding) for d in (first, second)] == [
        (True, True, Funding.FREE_QUOTA)] * 2
    again = await engine.check_and_reserve("a", "sora", "d1", V10)  # a retry replays, takes nothing
    assert (again.outcome.replayed, again.outcome.degraded) == (True, True)
    with pytest.raises(Unavailable, match="degraded allowance"):  # never credits, never more than 2
        await engine.check_and_reserve("a", "sora", "d3", V10)
    with pytest.raises(Unavailable):  # codex fails closed (the default policy)
        await engine.check_and_reserve("a", "codex", "c1", JobParams(model="codex-mini"))
    committed = await engine.commit("a", "d1")
    released = await engine.release("a", "d2")
    assert (committed.degraded, committed.free_charged, released.degraded, released.free_refunded) == (True, 1, True, 1)
    with pytest.raises(ResolutionConflict) as err:
        await engine.release("a", "d1")
    assert err.value.reason == "ALREADY_COMMITTED"
    assert (await engine.check_and_reserve("a", "sora", "d3", V10)).outcome.degraded  # the release freed a unit
    assert len(rig.journal.read_text().splitlines()) == 5  # 3 holds, a commit, a release

    rig.redis.start()
    assert await engine.flush_degraded()
    assert rig.journal.read_text() == "" and engine.degraded.pending == ()
    assert await engine.flush_degraded()  # nothing twice
    entries, _ = await engine.ledger("a", 100)
    replayed = [(e.type, e.fields.get("rid")) for e in entries if e.fields.get("degraded") == "1"]
    assert replayed == [("hold", "d1"), ("commit", "d1"), ("hold", "d2"), ("release", "d2"), ("hold", "d3")]
    # the credits were never touched; d3 is a live hold now, resolved like any other
    assert (await engine.balance("a")).credit_balance == 10
    assert (await engine.commit("a", "d3")).free_charged == 1
    assert [a for a in await audit_all(rig.store) if a.violations] == []


async def test_the_journal_survives_a_sidecar_restart(rig: Rig) -> None:
    rig.redis.kill()
    await rig.engine.check_and_reserve("b", "sora", "x1", V10)
    await rig.engine.commit("b", "x1")
    restarted = QuotaEngine(fail_open_plans(), rig.store, ManualClock(T0_MS), degraded=DegradedMode(FileJournal(str(rig.journal))))
    assert [(r.reservation_id, r.state) for r in restarted.degraded.pending] == [("x1", "committed")]
    rig.redis.start()
    assert await restarted.flush_degraded()
    with pytest.raises(ResolutionConflict) as err:
        await restarted.release("b", "x1")  # Redis has it now, committed
    assert err.value.reason == "ALREADY_COMMITTED"


async def test_degraded_decisions_on_the_wire_are_marked_and_counted(rig: Rig) -> None:
    metrics = Metrics()
    server, port = create_server(Settings(listen=("127.0.0.1:0",)), rig.engine, metrics=metrics)
    await server.start()
    try:
        rig.redis.kill()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = quota_pb2_grpc.QuotaServiceStub(channel)
            r = await stub.CheckAndReserve(pb.CheckAndReserveRequest(
                account_id="w", product="sora", reservation_id="r1",
                params=pb.JobParams(duration_seconds=10, resolution="720p")), timeout=5)
            assert (r.allowed, r.degraded, r.funding) == (True, True, pb.FUNDING_FREE_QUOTA)
            c = await stub.Commit(pb.CommitRequest(account_id="w", reservation_id="r1"), timeout=5)
            assert c.degraded
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CheckAndReserve(pb.CheckAndReserveRequest(
                    account_id="w", product="codex", reservation_id="r2",
                    params=pb.JobParams(model="codex-mini")), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
        rig.redis.start()
    assert metrics.registry.get_sample_value("quota_degraded_decisions_total", {"product": "sora"}) == 1


def test_the_policy_is_validated() -> None:
    document = yaml.safe_load(importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text())
    document["products"]["sora"]["on_redis_failure"] = "fail_open_free"
    with pytest.raises(PlansError, match="degraded_free_per_window"):
        parse_plans(document)
    document["products"]["sora"]["on_redis_failure"] = "fail_sometimes"
    with pytest.raises(PlansError, match="on_redis_failure"):
        parse_plans(document)
    assert parse_plans(yaml.safe_load(importlib.resources.files("quota_sidecar").joinpath(
        "default_plans.yaml").read_text())).product("sora").on_redis_failure == "fail_closed"




async def test_a_job_with_cameos_is_never_allowed_without_redis(rig: Rig) -> None:
    """Its cameo fees must be held in credits, which only Redis can do: fail closed, even on a
    fail_open_free product, alone or in a batch."""
    engine = rig.engine
    await engine.set_cameo("cam-a", "owner-1", 2, True)
    await engine.grant("a", 10, "p")
    rig.redis.kill()
    job = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a",))
    with pytest.raises(Unavailable):
        await engine.check_and_reserve("a", "sora", "d1", job)
    [out] = await engine.check_and_reserve_many([ReserveItem("a", "sora", "d2", job)])
    assert isinstance(out, Unavailable)
    assert engine.degraded is not None and engine.degraded.pending == ()
