"""Chaos: thousands of operations from many clients while the network and Redis misbehave.

The sidecar talks to its own redis-server through tests/fault_proxy.py, which
cuts, delays, half-closes, refuses and blackholes connections on a schedule,
and Redis is restarted twice (once gracefully, once with SIGKILL; appendfsync
always, so nothing acknowledged may be lost). Clients retry every call that
timed out or found Redis unavailable with the SAME ids, as docs/api.md says is
safe. Afterwards, with the faults off, the audit must find every account
clean, and what the clients were told must match what Redis kept.

The books too (tests/chaos_books.py): a shipper daemon reads the outbox through the same faulty
proxy and ships into a PostgreSQL of the test's own, which is stopped once and SIGKILLed once
(crash recovery) while the clients run; the decisions must go on meanwhile. At the end the outbox
is drained and the books must hold every movement exactly once (each account's seq 1..N), and the
audit across Redis and the books must be clean.

QUOTA_CHAOS_OPS scales the run (default 10,000 operations). The faults' schedule and the
clients' choices come from one seed, fixed by default and printed; QUOTA_CHAOS_SEED=<n> runs
another one. `pytest -s` shows the counters (a failure shows them anyway).

Nothing here depends on how fast the machine is: the clients stop after OPS operations (not
after some seconds), and the end waits for what it checks (bounded polling), never a computed
sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, cast

import grpc
import pytest
from chaos_books import drain_and_check, hang_watchdog, outage_problems, pg_chaos, running_shipper
from fault_proxy import FaultProxy
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc
from quota_sidecar.books.postgres_server import PostgresServerProcess
from quota_sidecar.domain.audit import format_report
from quota_sidecar.domain.clock import RedisClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import BooksUnavailable
from quota_sidecar.domain.model import JobParams
from quota_sidecar.domain.ports import Books
from quota_sidecar.domain.shipping import ShipCounts, Shipper, ShipperOptions
from quota_sidecar.server.app import create_admin_server, create_server
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.slow

OPS = int(os.environ.get("QUOTA_CHAOS_OPS", "10000"))
SEED = int(os.environ.get("QUOTA_CHAOS_SEED", "20261121"))
# The run takes ~35 s on a quiet 2-core machine; far past that it is hung, not slow.
HANG_BOUND_S = float(os.environ.get("QUOTA_CHAOS_HANG_BOUND_S", "420"))
_JITTER = random.Random(SEED)  # the retries' backoff jitter: from the seed too
ACCOUNTS = 60
PRO_ACCOUNTS = 6
CLIENTS = 48
CALL_DEADLINE_S = 0.3  # per attempt; Redis' own timeout (0.5 s) is longer, so both paths fire
ATTEMPTS = 8
CLEANUP_DEADLINE_S = 3.0
CLEANUP_ATTEMPTS = 5
# Far longer than the whole run, however loaded the machine: a job the clean-up resolves at
# the end never meets EXPIRED.
HOLD_TTL_S = 1800
ABANDON_TTLS_S = (1, 2)  # the minimum TTL; the end of the test waits them out (bounded)
SETTLE_S = 60.0  # bounds the end's waits; only a hold that never goes away reaches it
PURCHASES_PER_ACCOUNT = 6
RESTARTS = ((0.3, "graceful"), (0.65, "kill"))  # (share of ops done, how)
DECISIONS = ("CheckAndReserve", "Commit", "Release", "ExtendReservation")  # counted when answered
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# How a job ends if the client has its way, and how often.
ACTIONS = ("commit", "commit_smaller", "release", "extend_commit", "abandon", "balance")
ACTION_WEIGHTS = (35, 15, 20, 12, 12, 6)


def error_reason(err: grpc.aio.AioRpcError) -> str:
    """google.rpc.ErrorInfo.reason of an error, "" when it has none."""
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info.reason
    return ""


@dataclass
class Counters:
    ops: int = 0
    allowed: int = 0
    answered: int = 0  # decisions (DECISIONS) answered, at any attempt
    denied: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "Method CODE reason", every failed attempt
    retries: Counter[str] = field(default_factory=Counter)
    replays: Counter[str] = field(default_factory=Counter)  # replayed=True after a retried attempt
    inner_replays: Counter[str] = field(default_factory=Counter)  # replayed on attempt 1: redis-py retried inside
    already_on_retry: Counter[str] = field(default_factory=Counter)  # the first try had landed
    gave_up: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    cleanup: Counter[str] = field(default_factory=Counter)
    chaos: Counter[str] = field(default_factory=Counter)
    purchases: int = 0
    unexpected: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"ops {self.ops}, allowed {self.allowed}, purchases {self.purchases}, "
                 f"decisions answered {self.answered}"]
        for name in ("denied", "outcomes", "errors", "retries", "replays", "inner_replays", "already_on_retry",
                     "gave_up", "cleanup", "chaos"):
            values: Counter[str] = getattr(self, name)
            lines.append(f"  {name}: " + (", ".join(f"{k}={v}" for k, v in sorted(values.items())) or "-"))
        lines.append(f"  unexpected: {len(self.unexpected)}")
        lines += [f"    {u}" for u in self.unexpected[:20]]
        return "\n".join(lines)


@dataclass
class Job:
    """One reservation as its client saw it."""

    request: pb.CheckAndReserveRequest
    action: str
    allowed: bool | None = None  # None: no answer to CheckAndReserve (it may or may not have landed)
    final: str = ""  # "committed" / "released" / "abandoned" / "" while unknown to the client
    charged: int | None = None  # credits the client was told a commit charged
    actual: pb.JobParams | None = None  # Commit params, when smaller than reserved

    @property
    def account(self) -> str:
        return self.request.account_id

    @property
    def rid(self) -> str:
        return self.request.reservation_id


@dataclass
class Rig:
    redis: RedisServerProcess
    proxy: FaultProxy
    engine: QuotaEngine
    store: RedisStore  # through the proxy: the engine's, and the shipper's
    direct: RedisStore  # straight to Redis: the audit and the final reads
    quota: quota_pb2_grpc.QuotaServiceStub
    admin: quota_pb2_grpc.QuotaAdminStub
    accounts: list[str]
    granted: Counter[str] = field(default_factory=Counter)  # acknowledged grants, by account
    purchases: Counter[str] = field(default_factory=Counter)


@contextlib.asynccontextmanager
async def chaos_rig(redis_binary: str, data_dir: Path, key_prefix: str) -> AsyncIterator[Rig]:
    """Redis (appendfsync always) <- fault proxy <- store <- engine <- gRPC servers <- channels."""
    async with contextlib.AsyncExitStack() as stack:
        redis = RedisServerProcess(redis_binary, data_dir, appendfsync="always")
        redis.start()
        stack.callback(redis.stop)
        proxy = await FaultProxy("127.0.0.1", redis.port).start()
        stack.push_async_callback(proxy.aclose)
        store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0", timeout_seconds=0.5, key_prefix=key_prefix)
        stack.push_async_callback(store.close)
        direct = RedisStore.from_url(redis.url, timeout_seconds=5.0, key_prefix=key_prefix)
        stack.push_async_callback(direct.close)
        engine = QuotaEngine(load_plans(), store, RedisClock())
        settings = Settings(listen=("127.0.0.1:0",), admin_listen=("127.0.0.1:0",))
        ports = []
        for create in (create_server, create_admin_server):
            server, port = create(settings, engine)
            await server.start()
            stack.push_async_callback(server.stop, None)
            ports.append(port)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}")
        stack.push_async_callback(channel.close)
        admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}")
        stack.push_async_callback(admin_channel.close)
        yield Rig(redis=redis, proxy=proxy, engine=engine, store=store, direct=direct,
                  quota=quota_pb2_grpc.QuotaServiceStub(channel), admin=quota_pb2_grpc.QuotaAdminStub(admin_channel),
                  accounts=[f"chaos-{i:02d}" for i in range(ACCOUNTS)])


# -- calls with retries ----------------------------------------------------------------


@dataclass
class Reply:
    response: Any = None
    error: grpc.aio.AioRpcError | None = None  # the last error (non-retryable, or retries exhausted)
    attempts: int = 0

    @property
    def reason(self) -> str:
        return error_reason(self.error) if self.error is not None else ""


async def call(c: Counters, name: str, method: Callable[..., Awaitable[Any]], request: Any, *,
               attempts: int = ATTEMPTS, deadline_s: float = CALL_DEADLINE_S) -> Reply:
    """The call, retried with the same request on UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED."""
    reply = Reply()
    for attempt in range(1, attempts + 1):
        reply.attempts = attempt
        try:
            reply.response = await method(request, timeout=deadline_s)
            reply.error = None
            c.answered += name in DECISIONS
            return reply
        except grpc.aio.AioRpcError as err:
            reply.error = err
            c.errors[f"{name} {err.code().name} {error_reason(err)}".rstrip()] += 1
            if err.code() not in RETRYABLE:
                return reply
        if attempt < attempts:
            c.retries[name] += 1
            await asyncio.sleep(min(0.4, 0.02 * 2 ** attempt) * _JITTER.uniform(0.5, 1.0))
    c.gave_up[name] += 1
    return reply


async def call_until_done(c: Counters, name: str, method: Callable[..., Awaitable[Any]], request: Any, *,
                          budget_s: float = 120.0) -> Any:
    """For grants and account settings: billing retries with the same purchase id until it is done."""
    give_up_at = time.monotonic() + budget_s
    for _ in range(200):
        reply = await call(c, name, method, request)
        if reply.response is not None:
            return reply.response
        if reply.error is not None and reply.error.code() not in RETRYABLE:
            raise AssertionError(f"{name} {request} failed: {reply.error.code().name} {reply.reason}")
        if time.monotonic() > give_up_at:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} {request} never succeeded in {budget_s} s")


async def grant(rig: Rig, c: Counters, account: str, credits: int, purchase_id: str, **fields: Any) -> None:
    request = pb.GrantCreditsRequest(account_id=account, credits=credits, purchase_id=purchase_id, **fields)
    response = await call_until_done(c, "GrantCredits", rig.admin.GrantCredits, request)
    assert response.lot.credits_granted == credits
    rig.granted[account] += credits


async def set_up_accounts(rig: Rig, c: Counters) -> None:
    """A few pro accounts; most accounts get credits in one or two lots (one sooner-expiring promo)."""
    soon = timestamp_pb2.Timestamp()
    soon.FromMilliseconds(int(time.time() * 1000) + 3 * 86_400_000)

    async def one(i: int, account: str) -> None:
        if i < PRO_ACCOUNTS:
            await call_until_done(c, "SetAccount", rig.admin.SetAccount,
                                  pb.SetAccountRequest(account_id=account, plan="pro"))
        if i % 4:
            await grant(rig, c, account, 10 * (i % 4), f"{account}-initial")
        if i % 3 == 0:
            await grant(rig, c, account, 5, f"{account}-promo", source=pb.CREDIT_SOURCE_PROMO, expires_at=soon)

    await asyncio.gather(*(one(i, a) for i, a in enumerate(rig.accounts)))


# -- the clients ---------------------------------------------------------------------


def pick_job(rng: random.Random) -> tuple[str, pb.JobParams, pb.JobParams]:
    """Product, reserved params and smaller actual params (for commit_smaller)."""
    if rng.random() < 0.75:
        duration = rng.randint(5, 15)
        return ("sora", pb.JobParams(duration_seconds=duration, resolution="720p"),
                pb.JobParams(duration_seconds=rng.randint(1, duration), resolution="720p"))
    # Metered codex: an estimate of 1 to 4 credits of usage, a smaller actual usage.
    tokens = rng.randint(1, 3) * 60_000
    return ("codex", pb.JobParams(model="codex-mini", input_tokens=tokens),
            pb.JobParams(model="codex-mini", input_tokens=rng.randint(0, tokens)))


class Clients:
    def __init__(self, rig: Rig, c: Counters, seed: int) -> None:
        self.rig, self.c, self.seed = rig, c, seed
        self.jobs: list[Job] = []
        self.started = 0
        self.deadline_s = CALL_DEADLINE_S  # longer for the clean-up, once the faults are off

    async def run(self) -> None:
        await asyncio.gather(*(self._client(n) for n in range(CLIENTS)))

    async def _client(self, n: int) -> None:
        rng = random.Random(self.seed * 1000 + n)
        for k in range(OPS):  # every op is bounded (deadlines, ATTEMPTS): so is the run
            if self.started >= OPS:
                return
            self.started += 1
            await self._op(rng, f"c{n}-{k}")
            self.c.ops += 1

    async def _op(self, rng: random.Random, rid: str) -> None:
        account = rng.choice(self.rig.accounts)
        action = rng.choices(ACTIONS, ACTION_WEIGHTS)[0]
        if action == "balance":
            await self._check_balance(account)
            return
        product, params, smaller = pick_job(rng)
        ttl = rng.choice(ABANDON_TTLS_S) if action == "abandon" else HOLD_TTL_S
        job = Job(pb.CheckAndReserveRequest(account_id=account, product=product, reservation_id=rid, params=params,
                                            ttl_seconds=ttl), action,
                  actual=smaller if action == "commit_smaller" else None)
        self.jobs.append(job)
        reply = await call(self.c, "CheckAndReserve", self.rig.quota.CheckAndReserve, job.request)
        if reply.response is None and action == "abandon" and reply.attempts > 1 and reply.reason == "EXPIRED":
            # An earlier try held, with the shortest TTL, and the hold had expired by the time a
            # retry reached Redis (the retries of one call can outlast a 1 s TTL): the retry says
            # so, as it must. The job was allowed; its hold expired as an abandoned one does.
            self.c.already_on_retry["CheckAndReserve EXPIRED"] += 1
            job.allowed, job.final = True, "abandoned"
            self.c.outcomes["abandoned"] += 1
            return
        if reply.response is None:
            self._unexpected_error(job, "CheckAndReserve", reply)
            return
        self._note_replay("CheckAndReserve", reply)
        job.allowed = reply.response.allowed
        if not job.allowed:
            reason = pb.DenialReason.Name(reply.response.denial.reason)
            self.c.denied[reason] += 1
            if reason == "DENIAL_REASON_PURCHASE_REQUIRED" and rng.random() < 0.2:
                await self._buy(account)
            return
        self.c.allowed += 1
        if action == "abandon":
            job.final = "abandoned"
            self.c.outcomes["abandoned"] += 1
            return
        await self.resolve(job)

    async def resolve(self, job: Job) -> None:
        """Extend (for extend_commit), then Commit or Release, as the job's action says."""
        if job.action == "extend_commit":
            extend = pb.ExtendReservationRequest(account_id=job.account, reservation_id=job.rid, ttl_seconds=HOLD_TTL_S)
            reply = await call(self.c, "ExtendReservation", self.rig.quota.ExtendReservation, extend,
                              deadline_s=self.deadline_s)
            if reply.response is None:
                self._unexpected_error(job, "ExtendReservation", reply)
        if job.action == "release":
            name, method = "Release", self.rig.quota.Release
            request: Any = pb.ReleaseRequest(account_id=job.account, reservation_id=job.rid)
        else:
            name, method = "Commit", self.rig.quota.Commit
            request = pb.CommitRequest(account_id=job.account, reservation_id=job.rid, params=job.actual)
        reply = await call(self.c, name, method, request, deadline_s=self.deadline_s)
        self._settle(job, name, reply)

    def _settle(self, job: Job, name: str, reply: Reply) -> None:
        if reply.response is not None:
            self._note_replay(name, reply)
            job.final = "committed" if name == "Commit" else "released"
            job.charged = reply.response.credits_charged if name == "Commit" else None
            self.c.outcomes[job.final] += 1
            return
        reason = reply.reason
        if reply.attempts > 1 and reason in ("ALREADY_COMMITTED", "ALREADY_RELEASED"):
            # Only this client resolves this job: the timed-out first try had landed.
            self.c.already_on_retry[f"{name} {reason}"] += 1
            job.final = "committed" if reason == "ALREADY_COMMITTED" else "released"
            self.c.outcomes[job.final] += 1
            return
        self._unexpected_error(job, name, reply)

    def _unexpected_error(self, job: Job, name: str, reply: Reply) -> None:
        """Retries exhausted: left for the clean-up. Anything else should never happen here."""
        if reply.error is not None and reply.error.code() in RETRYABLE:
            self.c.outcomes[f"{name} unknown"] += 1
            return
        self.c.outcomes[f"{name} {reply.reason or reply.error.code().name}"] += 1  # type: ignore[union-attr]
        self.c.unexpected.append(f"{job.account}/{job.rid} {job.action}: {name} after {reply.attempts} "
                                 f"attempt(s): {reply.error.code().name} {reply.reason}")  # type: ignore[union-attr]

    def _note_replay(self, name: str, reply: Reply) -> None:
        if getattr(reply.response, "replayed", False):
            (self.c.replays if reply.attempts > 1 else self.c.inner_replays)[name] += 1

    async def _buy(self, account: str) -> None:
        if self.rig.purchases[account] >= PURCHASES_PER_ACCOUNT:
            return
        self.rig.purchases[account] += 1
        await grant(self.rig, self.c, account, 10, f"{account}-buy-{self.rig.purchases[account]}")
        self.c.purchases += 1

    async def _check_balance(self, account: str) -> None:
        reply = await call(self.c, "GetBalance", self.rig.quota.GetBalance, pb.GetBalanceRequest(account_id=account))
        if reply.response is None:
            return
        for a in reply.response.allowances:
            if a.free_used > a.free_limit:
                self.c.unexpected.append(f"{account}: {a.product} free {a.free_used}/{a.free_limit} during the run")


# -- chaos -------------------------------------------------------------------------


async def restart_redis(rig: Rig, c: Counters, how: str) -> None:
    # RedisServerProcess blocks (waits for the process, polls PING): off the event loop.
    await asyncio.to_thread(rig.redis.stop if how == "graceful" else rig.redis.kill)
    await asyncio.sleep(0.3)  # down for a moment: clients meet a dead Redis behind a live proxy
    await asyncio.to_thread(rig.redis.start)  # same port and AOF; returns once it answers PING
    await rig.direct.ping()
    c.chaos[f"restart_{how}"] += 1


async def one_fault(rig: Rig, c: Counters, rng: random.Random) -> None:
    fault = rng.choice(("cut", "delay", "half_close", "refuse", "blackhole"))
    c.chaos[fault] += 1
    if fault == "cut":
        await rig.proxy.cut()
    elif fault == "half_close":
        await rig.proxy.half_close()
    elif fault == "delay":
        await rig.proxy.delay(rng.uniform(50, 400))
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        await rig.proxy.delay(0)
    elif fault == "refuse":
        await rig.proxy.refuse(True)
        await rig.proxy.cut()  # else the pooled connections would never need a new one
        await asyncio.sleep(0.3)
        await rig.proxy.refuse(False)
    else:
        await rig.proxy.blackhole(True)
        await asyncio.sleep(0.3)
        await rig.proxy.blackhole(False)


async def chaos(rig: Rig, c: Counters, clients: Clients, done: asyncio.Event, seed: int) -> None:
    """A fault every 0.5-1 s, and the two Redis restarts once 30 % and 65 % of the ops are done."""
    rng = random.Random(seed)
    restarts = list(RESTARTS)
    while not done.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), rng.uniform(0.5, 1.0))
        if done.is_set():
            break
        if restarts and clients.started >= restarts[0][0] * OPS:
            await restart_redis(rig, c, restarts.pop(0)[1])
        else:
            await one_fault(rig, c, rng)
    # Whatever was interrupted: everything flows again.
    await rig.proxy.delay(0)
    await rig.proxy.refuse(False)
    await rig.proxy.blackhole(False)
    # A tiny QUOTA_CHAOS_OPS can finish first: the restarts still happen (over idle data).
    for _, how in restarts:
        await restart_redis(rig, c, how)


# -- after the chaos -----------------------------------------------------------------


async def all_records(rig: Rig) -> dict[tuple[str, str], dict[str, Any]]:
    """Every reservation record, by (account, reservation id), read straight from Redis."""
    records = {}
    for account in rig.accounts:
        for rid, raw in (await rig.direct.raw_state(account))["res"].items():
            records[(account, rid)] = json.loads(raw)
    return records


async def clean_up(rig: Rig, c: Counters, clients: Clients) -> None:
    """Faults off: finish what the clients gave up on, with the same ids (always safe)."""
    clients.deadline_s = CLEANUP_DEADLINE_S
    limit = asyncio.Semaphore(16)

    async def finish(job: Job) -> None:
        async with limit:
            if job.allowed is None:
                reply = await call(c, "CheckAndReserve", rig.quota.CheckAndReserve, job.request,
                                   attempts=CLEANUP_ATTEMPTS, deadline_s=CLEANUP_DEADLINE_S)
                if reply.response is None:
                    c.unexpected.append(f"{job.account}/{job.rid}: clean-up reserve failed: {reply.error}")
                    return
                job.allowed = reply.response.allowed
                c.cleanup["reserve " + ("replayed" if reply.response.replayed else
                                        "new" if job.allowed else "denied")] += 1
                job.action = "release"  # the job never ran: give the hold back
            if job.allowed and not job.final:
                job.action = "release" if job.action == "release" else "commit"
                await clients.resolve(job)
                c.cleanup[f"{job.action} -> {job.final or 'unknown'}"] += 1

    await asyncio.gather(*(finish(j) for j in clients.jobs if j.action != "abandon"))
    await release_orphans(rig, c, clients)


async def release_orphans(rig: Rig, c: Counters, clients: Clients) -> None:
    """A first try held up in the proxy can reach Redis after its retry was DENIED and hold then
    (at-least-once delivery; the client never learns of it). Such a hold lives its TTL; release it."""
    jobs = {(j.account, j.rid): j for j in clients.jobs}
    held = [key for key, record in (await all_records(rig)).items() if record.get("s") == "held"]
    for account, rid in held:
        job = jobs.get((account, rid))
        if job is not None and job.action == "abandon":
            continue  # short TTL: the sweep below settles it
        seen_as = "unknown" if job is None else "denied" if job.allowed is False else job.final or "unresolved"
        c.cleanup[f"orphan hold of a job seen as {seen_as}"] += 1
        reply = await call(c, "Release", rig.quota.Release, pb.ReleaseRequest(account_id=account, reservation_id=rid),
                           attempts=CLEANUP_ATTEMPTS, deadline_s=CLEANUP_DEADLINE_S)
        if reply.response is None:
            c.unexpected.append(f"{account}/{rid}: releasing an orphan hold: {reply.reason}")
        elif job is not None:
            job.final = "released"


async def expire_abandoned(rig: Rig, c: Counters, clients: Clients) -> None:
    """The abandoned jobs' holds (TTL 1-2 s from when Redis took them): sweep until none is held
    any more, polling what Redis says (no waiting for real TTLs, no guessing how long to wait).
    Bounded: a hold still there after SETTLE_S is reported by the checks that follow."""
    abandoned = {(j.account, j.rid) for j in clients.jobs if j.action == "abandon"}
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + SETTLE_S
    while True:
        c.cleanup["swept holds"] += await rig.engine.sweep()
        held = [key for key, record in (await all_records(rig)).items()
                if record.get("s") == "held" and key in abandoned]
        if not held or loop.time() > give_up_at:
            return
        await asyncio.sleep(0.2)


async def account_problems(rig: Rig, c: Counters, account: str) -> list[str]:
    """What GetAccount says: free use within the limits, credits conserved, nothing held, grants all there."""
    a = await call_until_done(c, "GetAccount", rig.admin.GetAccount, pb.GetAccountRequest(account_id=account))
    problems = [f"{account}: {x.product} free used {x.free_used} > limit {x.free_limit}"
                for x in a.balance.allowances if x.free_used > x.free_limit]
    t = a.totals
    if t.granted + t.refunded != t.available + t.held + t.spent + t.expired + t.revoked:
        problems.append(f"{account}: credits not conserved: {t}")
    if min(t.granted, t.spent, t.expired, t.revoked, t.refunded, t.held, t.available) < 0:
        problems.append(f"{account}: a negative total: {t}")
    if t.granted != rig.granted[account]:
        problems.append(f"{account}: {t.granted} credits granted, the clients were told {rig.granted[account]}")
    if t.held or a.balance.holds:
        problems.append(f"{account}: still {t.held} credits / {len(a.balance.holds)} hold(s) held at the end")
    return problems


def job_problems(jobs: list[Job], records: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """What each client was told against the record Redis kept (appendfsync always: nothing acknowledged lost)."""
    problems = []
    expected_state = {"committed": "committed", "released": "released", "abandoned": "expired"}
    for job in jobs:
        record = records.get((job.account, job.rid))
        where = f"{job.account}/{job.rid} ({job.action}, told {job.final or 'nothing'})"
        if job.allowed and record is None:
            problems.append(f"{where}: an acknowledged hold has no record")
            continue
        if record is None:
            continue
        want = expected_state.get(job.final)
        if want and record.get("s") != want:
            problems.append(f"{where}: Redis says {record.get('s')}")
        if job.final == "committed" and job.charged is not None and record.get("ch") != job.charged:
            problems.append(f"{where}: charged {record.get('ch')} but the client was told {job.charged}")
        if record.get("s") == "held":
            problems.append(f"{where}: still held after the clean-up and the sweep")
    return problems


async def holds_past_ttl(rig: Rig) -> list[str]:
    now_ms = int(time.time() * 1000)
    late = []
    for account in rig.accounts:
        for rid, expires_ms in (await rig.direct.raw_state(account))["holds"]:
            if expires_ms <= now_ms:
                late.append(f"{account}/{rid} expired at {int(expires_ms)}, now {now_ms}")
    return late


async def test_chaos_run_leaves_every_account_clean(redis_binary: str, tmp_path: Path, key_prefix: str,
                                                    postgres_server: PostgresServerProcess) -> None:
    """Once, on the newest redis-server (or the pinned one): the run is long."""
    seed = SEED
    print(f"\nchaos run: seed {seed} (QUOTA_CHAOS_SEED={seed} makes the same choices), {OPS} ops, "
          f"redis {redis_binary}, {postgres_server.describe()}")
    c = Counters()
    started = time.monotonic()
    async with hang_watchdog(HANG_BOUND_S), chaos_rig(redis_binary, tmp_path / "redis", key_prefix) as rig, \
            running_shipper(postgres_server, rig.store) as books:
        await set_up_accounts(rig, c)
        clients, done = Clients(rig, c, seed), asyncio.Event()
        chaos_task = asyncio.create_task(chaos(rig, c, clients, done, seed))
        pg_task = asyncio.create_task(pg_chaos(books, rig.direct, ops=OPS, started=lambda: clients.started,
                                               answered=lambda: c.answered, clients_done=done, bound_s=SETTLE_S,
                                               chaos=c.chaos))
        try:
            await clients.run()
        finally:
            done.set()
            for failure in await asyncio.gather(chaos_task, pg_task, return_exceptions=True):
                if isinstance(failure, BaseException):
                    raise failure
        client_phase_s = time.monotonic() - started
        # Faults off: what the proxy still held back (a delay, a blackhole) reaches Redis first.
        await rig.proxy.wait_for(lambda s: s.bytes_held == 0, timeout=SETTLE_S)
        await clean_up(rig, c, clients)
        await expire_abandoned(rig, c, clients)
        late = await holds_past_ttl(rig)
        # The shipper stops; a drain ships the rest; the books and the audit across both stores.
        end = await drain_and_check(books, rig.direct)
        audits = end.audits
        problems = job_problems(clients.jobs, await all_records(rig))
        for account in rig.accounts:
            problems += await account_problems(rig, c, account)
        stats = rig.proxy.stats
    print(f"chaos run (seed {seed}): {time.monotonic() - started:.1f} s ({client_phase_s:.1f} s of clients)\n"
          f"{c.report()}\n  proxy: {stats}\n{books.report()}\n  books: {end.rows} entries")
    where = f"[chaos seed {seed}] "
    assert not [a for a in audits if a.violations], where + format_report(audits)
    assert len(audits) >= min(ACCOUNTS, OPS // 100), f"{where}only {len(audits)} accounts audited"
    assert not late, where + "holds left past their TTL:\n" + "\n".join(late[:20])
    assert not c.unexpected, where + "\n".join(c.unexpected[:30])
    assert not problems, where + "\n".join(problems[:30])
    assert c.ops == OPS, f"{where}{c.ops} of {OPS} operations"
    assert (c.chaos["restart_graceful"], c.chaos["restart_kill"]) == (1, 1), where + str(c.chaos)
    # The books: exactly once, the outbox empty, and decisions never waited for PostgreSQL.
    assert not end.problems, where + "\n".join(end.problems[:30]) + "\n" + books.report()
    assert not (bad := outage_problems(books.outages, OPS)), where + "\n".join(bad) + "\n" + books.report()
    assert not [e for e in c.errors if "BOOKS" in e], where + f"a decision failed on the books: {c.errors}"
    assert books.watch.inserted > 0, where + "the shipper shipped nothing during the run\n" + books.report()


class BooksDownOnce:
    """The books, away for the shipper's first append (PostgreSQL restarting), there afterwards."""

    def __init__(self, books: Any) -> None:
        self.books, self.appends = books, 0

    def __getattr__(self, name: str) -> Any:  # migrate, and whatever else the shipper asks the books
        return getattr(self.books, name)

    async def append(self, entries: Any) -> Any:
        self.appends += 1
        if self.appends == 1:
            raise BooksUnavailable("books unavailable (append): the database system is shutting down")
        return await self.books.append(entries)


async def test_a_shipper_keeps_its_lease_through_a_failed_pass(store: RedisStore, books: Any) -> None:
    """Found with the chaos run's shipper: a failed pass (PostgreSQL or Redis away) made the daemon forget
    its lease, and SET NX then refused it its own lease until that lapsed (lease_ttl_ms, 15 s by
    default), so it stood by, shipping nothing, after every outage. No timing here: the passes run
    back to back (no sleep), and the second must ship what the first could not."""
    engine = QuotaEngine(load_plans(), store, RedisClock())
    await engine.grant("lease-1", 10, "lease-1-p1")
    await engine.check_and_reserve("lease-1", "sora", "lease-r1", JobParams(duration_seconds=5, resolution="720p"))
    queued = (await store.outbox_stats()).entries
    assert queued > 0
    stop, passes = asyncio.Event(), []

    def on_pass(counts: ShipCounts, stats: Any, failed: bool) -> None:
        passes.append((counts.inserted, failed))
        if len(passes) == 2:
            stop.set()

    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0)

    shipper = Shipper(store, cast(Books, BooksDownOnce(books)), RedisClock(), owner="only-shipper",
                      options=ShipperOptions(lease_ttl_ms=600_000), on_pass=on_pass, sleep=no_sleep)
    await asyncio.wait_for(shipper.run(stop), SETTLE_S)
    assert passes == [(0, True), (queued, False)]
    assert (await store.outbox_stats()).entries == 0


async def test_the_hang_watchdog_fails_a_hung_run_beside_grpc_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    """The watchdog printed each task with Task.print_stack, which raises TypeError on the tasks of
    grpc's server (Cython coroutines, frames without a line): the printing stopped at the first one,
    the run was never cancelled and a hang stalled the suite instead of failing with its stacks."""
    server = grpc.aio.server()
    server.add_insecure_port("127.0.0.1:0")
    await server.start()  # its tasks wait for calls: Cython coroutines
    try:
        with pytest.raises(AssertionError, match="hung"):
            async with hang_watchdog(0.2):
                await asyncio.wait_for(asyncio.Event().wait(), 30.0)  # a hang, bounded for a broken watchdog
    finally:
        await server.stop(None)
    stderr = capsys.readouterr().err
    assert "test_the_hang_watchdog_fails_a_hung_run_beside_grpc_tasks" in stderr, stderr
    assert "wait_for" in stderr and "no chain" not in stderr, stderr
