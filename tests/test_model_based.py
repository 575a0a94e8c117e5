"""The engine against the reference model (tests/reference_model.py), step by step.

A hypothesis RuleBasedStateMachine drives a real QuotaEngine on the session's
Redis (a fresh key prefix per run, a ManualClock that only the machine moves)
and the pure-Python model with the same calls: sora jobs and metered codex
jobs (estimates of a few credits to a few dozen, or none: the default hold)
on the packaged plans free, plus and pro, commits below, at and above the
estimate (included usage taking the actual; credits drawn past the hold,
debt up to the plan's bound, the rest written off), releases, extensions,
grants (paying debt first), time moving to window and expiry edges. Quotes
are among them: the model's is its reserve, forgotten, so a quote that
disagrees with the decision it announces, or leaves anything held, fails the
comparison. After every step the two must give the same answer (decision,
funding, denial, amounts, every window's use, debt, drawn / written-off
credits, balances, replay flags, error class and reason), and the touched
account's balance (sora's and codex's windows, lots, holds, debt) must agree.

Hypothesis stateful tests are synchronous: each machine owns a private event
loop and runs every engine call to completion on it.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test
from reference_model import (
    BalanceView,
    CommitReply,
    GrantReply,
    ReferenceModel,
    Refused,
    ReleaseReply,
    ReserveReply,
    Task,
    Video,
    product_of,
)

from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import QuotaError
from quota_sidecar.domain.model import CreditSource, Decision, JobParams
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

T = TypeVar("T")

# Saturday 2026-11-21 18:00 UTC: the first UTC midnight is six hours away.
START_MS = int(datetime(2026, 11, 21, 18, 0, tzinfo=timezone.utc).timestamp() * 1000)
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
# Longer than any run can reach (40 steps of at most 30 days): the model never forgets a reservation.
RETENTION_MS = 3650 * DAY_MS
ACCOUNTS = ("acct-a", "acct-b", "acct-c")
RESOLUTIONS = ("720p", "1080p")
# Whole seconds plus a few that straddle a 10-second step or a plan's longest video.
DURATIONS = st.one_of(st.integers(1, 30), st.sampled_from([0.5, 9.999, 10.001, 10.5, 15.001, 20.001, 25.001]))
VIDEOS = st.builds(Video, DURATIONS, st.sampled_from(RESOLUTIONS))
TOKENS_PER_CREDIT = 16_000  # model codex: 62.5 credits per 1M input tokens


def _tokens(credits: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Input tokens worth `credits`, or a token either side (one more costs a credit more)."""
    return st.tuples(credits, st.sampled_from((0, 0, 0, -1, 1))).map(
        lambda c: max(0, c[0] * TOKENS_PER_CREDIT + c[1]))


# 0 tokens: the default hold (5 credits). Past 10 the free plan's 5-hour window cannot hold it.
ESTIMATES = _tokens(st.one_of(st.just(0), st.integers(1, 12), st.integers(13, 60)))
TASKS = st.builds(Task, ESTIMATES, st.sampled_from((False, False, False, True)))
JOBS = st.one_of(VIDEOS, TASKS, TASKS)
TTLS = st.one_of(st.just(0), st.integers(1, 3600))
# Shared expiries make ties in the spending order likely (then promo first, then lot id).
LOT_LIFETIMES = st.one_of(st.sampled_from([HOUR_MS, DAY_MS, 30 * DAY_MS]), st.integers(HOUR_MS, 30 * DAY_MS))
SOURCES = {"purchase": CreditSource.PURCHASE, "promo": CreditSource.PROMO}
# Small lots make a job's credits span several lots (the order they are taken and given back in);
# large ones fund codex jobs of a few dozen credits.
LOTS = st.tuples(st.one_of(st.integers(1, 3), st.integers(1, 20), st.integers(20, 100)), LOT_LIFETIMES,
                 st.sampled_from(sorted(SOURCES)))
STEPS = st.one_of(st.integers(1, 999), st.integers(1, 3600).map(lambda s: s * 1000),
                  st.integers(1, 48).map(lambda h: h * HOUR_MS), st.integers(1, 3).map(lambda d: d * DAY_MS))

MACHINE_SETTINGS = settings(max_examples=25, stateful_step_count=40, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _reserve_reply(d: Decision) -> ReserveReply:
    o = d.outcome
    return ReserveReply(allowed=o.allowed, plan=o.plan, funding=o.funding.value if o.funding else None,
                        denial=o.denial.value if o.denial else None, cost_credits=o.cost_credits,
                        credits_held=o.credits_held, credits_short=o.credits_short, free_used=o.free_used,
                        free_limit=o.free_limit, free_resets_ms=o.free_resets_ms, credit_balance=o.credit_balance,
                        expires_ms=o.expires_ms, replayed=o.replayed, limits=_limits(o.limits),
                        debt_credits=o.debt_credits)


def _limits(statuses: Any) -> tuple[tuple[str, int, int, int], ...]:
    return tuple((s.limit.limit_id, s.used, s.limit.free, s.resets_ms) for s in statuses)


def job_params(job: Video | Task) -> JobParams:
    if isinstance(job, Video):
        return JobParams(duration_seconds=job.duration, resolution=job.resolution)
    return JobParams(model="codex", input_tokens=job.input_tokens, fast=job.fast)


class QuotaMachine(RuleBasedStateMachine):
    def __init__(self, redis_url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.prefix = "mb" + uuid.uuid4().hex[:12]
        self.store = RedisStore.from_url(redis_url, key_prefix=self.prefix, retention_ms=RETENTION_MS)
        self.clock = ManualClock(START_MS)
        self.engine = QuotaEngine(load_plans(), self.store, self.clock)
        self.model = ReferenceModel(START_MS)
        # Every id the machine used, so rules can retry them (denied ones included).
        self.rids: dict[str, dict[str, tuple[Video | Task, int]]] = {a: {} for a in ACCOUNTS}
        self.lot_ids: dict[str, dict[str, int]] = {a: {} for a in ACCOUNTS}
        self.serial = 0

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self._drop_keys())
            self.loop.run_until_complete(self.store.close())
        finally:
            self.loop.close()

    async def _drop_keys(self) -> None:
        client = self.store._client
        keys = [k async for k in client.scan_iter(match=f"{self.prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)

    def _new_id(self, kind: str) -> str:
        self.serial += 1
        return f"{kind}{self.serial}"

    def _both(self, engine_call: Callable[[], Awaitable[T]], convert: Callable[[T], Any],
              model_call: Callable[[], Any]) -> Any:
        """Runs the same call on both sides; answers (or refusals) must be equal."""
        try:
            got: Any = convert(self.loop.run_until_complete(engine_call()))
        except QuotaError as exc:
            got = ("refused", type(exc).__name__, exc.reason)
        try:
            want = model_call()
        except Refused as refused:
            want = ("refused", refused.kind, refused.reason)
        assert got == want, f"engine {got!r} != model {want!r} at now={self.clock.now_ms}"
        return got

    def _check_balance(self, account: str) -> None:
        def view(b: Any) -> BalanceView:
            sora = next(a for a in b.allowances if a.product == "sora")
            codex = next(a for a in b.allowances if a.product == "codex")
            return BalanceView(plan=b.plan, free_used=sora.free_used, free_limit=sora.free_limit,
                               free_resets_ms=sora.free_resets_ms,
                               codex=(codex.free_used, codex.free_limit, codex.free_resets_ms, _limits(codex.limits)),
                               credit_balance=b.credit_balance, debt_credits=b.debt_credits,
                               lots=tuple((x.lot_id, x.credits_left, x.expires_ms) for x in b.lots),
                               holds=tuple(sorted((h.reservation_id, h.product, h.funding.value, h.credits_held,
                                                   h.expires_ms) for h in b.holds)))

        self._both(lambda: self.engine.balance(account), view, lambda: self.model.balance(account))

    def _pick_reservation(self, data: st.DataObject) -> tuple[str, str]:
        """(account, rid): mostly a running hold, else any id used so far, sometimes one never used."""
        held = [(a, rid) for a in ACCOUNTS for rid in self.model.live_holds(a)]
        used = [(a, rid) for a in ACCOUNTS for rid in sorted(self.rids[a])]
        choice = data.draw(st.integers(0, 9), label="which id")
        if held and choice < 6:
            return data.draw(st.sampled_from(held), label="held")
        if used and choice < 9:
            return data.draw(st.sampled_from(used), label="used")
        return data.draw(st.sampled_from(ACCOUNTS), label="account"), self._new_id("r")

    def _reserve(self, account: str, rid: str, job: Video | Task, ttl: int) -> ReserveReply | None:
        """Both reserve; the decision when they agree on one (None: both refused)."""
        got = self._both(lambda: self.engine.check_and_reserve(account, product_of(job), rid, job_params(job), ttl),
                         lambda d: (d.reservation_id, _reserve_reply(d)),
                         lambda: (rid, self.model.reserve(account, rid, job, ttl)))
        return None if got[0] == "refused" else got[1]

    def _commit(self, account: str, rid: str, actual: Video | Task | None = None) -> None:
        job = None if actual is None else job_params(actual)
        self._both(lambda: self.engine.commit(account, rid, job),
                   lambda r: CommitReply(r.funding.value, r.credits_charged, r.credits_refunded, r.free_charged,
                                         r.credit_balance, r.replayed, r.credits_drawn, r.debt_credits,
                                         r.written_off),
                   lambda: self.model.commit(account, rid, actual))

    def _use_up_free(self, account: str) -> None:
        """Free 10 s jobs, each committed, until today's allowance (30 or 100) is gone: without this
        a run would hardly ever reach credits. Their ids are not offered to later rules."""
        for _ in range(101):
            today = self.model.balance(account)
            if today.free_used >= today.free_limit:
                return
            rid = self._new_id("f")
            decision = self._reserve(account, rid, Video(10, "720p"), 0)
            if decision is None or not decision.allowed:  # open debt denies free jobs too
                return
            self._commit(account, rid)

    def _use_up_included_usage(self, account: str, above: int) -> None:
        """One codex job the size of the tightest window's room, committed at ``above`` credits
        more: the windows full (or past full), so later jobs go to credits."""
        room = self.model.codex_room(account)
        if room:
            rid = self._new_id("u")
            decision = self._reserve(account, rid, Task(room * TOKENS_PER_CREDIT), 0)
            if decision is not None and decision.allowed:
                self._commit(account, rid, Task((room + above) * TOKENS_PER_CREDIT))

    # -- rules --------------------------------------------------------------

    @initialize(spent=st.lists(st.sampled_from(ACCOUNTS), unique=True, max_size=len(ACCOUNTS)),
                funded=st.lists(st.tuples(st.sampled_from(ACCOUNTS), st.integers(10, 80)), max_size=len(ACCOUNTS)))
    def start(self, spent: list[str], funded: list[tuple[str, int]]) -> None:
        """Some accounts' free sora jobs used up, some credits to start with (codex jobs too large
        for the windows need them, and debt needs credit-funded jobs)."""
        for account in spent:
            self._use_up_free(account)
        for account, credits in funded:
            lot_id, expires_ms = self._new_id("p"), self.clock.now_ms + 30 * DAY_MS
            self.lot_ids[account][lot_id] = credits
            self._both(lambda: self.engine.grant(account, credits, lot_id, expires_ms), lambda r: r.credit_balance,
                       lambda: self.model.grant(account, lot_id, credits, expires_ms, "purchase").credit_balance)

    @rule(account=st.sampled_from(ACCOUNTS), job=JOBS, ttl=TTLS)
    def reserve(self, account: str, job: Video | Task, ttl: int) -> None:
        rid = self._new_id("r")
        self.rids[account][rid] = (job, ttl)
        self._reserve(account, rid, job, ttl)
        self._check_balance(account)

    @precondition(lambda self: any(self.rids.values()))
    @rule(data=st.data(), same=st.booleans(), job=JOBS, ttl=TTLS)
    def reserve_again(self, data: st.DataObject, same: bool, job: Video | Task, ttl: int) -> None:
        """A retry of a used id: with its recorded parameters (a replay, or a new decision when it
        was denied), or with other ones (a conflict, unless it was denied)."""
        account, rid = data.draw(st.sampled_from([(a, r) for a in ACCOUNTS for r in sorted(self.rids[a])]))
        if same:
            job, ttl = self.model.params_of(account, rid) or self.rids[account][rid]
        self._reserve(account, rid, job, ttl)
        self._check_balance(account)

    @rule(data=st.data(), account=st.sampled_from(ACCOUNTS), job=JOBS, ttl=TTLS)
    def quote(self, data: st.DataObject, account: str, job: Video | Task, ttl: int) -> None:
        """A quote of a new job (no id), or of a used id with its own parameters or others: what
        reserve would answer, and nothing held afterwards (the balance check sees every hold)."""
        rid, used = "", sorted(self.rids[account])
        if used and data.draw(st.sampled_from((False, True)), label="quote a used id"):
            rid = data.draw(st.sampled_from(used), label="rid")
            if data.draw(st.booleans(), label="same parameters"):
                job, ttl = self.model.params_of(account, rid) or self.rids[account][rid]
        self._both(lambda: self.engine.quote(account, product_of(job), rid, job_params(job), ttl),
                   lambda d: (d.reservation_id, _reserve_reply(d)),
                   lambda: (rid, self.model.quote(account, rid, job, ttl)))
        self._check_balance(account)

    @rule(account=st.sampled_from(ACCOUNTS))
    def use_up_free_allowance(self, account: str) -> None:
        self._use_up_free(account)
        self._check_balance(account)

    @rule(account=st.sampled_from(ACCOUNTS), above=st.sampled_from((0, 0, 1, 30)))
    def use_up_included_usage(self, account: str, above: int) -> None:
        self._use_up_included_usage(account, above)
        self._check_balance(account)

    def _actual(self, data: st.DataObject, account: str, rid: str) -> Video | Task | None:
        """None (charge the hold), or the actual job of the reservation's product: for codex usage
        below, at or above the estimate (far above: past the lots and the debt bound)."""
        if data.draw(st.integers(0, 3), label="actual params") == 0:
            return None
        # The model's parameters of the reservation first: a retry under a used id may have made
        # a new reservation with other ones than the machine first recorded.
        known = self.model.params_of(account, rid) or self.rids[account].get(rid)
        job = known[0] if known else data.draw(JOBS, label="job")
        if isinstance(job, Video):
            return data.draw(VIDEOS, label="actual video")
        estimate = job.input_tokens // TOKENS_PER_CREDIT or 5
        credits = data.draw(st.one_of(st.integers(0, estimate), st.just(estimate),
                                      st.integers(estimate + 1, estimate + 10),
                                      st.integers(estimate + 11, estimate + 150)), label="actual credits")
        return Task(data.draw(_tokens(st.just(credits)), label="tokens"), job.fast)

    @rule(data=st.data(), account=st.sampled_from(ACCOUNTS), job=TASKS, ttl=TTLS, retry=st.booleans())
    def codex_job(self, data: st.DataObject, account: str, job: Task, ttl: int, retry: bool) -> None:
        """A codex job from reserve to commit (usage below, at or above its estimate), and often
        the commit's retry: the hold is not left to the other rules to find."""
        rid = self._new_id("r")
        self.rids[account][rid] = (job, ttl)
        self._reserve(account, rid, job, ttl)
        actual = self._actual(data, account, rid)
        self._commit(account, rid, actual)
        if retry:
            self._commit(account, rid, actual)
        self._check_balance(account)

    @rule(data=st.data(), retry=st.booleans())
    def commit(self, data: st.DataObject, retry: bool) -> None:
        """A commit, and often its retry with the same usage (a replay) right away."""
        account, rid = self._pick_reservation(data)
        actual = self._actual(data, account, rid)
        self._commit(account, rid, actual)
        if retry:
            self._commit(account, rid, actual)
        self._check_balance(account)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        account, rid = self._pick_reservation(data)
        self._both(lambda: self.engine.release(account, rid),
                   lambda r: ReleaseReply(r.funding.value, r.credits_refunded, r.free_refunded, r.credit_balance,
                                          r.replayed),
                   lambda: self.model.release(account, rid))
        self._check_balance(account)

    @rule(data=st.data(), ttl=st.one_of(st.just(0), st.integers(1, 3600), st.integers(3601, 86_400)))
    def extend(self, data: st.DataObject, ttl: int) -> None:
        account, rid = self._pick_reservation(data)
        self._both(lambda: self.engine.extend(account, rid, ttl), lambda ms: ms,
                   lambda: self.model.extend(account, rid, ttl))
        self._check_balance(account)

    @rule(data=st.data(), account=st.sampled_from(ACCOUNTS), lots=st.lists(LOTS, min_size=1, max_size=3))
    def grant(self, data: st.DataObject, account: str, lots: list[tuple[int, int, str]]) -> None:
        """One to three grants at the same instant (so equal expiries, and the tie rules, are common)."""
        granted = self.lot_ids[account]
        for credits, lifetime_ms, source in lots:
            lot_id = self._new_id("p")
            if granted and data.draw(st.integers(0, 3), label="retry a purchase") == 0:
                lot_id = data.draw(st.sampled_from(sorted(granted)), label="lot id")
                if data.draw(st.booleans(), label="same credits"):
                    credits = granted[lot_id]
            granted.setdefault(lot_id, credits)
            expires_ms = self.clock.now_ms + lifetime_ms
            self._both(lambda: self.engine.grant(account, credits, lot_id, expires_ms, source=SOURCES[source]),
                       lambda r: GrantReply(r.lot.lot_id, r.lot.credits_granted, r.lot.credits_left,
                                            r.lot.expires_ms, r.lot.granted_ms, r.lot.source.value,
                                            r.credit_balance, r.replayed, r.debt_paid_credits),
                       lambda: self.model.grant(account, lot_id, credits, expires_ms, source))
        self._check_balance(account)

    @rule(account=st.sampled_from(ACCOUNTS), plan=st.sampled_from(["free", "plus", "pro"]))
    def set_plan(self, account: str, plan: str) -> None:
        self._both(lambda: self.engine.set_account(account, plan=plan), lambda r: (r.plan, r.time_zone),
                   lambda: (self.model.set_plan(account, plan), "UTC"))
        self._check_balance(account)

    # Time moves only here. Each may then look at one account; the others are left for the
    # engine to settle lazily, so the next call on them meets holds and lots past their end.

    @rule(step_ms=STEPS, look_at=st.sampled_from((None, *ACCOUNTS)))
    def advance(self, step_ms: int, look_at: str | None) -> None:
        self._advance_to(self.clock.now_ms + step_ms, look_at)

    @rule(offset_ms=st.integers(-1, 1), look_at=st.sampled_from((None, *ACCOUNTS)))
    def advance_to_midnight(self, offset_ms: int, look_at: str | None) -> None:
        """To just before, at or just after the next UTC midnight (the free window's edge)."""
        self._advance_to((self.clock.now_ms // DAY_MS + 1) * DAY_MS + offset_ms, look_at)

    @precondition(lambda self: bool(self.model.expiries()))
    @rule(data=st.data(), offset_ms=st.integers(-1, 1), look=st.booleans())
    def advance_to_an_expiry(self, data: st.DataObject, offset_ms: int, look: bool) -> None:
        """To the edge of a hold's TTL, a lot's life or a rolling use's 5 hours (all end at now >= end)."""
        expires_ms, account = data.draw(st.sampled_from(self.model.expiries()), label="expiry")
        self._advance_to(expires_ms + offset_ms, account if look else None)

    def _advance_to(self, target_ms: int, look_at: str | None) -> None:
        step = max(target_ms - self.clock.now_ms, 0)
        self.clock.advance(ms=step)
        self.model.advance(step)
        if look_at is not None:
            self._check_balance(look_at)


@pytest.mark.slow
def test_engine_matches_the_reference_model(redis_server: RedisServerProcess) -> None:
    url = redis_server.url

    class Machine(QuotaMachine):
        def __init__(self) -> None:
            super().__init__(url)

    run_state_machine_as_test(Machine, settings=MACHINE_SETTINGS)


def test_replayed_commit_and_release_report_the_balance_after_expired_holds(redis_server: RedisServerProcess) -> None:
    """A replayed Commit or Release reports the balance as of now, like every other call: holds past
    their TTL are already refunded (regression found by the machine above)."""
    machine = QuotaMachine(redis_server.url)
    try:
        machine._use_up_free("acct-a")
        machine._both(lambda: machine.engine.grant("acct-a", 10, "p1"), lambda r: r.credit_balance,
                      lambda: machine.model.grant("acct-a", "p1", 10, machine.clock.now_ms + 365 * DAY_MS,
                                                  "purchase").credit_balance)
        machine._reserve("acct-a", "short", Video(10, "720p"), 60)  # 1 credit held for a minute
        for rid in ("committed", "released"):
            machine._reserve("acct-a", rid, Video(10, "720p"), 3600)
        machine._both(lambda: machine.engine.commit("acct-a", "committed"), lambda r: r.credit_balance,
                      lambda: machine.model.commit("acct-a", "committed").credit_balance)
        machine._both(lambda: machine.engine.release("acct-a", "released"), lambda r: r.credit_balance,
                      lambda: machine.model.release("acct-a", "released").credit_balance)
        machine._advance_to(machine.clock.now_ms + 120_000, None)  # "short" expired; nobody called since
        machine._both(lambda: machine.engine.commit("acct-a", "committed"),
                      lambda r: (r.replayed, r.credit_balance),
                      lambda: (True, machine.model.commit("acct-a", "committed").credit_balance))
        machine._both(lambda: machine.engine.release("acct-a", "released"),
                      lambda r: (r.replayed, r.credit_balance),
                      lambda: (True, machine.model.release("acct-a", "released").credit_balance))
    finally:
        machine.teardown()


@pytest.mark.parametrize("ending", ["commit", "release", "expire"])
def test_a_replay_after_each_ending_matches_the_model(redis_server: RedisServerProcess, ending: str) -> None:
    """A retried CheckAndReserve after the reservation was committed, released or expired: refused
    with the ending's reason, never allowed; a retry before the ending replays, with the expiry
    as extended. Both funding kinds."""
    machine = QuotaMachine(redis_server.url)
    try:
        machine._both(lambda: machine.engine.grant("acct-a", 10, "p1"), lambda r: r.credit_balance,
                      lambda: machine.model.grant("acct-a", "p1", 10, machine.clock.now_ms + 365 * DAY_MS,
                                                  "purchase").credit_balance)
        for funding in ("free", "credits"):
            if funding == "credits":
                machine._use_up_free("acct-a")
            rid = f"{ending}-{funding}"
            machine._reserve("acct-a", rid, Video(10, "720p"), 60)
            machine._both(lambda: machine.engine.extend("acct-a", rid, 600), lambda ms: ms,
                          lambda: machine.model.extend("acct-a", rid, 600))
            machine._reserve("acct-a", rid, Video(10, "720p"), 60)  # a live hold: replayed, extended expiry
            if ending == "commit":
                machine._both(lambda: machine.engine.commit("acct-a", rid), lambda r: r.credits_charged,
                              lambda: machine.model.commit("acct-a", rid).credits_charged)
            elif ending == "release":
                machine._both(lambda: machine.engine.release("acct-a", rid), lambda r: r.credits_refunded,
                              lambda: machine.model.release("acct-a", rid).credits_refunded)
            else:
                machine._advance_to(machine.clock.now_ms + 601_000, None)
            machine._reserve("acct-a", rid, Video(10, "720p"), 60)  # refused, as the model says
            machine._check_balance("acct-a")
    finally:
        machine.teardown()
