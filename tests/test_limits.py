"""Several windows per product, concurrency caps, shadow mode, overrides, versioned prices."""

from __future__ import annotations

from typing import Any

import pytest
from quota_fixtures import T0_MS, per_task_document, per_task_plans, utc_ms

from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import InvalidArgument
from quota_sidecar.domain.model import DenialReason, Funding, JobParams, Limit, LimitKind, LimitOverride
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

TASK = JobParams(model="codex-mini")  # 1 credit
V10 = JobParams(duration_seconds=10, resolution="720p")
HOUR_MS = 3_600_000


def plans_with(edit: Any) -> Plans:
    """The packaged plans with codex priced per task (one free unit per job), edited."""
    document = per_task_document()
    edit(document)
    return parse_plans(document)


@pytest.fixture
def engine(store: RedisStore, clock: ManualClock) -> QuotaEngine:
    """These tests count jobs: codex per task (docs/plans.md, the documented alternative)."""
    return QuotaEngine(per_task_plans(), store, clock)


@pytest.fixture
def codex_limits() -> Plans:
    def edit(d: dict[str, Any]) -> None:
        d["plans"]["free"]["codex"] = {
            "limits": [{"id": "five_hour", "kind": "rolling", "hours": 5, "free": 3},
                       {"id": "weekly", "kind": "week", "free": 5}],
            "max_concurrent": 2, "models": ["codex-mini", "codex"]}
    return plans_with(edit)


async def run_task(engine: QuotaEngine, rid: str, *, commit: bool = True) -> Any:
    d = await engine.check_and_reserve("a", "codex", rid, TASK)
    if commit and d.outcome.allowed:
        await engine.commit("a", rid)
    return d.outcome


def by_id(outcome: Any) -> dict[str, tuple[int, int, int]]:
    return {st.limit.limit_id: (st.used, st.limit.free, st.resets_ms) for st in outcome.limits}


async def test_a_job_needs_room_in_every_limit(store: RedisStore, clock: ManualClock, codex_limits: Plans) -> None:
    engine = QuotaEngine(codex_limits, store, clock)
    week_end = utc_ms(2026, 11, 23)  # Saturday 2026-11-21: the week ends Monday 00:00 UTC
    first = await run_task(engine, "t0")
    assert by_id(first) == {"five_hour": (1, 3, T0_MS + 5 * HOUR_MS), "weekly": (1, 5, week_end)}
    for i in (1, 2):
        clock.advance(hours=1)
        assert (await run_task(engine, f"t{i}")).funding is Funding.FREE_QUOTA
    clock.advance(hours=1)  # 3 uses in the last 5 hours: the rolling limit is full
    full = await run_task(engine, "t3")
    assert (full.allowed, full.denial, full.free_used, full.free_limit) == (False, DenialReason.PURCHASE_REQUIRED, 3, 3)
    assert by_id(full)["five_hour"] == (3, 3, T0_MS + 5 * HOUR_MS)  # frees when the first use is 5 h old
    clock.set(T0_MS + 5 * HOUR_MS - 1)
    assert not (await run_task(engine, "t3")).allowed  # exact: not a millisecond early
    clock.set(T0_MS + 5 * HOUR_MS)
    ok = await run_task(engine, "t3")
    assert (ok.allowed, by_id(ok)["five_hour"][0], by_id(ok)["weekly"][0]) == (True, 3, 4)
    clock.advance(hours=5)
    assert (await run_task(engine, "t4")).allowed  # weekly 5/5 now
    clock.advance(hours=4)
    weekly_full = await run_task(engine, "t5")
    # t4 (4 h ago) still counts in the rolling window; the weekly limit is what refuses
    assert (weekly_full.allowed, by_id(weekly_full)["weekly"][:2], by_id(weekly_full)["five_hour"][0]) == (
        False, (5, 5), 1)
    clock.set(week_end)  # Monday: a new week
    assert (await run_task(engine, "t6")).allowed


async def test_releasing_a_free_job_gives_back_a_unit_in_every_limit(store: RedisStore, clock: ManualClock,
                                                                     codex_limits: Plans) -> None:
    engine = QuotaEngine(codex_limits, store, clock)
    await run_task(engine, "a", commit=False)
    await engine.release("a", "a")
    allowance = next(x for x in (await engine.balance("a")).allowances if x.product == "codex")
    assert [(st.limit.limit_id, st.used) for st in allowance.limits] == [("five_hour", 0), ("weekly", 0)]


async def test_concurrency_cap(store: RedisStore, clock: ManualClock, codex_limits: Plans) -> None:
    engine = QuotaEngine(codex_limits, store, clock)
    assert (await run_task(engine, "j1", commit=False)).allowed
    assert (await run_task(engine, "j2", commit=False)).allowed
    third = await engine.check_and_reserve("a", "codex", "j3", TASK)
    assert (third.outcome.allowed, third.outcome.denial) == (False, DenialReason.CONCURRENCY_LIMIT)
    assert "in flight" in third.denial_message
    allowance = next(x for x in (await engine.balance("a")).allowances if x.product == "codex")
    assert (allowance.jobs_in_flight, allowance.max_concurrent) == (2, 2)
    await engine.commit("a", "j1")
    assert (await run_task(engine, "j3", commit=False)).allowed
    clock.advance(seconds=1800)  # codex default TTL: j2 and j3 expire and leave the in-flight count
    assert (await run_task(engine, "j4", commit=False)).allowed
    # the sora cap is separate (none on the free plan)
    for i in range(3):
        assert (await engine.check_and_reserve("a", "sora", f"v{i}", V10)).outcome.allowed


async def test_shadow_limit_is_reported_not_enforced(store: RedisStore, clock: ManualClock) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["plans"]["free"]["sora"]["limits"] = [{"id": "daily", "kind": "day", "free": 30},
                                                {"id": "cut_to_20", "kind": "day", "free": 20, "shadow": True}]
        del d["plans"]["free"]["sora"]["daily_free"]
    engine = QuotaEngine(plans_with(edit), store, clock)
    outcomes = [(await engine.check_and_reserve("a", "sora", f"r{i}", V10)).outcome for i in range(31)]
    assert [o.allowed for o in outcomes] == [True] * 30 + [False]
    assert [o.shadow_limits for o in outcomes[:21]] == [()] * 20 + [("cut_to_20",)]
    assert all(o.shadow_limits == ("cut_to_20",) for o in outcomes[20:30])
    assert (outcomes[29].free_used, outcomes[29].free_limit) == (30, 30)  # the headline is the enforced limit
    assert {st.limit.limit_id: st.used for st in outcomes[29].limits} == {"daily": 30, "cut_to_20": 30}


async def test_shadow_plan_and_concurrency(store: RedisStore, clock: ManualClock) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["plans"]["free"]["codex"]["max_concurrent"] = 1
        d["shadow"] = {"plans": ["free"]}
    engine = QuotaEngine(plans_with(edit), store, clock)
    outcomes = [(await engine.check_and_reserve("a", "codex", f"r{i}", TASK)).outcome for i in range(12)]
    assert all(o.allowed and o.funding is Funding.FREE_QUOTA for o in outcomes)  # nothing enforced
    assert outcomes[0].shadow_limits == ()
    assert outcomes[1].shadow_limits == ("concurrency",)
    assert outcomes[10].shadow_limits == ("daily", "concurrency")  # 10 free a day on the free plan


async def test_account_override_replaces_the_plan_limits(engine: QuotaEngine) -> None:
    contract = LimitOverride("codex", (Limit("contract", LimitKind.WEEK, 40),), max_concurrent=5)
    s = await engine.set_account("a", overrides=(contract,))
    assert s.overrides == (contract,)
    outcomes = [(await engine.check_and_reserve("a", "codex", f"r{i}", TASK)).outcome for i in range(6)]
    assert [o.allowed for o in outcomes] == [True] * 5 + [False]
    assert outcomes[5].denial is DenialReason.CONCURRENCY_LIMIT
    assert outcomes[4].free_limit == 40
    allowance = next(x for x in (await engine.balance("a")).allowances if x.product == "codex")
    assert (allowance.overridden, allowance.free_used, allowance.max_concurrent) == (True, 5, 5)
    assert (await engine.account("a")).overrides == (contract,)
    s = await engine.set_account("a", clear_overrides=("codex",))
    assert s.overrides == ()
    allowance = next(x for x in (await engine.balance("a")).allowances if x.product == "codex")
    assert (allowance.overridden, allowance.free_limit) == (False, 10)


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("override,field", [
    (LimitOverride("dalle", (Limit("x", LimitKind.DAY, 1),)), "overrides.product"),
    (LimitOverride("codex", ()), "overrides[codex].limits"),
    (LimitOverride("codex", (Limit("x", LimitKind.ROLLING, 1),)), "overrides[codex].limits.rolling_hours"),
    (LimitOverride("codex", (Limit("x", LimitKind.DAY, 1, hours=3),)), "overrides[codex].limits.rolling_hours"),
    (LimitOverride("codex", (Limit("x", LimitKind.DAY, -1),)), "overrides[codex].limits.free"),
    (LimitOverride("codex", (Limit("x", LimitKind.DAY, 1), Limit("x", LimitKind.WEEK, 1))), "overrides[codex].limits"),
])
async def test_bad_overrides_are_refused(engine: QuotaEngine, override: LimitOverride, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await engine.set_account("a", overrides=(override,))
    assert err.value.field == field


async def test_commit_prices_with_the_version_the_reservation_was_made_under(engine: QuotaEngine) -> None:
    for i in range(30):
        await engine.check_and_reserve("a", "sora", f"f{i}", V10)
    await engine.grant("a", 20, "p")
    d = await engine.check_and_reserve("a", "sora", "r", JobParams(duration_seconds=15, resolution="720p"))
    assert (d.outcome.credits_held, d.outcome.plans_version) == (2, engine.plans.version)

    def pricier(doc: dict[str, Any]) -> None:
        doc["version"] = "2027-01-01"
        doc["products"]["sora"]["credits_per_step"] = 3
    engine.set_plans(plans_with(pricier))
    c = await engine.commit("a", "r", JobParams(duration_seconds=8, resolution="720p"))
    assert (c.credits_charged, c.credits_refunded) == (1, 1)  # 1 step at the old price, not 3
    d2 = await engine.check_and_reserve("a", "sora", "r2", V10)
    assert (d2.outcome.credits_held, d2.outcome.plans_version) == (3, "2027-01-01")


def scheduled_cut(from_iso: str) -> Plans:
    """The default plans, with free sora cut from 30 to 20 a day from ``from_iso``."""
    def edit(d: dict[str, Any]) -> None:
        d["scheduled"] = [{"effective_from": from_iso,
                           "plans": {"free": {"sora": {"daily_free": 20, "max_duration_seconds": 15,
                                                        "max_resolution": "720p"},
                                              "codex": d["plans"]["free"]["codex"]}}}]
    return plans_with(edit)


class SlowSidecarClock:
    """This sidecar's clock runs 30 minutes behind; the (pinned) Redis time decides."""

    def __init__(self, redis_now_ms: int) -> None:
        self.redis_now_ms = redis_now_ms

    def local_now_ms(self) -> int:
        return self.redis_now_ms - 30 * 60_000

    def pinned_now_ms(self) -> int:
        return self.redis_now_ms


async def test_a_change_scheduled_during_a_live_window(store: RedisStore) -> None:
    # The cut starts at 13:00 UTC on 2026-11-21, in the middle of the day's window.
    plans = scheduled_cut("2026-11-21T13:00:00Z")
    clock = SlowSidecarClock(T0_MS)
    engine = QuotaEngine(plans, store, clock)  # type: ignore[arg-type]
    balance = await engine.balance("a")
    upcoming = next(x for x in balance.allowances if x.product == "sora").upcoming
    assert [(u.effective_from_ms, u.limits[0].free) for u in upcoming] == [(utc_ms(2026, 11, 21, 13), 20)]
    for i in range(25):
        d = await engine.check_and_reserve("a", "sora", f"r{i}", V10)
        assert d.outcome.allowed and d.outcome.plans_version == "2026-11-01"
        await engine.commit("a", f"r{i}")
    clock.redis_now_ms = utc_ms(2026, 11, 21, 12, 59, 59, 999)
    d = await engine.check_and_reserve("a", "sora", "before", V10)
    assert (d.outcome.funding, d.outcome.free_limit) == (Funding.FREE_QUOTA, 30)
    await engine.commit("a", "before")
    # 13:00 by Redis' clock, 12:30 by this sidecar's: the cut applies anyway
    clock.redis_now_ms = utc_ms(2026, 11, 21, 13)
    d = await engine.check_and_reserve("a", "sora", "after", V10)
    assert (d.outcome.allowed, d.outcome.denial, d.outcome.free_used, d.outcome.free_limit) == (
        False, DenialReason.PURCHASE_REQUIRED, 26, 20)
    assert d.outcome.plans_version == "2026-11-01@2026-11-21T13:00:00Z"
    # the next day's window has the new limit from the start
    clock.redis_now_ms = utc_ms(2026, 11, 22, 12)
    outcomes = [(await engine.check_and_reserve("a", "sora", f"d2-{i}", V10)).outcome for i in range(21)]
    assert [o.funding for o in outcomes] == [Funding.FREE_QUOTA] * 20 + [None]
    assert (await engine.balance("a")).allowances[0].upcoming == ()


def test_schedule_is_validated() -> None:
    with pytest.raises(Exception) as err:
        scheduled_cut("2026-11-21 13:00")  # no zone
    assert "effective_from" in str(err.value)

    def two(d: dict[str, Any]) -> None:
        d["scheduled"] = [{"effective_from": "2026-12-02T00:00:00Z", "packs": {}},
                          {"effective_from": "2026-12-01T00:00:00Z", "packs": {}}]
    with pytest.raises(Exception, match="later than the previous"):
        plans_with(two)

    def bad(d: dict[str, Any]) -> None:
        d["scheduled"] = [{"effective_from": "2026-12-01T00:00:00Z",
                           "plans": {"free": {"sora": {"daily_free": -5}}}}]
    with pytest.raises(Exception, match=r"scheduled\[0\]: plans.free.sora.daily_free"):
        plans_with(bad)
    plans = scheduled_cut("2026-12-01T00:00:00+01:00")
    assert plans.at(utc_ms(2026, 11, 30, 22, 59)).version == "2026-11-01"
    assert plans.at(utc_ms(2026, 11, 30, 23)).version == "2026-11-01@2026-11-30T23:00:00Z"


async def test_shadow_decisions_are_counted_on_the_metrics(store: RedisStore, clock: ManualClock) -> None:
    import grpc

    from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
    from quota_sidecar._proto.quota.v1 import quota_pb2_grpc
    from quota_sidecar.server.app import create_server
    from quota_sidecar.server.metrics import Metrics
    from quota_sidecar.server.settings import Settings

    def edit(d: dict[str, Any]) -> None:
        d["plans"]["free"]["sora"] = {"limits": [{"id": "daily", "kind": "day", "free": 30},
                                                 {"id": "cut", "kind": "day", "free": 2, "shadow": True}],
                                      "max_duration_seconds": 15, "max_resolution": "720p"}
    metrics = Metrics()
    server, port = create_server(Settings(listen=("127.0.0.1:0",)), QuotaEngine(plans_with(edit), store, clock),
                                 metrics=metrics)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = quota_pb2_grpc.QuotaServiceStub(channel)
            for i in range(5):
                r = await stub.CheckAndReserve(pb.CheckAndReserveRequest(
                    account_id="a", product="sora", reservation_id=f"r{i}",
                    params=pb.JobParams(duration_seconds=10, resolution="720p")))
                assert r.allowed and list(r.shadow_limits) == (["cut"] if i >= 2 else [])
            await stub.CheckAndReserve(pb.CheckAndReserveRequest(  # a replay is not counted again
                account_id="a", product="sora", reservation_id="r4",
                params=pb.JobParams(duration_seconds=10, resolution="720p")))
    finally:
        await server.stop(None)
    assert metrics.registry.get_sample_value("quota_shadow_decisions_total", {"product": "sora", "limit": "cut"}) == 3
