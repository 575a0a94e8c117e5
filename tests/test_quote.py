"""Quote: what CheckAndReserve would answer now, holding nothing (quote.lua: reserve_one as a dry run).

Every branch of the decision is checked the same way (``same_answer``): on one state, a Quote
first, then a CheckAndReserve of the same request; the answers must be equal field for field
(allowed, funding, cost, amounts, limits, shadow limits, plans version, denial, message, offers)
and the quote must have written nothing: every key of the test's prefix (the account's keys, the
bucket's outbox and events streams) is the same before and after it (``snapshot``). Then the same
through gRPC, the client library and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from quota_fixtures import T0_MS, Sidecar, key, keys_with_prefix, per_task_document, per_task_plans, utc_ms

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.client import Denied, QuotaClient, SyncQuotaClient
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.degraded import DegradedMode
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Conflict, InvalidArgument, QuotaError, ResolutionConflict, Unavailable
from quota_sidecar.domain.model import Decision, DenialReason, Funding, JobParams, Limit, LimitKind, LimitOverride
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.app import create_server
from quota_sidecar.server.journal import FileJournal
from quota_sidecar.server.metrics import Metrics
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.keys import key_bucket, outbox_key
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore
from quota_sidecar.tools import cli

pytestmark = pytest.mark.all_redis_versions

V10 = JobParams(duration_seconds=10, resolution="720p")  # 1 credit
V15 = JobParams(duration_seconds=15, resolution="720p")  # 2 credits
TASK = JobParams(model="codex-mini")  # 1 credit
HOUR_MS = 3_600_000


def plans_with(edit: Any) -> Plans:
    """The packaged plans with codex priced per task (one free unit per job), edited."""
    document = per_task_document()
    edit(document)
    return parse_plans(document)


@pytest.fixture
def engine(store: RedisStore, clock: ManualClock) -> QuotaEngine:
    """Jobs counted one unit each: codex per task (docs/plans.md); metered codex: test_metered.py."""
    return QuotaEngine(per_task_plans(), store, clock)


async def snapshot(client: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key of the test's prefix with its type, encoding and whole content, a stream with its
    last id and counters too (XINFO STREAM): any write to any of them changes this. Not DUMP's
    bytes: a mere read advances the incremental rehashing of a large hash, which reorders the
    fields DUMP lists (seen here with the reservation records), though nothing was written."""
    state: dict[str, Any] = {}
    for k in await keys_with_prefix(client, prefix):
        kind = await client.type(k)
        if kind == "hash":
            content: Any = await client.hgetall(k)
        elif kind == "zset":
            content = await client.zrange(k, 0, -1, withscores=True)
        elif kind == "stream":
            content = (await client.xrange(k), await client.xinfo_stream(k))
        else:
            content = await client.dump(k)
        state[k] = (kind, await client.object("encoding", k), content)
    return state


class Checker:
    """Quote, then CheckAndReserve, on the same state: the same answer, and a quote that wrote nothing."""

    def __init__(self, engine: QuotaEngine, client: aioredis.Redis, prefix: str) -> None:
        self.engine, self.client, self.prefix = engine, client, prefix
        self.serial = 0

    async def quote(self, account: str, product: str, job: JobParams, rid: str = "", ttl: int = 0) -> Decision:
        before = await snapshot(self.client, self.prefix)
        quoted = await self.engine.quote(account, product, rid, job, ttl)
        assert await snapshot(self.client, self.prefix) == before, "the quote wrote something"
        assert quoted.reservation_id == rid  # a quote makes no id
        return quoted

    async def same_answer(self, account: str, product: str, job: JobParams, rid: str = "",
                          ttl: int = 0) -> Decision:
        """The reservation's decision, after checking its quote; ``rid`` "": a new id for the reservation."""
        quoted = await self.quote(account, product, job, rid, ttl)
        self.serial += 1
        decided = await self.engine.check_and_reserve(account, product, rid or f"job-{self.serial}", job, ttl)
        assert (quoted.outcome, quoted.denial_message, quoted.offers) == (
            decided.outcome, decided.denial_message, decided.offers)
        return decided

    async def same_error(self, account: str, product: str, job: JobParams, rid: str = "",
                         ttl: int = 0) -> QuotaError:
        """Both refuse with the same error (class, reason, field); the quote writes nothing."""
        before = await snapshot(self.client, self.prefix)
        with pytest.raises(QuotaError) as quoted:
            await self.engine.quote(account, product, rid, job, ttl)
        assert await snapshot(self.client, self.prefix) == before
        with pytest.raises(QuotaError) as decided:
            await self.engine.check_and_reserve(account, product, rid, job, ttl)
        assert (type(quoted.value), quoted.value.reason, getattr(quoted.value, "field", None)) == (
            type(decided.value), decided.value.reason, getattr(decided.value, "field", None))
        return quoted.value


@pytest.fixture
def check(engine: QuotaEngine, redis_client: aioredis.Redis, key_prefix: str) -> Checker:
    return Checker(engine, redis_client, key_prefix)


def checker_for(plans: Plans, store: RedisStore, clock: Any, client: aioredis.Redis, prefix: str) -> Checker:
    return Checker(QuotaEngine(plans, store, clock), client, prefix)


# --------------------------------------------------------------------------- every branch of the decision


async def test_free_then_credits_then_purchase_required(check: Checker) -> None:
    """The free allowance (its 80 % warning and its last unit emit events: never from a quote), then
    credits down past the credits_low threshold (an event, and not from a quote), then a denial with
    the offer that covers it (a purchase_required event, not from a quote)."""
    for i in range(30):
        d = await check.same_answer("a", "sora", V10)
        assert (d.outcome.funding, d.outcome.free_used) == (Funding.FREE_QUOTA, i + 1)
        await check.engine.commit("a", d.reservation_id)
    await check.engine.grant("a", 3, "p1")
    for balance_after in (1, 0):
        d = await check.same_answer("a", "sora", V10 if balance_after == 0 else V15)
        assert (d.outcome.funding, d.outcome.credit_balance) == (Funding.CREDITS, balance_after)
    denied = await check.same_answer("a", "sora", V15)
    assert (denied.outcome.denial, denied.outcome.credits_short) == (DenialReason.PURCHASE_REQUIRED, 2)
    assert [(o.pack.pack_id, o.quantity) for o in denied.offers] == [("pack_10", 1)]
    assert "free sora allowance used (30/30" in denied.denial_message


async def test_not_entitled(check: Checker) -> None:
    d = await check.same_answer("a", "sora", JobParams(duration_seconds=10, resolution="1080p"))
    assert (d.outcome.allowed, d.outcome.denial) == (False, DenialReason.NOT_ENTITLED)
    assert "1080p" in d.denial_message


async def test_concurrency_cap(check: Checker) -> None:
    await check.engine.set_account("a", overrides=(LimitOverride("codex", (Limit("daily", LimitKind.DAY, 5),), 2),))
    for _ in range(2):
        assert (await check.same_answer("a", "codex", TASK)).outcome.allowed
    d = await check.same_answer("a", "codex", TASK)
    assert (d.outcome.allowed, d.outcome.denial) == (False, DenialReason.CONCURRENCY_LIMIT)


async def test_the_open_holds_bound(redis_server: RedisServerProcess, key_prefix: str, clock: ManualClock,
                                    redis_client: aioredis.Redis) -> None:
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix, max_open_holds_per_account=2)
    try:
        check = checker_for(plans_with(lambda d: None), store, clock, redis_client, key_prefix)
        for _ in range(2):
            await check.same_answer("a", "sora", V10)
        d = await check.same_answer("a", "sora", V10)
        assert (d.outcome.denial, d.outcome.free_used) == (DenialReason.CONCURRENCY_LIMIT, 2)
    finally:
        await store.close()


async def test_spend_cap(check: Checker) -> None:
    """The job that reaches the cap exactly (a budget_reached event, not from its quote), then the one
    past it: BUDGET_EXCEEDED (another budget_reached, still not from the quote)."""
    for i in range(30):
        await check.engine.check_and_reserve("a", "sora", f"f{i}", V10)
    await check.engine.grant("a", 10, "p1")
    await check.engine.set_account("a", monthly_spend_cap_credits=2)
    assert (await check.same_answer("a", "sora", V15)).outcome.credits_held == 2
    d = await check.same_answer("a", "sora", V10)
    assert (d.outcome.allowed, d.outcome.denial, d.outcome.credit_balance) == (
        False, DenialReason.BUDGET_EXCEEDED, 8)


async def test_shadow_limits(store: RedisStore, clock: ManualClock, redis_client: aioredis.Redis,
                             key_prefix: str) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["plans"]["free"]["sora"]["limits"] = [{"id": "daily", "kind": "day", "free": 3},
                                                {"id": "cut_to_1", "kind": "day", "free": 1, "shadow": True}]
        del d["plans"]["free"]["sora"]["daily_free"]
        d["plans"]["free"]["codex"]["max_concurrent"] = 1
        d["shadow"] = {"plans": ["free"]}
    check = checker_for(plans_with(edit), store, clock, redis_client, key_prefix)
    shadows = [(await check.same_answer("a", "sora", V10)).outcome.shadow_limits for _ in range(3)]
    assert shadows == [(), ("cut_to_1",), ("cut_to_1",)]
    await check.same_answer("a", "codex", TASK)
    d = await check.same_answer("a", "codex", TASK)  # the cap in shadow: allowed, reported
    assert (d.outcome.allowed, d.outcome.shadow_limits) == (True, ("concurrency",))


async def test_a_scheduled_plans_change_right_at_its_instant(store: RedisStore, redis_client: aioredis.Redis,
                                                             key_prefix: str) -> None:
    """Free sora cut from 30 to 20 a day at 13:00 UTC: the last millisecond before it and its first
    one, each quoted and decided on the same state."""
    def edit(d: dict[str, Any]) -> None:
        d["scheduled"] = [{"effective_from": "2026-11-21T13:00:00Z",
                           "plans": {"free": {"sora": {"daily_free": 20, "max_duration_seconds": 15,
                                                        "max_resolution": "720p"},
                                              "codex": d["plans"]["free"]["codex"]}}}]
    clock = ManualClock(T0_MS)
    check = checker_for(plans_with(edit), store, clock, redis_client, key_prefix)
    for i in range(25):
        await check.engine.check_and_reserve("a", "sora", f"r{i}", V10)
        await check.engine.commit("a", f"r{i}")
    clock.set(utc_ms(2026, 11, 21, 13) - 1)
    before = await check.same_answer("a", "sora", V10)
    assert (before.outcome.funding, before.outcome.free_limit, before.outcome.plans_version) == (
        Funding.FREE_QUOTA, 30, "2026-11-01")
    clock.set(utc_ms(2026, 11, 21, 13))
    after = await check.same_answer("a", "sora", V10)
    assert (after.outcome.denial, after.outcome.free_used, after.outcome.free_limit, after.outcome.plans_version) == (
        DenialReason.PURCHASE_REQUIRED, 26, 20, "2026-11-01@2026-11-21T13:00:00Z")


async def test_rolling_and_weekly_limits(store: RedisStore, clock: ManualClock, redis_client: aioredis.Redis,
                                         key_prefix: str) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["plans"]["free"]["codex"] = {"limits": [{"id": "five_hour", "kind": "rolling", "hours": 5, "free": 2},
                                                  {"id": "weekly", "kind": "week", "free": 5}]}
    check = checker_for(plans_with(edit), store, clock, redis_client, key_prefix)
    await check.engine.grant("a", 1, "p1")
    funding = []
    for _ in range(3):
        d = await check.same_answer("a", "codex", TASK)
        await check.engine.commit("a", d.reservation_id)  # committed: no hold left to expire unsettled
        funding.append(d.outcome.funding)
        clock.advance(hours=1)
    assert funding == [Funding.FREE_QUOTA, Funding.FREE_QUOTA, Funding.CREDITS]
    clock.set(T0_MS + 5 * HOUR_MS)  # the first use leaves the rolling window
    assert (await check.same_answer("a", "codex", TASK)).outcome.funding is Funding.FREE_QUOTA


async def test_a_non_utc_account_the_sidecar_has_not_met(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                                         redis_client: aioredis.Redis, key_prefix: str) -> None:
    """A quote's first try with the wrong zone is refused before any write; the retry answers."""
    await engine.set_account("a", tz="Pacific/Kiritimati")  # UTC+14: already Sunday there
    fresh = checker_for(engine.plans, store, clock, redis_client, key_prefix)
    d = await fresh.same_answer("a", "sora", V10)
    assert d.outcome.free_resets_ms == utc_ms(2026, 11, 22, 10)


# --------------------------------------------------------------------------- a reservation id


async def test_a_quote_of_a_reservation_id_answers_as_a_retry_would(check: Checker, clock: ManualClock) -> None:
    engine = check.engine
    await engine.check_and_reserve("a", "sora", "live", V10, 60)
    clock.advance(seconds=10)
    replay = await check.same_answer("a", "sora", V10, "live", 60)  # the replay of the live hold
    assert (replay.outcome.allowed, replay.outcome.replayed, replay.outcome.expires_ms) == (True, True, T0_MS + 60_000)
    conflict = await check.same_error("a", "sora", V15, "live", 60)
    assert (type(conflict), conflict.reason) == (Conflict, "RESERVATION_PARAMS_MISMATCH")
    assert (await check.same_error("a", "sora", V10, "live", 0)).reason == "RESERVATION_PARAMS_MISMATCH"  # ttl too
    await engine.commit("a", "live")
    await engine.check_and_reserve("a", "sora", "dropped", V10)
    await engine.release("a", "dropped")
    for rid, reason in (("live", "ALREADY_COMMITTED"), ("dropped", "ALREADY_RELEASED")):
        error = await check.same_error("a", "sora", V10, rid, 60 if rid == "live" else 0)
        assert (type(error), error.reason) == (ResolutionConflict, reason)
    for i in range(30):  # a denied id is not recorded: quoted (and decided) afresh
        await engine.check_and_reserve("a", "sora", f"f{i}", V10)
    assert (await check.same_answer("a", "sora", V10, "denied")).outcome.denial is DenialReason.PURCHASE_REQUIRED
    assert (await check.same_answer("a", "sora", V10, "denied")).outcome.replayed is False


async def test_validation_is_check_and_reserves(check: Checker) -> None:
    cases = [("", "sora", V10, "", 0, "account_id"), ("a", "dalle", V10, "", 0, "product"),
             ("a", "sora", JobParams(duration_seconds=0, resolution="720p"), "", 0, "params.duration_seconds"),
             ("a", "sora", JobParams(duration_seconds=10, resolution="4k"), "", 0, "params.resolution"),
             ("a", "sora", V10, "bad id", 0, "reservation_id"), ("a", "sora", V10, "", 86_401, "ttl_seconds")]
    for account, product, job, rid, ttl, field in cases:
        error = await check.same_error(account, product, job, rid, ttl)
        assert isinstance(error, InvalidArgument) and error.field == field, (field, error)


# --------------------------------------------------------------------------- lazy expiry


async def test_a_quote_settles_what_is_past_due_exactly_as_check_and_reserve_would(
        check: Checker, store: RedisStore, clock: ManualClock) -> None:
    """An expired credit hold and an expired lot, unsettled (nobody called since): the quote settles
    them (their ledger entries, as any call's), answers what CheckAndReserve then answers, and the
    next quote writes nothing."""
    engine = check.engine
    for i in range(30):
        await engine.check_and_reserve("a", "sora", f"f{i}", V10)
    await engine.grant("a", 3, "short-lived", T0_MS + 30_000)
    await engine.grant("a", 1, "p2")
    await engine.check_and_reserve("a", "sora", "held", V15, 60)  # 2 of short-lived's 3 credits
    clock.advance(seconds=61)  # the lot expired, then the hold: its credits expire with the lot
    seq = await store.account_seq("a")
    quoted = await engine.quote("a", "sora", "", V15)
    settled = [(e.type, e.fields.get("rid") or e.fields.get("pid"), e.deltas.expired)
               for e in await store.account_outbox("a") if e.seq > seq]
    assert settled == [("lot_expire", "short-lived", 1), ("expire", "held", 2)]
    assert (quoted.outcome.denial, quoted.outcome.credit_balance) == (DenialReason.PURCHASE_REQUIRED, 1)
    assert (await check.same_answer("a", "sora", V15)).outcome.credits_short == 1
    error = await check.same_error("a", "sora", V15, "held", 60)  # the settled hold, as a retry sees it
    assert error.reason == "EXPIRED"


async def test_a_quote_of_an_unsettled_expired_hold_by_its_id(check: Checker, store: RedisStore,
                                                              clock: ManualClock) -> None:
    engine = check.engine
    await engine.check_and_reserve("a", "sora", "r1", V10, 60)
    clock.advance(seconds=60)  # expires_ms <= now: expired, not yet settled
    with pytest.raises(ResolutionConflict) as err:
        await engine.quote("a", "sora", "r1", V10, 60)
    assert err.value.reason == "EXPIRED"
    assert [e.type for e in await store.account_outbox("a")] == ["hold", "expire"]
    assert (await check.same_error("a", "sora", V10, "r1", 60)).reason == "EXPIRED"


# --------------------------------------------------------------------------- without Redis


async def test_without_redis_a_quote_is_unavailable_and_a_degraded_id_replays(tmp_path: Path,
                                                                               redis_binary: str) -> None:
    def fail_open(d: dict[str, Any]) -> None:
        d["products"]["sora"]["on_redis_failure"] = "fail_open_free"
        d["products"]["sora"]["degraded_free_per_window"] = 2
    redis = RedisServerProcess(redis_binary, tmp_path / "redis")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=0.3)
    journal = tmp_path / "journal.jsonl"
    engine = QuotaEngine(plans_with(fail_open), store, ManualClock(T0_MS),
                         degraded=DegradedMode(FileJournal(str(journal))))
    try:
        redis.kill()
        with pytest.raises(Unavailable):  # never from the degraded allowance
            await engine.quote("a", "sora", "", V10)
        assert not journal.exists() or journal.read_text() == ""
        held = await engine.check_and_reserve("a", "sora", "d1", V10)
        recorded = journal.read_text()
        quoted = await engine.quote("a", "sora", "d1", V10)
        replay = await engine.check_and_reserve("a", "sora", "d1", V10)
        assert quoted.outcome == replay.outcome and quoted.outcome.degraded and quoted.outcome.replayed
        assert held.outcome.degraded and journal.read_text() == recorded
    finally:
        await store.close()
        redis.stop()


# --------------------------------------------------------------------------- gRPC, client library, CLI


def _answer_fields(message: Any) -> dict[str, Any]:
    fields = json_format.MessageToDict(message, preserving_proto_field_name=True)
    fields.pop("reservation_id", None)
    return fields


def test_quote_messages_mirror_check_and_reserve_ones() -> None:
    """The servicer fills both responses with one function, and the request carries the same fields."""
    for quote, reserve in ((pb.QuoteRequest, pb.CheckAndReserveRequest),
                           (pb.QuoteResponse, pb.CheckAndReserveResponse)):
        def shape(message: Any) -> list[tuple[str, int, int, str]]:
            return [(f.name, f.number, f.type, f.message_type.full_name if f.message_type else "")
                    for f in message.DESCRIPTOR.fields]
        assert shape(quote) == shape(reserve)


@pytest.fixture
async def metered(engine: QuotaEngine) -> AsyncIterator[tuple[Sidecar, Metrics]]:
    """A worker server that counts into its own metrics (the sidecar fixture counts nothing)."""
    metrics = Metrics()
    server, port = create_server(Settings(listen=("127.0.0.1:0",)), engine, metrics=metrics)
    await server.start()
    sidecar = Sidecar(engine, port, port)
    try:
        yield sidecar, metrics
    finally:
        await sidecar.channel.close()
        await sidecar.admin_channel.close()
        await server.stop(None)


async def test_grpc(metered: tuple[Sidecar, Metrics], redis_client: aioredis.Redis, key_prefix: str) -> None:
    sidecar, metrics = metered
    for i in range(30):
        await sidecar.engine.check_and_reserve("w", "sora", f"f{i}", V10)
    params = pb.JobParams(duration_seconds=15, resolution="720p")
    before = await snapshot(redis_client, key_prefix)
    quoted = await sidecar.quota.Quote(pb.QuoteRequest(account_id="w", product="sora", params=params))
    assert await snapshot(redis_client, key_prefix) == before
    decided = await sidecar.quota.CheckAndReserve(pb.CheckAndReserveRequest(account_id="w", product="sora",
                                                                            reservation_id="r", params=params))
    assert _answer_fields(quoted) == _answer_fields(decided)
    assert (quoted.allowed, quoted.reservation_id, quoted.denial.reason, quoted.denial.credits_short,
            quoted.job_cost_credits, [o.pack_id for o in quoted.denial.offers]) == (
        False, "", pb.DENIAL_REASON_PURCHASE_REQUIRED, 2, 2, ["pack_10"])
    assert metrics.registry.get_sample_value("quota_quotes_total", {
        "product": "sora", "outcome": "denied", "reason": "PURCHASE_REQUIRED"}) == 1
    assert metrics.registry.get_sample_value("quota_decisions_total", {
        "product": "sora", "outcome": "denied", "funding": "none", "reason": "PURCHASE_REQUIRED"}) == 1

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.Quote(pb.QuoteRequest(account_id="w", product="sora", params=pb.JobParams()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violation(err.value) == "params.duration_seconds"
    await sidecar.engine.release("w", "f0")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.Quote(pb.QuoteRequest(account_id="w", product="sora", reservation_id="f0",
                                                  params=pb.JobParams(duration_seconds=10, resolution="720p")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _violation(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    return str(bad.field_violations[0].field)


async def test_client_library(sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str) -> None:
    target = f"127.0.0.1:{sidecar.port}"
    video = {"duration_seconds": 10, "resolution": "720p"}
    async with QuotaClient(target) as client:
        q = await client.quote("c", "sora", video, ttl_seconds=60)
        r = await client.reserve("c", "sora", video, ttl_seconds=60, reservation_id="r1")
        assert (q.allowed, q.funding, q.free_used, q.expires_at, q.reservation_id, q.denial) == (
            True, "free", 1, r.expires_at, "", None)
        again = await client.quote("c", "sora", video, ttl_seconds=60, reservation_id="r1")
        assert (again.replayed, again.reservation_id, again.funding) == (True, "r1", "free")
        for _ in range(29):
            await client.reserve("c", "sora", video)
        before = await snapshot(redis_client, key_prefix)
        q = await client.quote("c", "sora", video)
        assert await snapshot(redis_client, key_prefix) == before
        with pytest.raises(Denied) as denied:
            await client.reserve("c", "sora", video)
    assert q.denial is not None and not q.allowed
    assert (q.denial.reason, q.denial.credits_short, q.denial.offers, q.denial.denial_message, q.job_cost_credits) == (
        denied.value.reason, denied.value.credits_short, denied.value.offers, denied.value.denial_message, 1)

    def blocking() -> Any:
        with SyncQuotaClient(target) as sync:
            return sync.quote("c", "codex", {"model": "codex-mini"})
    assert (await asyncio.to_thread(blocking)).funding == "free"


async def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The CLI in a thread (the sidecar serves on this test's event loop), its exit status and stdout."""
    status = await asyncio.to_thread(cli.main, list(args))
    return status, capsys.readouterr().out


async def test_cli(sidecar: Sidecar, capsys: pytest.CaptureFixture[str], redis_client: aioredis.Redis,
                   key_prefix: str) -> None:
    flags = ["--account", "v", "--product", "sora", "--duration", "15", "--resolution", "720p",
             "--target", f"127.0.0.1:{sidecar.port}"]
    status, out = await run_cli(capsys, "quote", *flags)
    assert status == 0, out
    assert out.startswith("QUOTE  would be allowed\n  funded by free allowance: 1 free unit would be held until "), out
    assert "free today: 1/30" in out and "job cost: 2 credit(s); credits available: 0\n" in out, out
    for i in range(30):
        await sidecar.engine.check_and_reserve("v", "sora", f"f{i}", V10)
    await sidecar.engine.grant("v", 5, "p1")
    status, out = await run_cli(capsys, "quote", *flags, "--ttl", "60")
    assert status == 0 and "funded by credits: 2 credit(s) would be held until" in out, out
    assert "credits available: 5, 3 after this job" in out, out
    await sidecar.engine.check_and_reserve("v", "sora", "big", JobParams(duration_seconds=15, resolution="720p"))
    await sidecar.engine.check_and_reserve("v", "sora", "big2", JobParams(duration_seconds=15, resolution="720p"))
    before = await snapshot(redis_client, key_prefix)
    status, out = await run_cli(capsys, "quote", *flags)
    assert status == 3, out
    assert out.startswith("QUOTE  would be denied: PURCHASE_REQUIRED: "), out
    assert "  offer: 1 x pack_10 (10 credits, USD 4.00) = USD 4.00" in out, out
    # A child process: --json writes through the sys.stdout of import time, which capsys does not see.
    child = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "quota_sidecar", "quote", *flags, "--json"],
                                    capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 3 and json.loads(child.stdout)["denial"]["credits_short"] == 1, child
    status, out = await run_cli(capsys, "quote", *flags, "--id", "big")
    assert status == 0 and "(reservation big already holds it)" in out and "(replayed earlier decision)" in out, out
    assert await snapshot(redis_client, key_prefix) == before


async def test_cli_errors(sidecar: Sidecar, capsys: pytest.CaptureFixture[str]) -> None:
    status = await asyncio.to_thread(cli.main, ["quote", "--account", "v", "--product", "sora", "--duration", "0",
                                                "--resolution", "720p", "--target", f"127.0.0.1:{sidecar.port}"])
    captured = capsys.readouterr()
    assert status == 1 and captured.err.startswith("error: INVALID_ARGUMENT:"), captured
    assert "params.duration_seconds" in captured.err


async def test_outbox_untouched_by_quotes_of_every_kind(check: Checker, store: RedisStore,
                                                       redis_client: aioredis.Redis, key_prefix: str) -> None:
    """The outbox and the account's sequence number, after many quotes of every outcome."""
    outbox = outbox_key(key_prefix, key_bucket("a", store.key_buckets))
    await check.engine.check_and_reserve("a", "sora", "r0", V10)
    length, seq = await redis_client.xlen(outbox), await store.account_seq("a")
    for job in (V10, V15, JobParams(duration_seconds=10, resolution="1080p")):
        for rid in ("", "r0", "other"):
            try:
                await check.engine.quote("a", "sora", rid, job)
            except QuotaError:
                pass
    assert (await redis_client.xlen(outbox), await store.account_seq("a")) == (length, seq)
    assert await redis_client.hlen(key(key_prefix, "a", "res")) == 1
