"""CheckAndReserveBatch, CommitBatch and ReleaseBatch over a real channel.

Per-item results in order, each item decided as the single call would decide it;
one pipelined round trip per batch; all_or_nothing is one atomic script.
"""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis
from quota_fixtures import Sidecar, flush_scripts, script_calls

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.domain.audit import audit_account, format_report
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

V10 = pb.JobParams(duration_seconds=10, resolution="720p")


def item(account: str, rid: str, params: pb.JobParams = V10, product: str = "sora") -> pb.CheckAndReserveRequest:
    return pb.CheckAndReserveRequest(account_id=account, product=product, reservation_id=rid, params=params)


def batch(*items: pb.CheckAndReserveRequest, all_or_nothing: bool = False) -> pb.CheckAndReserveBatchRequest:
    return pb.CheckAndReserveBatchRequest(items=list(items), all_or_nothing=all_or_nothing)


async def holds(sidecar: Sidecar, account: str) -> tuple[int, int, int]:
    """(free used, holds, credits held) of the account's sora allowance."""
    b = await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id=account))
    sora = next(a for a in b.allowances if a.product == "sora")
    return sora.free_used, len(b.holds), b.credits_held


async def assert_audit_clean(store: RedisStore, account: str) -> None:
    audit = await audit_account(store, account)
    assert audit.violations == (), format_report([audit])


async def test_40_items_for_one_free_account_allow_exactly_30_in_order(
        sidecar: Sidecar, store: RedisStore, redis_client: aioredis.Redis) -> None:
    await sidecar.quota.CheckAndReserve(item("warm-up", "w"))  # the script is loaded: no NOSCRIPT below
    before = await script_calls(redis_client)
    response = await sidecar.quota.CheckAndReserveBatch(batch(*(item("bulk", f"j{i}") for i in range(40))))
    # One script call (FCALL, or EVALSHA on 6.2) per item, none extra (no per-item retries, no SCRIPT EXISTS).
    assert await script_calls(redis_client) - before == 40
    results = [r.response for r in response.results]
    assert all(r.WhichOneof("outcome") == "response" for r in response.results)
    assert [r.allowed for r in results] == [True] * 30 + [False] * 10
    assert [r.free_used for r in results[:30]] == list(range(1, 31))
    assert [r.reservation_id for r in results] == [f"j{i}" for i in range(40)]
    assert {r.denial.reason for r in results[30:]} == {pb.DENIAL_REASON_PURCHASE_REQUIRED}
    assert results[30].denial.offers, "a denial in a batch carries its offer like a single call's"
    assert await holds(sidecar, "bulk") == (30, 30, 0)
    await assert_audit_clean(store, "bulk")


async def test_mixed_batch_gives_per_item_results(sidecar: Sidecar) -> None:
    await sidecar.quota.CheckAndReserve(item("b", "taken", pb.JobParams(duration_seconds=5, resolution="720p")))
    await sidecar.admin.GrantCredits(pb.GrantCreditsRequest(account_id="c", credits=10, purchase_id="p1"))
    request = batch(
        item("a", "a1"),
        item("b", "b1"),
        item("a", "bad", pb.JobParams(duration_seconds=-3, resolution="720p")),
        item("b", "taken"),  # the same id with other params: a conflict, not a replay
        item("c", "c1", product="codex", params=pb.JobParams(model="codex-mini")),
        item("a", "a2"),
    )
    response = await sidecar.quota.CheckAndReserveBatch(request)
    kinds = [r.WhichOneof("outcome") for r in response.results]
    assert kinds == ["response", "response", "error", "error", "response", "response"]
    r = response.results
    assert (r[0].response.allowed, r[0].response.free_used) == (True, 1)
    assert (r[1].response.allowed, r[1].response.free_used) == (True, 2)
    assert (r[2].error.code, r[2].error.field) == ("INVALID_ARGUMENT", "items[2].params.duration_seconds")
    assert (r[3].error.code, r[3].error.reason) == ("ALREADY_EXISTS", "RESERVATION_PARAMS_MISMATCH")
    assert r[4].response.allowed
    assert (r[5].response.allowed, r[5].response.free_used) == (True, 2)

    replay = await sidecar.quota.CheckAndReserveBatch(request)
    assert [x.WhichOneof("outcome") for x in replay.results] == kinds
    assert all(x.response.replayed for x in replay.results if x.WhichOneof("outcome") == "response")
    assert await holds(sidecar, "a") == (2, 2, 0)
    assert await holds(sidecar, "b") == (2, 2, 0)


async def test_replaying_a_batch_holds_nothing_twice(sidecar: Sidecar, store: RedisStore) -> None:
    request = batch(*(item("again", f"r{i}") for i in range(10)))
    first = await sidecar.quota.CheckAndReserveBatch(request)
    second = await sidecar.quota.CheckAndReserveBatch(request)
    assert [r.response.replayed for r in first.results] == [False] * 10
    assert [r.response.replayed for r in second.results] == [True] * 10
    assert [r.response.free_used for r in second.results] == list(range(1, 11))
    assert await holds(sidecar, "again") == (10, 10, 0)
    await assert_audit_clean(store, "again")


async def test_commit_and_release_batches_per_item(sidecar: Sidecar, store: RedisStore) -> None:
    await sidecar.quota.CheckAndReserveBatch(batch(item("f", "f1"), item("f", "f2"), item("f", "f3")))
    commit = await sidecar.quota.CommitBatch(pb.CommitBatchRequest(items=[
        pb.CommitRequest(account_id="f", reservation_id="f1"),
        pb.CommitRequest(account_id="f", reservation_id="nope"),
        pb.CommitRequest(account_id="f", reservation_id="f2", params=pb.JobParams(duration_seconds=0)),
        pb.CommitRequest(account_id="", reservation_id="f3"),
    ]))
    r = commit.results
    assert (r[0].response.free_charged, r[0].response.funding) == (1, pb.FUNDING_FREE_QUOTA)
    assert (r[1].error.code, r[1].error.reason) == ("NOT_FOUND", "RESERVATION_NOT_FOUND")
    assert (r[2].error.code, r[2].error.field) == ("INVALID_ARGUMENT", "items[2].params.duration_seconds")
    assert (r[3].error.code, r[3].error.field) == ("INVALID_ARGUMENT", "items[3].account_id")

    release = await sidecar.quota.ReleaseBatch(pb.ReleaseBatchRequest(items=[
        pb.ReleaseRequest(account_id="f", reservation_id="f2"),
        pb.ReleaseRequest(account_id="f", reservation_id="f1"),
        pb.ReleaseRequest(account_id="f", reservation_id="missing"),
        pb.ReleaseRequest(account_id="f", reservation_id="f3"),
    ]))
    r = release.results
    assert r[0].response.free_refunded == 1
    assert (r[1].error.code, r[1].error.reason) == ("FAILED_PRECONDITION", "ALREADY_COMMITTED")
    assert (r[2].error.code, r[2].error.reason) == ("NOT_FOUND", "RESERVATION_NOT_FOUND")
    assert r[3].response.free_refunded == 1
    assert await holds(sidecar, "f") == (1, 0, 0)
    await assert_audit_clean(store, "f")


async def test_too_many_items_is_invalid_argument(sidecar: Sidecar) -> None:
    too_many = batch(*(item("big", f"x{i}") for i in range(101)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.CheckAndReserveBatch(too_many)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.ReleaseBatch(pb.ReleaseBatchRequest(
            items=[pb.ReleaseRequest(account_id="big", reservation_id=f"x{i}") for i in range(101)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await holds(sidecar, "big") == (0, 0, 0)


async def test_all_or_nothing_that_fits_holds_everything(sidecar: Sidecar, store: RedisStore) -> None:
    response = await sidecar.quota.CheckAndReserveBatch(
        batch(*(item("whole", f"w{i}") for i in range(10)), all_or_nothing=True))
    assert [r.response.allowed for r in response.results] == [True] * 10
    assert [r.response.free_used for r in response.results] == list(range(1, 11))
    assert await holds(sidecar, "whole") == (10, 10, 0)
    await assert_audit_clean(store, "whole")


async def test_all_or_nothing_that_does_not_fit_holds_nothing(sidecar: Sidecar, store: RedisStore) -> None:
    await sidecar.admin.GrantCredits(pb.GrantCreditsRequest(account_id="none", credits=3, purchase_id="p"))
    outbox_before = await store.account_outbox("none")
    assert [e.type for e in outbox_before] == ["grant"]
    request = batch(*(item("none", f"n{i}") for i in range(40)), all_or_nothing=True)
    response = await sidecar.quota.CheckAndReserveBatch(request)
    r = response.results
    # 30 free units and 3 credits would have funded 33; none of them is held.
    assert [x.error.code for x in r[:33]] == ["ABORTED"] * 33
    assert {x.error.reason for x in r[:33]} == {"ALL_OR_NOTHING_ABORTED"}
    assert [x.response.allowed for x in r[33:]] == [False] * 7
    assert {x.response.denial.reason for x in r[33:]} == {pb.DENIAL_REASON_PURCHASE_REQUIRED}
    assert await holds(sidecar, "none") == (0, 0, 0)
    balance = await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id="none"))
    assert balance.credit_balance == 3
    assert await store.account_outbox("none") == outbox_before, "an undone batch leaves no outbox entry"
    assert await store.account_seq("none") == 1, "and takes no sequence number"
    await assert_audit_clean(store, "none")

    # Nothing was remembered: after a purchase the same batch goes through.
    await sidecar.admin.GrantCredits(pb.GrantCreditsRequest(account_id="none", credits=10, purchase_id="p2"))
    again = await sidecar.quota.CheckAndReserveBatch(request)
    assert all(x.response.allowed and not x.response.replayed for x in again.results)
    assert await holds(sidecar, "none") == (30, 40, 10)
    # The grants and the 40 holds, numbered with no gap where the refused batch was.
    outbox = await store.account_outbox("none")
    assert [e.seq for e in outbox] == list(range(1, 43)) and [e.type for e in outbox[2:]] == ["hold"] * 40
    await assert_audit_clean(store, "none")


async def test_all_or_nothing_needs_one_account_and_valid_distinct_items(sidecar: Sidecar) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.CheckAndReserveBatch(batch(item("x", "1"), item("y", "2"), all_or_nothing=True))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "all_or_nothing" in (err.value.details() or "")

    response = await sidecar.quota.CheckAndReserveBatch(batch(
        item("x", "1"), item("x", "2", pb.JobParams(duration_seconds=10, resolution="9000p")), item("x", "1"),
        all_or_nothing=True))
    r = response.results
    assert (r[0].error.code, r[0].error.reason) == ("ABORTED", "ALL_OR_NOTHING_ABORTED")
    assert (r[1].error.code, r[1].error.field) == ("INVALID_ARGUMENT", "items[1].params.resolution")
    assert (r[2].error.code, r[2].error.field) == ("INVALID_ARGUMENT", "items[2].reservation_id")
    assert await holds(sidecar, "x") == (0, 0, 0)


async def test_all_or_nothing_keeps_earlier_holds_it_replays(sidecar: Sidecar) -> None:
    await sidecar.quota.CheckAndReserve(item("keep", "old"))
    response = await sidecar.quota.CheckAndReserveBatch(
        batch(item("keep", "old"), *(item("keep", f"k{i}") for i in range(30)), all_or_nothing=True))
    r = response.results
    assert r[0].response.replayed and r[0].response.allowed
    assert [x.error.code for x in r[1:30]] == ["ABORTED"] * 29
    assert not r[30].response.allowed
    assert await holds(sidecar, "keep") == (1, 1, 0)


async def test_batch_after_script_flush_reloads_and_decides_each_item_once(
        sidecar: Sidecar, redis_client: aioredis.Redis) -> None:
    await flush_scripts(redis_client)
    response = await sidecar.quota.CheckAndReserveBatch(batch(*(item("flushed", f"s{i}") for i in range(5))))
    assert [r.response.free_used for r in response.results] == [1, 2, 3, 4, 5]
    assert not any(r.response.replayed for r in response.results)
    await flush_scripts(redis_client)
    response = await sidecar.quota.CheckAndReserveBatch(
        batch(*(item("flushed", f"t{i}") for i in range(3)), all_or_nothing=True))
    assert [r.response.free_used for r in response.results] == [6, 7, 8]
    assert await holds(sidecar, "flushed") == (8, 8, 0)
