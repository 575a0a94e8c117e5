"""A small pure-Python reference model of the quota rules: the spec in code.

tests/test_model_based.py drives it side by side with the real engine and
compares every answer. It covers only what that machine drives, for the
default plans: accounts on plan ``free``, ``plus`` or ``pro`` in UTC;
product ``sora`` (durations of a few seconds, 720p or 1080p) with its daily
free window; the metered product ``codex`` (model ``codex``, 62.5 credits
per 1M input tokens, optionally fast) with its included usage per rolling
5 hours and per calendar week (UTC, Monday 00:00), funded by that usage when
both windows have room for the whole estimate, else by credits whole; credit
lots, holds with a TTL, Commit (below, at or above the estimate: included
usage takes the actual even past the allowance; credits give the rest back
or, above the hold, draw the excess from the lots, then open debt up to the
plan's max_debt_credits, the rest written off), Release, ExtendReservation,
GrantCredits (which pays open debt first) and the idempotent retries of
each, debt (it denies every new job; credits a release or an expiry returned
pay it at the next CheckAndReserve or Quote), and Quote (a reserve that is
forgotten, after the debt repayment it settles for real). Not modelled:
other codex models and token kinds, time zones, spend caps, overrides,
concurrency caps, cameos, revocation, refunds, the pruning of old window
counters (never read again) and of resolved reservations (the machine keeps
its runs shorter than the retention).

It is deliberately naive so that it is obviously right: no Redis, no
batching, no laziness except where the answers show it (debt is repaid only
when the sidecar says it is). Every call first settles what time has already
decided (holds past their TTL are refunded exactly like a Release), so the
model is what an "eager" sidecar would answer at that instant.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from fractions import Fraction

DAY_MS = 86_400_000
FIVE_HOURS_MS = 5 * 3_600_000
SORA_DEFAULT_TTL_MS = 900_000
CODEX_DEFAULT_TTL_MS = 1_800_000
CODEX_DEFAULT_HOLD_CREDITS = 5  # held when the estimate gives no tokens
CODEX_INPUT_MILLI_PER_1M = 62_500  # model codex: 62.5 credits per 1M input tokens
CODEX_FAST_MULTIPLIER = 2


@dataclass(frozen=True)
class PlanRules:
    free_per_day: int  # sora jobs
    max_seconds: int
    max_height: int
    included_five_hours: int  # codex usage, credits per rolling 5 h
    included_week: int  # codex usage, credits per calendar week
    max_debt: int  # credits a codex commit may leave owed


PLANS = {"free": PlanRules(30, 15, 720, included_five_hours=10, included_week=40, max_debt=5),
         "plus": PlanRules(30, 15, 720, included_five_hours=50, included_week=250, max_debt=25),
         "pro": PlanRules(100, 25, 1080, included_five_hours=300, included_week=1500, max_debt=100)}
RESOLUTION_MULTIPLIER = {"720p": 1, "1080p": 2}
# At equal expiry, promo credits are spent before purchased ones.
SOURCE_RANK = {"promo": 0, "purchase": 3}


@dataclass(frozen=True)
class Video:
    """A sora job."""

    duration: float
    resolution: str


@dataclass(frozen=True)
class Task:
    """A codex job (model codex): its estimate at reserve, its actual usage at commit."""

    input_tokens: int
    fast: bool = False


def product_of(job: Video | Task) -> str:
    return "sora" if isinstance(job, Video) else "codex"


def job_cost(duration_seconds: float, resolution: str) -> int:
    """1 credit per started 10 seconds, twice that at 1080p."""
    started_steps = math.ceil(Fraction(str(duration_seconds)) / 10)
    return started_steps * RESOLUTION_MULTIPLIER[resolution]


def usage_cost(task: Task) -> int:
    """Milli-credits rounded up, doubled when fast, then rounded up to whole credits."""
    milli = math.ceil(Fraction(task.input_tokens * CODEX_INPUT_MILLI_PER_1M, 1_000_000))
    if task.fast:
        milli *= CODEX_FAST_MULTIPLIER
    return math.ceil(Fraction(milli, 1000))


def reserved_cost(job: Video | Task) -> int:
    if isinstance(job, Video):
        return job_cost(job.duration, job.resolution)
    return usage_cost(job) if job.input_tokens else CODEX_DEFAULT_HOLD_CREDITS


def actual_cost(job: Video | Task) -> int:
    """What Commit prices: a task without tokens used nothing (not the default hold)."""
    return job_cost(job.duration, job.resolution) if isinstance(job, Video) else usage_cost(job)


def entitled(plan: str, job: Video | Task) -> bool:
    if isinstance(job, Task):
        return True  # the codex model is in every plan
    rules = PLANS[plan]
    return (Fraction(str(job.duration)) <= rules.max_seconds
            and int(job.resolution[:-1]) <= rules.max_height)


def utc_date(now_ms: int) -> datetime:
    return datetime.fromtimestamp(now_ms // 1000, tz=timezone.utc).replace(hour=0, minute=0, second=0)


def utc_day(now_ms: int) -> str:
    return utc_date(now_ms).strftime("%Y%m%d")


def next_utc_midnight_ms(now_ms: int) -> int:
    return (now_ms // DAY_MS + 1) * DAY_MS


def utc_week(now_ms: int) -> str:
    """The calendar week, named by its Monday."""
    day = utc_date(now_ms)
    return (day - timedelta(days=day.weekday())).strftime("%Y%m%d")


def next_utc_monday_ms(now_ms: int) -> int:
    day = utc_date(now_ms)
    return int((day + timedelta(days=7 - day.weekday())).timestamp()) * 1000


RESOLVED_REFUSALS = {"committed": "ALREADY_COMMITTED", "released": "ALREADY_RELEASED", "expired": "EXPIRED"}


class Refused(Exception):
    """An error answer: ``kind`` is the engine's exception class name, ``reason`` its stable reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(kind, reason)
        self.kind = kind
        self.reason = reason


# -- answers, shaped like what the test reads off the engine ---------------

LimitView = tuple[str, int, int, int]  # (limit id, used, allowance, resets_ms)


@dataclass(frozen=True)
class ReserveReply:
    allowed: bool
    plan: str
    funding: str | None  # "free" / "credits"
    denial: str | None
    cost_credits: int
    credits_held: int
    credits_short: int
    free_used: int
    free_limit: int
    free_resets_ms: int
    credit_balance: int
    expires_ms: int
    replayed: bool
    limits: tuple[LimitView, ...]
    debt_credits: int  # the open debt that refused the job


@dataclass(frozen=True)
class CommitReply:
    funding: str
    credits_charged: int
    credits_refunded: int
    free_charged: int
    credit_balance: int
    replayed: bool
    credits_drawn: int = 0
    debt_credits: int = 0
    written_off: int = 0


@dataclass(frozen=True)
class ReleaseReply:
    funding: str
    credits_refunded: int
    free_refunded: int
    credit_balance: int
    replayed: bool


@dataclass(frozen=True)
class GrantReply:
    lot_id: str
    credits_granted: int
    credits_left: int
    expires_ms: int
    granted_ms: int
    source: str
    credit_balance: int
    replayed: bool
    debt_paid_credits: int


@dataclass(frozen=True)
class BalanceView:
    plan: str
    free_used: int  # sora
    free_limit: int
    free_resets_ms: int
    codex: tuple[int, int, int, tuple[LimitView, ...]]  # headline used, allowance, resets_ms; every limit
    credit_balance: int
    debt_credits: int
    lots: tuple[tuple[str, int, int], ...]  # (lot id, credits left, expires_ms) in spending order
    holds: tuple[tuple[str, str, str, int, int], ...]  # (rid, product, funding, credits held, expires_ms) by rid


# -- state -----------------------------------------------------------------

@dataclass
class Lot:
    lot_id: str
    granted: int
    left: int
    expires_ms: int
    granted_ms: int
    source: str
    debt_paid: int = 0

    def live(self, now_ms: int) -> bool:
        return now_ms < self.expires_ms

    def spending_key(self) -> tuple[int, int, str]:
        return self.expires_ms, SOURCE_RANK[self.source], self.lot_id


@dataclass
class Reservation:
    rid: str
    params: tuple[Video | Task, int]  # (job, ttl_seconds) as asked: the idempotency key
    funding: str
    credits: int
    taken: list[tuple[str, int]]  # (lot id, credits) in the order they were taken
    window: str  # the free window the hold counted in: its UTC day (sora) or week (codex)
    expires_ms: int
    ttl_ms: int
    decision: ReserveReply
    plan: str  # the account's plan when reserved: the actual job at commit must be entitled under it
    cost: int  # the reserved job's cost: the actual job at commit may not cost more (sora)
    usage: int = 0  # codex on included usage: what its windows count (the estimate, then the actual)
    state: str = "held"  # held, committed, released, expired
    requested: int = 0  # a credits commit: the cost it asked (what a retry must repeat)
    charged: int = 0
    refunded: int = 0
    drawn: int = 0
    debt: int = 0
    written_off: int = 0

    @property
    def product(self) -> str:
        return product_of(self.params[0])


@dataclass
class Account:
    plan: str = "free"
    free_used: dict[str, int] = field(default_factory=dict)  # UTC day -> sora free units held or spent
    # codex included usage: rid -> (when, credits) counted by the rolling window, and week -> credits.
    rolling: dict[str, tuple[int, int]] = field(default_factory=dict)
    week_used: dict[str, int] = field(default_factory=dict)
    debt: int = 0
    lots: dict[str, Lot] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)


class ReferenceModel:
    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.accounts: dict[str, Account] = {}

    def advance(self, ms: int) -> None:
        assert ms >= 0
        self.now_ms += ms

    def _account(self, account_id: str) -> Account:
        """The account, with every hold past its TTL already refunded."""
        acct = self.accounts.setdefault(account_id, Account())
        for res in acct.reservations.values():
            if res.state == "held" and res.expires_ms <= self.now_ms:
                self._refund_hold(acct, res)
                res.state = "expired"
        return acct

    # -- credits ----------------------------------------------------------

    def _live_lots(self, acct: Account) -> list[Lot]:
        """Lots that can be spent, soonest-expiring (then promo, then lot id) first."""
        lots = [lot for lot in acct.lots.values() if lot.live(self.now_ms) and lot.left > 0]
        return sorted(lots, key=Lot.spending_key)

    def _balance(self, acct: Account) -> int:
        return sum(lot.left for lot in self._live_lots(acct))

    def _take(self, acct: Account, credits: int) -> list[tuple[str, int]]:
        taken = []
        for lot in self._live_lots(acct):
            n = min(lot.left, credits)
            if n:
                lot.left -= n
                credits -= n
                taken.append((lot.lot_id, n))
        assert credits == 0
        return taken

    def _give_back(self, acct: Account, taken: list[tuple[str, int]], credits: int) -> list[tuple[str, int]]:
        """Returns ``credits`` to the lots taken last first; a lot that expired meanwhile keeps
        nothing (they expire with it). What stays taken is returned."""
        kept = list(taken)
        while credits:
            lot_id, n = kept.pop()
            back = min(n, credits)
            lot = acct.lots[lot_id]
            if lot.live(self.now_ms):
                lot.left += back
            credits -= back
            if n > back:
                kept.append((lot_id, n - back))
        return kept

    def _repay_debt(self, acct: Account) -> int:
        """Open debt paid from the live lots (soonest-expiring first), as far as they go."""
        paid = min(acct.debt, self._balance(acct))
        self._take(acct, paid)
        acct.debt -= paid
        return paid

    def _refund_hold(self, acct: Account, res: Reservation) -> None:
        if res.funding == "credits":
            res.taken = self._give_back(acct, res.taken, res.credits)
        elif res.product == "sora":
            acct.free_used[res.window] -= 1
        else:
            self._count_usage(acct, res, 0)

    def _count_usage(self, acct: Account, res: Reservation, usage: int) -> None:
        """A codex hold's included usage becomes ``usage`` where it was counted: the rolling
        use keeps its time (none when 0), the week is the hold's own."""
        when, _ = acct.rolling.pop(res.rid)
        if usage:
            acct.rolling[res.rid] = (when, usage)
        acct.week_used[res.window] += usage - res.usage
        res.usage = usage

    # -- free windows -----------------------------------------------------

    def _limits(self, acct: Account, product: str) -> list[LimitView]:
        rules = PLANS[acct.plan]
        if product == "sora":
            return [("daily", acct.free_used.get(utc_day(self.now_ms), 0), rules.free_per_day,
                     next_utc_midnight_ms(self.now_ms))]
        uses = [(when, n) for when, n in acct.rolling.values() if self.now_ms < when + FIVE_HOURS_MS]
        oldest_ms = min((when for when, _ in uses), default=self.now_ms)
        return [("five_hour", sum(n for _, n in uses), rules.included_five_hours, oldest_ms + FIVE_HOURS_MS),
                ("weekly", acct.week_used.get(utc_week(self.now_ms), 0), rules.included_week,
                 next_utc_monday_ms(self.now_ms))]

    @staticmethod
    def _headline(limits: list[LimitView]) -> LimitView:
        """The limit with the least room (the first of equals)."""
        return min(limits, key=lambda limit: limit[2] - limit[1])

    # -- QuotaService -----------------------------------------------------

    def reserve(self, account_id: str, rid: str, job: Video | Task, ttl_seconds: int = 0) -> ReserveReply:
        acct = self._account(account_id)
        params = (job, ttl_seconds)
        known = acct.reservations.get(rid)
        if known is not None:
            if known.params != params:
                raise Refused("Conflict", "RESERVATION_PARAMS_MISMATCH")
            if known.state != "held":  # only a live hold replays as allowed: nothing funds it otherwise
                raise Refused("ResolutionConflict", RESOLVED_REFUSALS[known.state])
            return replace(known.decision, replayed=True, expires_ms=known.expires_ms)
        self._repay_debt(acct)  # credits returned since the last decision pay the debt first
        product, cost = product_of(job), reserved_cost(job)
        amount = 1 if product == "sora" else cost  # what a free job takes of every window
        limits = self._limits(acct, product)
        room = all(used + amount <= free for _, used, free, _ in limits)
        _, used, free, resets_ms = self._headline(limits)
        balance = self._balance(acct)
        answer = ReserveReply(allowed=False, plan=acct.plan, funding=None, denial=None, cost_credits=cost,
                              credits_held=0, credits_short=0, free_used=used, free_limit=free,
                              free_resets_ms=resets_ms, credit_balance=balance, expires_ms=0, replayed=False,
                              limits=tuple(limits), debt_credits=0)
        if not entitled(acct.plan, job):
            return replace(answer, denial="NOT_ENTITLED")
        if acct.debt:  # every new job, free or not; the shortfall counts what it would take of credits
            short = max(acct.debt, acct.debt + (0 if room else cost) - balance)
            return replace(answer, denial="PURCHASE_REQUIRED", credits_short=short, debt_credits=acct.debt)
        default_ttl_ms = SORA_DEFAULT_TTL_MS if product == "sora" else CODEX_DEFAULT_TTL_MS
        ttl_ms = ttl_seconds * 1000 or default_ttl_ms
        res = Reservation(rid=rid, params=params, funding="free", credits=0, taken=[], window="",
                          expires_ms=self.now_ms + ttl_ms, ttl_ms=ttl_ms, decision=answer, plan=acct.plan, cost=cost)
        if room:
            if product == "sora":
                res.window = utc_day(self.now_ms)
                acct.free_used[res.window] = used + 1
            else:
                res.window, res.usage = utc_week(self.now_ms), cost
                acct.rolling[rid] = (self.now_ms, cost)
                acct.week_used[res.window] = acct.week_used.get(res.window, 0) + cost
            answer = replace(answer, free_used=used + amount,
                             limits=tuple((i, u + amount, f, r) for i, u, f, r in limits))
        elif balance >= cost:
            res.funding, res.credits, res.taken = "credits", cost, self._take(acct, cost)
            answer = replace(answer, credit_balance=balance - cost)
        else:
            return replace(answer, denial="PURCHASE_REQUIRED", credits_short=cost - balance)
        res.decision = replace(answer, allowed=True, funding=res.funding, credits_held=res.credits,
                               expires_ms=res.expires_ms)
        acct.reservations[rid] = res
        return res.decision

    def quote(self, account_id: str, rid: str, job: Video | Task, ttl_seconds: int = 0) -> ReserveReply:
        """What reserve would answer now, holding nothing: reserve on a copy of the state, forgotten.
        Only the debt repayment a new decision begins with is kept (the sidecar settles it for
        real, like lazy expiry, so that the quote answers as the reservation would)."""
        acct = self._account(account_id)
        if rid not in acct.reservations:
            self._repay_debt(acct)
        saved = copy.deepcopy(self.accounts)
        try:
            return self.reserve(account_id, rid, job, ttl_seconds)
        finally:
            self.accounts = saved

    def _reservation(self, acct: Account, rid: str) -> Reservation:
        res = acct.reservations.get(rid)
        if res is None:
            raise Refused("NotFound", "RESERVATION_NOT_FOUND")
        return res

    def commit(self, account_id: str, rid: str, actual: Video | Task | None = None) -> CommitReply:
        acct = self._account(account_id)
        res = self._reservation(acct, rid)
        asked = None if actual is None else actual_cost(actual)
        # Included usage: the windows take the actual usage (no params: the estimate), no credits.
        usage = res.cost if asked is None else asked
        # Credits: the cost asked (no params: the hold), the hold being its most.
        requested = res.credits if asked is None else asked
        if res.state == "committed":
            if (res.funding == "credits" and requested != res.requested
                    or res.funding == "free" and res.product == "codex" and usage != res.usage):
                raise Refused("Conflict", "COMMIT_COST_MISMATCH")
            return self._commit_reply(acct, res, replayed=True)
        if res.state in ("released", "expired"):
            raise Refused("ResolutionConflict", RESOLVED_REFUSALS[res.state])
        if actual is not None and not entitled(res.plan, actual):
            raise Refused("ResolutionConflict", "ACTUAL_NOT_ENTITLED")
        if res.product == "sora" and asked is not None and asked > res.cost:  # sora's overage: reject
            raise Refused("ResolutionConflict", "COST_EXCEEDS_HOLD")
        res.state = "committed"
        if res.funding == "free":
            if res.product == "codex":
                self._count_usage(acct, res, usage)  # above the estimate too, even past the allowance
            return self._commit_reply(acct, res, replayed=False)
        res.requested = requested
        charge = min(requested, res.credits)
        res.taken = self._give_back(acct, res.taken, res.credits - charge)
        res.charged, res.refunded = charge, res.credits - charge
        excess = requested - charge  # codex's overage: draw
        if excess:
            res.drawn = min(excess, self._balance(acct))
            self._take(acct, res.drawn)
            # Never past max(debt before, the plan's bound): what is beyond is written off.
            res.debt = max(0, min(excess - res.drawn, PLANS[res.plan].max_debt - acct.debt))
            res.written_off = excess - res.drawn - res.debt
            acct.debt += res.debt
            res.charged += res.drawn + res.debt
        return self._commit_reply(acct, res, replayed=False)

    def _commit_reply(self, acct: Account, res: Reservation, replayed: bool) -> CommitReply:
        return CommitReply(res.funding, res.charged, res.refunded, 1 if res.funding == "free" else 0,
                           self._balance(acct), replayed, res.drawn, res.debt, res.written_off)

    def release(self, account_id: str, rid: str) -> ReleaseReply:
        acct = self._account(account_id)
        res = self._reservation(acct, rid)
        if res.state == "committed":
            raise Refused("ResolutionConflict", "ALREADY_COMMITTED")
        if res.state == "expired":
            raise Refused("ResolutionConflict", "EXPIRED")
        replayed = res.state == "released"
        if not replayed:
            self._refund_hold(acct, res)  # credits back to the lots; they pay any debt only later
            res.state = "released"
        free_refunded = 1 if res.funding == "free" else 0
        return ReleaseReply(res.funding, res.credits, free_refunded, self._balance(acct), replayed)

    def extend(self, account_id: str, rid: str, ttl_seconds: int = 0) -> int:
        """The hold's new expiry (ms): never earlier than it was."""
        acct = self._account(account_id)
        res = self._reservation(acct, rid)
        if res.state != "held":
            raise Refused("ResolutionConflict", RESOLVED_REFUSALS[res.state])
        ttl_ms = ttl_seconds * 1000 or res.ttl_ms
        res.expires_ms = max(res.expires_ms, self.now_ms + ttl_ms)
        return res.expires_ms

    def balance(self, account_id: str) -> BalanceView:
        acct = self._account(account_id)
        _, used, free, resets_ms = self._limits(acct, "sora")[0]
        codex = self._limits(acct, "codex")
        lots = tuple((lot.lot_id, lot.left, lot.expires_ms) for lot in self._live_lots(acct))
        holds = tuple(sorted((rid, res.product, res.funding, res.credits, res.expires_ms)
                             for rid, res in acct.reservations.items() if res.state == "held"))
        return BalanceView(plan=acct.plan, free_used=used, free_limit=free, free_resets_ms=resets_ms,
                           codex=(*self._headline(codex)[1:], tuple(codex)), credit_balance=self._balance(acct),
                           debt_credits=acct.debt, lots=lots, holds=holds)

    def codex_room(self, account_id: str) -> int:
        """Included codex usage a job could take now (the tightest window's room)."""
        acct = self._account(account_id)
        return max(0, min(free - used for _, used, free, _ in self._limits(acct, "codex")))

    # -- QuotaAdmin -------------------------------------------------------

    def grant(self, account_id: str, lot_id: str, credits: int, expires_ms: int, source: str) -> GrantReply:
        acct = self._account(account_id)
        lot = acct.lots.get(lot_id)
        replayed = lot is not None
        if lot is None:
            lot = acct.lots[lot_id] = Lot(lot_id, credits, credits, expires_ms, self.now_ms, source)
            lot.debt_paid = self._repay_debt(acct)  # a replay reports it again
        elif lot.granted != credits:
            raise Refused("Conflict", "PURCHASE_ID_CONFLICT")
        left = lot.left if lot.live(self.now_ms) else 0  # an expired lot's credits expired with it
        return GrantReply(lot_id, lot.granted, left, lot.expires_ms, lot.granted_ms, lot.source,
                          self._balance(acct), replayed, lot.debt_paid)

    def set_plan(self, account_id: str, plan: str) -> str:
        self._account(account_id).plan = plan
        return plan

    def params_of(self, account_id: str, rid: str) -> tuple[Video | Task, int] | None:
        """The request a reservation id was recorded with (None when it never held anything)."""
        res = self.accounts.get(account_id, Account()).reservations.get(rid)
        return None if res is None else res.params

    def live_holds(self, account_id: str) -> list[str]:
        """Reservation ids whose hold is still running now."""
        acct = self.accounts.get(account_id, Account())
        return sorted(rid for rid, res in acct.reservations.items()
                      if res.state == "held" and res.expires_ms > self.now_ms)

    def expiries(self) -> list[tuple[int, str]]:
        """(expires_ms, account) of every hold, lot and rolling use not yet expired."""
        found = set()
        for account_id, acct in self.accounts.items():
            found |= {(res.expires_ms, account_id) for res in acct.reservations.values() if res.state == "held"}
            found |= {(lot.expires_ms, account_id) for lot in acct.lots.values()}
            found |= {(when + FIVE_HOURS_MS, account_id) for when, _ in acct.rolling.values()}
        return sorted(x for x in found if x[0] > self.now_ms)
