"""Fuzzing the gRPC boundary with hypothesis.

Random and extreme field values (unicode, control characters, braces and
'|', huge strings and maps, nan/inf/subnormal floats, integer extremes,
timestamps from year 1 to 9999) must end as a valid answer or a client error
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS,
RESOURCE_EXHAUSTED): never INTERNAL, UNKNOWN or UNAVAILABLE. A refused request
writes nothing to Redis, and the server keeps serving afterwards. Requests
above the configured max message size are refused before any handler runs.

Hypothesis tests are synchronous and the server is grpc.aio: each test runs
its own sidecar (servers, channels, store) on an event loop in a background
thread and hands every call to it with run_coroutine_threadsafe.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from quota_fixtures import T0_MS

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.server.app import create_admin_server, create_server
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = [pytest.mark.all_redis_versions, pytest.mark.slow]

T = TypeVar("T")

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}
# Nothing may be written for these: the request was refused before any decision.
REFUSED_UNHANDLED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
CALL_TIMEOUT_S = 30
UINT32_MAX, INT64_MIN, INT64_MAX = 2**32 - 1, -(2**63), 2**63 - 1
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
TS_MIN_S, TS_MAX_S = -62_135_596_800, 253_402_300_799
DAY_S = 86_400

# -- strategies ----------------------------------------------------------------

def mostly(valid: st.SearchStrategy[T], wild: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Mostly valid, sometimes wild, so that requests also get past the first check of each field."""
    # Distinct branch objects: one_of would fold repeats of the same strategy into one branch.
    return st.one_of(*(valid.map(lambda x: x) for _ in range(3)), wild)


def huge_text(min_size: int = 129, max_size: int = 20_000) -> st.SearchStrategy[str]:
    """Big strings built by repetition (drawing 20 KB character by character would be slow)."""
    return st.builds(lambda piece, n: (piece * n)[:max_size], st.text(min_size=1, max_size=8),
                     st.integers(min_size, max_size))


VALID_IDS = st.one_of(st.sampled_from(["acct", "a", "b"]), st.from_regex(r"[A-Za-z0-9._:@+=/-]{1,128}", fullmatch=True))
TRICKY_IDS = st.sampled_from(["", "a", "{b1}", "a}b{", "a|b", "has space", "x" * 128, "x" * 129, "é", "\x00",
                              "a\nb", "\u202e", "🙂", "qs:{b1}:a:acct", "*", "?", "[a]", "\\", "%s", "null"])
TEXT = st.one_of(st.text(max_size=300), huge_text())
IDS = mostly(VALID_IDS, st.one_of(TRICKY_IDS, st.text(max_size=200), huge_text()))
PRODUCTS = mostly(st.sampled_from(["sora", "codex"]),
                  st.one_of(st.sampled_from(["", "SORA", "sora ", "dalle"]), st.text(max_size=50)))
FLOATS = mostly(
    st.one_of(st.floats(min_value=0.001, max_value=30), st.sampled_from([10.0, 15.0, 15.001, 25.0, 600.0])),
    st.one_of(st.floats(),  # nan, inf, -0.0, subnormals, 1e308 and everything between
              st.sampled_from([0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1e-4, 0.0004, 0.0005, 1e308, -1e308,
                               float("nan"), float("inf"), float("-inf"), 600.0000001])))
EXTRA = mostly(
    st.dictionaries(st.text(min_size=1, max_size=64), st.text(max_size=256), max_size=32),
    st.one_of(st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=40),
              st.builds(lambda n, value: {f"k{i}": value for i in range(n)}, st.integers(0, 400), st.text(max_size=20)),
              st.builds(lambda key, value: {key: value}, huge_text(max_size=8_000), huge_text(max_size=8_000))))
JOB_PARAMS = st.builds(
    pb.JobParams, duration_seconds=FLOATS,
    resolution=mostly(st.sampled_from(["480p", "720p", "1080p"]),
                      st.one_of(st.sampled_from(["", "4k", "0p", "99999p", "720P"]), st.text(max_size=40))),
    model=mostly(st.sampled_from(["", "sora-2", "codex-mini", "codex", "codex-max"]), st.text(max_size=40)),
    units=mostly(st.integers(0, 5), st.integers(0, UINT32_MAX)), extra=EXTRA)
TTLS = mostly(st.integers(0, 86_400), st.integers(0, UINT32_MAX))
INT64 = st.one_of(st.integers(INT64_MIN, INT64_MAX), st.integers(-5, 2_000_000_000),
                  st.sampled_from([INT64_MIN, INT64_MAX, 0, -1, 1, 10**9, 10**9 + 1]))
TIMESTAMPS = st.builds(
    lambda seconds, nanos: timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
    mostly(st.integers(T0_MS // 1000 - DAY_S, T0_MS // 1000 + 21 * 366 * DAY_S),
           st.one_of(st.integers(TS_MIN_S, TS_MAX_S), st.sampled_from([TS_MIN_S, TS_MAX_S, 0, T0_MS // 1000]))),
    st.integers(0, 999_999_999))
ZONES = mostly(st.sampled_from(["", "UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Etc/GMT+5", "EST5EDT"]),
               st.one_of(st.sampled_from(["Mars/Olympus", "../etc/passwd", "/etc/localtime", "UTC\x00", "localtime",
                                          "posixrules", "Factory", "right/UTC", "posix/UTC", "Europe/",
                                          "Europe//Paris", "zone.tab", "tzdata.zi", "leapseconds", "+VERSION"]),
                         st.text(max_size=80), huge_text(max_size=2_000)))


# -- the sidecar on a loop thread ---------------------------------------------

class Harness:
    """A started worker and admin server (pinned clock, own key prefix) driven from sync code."""

    def __init__(self, redis_url: str, max_message_bytes: int = 64 * 1024) -> None:
        self.prefix = "fz" + uuid.uuid4().hex[:12]
        self._redis_url = redis_url
        self._settings = Settings(listen=("127.0.0.1:0",), admin_listen=("127.0.0.1:0",),
                                  max_message_bytes=max_message_bytes)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self._thread.start()
        self.run(self._start)

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """Runs ``make()`` on the loop thread: grpc.aio calls must be created there, not only awaited."""
        async def go() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(CALL_TIMEOUT_S)

    async def _start(self) -> None:
        self.store = RedisStore.from_url(self._redis_url, key_prefix=self.prefix)
        self.engine = QuotaEngine(load_plans(), self.store, ManualClock(T0_MS))
        self.server, port = create_server(self._settings, self.engine)
        self.admin_server, admin_port = create_admin_server(self._settings, self.engine)
        await self.server.start()
        await self.admin_server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}")
        self.quota = quota_pb2_grpc.QuotaServiceStub(self.channel)
        self.admin = quota_pb2_grpc.QuotaAdminStub(self.admin_channel)
        self.redis = aioredis.from_url(self._redis_url)  # bytes: DUMP payloads are binary

    async def _stop(self) -> None:
        await self.channel.close()
        await self.admin_channel.close()
        await self.server.stop(None)
        await self.admin_server.stop(None)
        keys = [k async for k in self.redis.scan_iter(match=f"{self.prefix}:*", count=1000)]
        if keys:
            await self.redis.delete(*keys)
        await self.redis.aclose()
        await self.store.close()

    def close(self) -> None:
        try:
            self.run(self._stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(CALL_TIMEOUT_S)
            self.loop.close()

    async def _snapshot(self) -> dict[bytes, bytes]:
        """Every key under this test's prefix with its serialized value."""
        keys = sorted([k async for k in self.redis.scan_iter(match=f"{self.prefix}:*", count=1000)])
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.dump(k)
            values = await pipe.execute()
        return dict(zip(keys, values))

    def call(self, method: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, Any]:
        """Calls ``method``; a refusal must be a client error and must have written nothing."""
        async def go() -> tuple[grpc.StatusCode, Any, dict[bytes, bytes], dict[bytes, bytes]]:
            before = await self._snapshot()
            try:
                response = await method(request, timeout=CALL_TIMEOUT_S)
                code, answer = grpc.StatusCode.OK, response
            except grpc.aio.AioRpcError as err:
                code, answer = err.code(), err.details()
            return code, answer, before, await self._snapshot()

        code, answer, before, after = self.run(go)
        assert code is grpc.StatusCode.OK or code in CLIENT_ERRORS, f"{code.name}: {answer}"
        if code in REFUSED_UNHANDLED:
            assert after == before, f"{code.name} ({answer}) but Redis changed: {sorted(set(after) ^ set(before))}"
        return code, answer

    def assert_still_serving(self) -> None:
        rid = "after-" + uuid.uuid4().hex[:8]
        request = pb.CheckAndReserveRequest(account_id="still-serving", product="sora", reservation_id=rid,
                                            params=pb.JobParams(duration_seconds=10, resolution="720p"))
        response = self.run(lambda: self.quota.CheckAndReserve(request, timeout=CALL_TIMEOUT_S))
        assert (response.allowed, response.reservation_id) == (True, rid)
        self.run(lambda: self.quota.Release(pb.ReleaseRequest(account_id="still-serving", reservation_id=rid),
                                    timeout=CALL_TIMEOUT_S))


@pytest.fixture
def harness(redis_server: RedisServerProcess) -> Iterator[Harness]:
    h = Harness(redis_server.url)
    try:
        yield h
    finally:
        h.close()


def _assert_decision(response: pb.CheckAndReserveResponse) -> None:
    if response.allowed:
        assert response.funding != pb.FUNDING_UNSPECIFIED and not response.HasField("denial")
    else:
        assert response.denial.reason != pb.DENIAL_REASON_UNSPECIFIED


# -- QuotaService --------------------------------------------------------------

RESERVE_REQUESTS = st.builds(pb.CheckAndReserveRequest, account_id=IDS, product=PRODUCTS,
                             reservation_id=st.one_of(st.just(""), IDS), params=JOB_PARAMS, ttl_seconds=TTLS)


def test_fuzz_check_and_reserve(harness: Harness) -> None:
    @FUZZ
    @given(request=RESERVE_REQUESTS)
    @example(request=pb.CheckAndReserveRequest(account_id="a", product="sora", params=pb.JobParams(
        duration_seconds=5e-324, resolution="720p")))
    @example(request=pb.CheckAndReserveRequest(account_id="a", product="sora", params=pb.JobParams(
        duration_seconds=0.0004, resolution="720p")))
    def check(request: pb.CheckAndReserveRequest) -> None:
        code, answer = harness.call(harness.quota.CheckAndReserve, request)
        if code is grpc.StatusCode.OK:
            _assert_decision(answer)

    check()
    harness.assert_still_serving()


def _seed_reservations(harness: Harness) -> list[tuple[str, str]]:
    """(account, rid) in each state a reservation can be in, for the fuzzed calls to hit."""
    job = pb.JobParams(duration_seconds=10, resolution="720p")
    for rid in ("held", "committed", "released"):
        request = pb.CheckAndReserveRequest(account_id="acct", product="sora", reservation_id=rid, params=job,
                                            ttl_seconds=3600)
        assert harness.call(harness.quota.CheckAndReserve, request)[0] is grpc.StatusCode.OK
    harness.call(harness.quota.Commit, pb.CommitRequest(account_id="acct", reservation_id="committed"))
    harness.call(harness.quota.Release, pb.ReleaseRequest(account_id="acct", reservation_id="released"))
    return [("acct", rid) for rid in ("held", "committed", "released", "missing")]


def test_fuzz_commit_release_extend(harness: Harness) -> None:
    known = _seed_reservations(harness)
    targets = st.one_of(st.sampled_from(known), st.tuples(st.sampled_from(["acct"]), IDS), st.tuples(IDS, IDS))

    @FUZZ
    @given(target=targets, call=st.sampled_from(["commit", "commit_params", "release", "extend"]),
           params=JOB_PARAMS, ttl=TTLS)
    def check(target: tuple[str, str], call: str, params: pb.JobParams, ttl: int) -> None:
        account, rid = target
        if call == "commit":
            harness.call(harness.quota.Commit, pb.CommitRequest(account_id=account, reservation_id=rid))
        elif call == "commit_params":
            harness.call(harness.quota.Commit, pb.CommitRequest(account_id=account, reservation_id=rid, params=params))
        elif call == "release":
            harness.call(harness.quota.Release, pb.ReleaseRequest(account_id=account, reservation_id=rid))
        else:
            harness.call(harness.quota.ExtendReservation,
                         pb.ExtendReservationRequest(account_id=account, reservation_id=rid, ttl_seconds=ttl))

    check()
    harness.assert_still_serving()


def test_fuzz_get_balance(harness: Harness) -> None:
    @FUZZ
    @given(account=IDS)
    def check(account: str) -> None:
        code, answer = harness.call(harness.quota.GetBalance, pb.GetBalanceRequest(account_id=account))
        if code is grpc.StatusCode.OK:
            assert answer.account_id == account and answer.credit_balance >= 0

    check()
    harness.assert_still_serving()


# -- QuotaAdmin ----------------------------------------------------------------

GRANT_REQUESTS = st.builds(
    lambda account, credits, purchase, expires, source, reason: pb.GrantCreditsRequest(
        account_id=account, credits=credits, purchase_id=purchase, source=source, reason=reason,
        **({} if expires is None else {"expires_at": expires})),
    IDS, mostly(st.integers(1, 100), INT64), mostly(st.sampled_from(["p1", "p2", "p3"]), IDS),
    st.one_of(st.none(), TIMESTAMPS), mostly(st.integers(0, 4), st.integers(-(2**31), 2**31 - 1)),
    mostly(st.sampled_from(["", "order 17"]), TEXT))


def test_fuzz_grant_credits(harness: Harness) -> None:
    @FUZZ
    @given(request=GRANT_REQUESTS)
    def check(request: pb.GrantCreditsRequest) -> None:
        code, answer = harness.call(harness.admin.GrantCredits, request)
        if code is grpc.StatusCode.OK:
            assert answer.lot.lot_id == request.purchase_id and 1 <= answer.lot.credits_granted <= 10**9

    check()
    harness.assert_still_serving()


SET_ACCOUNT_REQUESTS = st.builds(
    lambda account, plan, zone, cap: pb.SetAccountRequest(
        account_id=account, plan=plan, time_zone=zone, **({} if cap is None else {"monthly_spend_cap_credits": cap})),
    IDS, mostly(st.sampled_from(["", "free", "plus", "pro"]),
                st.one_of(st.sampled_from(["platinum", "FREE"]), st.text(max_size=40))),
    ZONES, st.one_of(st.none(), mostly(st.integers(0, 1000), INT64)))


def test_fuzz_set_account(harness: Harness) -> None:
    @FUZZ
    @given(request=SET_ACCOUNT_REQUESTS)
    def check(request: pb.SetAccountRequest) -> None:
        code, answer = harness.call(harness.admin.SetAccount, request)
        if code is grpc.StatusCode.OK:
            assert answer.plan in ("free", "plus", "pro") and answer.time_zone

    check()
    # A valid reservation on an account whose zone the fuzzing may have changed still decides.
    harness.call(harness.quota.CheckAndReserve, pb.CheckAndReserveRequest(
        account_id="acct", product="sora", params=pb.JobParams(duration_seconds=10, resolution="720p")))
    harness.assert_still_serving()


# -- message size ----------------------------------------------------------------

@pytest.fixture
def small_harness(redis_server: RedisServerProcess) -> Iterator[Harness]:
    h = Harness(redis_server.url, max_message_bytes=16 * 1024)
    try:
        yield h
    finally:
        h.close()


def test_oversized_requests_are_refused_and_write_nothing(small_harness: Harness) -> None:
    h = small_harness
    big_extra = {f"k{i}": "v" * 200 for i in range(500)}  # ~100 KB
    oversized = [
        (h.quota.CheckAndReserve, pb.CheckAndReserveRequest(
            account_id="a", product="sora", reservation_id="big",
            params=pb.JobParams(duration_seconds=10, resolution="720p", extra=big_extra))),
        (h.quota.Commit, pb.CommitRequest(account_id="a", reservation_id="x" * 20_000)),
        (h.admin.GrantCredits, pb.GrantCreditsRequest(account_id="a", credits=5, purchase_id="p", reason="r" * 20_000)),
    ]
    for method, request in oversized:
        assert request.ByteSize() > 16 * 1024
        code, _ = h.call(method, request)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.run(h._snapshot) == {}
    # Just below the limit is still read (and refused or decided on its merits).
    code, _ = h.call(h.quota.CheckAndReserve, pb.CheckAndReserveRequest(
        account_id="a", product="sora", params=pb.JobParams(duration_seconds=10, resolution="720p",
                                                            extra={"k": "v" * 200})))
    assert code is grpc.StatusCode.OK
    h.assert_still_serving()
