"""A small pure-Python reference model of the quota rules: the spec in code.

tests/test_model_based.py drives it side by side with the real engine and
compares every answer. It covers only what that machine drives, for the
default plans: accounts on plan ``free`` or ``pro`` in UTC, product ``sora``
(durations of a few seconds, 720p or 1080p), the daily free window, credit
lots, holds with a TTL, Commit / Release / ExtendReservation, GrantCredits
and the idempotent retries of each, and Quote (a reserve that is forgotten). Not modelled: codex, time zones, spend
caps, overrides, concurrency caps, revocation, refunds, and the pruning of
resolved reservations (the machine keeps its runs shorter than the
retention).

It is deliberately naive so that it is obviously right: no Redis, no
batching, no laziness. Every call first settles what time has already
decided (holds past their TTL are refunded exactly like a Release), so the
model is what an "eager" sidecar would answer at that instant.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from fractions import Fraction

DAY_MS = 86_400_000
SORA_DEFAULT_TTL_MS = 900_000


@dataclass(frozen=True)
class PlanRules:
    free_per_day: int
    max_seconds: int
    max_height: int


PLANS = {"free": PlanRules(free_per_day=30, max_seconds=15, max_height=720),
         "pro": PlanRules(free_per_day=100, max_seconds=25, max_height=1080)}
RESOLUTION_MULTIPLIER = {"720p": 1, "1080p": 2}
# At equal expiry, promo credits are spent before purchased ones.
SOURCE_RANK = {"promo": 0, "purchase": 3}


def job_cost(duration_seconds: float, resolution: str) -> int:
    """1 credit per started 10 seconds, twice that at 1080p."""
    started_steps = math.ceil(Fraction(str(duration_seconds)) / 10)
    return started_steps * RESOLUTION_MULTIPLIER[resolution]


def entitled(plan: str, duration_seconds: float, resolution: str) -> bool:
    rules = PLANS[plan]
    return (Fraction(str(duration_seconds)) <= rules.max_seconds
            and int(resolution[:-1]) <= rules.max_height)


def utc_day(now_ms: int) -> str:
    return datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc).strftime("%Y%m%d")


def next_utc_midnight_ms(now_ms: int) -> int:
    return (now_ms // DAY_MS + 1) * DAY_MS


RESOLVED_REFUSALS = {"committed": "ALREADY_COMMITTED", "released": "ALREADY_RELEASED", "expired": "EXPIRED"}


class Refused(Exception):
    """An error answer: ``kind`` is the engine's exception class name, ``reason`` its stable reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(kind, reason)
        self.kind = kind
        self.reason = reason


# -- answers, shaped like what the test reads off the engine ---------------

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


@dataclass(frozen=True)
class CommitReply:
    funding: str
    credits_charged: int
    credits_refunded: int
    free_charged: int
    credit_balance: int
    replayed: bool


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


@dataclass(frozen=True)
class BalanceView:
    plan: str
    free_used: int
    free_limit: int
    free_resets_ms: int
    credit_balance: int
    lots: tuple[tuple[str, int, int], ...]  # (lot id, credits left, expires_ms) in spending order
    holds: tuple[tuple[str, str, int, int], ...]  # (rid, funding, credits held, expires_ms) by rid


# -- state -----------------------------------------------------------------

@dataclass
class Lot:
    lot_id: str
    granted: int
    left: int
    expires_ms: int
    granted_ms: int
    source: str

    def live(self, now_ms: int) -> bool:
        return now_ms < self.expires_ms

    def spending_key(self) -> tuple[int, int, str]:
        return self.expires_ms, SOURCE_RANK[self.source], self.lot_id


@dataclass
class Reservation:
    params: tuple[float, str, int]  # (duration, resolution, ttl_seconds) as asked: the idempotency key
    funding: str
    credits: int
    taken: list[tuple[str, int]]  # (lot id, credits) in the order they were taken
    day: str  # the free window a free unit came from
    expires_ms: int
    ttl_ms: int
    decision: ReserveReply
    plan: str  # the account's plan when reserved: the actual job at commit must be entitled under it
    cost: int  # the reserved job's cost: the actual job at commit may not cost more
    state: str = "held"  # held, committed, released, expired
    charged: int = 0
    refunded: int = 0


@dataclass
class Account:
    plan: str = "free"
    free_used: dict[str, int] = field(default_factory=dict)  # UTC day -> free units held or spent
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

    def _refund_hold(self, acct: Account, res: Reservation) -> None:
        if res.funding == "free":
            acct.free_used[res.day] -= 1
        else:
            res.taken = self._give_back(acct, res.taken, res.credits)

    # -- QuotaService -----------------------------------------------------

    def reserve(self, account_id: str, rid: str, duration: float, resolution: str,
                ttl_seconds: int = 0) -> ReserveReply:
        acct = self._account(account_id)
        params = (float(duration), resolution, ttl_seconds)
        known = acct.reservations.get(rid)
        if known is not None:
            if known.params != params:
                raise Refused("Conflict", "RESERVATION_PARAMS_MISMATCH")
            if known.state != "held":  # only a live hold replays as allowed: nothing funds it otherwise
                raise Refused("ResolutionConflict", RESOLVED_REFUSALS[known.state])
            return replace(known.decision, replayed=True, expires_ms=known.expires_ms)
        rules, cost, day = PLANS[acct.plan], job_cost(duration, resolution), utc_day(self.now_ms)
        used, balance = acct.free_used.get(day, 0), self._balance(acct)
        answer = ReserveReply(allowed=False, plan=acct.plan, funding=None, denial=None, cost_credits=cost,
                              credits_held=0, credits_short=0, free_used=used, free_limit=rules.free_per_day,
                              free_resets_ms=next_utc_midnight_ms(self.now_ms), credit_balance=balance,
                              expires_ms=0, replayed=False)
        if not entitled(acct.plan, duration, resolution):
            return replace(answer, denial="NOT_ENTITLED")
        ttl_ms = ttl_seconds * 1000 or SORA_DEFAULT_TTL_MS
        expires_ms = self.now_ms + ttl_ms
        taken: list[tuple[str, int]] = []
        if used < rules.free_per_day:
            acct.free_used[day] = used + 1
            funding, held = "free", 0
            answer = replace(answer, free_used=used + 1)
        elif balance >= cost:
            taken = self._take(acct, cost)
            funding, held = "credits", cost
            answer = replace(answer, credit_balance=balance - cost)
        else:
            return replace(answer, denial="PURCHASE_REQUIRED", credits_short=cost - balance)
        answer = replace(answer, allowed=True, funding=funding, credits_held=held, expires_ms=expires_ms)
        acct.reservations[rid] = Reservation(params=params, funding=funding, credits=held, taken=taken, day=day,
                                             expires_ms=expires_ms, ttl_ms=ttl_ms, decision=answer,
                                             plan=acct.plan, cost=cost)
        return answer

    def quote(self, account_id: str, rid: str, duration: float, resolution: str,
              ttl_seconds: int = 0) -> ReserveReply:
        """What reserve would answer now, holding nothing: reserve on a copy of the state, forgotten."""
        saved = copy.deepcopy(self.accounts)
        try:
            return self.reserve(account_id, rid, duration, resolution, ttl_seconds)
        finally:
            self.accounts = saved

    def _reservation(self, acct: Account, rid: str) -> Reservation:
        res = acct.reservations.get(rid)
        if res is None:
            raise Refused("NotFound", "RESERVATION_NOT_FOUND")
        return res

    def commit(self, account_id: str, rid: str, actual: tuple[float, str] | None = None) -> CommitReply:
        acct = self._account(account_id)
        res = self._reservation(acct, rid)
        if res.funding == "free":
            charge = 0
        else:
            charge = res.credits if actual is None else job_cost(*actual)
        free_charged = 1 if res.funding == "free" else 0
        if res.state == "committed":
            if charge != res.charged:
                raise Refused("Conflict", "COMMIT_COST_MISMATCH")
            return CommitReply(res.funding, charge, res.refunded, free_charged, self._balance(acct), True)
        if res.state == "released":
            raise Refused("ResolutionConflict", "ALREADY_RELEASED")
        if res.state == "expired":
            raise Refused("ResolutionConflict", "EXPIRED")
        if actual is not None and not entitled(res.plan, *actual):
            raise Refused("ResolutionConflict", "ACTUAL_NOT_ENTITLED")
        if actual is not None and job_cost(*actual) > res.cost:  # a free unit covers the reserved size only
            raise Refused("ResolutionConflict", "COST_EXCEEDS_HOLD")
        res.taken = self._give_back(acct, res.taken, res.credits - charge)
        res.state, res.charged, res.refunded = "committed", charge, res.credits - charge
        return CommitReply(res.funding, charge, res.refunded, free_charged, self._balance(acct), False)

    def release(self, account_id: str, rid: str) -> ReleaseReply:
        acct = self._account(account_id)
        res = self._reservation(acct, rid)
        if res.state == "committed":
            raise Refused("ResolutionConflict", "ALREADY_COMMITTED")
        if res.state == "expired":
            raise Refused("ResolutionConflict", "EXPIRED")
        replayed = res.state == "released"
        if not replayed:
            self._refund_hold(acct, res)
            res.state = "released"
        free_refunded = 1 if res.funding == "free" else 0
        return ReleaseReply(res.funding, res.credits, free_refunded, self._balance(acct), replayed)

    def extend(self, account_id: str, rid: str, ttl_seconds: int = 0) -> int:
        """The hold's new expiry (ms): never earlier than it was."""
        acct = self._account(account_id)
        res = self._reservation(acct, rid)
        if res.state != "held":
            reasons = {"committed": "ALREADY_COMMITTED", "released": "ALREADY_RELEASED", "expired": "EXPIRED"}
            raise Refused("ResolutionConflict", reasons[res.state])
        ttl_ms = ttl_seconds * 1000 or res.ttl_ms
        res.expires_ms = max(res.expires_ms, self.now_ms + ttl_ms)
        return res.expires_ms

    def balance(self, account_id: str) -> BalanceView:
        acct = self._account(account_id)
        rules = PLANS[acct.plan]
        lots = tuple((lot.lot_id, lot.left, lot.expires_ms) for lot in self._live_lots(acct))
        holds = tuple(sorted((rid, res.funding, res.credits, res.expires_ms)
                             for rid, res in acct.reservations.items() if res.state == "held"))
        return BalanceView(plan=acct.plan, free_used=acct.free_used.get(utc_day(self.now_ms), 0),
                           free_limit=rules.free_per_day, free_resets_ms=next_utc_midnight_ms(self.now_ms),
                           credit_balance=self._balance(acct), lots=lots, holds=holds)

    # -- QuotaAdmin -------------------------------------------------------

    def grant(self, account_id: str, lot_id: str, credits: int, expires_ms: int, source: str) -> GrantReply:
        acct = self._account(account_id)
        lot = acct.lots.get(lot_id)
        replayed = lot is not None
        if lot is None:
            lot = acct.lots[lot_id] = Lot(lot_id, credits, credits, expires_ms, self.now_ms, source)
        elif lot.granted != credits:
            raise Refused("Conflict", "PURCHASE_ID_CONFLICT")
        left = lot.left if lot.live(self.now_ms) else 0  # an expired lot's credits expired with it
        return GrantReply(lot_id, lot.granted, left, lot.expires_ms, lot.granted_ms, lot.source,
                          self._balance(acct), replayed)

    def set_plan(self, account_id: str, plan: str) -> str:
        self._account(account_id).plan = plan
        return plan

    def params_of(self, account_id: str, rid: str) -> tuple[float, str, int] | None:
        """The request a reservation id was recorded with (None when it never held anything)."""
        res = self.accounts.get(account_id, Account()).reservations.get(rid)
        return None if res is None else res.params

    def live_holds(self, account_id: str) -> list[str]:
        """Reservation ids whose hold is still running now."""
        acct = self.accounts.get(account_id, Account())
        return sorted(rid for rid, res in acct.reservations.items()
                      if res.state == "held" and res.expires_ms > self.now_ms)

    def expiries(self) -> list[tuple[int, str]]:
        """(expires_ms, account) of every hold and lot not yet expired."""
        found = set()
        for account_id, acct in self.accounts.items():
            found |= {(res.expires_ms, account_id) for res in acct.reservations.values() if res.state == "held"}
            found |= {(lot.expires_ms, account_id) for lot in acct.lots.values()}
        return sorted(x for x in found if x[0] > self.now_ms)
