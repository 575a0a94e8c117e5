"""The gRPC boundary over a real channel: concurrency, bad input, rich errors, health."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from quota_fixtures import T0_MS, Sidecar, keys_with_prefix

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.server.app import create_server
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

V10 = pb.JobParams(duration_seconds=10, resolution="720p")


def reserve_request(account: str, rid: str = "", params: pb.JobParams = V10, **kw) -> pb.CheckAndReserveRequest:
    return pb.CheckAndReserveRequest(account_id=account, product=kw.pop("product", "sora"), reservation_id=rid,
                                     params=params, **kw)


def details(err: grpc.aio.AioRpcError) -> dict[str, object]:
    """google.rpc details of an error, by type name."""
    found: dict[str, object] = {}
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            st = status_pb2.Status.FromString(value)
            assert st.code == err.code().value[0] and st.message == err.details()
            for d in st.details:
                for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                    if d.Is(kind.DESCRIPTOR):
                        msg = kind()
                        d.Unpack(msg)
                        found[kind.DESCRIPTOR.name] = msg
    return found


async def test_200_concurrent_reservations_allow_exactly_the_free_allowance(sidecar: Sidecar) -> None:
    results = await asyncio.gather(*(sidecar.quota.CheckAndReserve(reserve_request("crowd", f"r{i}"))
                                     for i in range(200)))
    allowed = [r for r in results if r.allowed]
    assert (len(allowed), len(results) - len(allowed)) == (30, 170)
    assert all(r.funding == pb.FUNDING_FREE_QUOTA for r in allowed)
    assert sorted(r.free_used for r in allowed) == list(range(1, 31))
    denied = [r for r in results if not r.allowed]
    assert {r.denial.reason for r in denied} == {pb.DENIAL_REASON_PURCHASE_REQUIRED}


async def test_200_concurrent_with_5_credits_allow_exactly_35(sidecar: Sidecar) -> None:
    g = await sidecar.admin.GrantCredits(pb.GrantCreditsRequest(account_id="crowd", credits=5, purchase_id="p"))
    assert g.credit_balance == 5
    results = await asyncio.gather(*(sidecar.quota.CheckAndReserve(reserve_request("crowd", f"r{i}"))
                                     for i in range(200)))
    by_funding = [r.funding for r in results if r.allowed]
    assert (by_funding.count(pb.FUNDING_FREE_QUOTA), by_funding.count(pb.FUNDING_CREDITS)) == (30, 5)
    assert sum(not r.allowed for r in results) == 165
    balance = await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id="crowd"))
    assert (balance.credit_balance, balance.credits_held, len(balance.holds)) == (0, 5, 35)


async def test_concurrent_retries_of_one_id_hold_once(sidecar: Sidecar) -> None:
    results = await asyncio.gather(*(sidecar.quota.CheckAndReserve(reserve_request("a", "same")) for _ in range(50)))
    assert all(r.allowed for r in results)
    assert sum(not r.replayed for r in results) == 1
    balance = await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id="a"))
    assert (balance.allowances[0].free_used, len(balance.holds)) == (1, 1)


async def test_decision_fields_on_the_wire(sidecar: Sidecar) -> None:
    r = await sidecar.quota.CheckAndReserve(reserve_request("a", "r1", ttl_seconds=120))
    assert (r.allowed, r.reservation_id, r.funding, r.free_used, r.free_limit, r.job_cost_credits) == (
        True, "r1", pb.FUNDING_FREE_QUOTA, 1, 30, 1)
    assert r.expires_at.ToMilliseconds() == T0_MS + 120_000
    assert r.free_resets_at.ToMilliseconds() == T0_MS + 12 * 3_600_000
    assert not r.HasField("denial")
    c = await sidecar.quota.Commit(pb.CommitRequest(account_id="a", reservation_id="r1"))
    assert (c.free_charged, c.credits_charged, c.funding) == (1, 0, pb.FUNDING_FREE_QUOTA)


async def test_denial_on_the_wire_carries_the_offer(sidecar: Sidecar) -> None:
    for i in range(30):
        await sidecar.quota.CheckAndReserve(reserve_request("a", f"r{i}"))
    r = await sidecar.quota.CheckAndReserve(
        reserve_request("a", "big", pb.JobParams(duration_seconds=15, resolution="720p")))
    assert (r.allowed, r.denial.reason, r.denial.credits_short) == (False, pb.DENIAL_REASON_PURCHASE_REQUIRED, 2)
    offer = r.denial.offers[0]
    assert (offer.pack_id, offer.credits, offer.quantity) == ("pack_10", 10, 1)
    assert (offer.price.currency_code, offer.price.minor_units, offer.total_price.minor_units) == ("USD", 400, 400)
    assert r.free_resets_at.ToMilliseconds() == T0_MS + 12 * 3_600_000


BAD_RESERVATIONS = [
    ("account_id", reserve_request("")),
    ("account_id", reserve_request("x" * 10_000)),
    ("account_id", reserve_request("has space")),
    ("account_id", reserve_request("brace{tag}")),
    ("product", reserve_request("a", product="dalle")),
    ("product", reserve_request("a", product="")),
    ("reservation_id", reserve_request("a", "bad|id")),
    ("params.duration_seconds", reserve_request("a", params=pb.JobParams(resolution="720p"))),
    ("params.duration_seconds", reserve_request("a", params=pb.JobParams(duration_seconds=0, resolution="720p"))),
    ("params.duration_seconds", reserve_request("a", params=pb.JobParams(duration_seconds=-5, resolution="720p"))),
    ("params.duration_seconds", reserve_request("a", params=pb.JobParams(duration_seconds=1e12, resolution="720p"))),
    ("params.duration_seconds", reserve_request("a", params=pb.JobParams(duration_seconds=math.nan, resolution="720p"))),
    ("params.duration_seconds", reserve_request("a", params=pb.JobParams(duration_seconds=math.inf, resolution="720p"))),
    ("params.resolution", reserve_request("a", params=pb.JobParams(duration_seconds=10, resolution="4k"))),
    ("params.resolution", reserve_request("a", params=pb.JobParams(duration_seconds=10))),
    ("params.model", reserve_request("a", params=pb.JobParams(duration_seconds=10, resolution="720p", model="x"))),
    ("params.units", reserve_request("a", params=pb.JobParams(units=1000), product="codex")),
    ("params.extra", reserve_request("a", params=pb.JobParams(duration_seconds=10, resolution="720p",
                                                            extra={f"k{i}": "v" for i in range(100)}))),
    ("ttl_seconds", reserve_request("a", ttl_seconds=86_401)),
]


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("field,request_", BAD_RESERVATIONS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_RESERVATIONS)])
async def test_bad_reservation_is_invalid_argument_naming_the_field_and_writes_nothing(
        sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str, field: str,
        request_: pb.CheckAndReserveRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.CheckAndReserve(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = details(err.value)["BadRequest"]
    assert [v.field for v in bad_request.field_violations] == [field]
    assert field in err.value.details()
    assert await keys_with_prefix(redis_client, key_prefix) == []


BAD_ADMIN = [
    ("SetAccount", "time_zone", pb.SetAccountRequest(account_id="a", time_zone="Mars/Olympus")),
    ("SetAccount", "time_zone", pb.SetAccountRequest(account_id="a", time_zone="../etc/passwd")),
    ("SetAccount", "plan", pb.SetAccountRequest(account_id="a", plan="platinum")),
    ("SetAccount", "account_id", pb.SetAccountRequest(account_id="", plan="pro")),
    ("GrantCredits", "credits", pb.GrantCreditsRequest(account_id="a", credits=0, purchase_id="p")),
    ("GrantCredits", "credits", pb.GrantCreditsRequest(account_id="a", credits=-3, purchase_id="p")),
    ("GrantCredits", "purchase_id", pb.GrantCreditsRequest(account_id="a", credits=3)),
]


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("method,field,request_", BAD_ADMIN, ids=[f"{m}-{f}-{i}" for i, (m, f, _) in enumerate(BAD_ADMIN)])
async def test_bad_admin_input_is_invalid_argument_and_writes_nothing(
        sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str, method: str, field: str, request_) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(sidecar.admin, method)(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(err.value)["BadRequest"].field_violations] == [field]
    assert await keys_with_prefix(redis_client, key_prefix) == []


async def test_bad_commit_params_change_nothing(sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str) -> None:
    await sidecar.quota.CheckAndReserve(reserve_request("a", "r"))
    before = {k: await redis_client.dump(k) for k in await keys_with_prefix(redis_client, key_prefix)}
    bad = pb.CommitRequest(account_id="a", reservation_id="r", params=pb.JobParams(duration_seconds=-1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.Commit(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(err.value)["BadRequest"].field_violations] == ["params.duration_seconds"]
    after = {k: await redis_client.dump(k) for k in await keys_with_prefix(redis_client, key_prefix)}
    assert after == before


async def test_resolution_conflicts_carry_error_info(sidecar: Sidecar) -> None:
    await sidecar.quota.CheckAndReserve(reserve_request("a", "r"))
    await sidecar.quota.Commit(pb.CommitRequest(account_id="a", reservation_id="r"))
    cases = [
        (sidecar.quota.Release(pb.ReleaseRequest(account_id="a", reservation_id="r")),
         grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_COMMITTED"),
        (sidecar.quota.CheckAndReserve(reserve_request("a", "r", ttl_seconds=5)),
         grpc.StatusCode.ALREADY_EXISTS, "RESERVATION_PARAMS_MISMATCH"),
        (sidecar.quota.Commit(pb.CommitRequest(account_id="a", reservation_id="missing")),
         grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND"),
        (sidecar.quota.ExtendReservation(pb.ExtendReservationRequest(account_id="a", reservation_id="r")),
         grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_COMMITTED"),
    ]
    for call, code, reason in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == code
        info = details(err.value)["ErrorInfo"]
        assert (info.reason, info.domain) == (reason, "quota-sidecar")


async def test_expired_reservation_reports_expired(sidecar: Sidecar, clock: ManualClock) -> None:
    await sidecar.quota.CheckAndReserve(reserve_request("a", "r", ttl_seconds=1))
    clock.advance(seconds=1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.Commit(pb.CommitRequest(account_id="a", reservation_id="r"))
    assert (err.value.code(), details(err.value)["ErrorInfo"].reason) == (grpc.StatusCode.FAILED_PRECONDITION, "EXPIRED")


@pytest.mark.newest_redis_only
async def test_health_reflection_and_admin_separation(sidecar: Sidecar) -> None:
    health = health_pb2_grpc.HealthStub(sidecar.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "quota.v1.QuotaService" in names and "quota.v1.QuotaAdmin" not in names
    wrong = quota_pb2_grpc.QuotaAdminStub(sidecar.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await wrong.GrantCredits(pb.GrantCreditsRequest(account_id="a", credits=5, purchase_id="p"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.newest_redis_only
async def test_oversized_request_is_refused(sidecar: Sidecar) -> None:
    huge = pb.JobParams(duration_seconds=10, resolution="720p", extra={"blob": "x" * 200_000})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.CheckAndReserve(reserve_request("a", "r", huge))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_redis_down_is_unavailable_with_retry_info(tmp_path, redis_binary: str) -> None:
    # appendfsync always: with everysec a SIGKILL may lose the last write (Redis postpones
    # AOF writes while a background fsync runs), and this test replays an acknowledged hold.
    redis = RedisServerProcess(redis_binary, tmp_path / "redis", appendfsync="always")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=0.5)
    engine = QuotaEngine(load_plans(), store, ManualClock(T0_MS))
    server, port = create_server(Settings(listen=("127.0.0.1:0",)), engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = quota_pb2_grpc.QuotaServiceStub(channel)
            assert (await stub.CheckAndReserve(reserve_request("a", "r1"))).allowed
            redis.kill()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CheckAndReserve(reserve_request("a", "r2"), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            found = details(err.value)
            assert found["ErrorInfo"].reason == "STORE_UNAVAILABLE"
            assert found["RetryInfo"].retry_delay.ToMilliseconds() > 0
            redis.start()  # same port, same AOF: the earlier hold is still there
            retry = await stub.CheckAndReserve(reserve_request("a", "r1"))
            assert (retry.allowed, retry.replayed) == (True, True)
    finally:
        await server.stop(None)
        await store.close()
        redis.stop()
