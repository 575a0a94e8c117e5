"""Metered products (issue 17, part 2, first slice): a rate card in credits per 1M tokens, priced
exactly in integer milli-credits; CheckAndReserve holds the estimate (else the default hold),
Commit carries the actual usage; overage policy reject (COST_EXCEEDS_HOLD)."""

from __future__ import annotations

import asyncio
import importlib.resources
from typing import Any

import grpc
import pytest
import yaml
from quota_fixtures import T0_MS, Sidecar

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.client import QuotaClient
from quota_sidecar.domain.audit import audit_all, format_report
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine, fingerprint
from quota_sidecar.domain.errors import InvalidArgument, PlansError, ResolutionConflict
from quota_sidecar.domain.model import DenialReason, Funding, JobParams
from quota_sidecar.domain.plans import Plans, credits_of_milli
from quota_sidecar.domain.shipping import Shipper, ShipperOptions
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.storage.store import RedisStore
from quota_sidecar.tools import cli

M = 1_000_000  # tokens per rate


def metered_document(**product: Any) -> dict[str, Any]:
    text = importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text("utf-8")
    document = yaml.safe_load(text)
    document["products"]["codex-usage"] = {
        "kind": "metered", "unit": "task", "default_ttl_seconds": 1800,
        "models": {
            "large": {"input": 125, "cached_input": "12.5", "output": 750},
            "mid": {"input": "62.5", "cached_input": "6.25", "output": 375},
            "mini": {"input": "18.75", "cached_input": "1.875", "output": 113},
        },
        "default_model": "mid", "fast_multiplier": 2, "default_hold_credits": 5, "max_tokens": 100_000_000,
        **product,
    }
    for plan in document["plans"].values():
        plan["codex-usage"] = {"daily_free": 0}
    document["plans"]["free"]["codex-usage"]["models"] = ["mini", "mid"]
    return document


@pytest.fixture
def metered_plans() -> Plans:
    return parse_plans(metered_document())


@pytest.fixture
def engine(store: RedisStore, clock: ManualClock, metered_plans: Plans) -> QuotaEngine:
    """The default plans plus a metered product, codex-usage (the sidecar fixture serves it)."""
    return QuotaEngine(metered_plans, store, clock)


@pytest.fixture
def metered_engine(engine: QuotaEngine) -> QuotaEngine:
    return engine


def usage(model: str = "", i: int = 0, c: int = 0, o: int = 0, fast: bool = False) -> JobParams:
    return JobParams(model=model, input_tokens=i, cached_input_tokens=c, output_tokens=o, fast=fast)


# --- pricing: exact milli-credits ---------------------------------------------------------------


def test_rate_card_in_milli_credits(metered_plans: Plans) -> None:
    product = metered_plans.product("codex-usage")
    assert product.kind == "metered"
    assert product.rates["large"].input_milli == 125_000
    assert product.rates["large"].cached_input_milli == 12_500
    assert product.rates["mini"].cached_input_milli == 1_875
    assert product.rates["mini"].output_milli == 113_000
    assert set(product.models) == {"large", "mid", "mini"}


def test_usage_price_is_exact(metered_plans: Plans) -> None:
    price = metered_plans.usage_milli
    # 1M tokens of each, large model: 125 + 12.5 + 750 = 887.5 credits = 887,500 milli-credits.
    assert price("codex-usage", usage("large", M, M, M)) == 887_500
    assert metered_plans.job_cost("codex-usage", usage("large", M, M, M)) == 888  # rounded up
    # Fast mode: twice.
    assert price("codex-usage", usage("large", M, M, M, fast=True)) == 1_775_000
    # mini cached input: 1.875 credits per 1M; 8 tokens = 0.000015 credits -> 1 milli-credit (up).
    assert price("codex-usage", usage("mini", c=8)) == 1
    # 533,334 cached tokens of mini: 1000.00125 milli-credits, rounded up to 1001
    assert price("codex-usage", usage("mini", c=533_334)) == 1001
    # No float drift: 3 x 1/3-ish amounts add exactly.
    assert price("codex-usage", usage("mid", i=400_000, c=400_000, o=400_000)) == (
        (400_000 * 62_500 + 400_000 * 6_250 + 400_000 * 375_000 + M - 1) // M)
    # The default model (mid) when none is named.
    assert price("codex-usage", usage(i=M)) == 62_500
    assert credits_of_milli(0) == 0 and credits_of_milli(1) == 1 and credits_of_milli(1000) == 1
    assert credits_of_milli(1001) == 2


def test_no_estimate_holds_the_default(metered_plans: Plans) -> None:
    assert metered_plans.job_cost("codex-usage", JobParams()) == 5
    assert metered_plans.actual_cost("codex-usage", JobParams()) == 0


def test_usage_fields_are_checked(metered_plans: Plans) -> None:
    with pytest.raises(InvalidArgument) as bad:
        metered_plans.job_cost("codex-usage", usage(i=-1))
    assert bad.value.field == "params.input_tokens"
    with pytest.raises(InvalidArgument) as bad:
        metered_plans.job_cost("codex-usage", usage(o=100_000_001))
    assert bad.value.field == "params.output_tokens"
    with pytest.raises(InvalidArgument) as bad:
        metered_plans.job_cost("codex-usage", usage("huge", i=1))
    assert bad.value.field == "params.model"
    # Token usage on a product that is not metered is refused, not ignored.
    with pytest.raises(InvalidArgument) as bad:
        metered_plans.job_cost("sora", JobParams(duration_seconds=10, resolution="720p", input_tokens=5))
    assert bad.value.field == "params.input_tokens"


def test_plans_file_refusals() -> None:
    bad = metered_document()
    bad["products"]["codex-usage"]["models"]["large"]["input"] = "12.3456"
    with pytest.raises(PlansError, match=r"products\.codex-usage\.models\.large\.input"):
        parse_plans(bad)
    bad = metered_document()
    bad["products"]["codex-usage"]["models"]["large"]["input"] = 1.5  # a float is read exactly as "1.5"
    assert parse_plans(bad).product("codex-usage").rates["large"].input_milli == 1500
    bad = metered_document(overage="forgive")
    with pytest.raises(PlansError, match=r"products\.codex-usage\.overage"):
        parse_plans(bad)
    # Included usage: daily_free and limits count credits of usage; bad values name their path.
    good = metered_document()
    good["plans"]["pro"]["codex-usage"] = {"daily_free": 3}
    assert parse_plans(good).rules("pro", "codex-usage").daily_free == 3  # type: ignore[union-attr]
    bad = metered_document()
    bad["plans"]["pro"]["codex-usage"] = {"daily_free": -1}
    with pytest.raises(PlansError, match=r"plans\.pro\.codex-usage\.daily_free"):
        parse_plans(bad)
    bad = metered_document()
    bad["plans"]["pro"]["codex-usage"] = {"limits": [{"id": "five_hour", "kind": "rolling", "free": 300}]}
    with pytest.raises(PlansError, match=r"plans\.pro\.codex-usage\.limits\[0\]\.hours"):
        parse_plans(bad)
    bad = metered_document()
    bad["plans"]["pro"]["codex-usage"] = {"limits": [{"id": "weekly", "kind": "week", "free": "lots"}]}
    with pytest.raises(PlansError, match=r"plans\.pro\.codex-usage\.limits\[0\]\.free"):
        parse_plans(bad)
    bad = metered_document()
    bad["plans"]["pro"]["codex-usage"] = {"daily_free": 0, "max_units": 3}
    with pytest.raises(PlansError, match=r"plans\.pro\.codex-usage\.max_units"):
        parse_plans(bad)
    # Without Redis a metered job's usage could be neither counted nor charged: it fails closed.
    bad = metered_document()
    bad["products"]["codex-usage"].update(on_redis_failure="fail_open_free", degraded_free_per_window=3)
    with pytest.raises(PlansError, match=r"products\.codex-usage\.on_redis_failure: must be fail_closed"):
        parse_plans(bad)


def test_fingerprint_keeps_old_jobs_and_tells_estimates_apart() -> None:
    video = JobParams(duration_seconds=10, resolution="720p")
    assert fingerprint("sora", video, 0) == fingerprint("sora", JobParams(duration_seconds=10, resolution="720p"), 0)
    assert fingerprint("codex-usage", usage(i=1), 0) != fingerprint("codex-usage", usage(i=2), 0)
    assert fingerprint("codex-usage", usage(i=1), 0) != fingerprint("codex-usage", usage(i=1, fast=True), 0)


# --- hold the estimate, settle the actual usage (real Redis) ----------------------------------------


async def assert_audit_clean(engine: QuotaEngine) -> None:
    audits = await audit_all(engine.store)
    assert all(a.ok for a in audits), format_report(audits)


async def test_estimate_held_actual_below_refunds_the_rest(metered_engine: QuotaEngine) -> None:
    engine = metered_engine
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 100, "p1")
    # Estimate: 100k input + 20k output on large = 12.5 + 15 = 27.5 credits -> 28 held.
    d = await engine.check_and_reserve("acct", "codex-usage", "r1", usage("large", i=100_000, o=20_000))
    assert d.outcome.allowed and d.outcome.funding is Funding.CREDITS
    assert d.outcome.cost_credits == 28 and d.outcome.credits_held == 28
    # Actual: 80k input, 10k cached, 12k output = 10 + 0.125 + 9 = 19.125 credits -> 20 charged.
    c = await engine.commit("acct", "r1", usage("large", i=80_000, c=10_000, o=12_000))
    assert (c.credits_charged, c.credits_refunded, c.credit_balance) == (20, 8, 80)
    await assert_audit_clean(engine)


async def test_no_estimate_holds_the_default_and_commit_without_usage_charges_the_hold(
        metered_engine: QuotaEngine) -> None:
    engine = metered_engine
    await engine.grant("acct", 10, "p1")
    d = await engine.check_and_reserve("acct", "codex-usage", "r1", JobParams())
    assert d.outcome.credits_held == 5
    c = await engine.commit("acct", "r1")  # no actual given: the whole hold
    assert (c.credits_charged, c.credits_refunded) == (5, 0)
    d = await engine.check_and_reserve("acct", "codex-usage", "r2", JobParams())
    c = await engine.commit("acct", "r2", JobParams())  # actual usage given, none: nothing charged
    assert (c.credits_charged, c.credits_refunded, c.credit_balance) == (0, 5, 5)
    await assert_audit_clean(engine)


async def test_actual_above_the_hold_is_rejected(metered_engine: QuotaEngine) -> None:
    engine = metered_engine
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 100, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "r1", usage("mini", o=M))  # 113 > 100: denied
    d = await engine.check_and_reserve("acct", "codex-usage", "r2", usage("mini", o=100_000))  # 11.3 -> 12
    assert d.outcome.credits_held == 12
    with pytest.raises(ResolutionConflict) as err:
        await engine.commit("acct", "r2", usage("mini", o=110_000))  # 12.43 -> 13
    assert err.value.reason == "COST_EXCEEDS_HOLD"
    # Fast mode doubles: the same usage in fast mode exceeds the hold too.
    with pytest.raises(ResolutionConflict):
        await engine.commit("acct", "r2", usage("mini", o=100_000, fast=True))
    c = await engine.commit("acct", "r2", usage("mini", o=100_000))
    assert (c.credits_charged, c.credits_refunded, c.credit_balance) == (12, 0, 88)
    await assert_audit_clean(engine)


async def test_denied_estimate_names_the_shortfall(metered_engine: QuotaEngine) -> None:
    engine = metered_engine
    await engine.grant("acct", 10, "p1")
    await engine.set_account("acct", plan="pro")
    d = await engine.check_and_reserve("acct", "codex-usage", "r1", usage("large", o=20_000))  # 15 credits
    assert not d.outcome.allowed and d.outcome.credits_short == 5
    assert d.outcome.denial is DenialReason.PURCHASE_REQUIRED
    # The free plan does not include the large model: not entitled, whatever the credits.
    await engine.set_account("acct", plan="free")
    d = await engine.check_and_reserve("acct", "codex-usage", "r2", usage("large", o=1))
    assert not d.outcome.allowed and d.outcome.denial is DenialReason.NOT_ENTITLED
    d = await engine.check_and_reserve("acct", "codex-usage", "r3", usage("mini", o=1))
    assert d.outcome.allowed and d.outcome.credits_held == 1
    await engine.release("acct", "r3")
    await assert_audit_clean(engine)


async def test_metered_through_grpc(sidecar: Sidecar) -> None:
    engine = sidecar.engine
    await engine.grant("acct", 50, "p1")
    params = pb.JobParams(model="mid", input_tokens=200_000, output_tokens=10_000)  # 12.5 + 3.75 -> 17
    r = await sidecar.quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id="acct", product="codex-usage", reservation_id="g1", params=params))
    assert r.allowed and r.credits_held == 17
    c = await sidecar.quota.Commit(pb.CommitRequest(account_id="acct", reservation_id="g1", params=pb.JobParams(
        model="mid", input_tokens=100_000, cached_input_tokens=100_000, output_tokens=1)))  # 6.875375 -> 7
    assert (c.credits_charged, c.credits_refunded) == (7, 10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.CheckAndReserve(pb.CheckAndReserveRequest(
            account_id="acct", product="sora", reservation_id="g2",
            params=pb.JobParams(duration_seconds=10, resolution="720p", output_tokens=5)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await assert_audit_clean(engine)


# --- overage: cap -----------------------------------------------------------------------------------


@pytest.fixture
def capped_engine(store: RedisStore, clock: ManualClock) -> QuotaEngine:
    return QuotaEngine(parse_plans(metered_document(overage="cap")), store, clock)


async def test_cap_charges_the_hold_and_records_the_write_off(capped_engine: QuotaEngine) -> None:
    engine = capped_engine
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 100, "p1")
    d = await engine.check_and_reserve("acct", "codex-usage", "r1", usage("mini", o=100_000))  # 11.3 -> 12
    assert d.outcome.credits_held == 12
    c = await engine.commit("acct", "r1", usage("mini", o=200_000))  # 22.6 -> 23: 11 written off
    assert (c.credits_charged, c.credits_refunded, c.written_off, c.credit_balance) == (12, 0, 11, 88)
    # A retry replays the same outcome.
    again = await engine.commit("acct", "r1", usage("mini", o=200_000))
    assert again.replayed and again.credits_charged == 12
    entries, _ = await engine.ledger("acct")
    commit = [e for e in entries if e.type == "commit"][-1]
    assert commit.fields["wo"] == "11" and commit.fields["credits"] == "12"
    # Below the hold, cap changes nothing: the rest goes back, nothing is written off.
    await engine.check_and_reserve("acct", "codex-usage", "r2", usage("mini", o=100_000))
    c = await engine.commit("acct", "r2", usage("mini", o=50_000))  # 5.65 -> 6
    assert (c.credits_charged, c.credits_refunded, c.written_off) == (6, 6, 0)
    entries, _ = await engine.ledger("acct")
    assert "wo" not in [e for e in entries if e.type == "commit"][-1].fields
    await assert_audit_clean(engine)


async def test_cap_still_refuses_an_actual_job_the_plan_does_not_include(capped_engine: QuotaEngine) -> None:
    engine = capped_engine
    await engine.grant("acct", 100, "p1")  # the free plan: mini and mid only
    await engine.check_and_reserve("acct", "codex-usage", "r1", usage("mini", o=1))
    with pytest.raises(ResolutionConflict) as err:
        await engine.commit("acct", "r1", usage("large", o=1_000))
    assert err.value.reason == "ACTUAL_NOT_ENTITLED"
    await assert_audit_clean(engine)


async def test_metered_movements_reach_the_books(capped_engine: QuotaEngine, store: RedisStore, books) -> None:
    engine = capped_engine
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 100, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "r1", usage("large", i=100_000, o=20_000))  # 28 held
    await engine.commit("acct", "r1", usage("large", i=80_000, c=10_000, o=12_000))  # 19.125 -> 20
    await engine.check_and_reserve("acct", "codex-usage", "r2", usage("mini", o=100_000))  # 12 held
    await engine.commit("acct", "r2", usage("mini", o=200_000))  # 23: 12 charged, 11 written off
    await Shipper(store, books, ManualClock(T0_MS), owner="t", options=ShipperOptions()).drain()
    shipped = [e for e in await books.account_entries("acct") if e.type == "commit"]
    assert [(e.fields["credits"], e.fields.get("wo")) for e in shipped] == [("20", None), ("12", "11")]
    assert shipped[-1].totals_after.spent == 32 and shipped[-1].totals_after.available == 68
    audits = await audit_all(store, books=books)
    assert all(a.ok for a in audits), format_report(audits)


async def test_client_and_cli(sidecar: Sidecar, capsys: pytest.CaptureFixture[str]) -> None:
    await sidecar.engine.grant("acct", 50, "p1")
    target = f"127.0.0.1:{sidecar.port}"
    async with QuotaClient(target) as client:
        d = await client.reserve("acct", "codex-usage", {"model": "mid", "input_tokens": 160_000}, reservation_id="c1")
        assert d.credits_held == 10  # 62.5 x 0.16
        c = await client.commit("acct", "c1", {"model": "mid", "output_tokens": 10_000})  # 3.75 -> 4
        assert (c.credits_charged, c.credits_refunded, c.credits_written_off) == (4, 6, 0)
    status = await asyncio.to_thread(cli.main, [
        "reserve", "--account", "acct", "--product", "codex-usage", "--id", "c2", "--model", "mini",
        "--output-tokens", "10000", "--fast", "--target", target])  # 1.13 x 2 = 2.26 -> 3
    out = capsys.readouterr().out
    assert status == 0 and "3 credit(s)" in out, out
    status = await asyncio.to_thread(cli.main, [
        "commit", "--account", "acct", "--id", "c2", "--model", "mini", "--input-tokens", "1000",
        "--cached-input-tokens", "1000", "--fast", "--target", target])  # 0.0411 -> 1
    out = capsys.readouterr().out
    assert status == 0 and "charged 1 credit(s)" in out and "refunded 2" in out, out
    await assert_audit_clean(sidecar.engine)


async def test_quote_prices_the_estimate_as_reserve_holds_it(metered_engine: QuotaEngine) -> None:
    engine = metered_engine
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 30, "p1")
    for rid, job in (("q1", usage("large", i=100_000, o=20_000)), ("q2", JobParams()),
                     ("q3", usage("large", o=100_000)), ("q4", usage("mini", c=8, fast=True))):
        quoted = await engine.quote("acct", "codex-usage", rid, job)
        decided = await engine.check_and_reserve("acct", "codex-usage", rid, job)
        assert quoted.outcome.allowed == decided.outcome.allowed, rid
        assert quoted.outcome.cost_credits == decided.outcome.cost_credits, rid
        assert quoted.outcome.credits_short == decided.outcome.credits_short, rid
        if decided.outcome.allowed:
            await engine.release("acct", rid)
    # q3: 75 credits against 30: 45 short.
    assert (await engine.quote("acct", "codex-usage", "q5", usage("large", o=100_000))).outcome.credits_short == 45
    balance = await engine.balance("acct")
    assert (balance.credit_balance, balance.credits_held) == (30, 0)
    await assert_audit_clean(engine)


async def test_a_videos_size_on_a_metered_job_is_refused(metered_engine: QuotaEngine, store: RedisStore) -> None:
    """Duration or resolution on a token-billed job is a confused caller: INVALID_ARGUMENT naming the
    field, at reserve and at commit, and nothing changes (it is not a job of 0 tokens)."""
    engine = metered_engine
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 100, "p1")
    with pytest.raises(InvalidArgument) as err:
        await engine.check_and_reserve("acct", "codex-usage", "r0", JobParams(duration_seconds=10))
    assert err.value.field == "params.duration_seconds"
    d = await engine.check_and_reserve("acct", "codex-usage", "r1", usage("mini", o=100_000))
    assert d.outcome.credits_held == 12
    before = await store.raw_state("acct")
    with pytest.raises(InvalidArgument) as err:
        await engine.commit("acct", "r1", JobParams(duration_seconds=1, resolution="720p"))
    assert err.value.field == "params.duration_seconds"
    with pytest.raises(InvalidArgument) as err:
        await engine.commit("acct", "r1", JobParams(model="mini", resolution="720p"))
    assert err.value.field == "params.resolution"
    assert await store.raw_state("acct") == before
    assert (await engine.commit("acct", "r1", usage("mini", o=100_000))).credits_charged == 12
