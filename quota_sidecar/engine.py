"""The quota engine: request validation, pricing and windows around the store.

Pure domain code: it knows plans, prices, windows and decisions, and asks a
Store (quota_sidecar.store.RedisStore in production) to apply each decision
atomically. No protobuf and no redis types here; the clock is injected.

Every decision is one store call (one EVALSHA). The engine never reads state
to decide in Python: it passes everything the script needs (the job's cost,
each plan's free limit and entitlement, candidate windows) and the script
decides. The only extra round trip is when an account's time zone is not the
one this sidecar assumed (first sight of a non-UTC account): the script
refuses without writing, and the engine asks again with the right zone.
"""

from __future__ import annotations

import calendar
import hashlib
import json
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Awaitable, Callable, Mapping, Protocol, Sequence, TypeVar

from .clock import Clock, RedisClock
from .errors import InvalidArgument, Unavailable
from .ids import check_id, new_reservation_id
from .model import (
    COST_INVALID,
    COST_WHOLE_HOLD,
    AccountSettings,
    Allowance,
    Balance,
    BalanceSnapshot,
    CommitResult,
    Decision,
    DenialReason,
    GrantResult,
    JobParams,
    ParamsInvalidForProduct,
    PlanRow,
    ReleaseResult,
    ReserveCommand,
    ReserveOutcome,
    StaleTimeZone,
    Window,
)
from .plans import Plans
from .windows import candidate_windows, time_zone

MAX_TTL_SECONDS = 86_400
MAX_GRANT_CREDITS = 1_000_000_000
MAX_LOT_LIFETIME_DAYS = 20 * 366  # keeps every stored time within 13 digits
DEFAULT_TIME_ZONE = "UTC"

T = TypeVar("T")


class Store(Protocol):
    """What the engine needs from storage; see quota_sidecar.store.RedisStore."""

    async def reserve(self, cmd: ReserveCommand) -> ReserveOutcome: ...
    async def commit(self, account_id: str, reservation_id: str, costs: Mapping[str, int], now_ms: int = 0) -> CommitResult: ...
    async def release(self, account_id: str, reservation_id: str, now_ms: int = 0) -> ReleaseResult: ...
    async def extend(self, account_id: str, reservation_id: str, ttl_ms: int, now_ms: int = 0) -> int: ...
    async def grant(self, account_id: str, lot_id: str, credits: int, expires_ms: int, now_ms: int = 0) -> GrantResult: ...
    async def set_account(self, account_id: str, plan: str, time_zone: str, default_plan: str) -> AccountSettings: ...
    async def balance(self, account_id: str, *, time_zone: str, windows: Sequence[Window],
                      products: Sequence[str], default_plan: str, now_ms: int = 0) -> BalanceSnapshot: ...
    async def sweep_account(self, account_id: str, now_ms: int = 0) -> int: ...
    async def accounts_with_holds(self) -> list[str]: ...


def fingerprint(product: str, job: JobParams, ttl_seconds: int) -> str:
    """Identity of a CheckAndReserve request, for telling a retry from a reuse."""
    canonical = json.dumps(
        [product, repr(float(job.duration_seconds)), job.resolution, job.model, job.units,
         sorted(job.extra.items()), ttl_seconds],
        separators=(",", ":"),
    )
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def add_months_ms(at_ms: int, months: int) -> int:
    """Same UTC day and time ``months`` later, clamped to the month's end (Feb 29 -> Feb 28)."""
    at = datetime.fromtimestamp(at_ms / 1000, tz=timezone.utc)
    month_index = at.month - 1 + months
    year, month = at.year + month_index // 12, month_index % 12 + 1
    day = min(at.day, calendar.monthrange(year, month)[1])
    return int(at.replace(year=year, month=month, day=day).timestamp() * 1000)


def check_ttl_seconds(field: str, ttl_seconds: int) -> None:
    if not 0 <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument(field, f"must be 0 (default) or 1 to {MAX_TTL_SECONDS} seconds")


def denial_message(plans: Plans, product: str, job: JobParams, outcome: ReserveOutcome) -> str:
    if outcome.denial is DenialReason.NOT_ENTITLED:
        return plans.entitlement_denial(outcome.plan, product, job) or "not entitled"
    unit = plans.product(product).unit_name
    return (f"daily free {product} allowance used ({outcome.free_used}/{outcome.free_limit} {unit}s) and "
            f"{outcome.credits_short} more credit(s) needed for this job ({outcome.cost_credits} credits)")


class QuotaEngine:
    def __init__(self, plans: Plans, store: Store, clock: Clock | None = None, *,
                 zone_cache_entries: int = 100_000) -> None:
        # Replaced whole (never mutated) when plans change; read once per call.
        self.plans = plans
        self.store = store
        self.clock = clock or RedisClock()
        self._zones: OrderedDict[str, str] = OrderedDict()
        self._zone_cache_entries = zone_cache_entries

    # -- time zones -------------------------------------------------------

    def _remember_zone(self, account_id: str, tz: str) -> None:
        self._zones[account_id] = tz
        self._zones.move_to_end(account_id)
        if len(self._zones) > self._zone_cache_entries:
            self._zones.popitem(last=False)

    async def _in_account_zone(self, account_id: str, call: Callable[[str, tuple[Window, ...]], Awaitable[T]]) -> T:
        tz = self._zones.get(account_id, DEFAULT_TIME_ZONE)
        for _ in range(3):
            windows = candidate_windows(tz, self.clock.local_now_ms())
            try:
                result = await call(tz, windows)
            except StaleTimeZone as stale:
                tz = stale.time_zone
                continue
            self._remember_zone(account_id, tz)
            return result
        raise Unavailable("the account's time zone kept changing; retry", reason="ZONE_CHANGING")

    # -- QuotaService -----------------------------------------------------

    async def check_and_reserve(self, account_id: str, product: str, reservation_id: str,
                                job: JobParams, ttl_seconds: int = 0) -> Decision:
        plans = self.plans
        check_id("account_id", account_id)
        plans.product(product)
        rid = check_id("reservation_id", reservation_id) if reservation_id else new_reservation_id()
        cost_credits = plans.job_cost(product, job)
        check_ttl_seconds("ttl_seconds", ttl_seconds)
        ttl_ms = (ttl_seconds or plans.default_ttl_seconds(product)) * 1000
        rows = tuple(PlanRow(name, plans.free_limit(name, product),
                             plans.entitlement_denial(name, product, job) is None) for name in plans.plans)

        def reserve(tz: str, windows: tuple[Window, ...]) -> Awaitable[ReserveOutcome]:
            return self.store.reserve(ReserveCommand(
                account_id=account_id, reservation_id=rid, product=product,
                fingerprint=fingerprint(product, job, ttl_seconds), ttl_ms=ttl_ms, cost_credits=cost_credits,
                default_plan=plans.default_plan, time_zone=tz, windows=windows, plan_rows=rows,
                now_ms=self.clock.pinned_now_ms()))

        outcome = await self._in_account_zone(account_id, reserve)
        if outcome.allowed:
            return Decision(reservation_id=rid, outcome=outcome)
        offers = plans.offers(outcome.credits_short) if outcome.denial is DenialReason.PURCHASE_REQUIRED else ()
        return Decision(reservation_id=rid, outcome=outcome,
                        denial_message=denial_message(plans, product, job, outcome), offers=offers)

    async def commit(self, account_id: str, reservation_id: str, actual: JobParams | None = None) -> CommitResult:
        check_id("account_id", account_id)
        check_id("reservation_id", reservation_id)
        costs, errors = self._actual_costs(actual)
        try:
            return await self.store.commit(account_id, reservation_id, costs, self.clock.pinned_now_ms())
        except ParamsInvalidForProduct as bad:
            raise errors[bad.product] from None

    def _actual_costs(self, actual: JobParams | None) -> tuple[dict[str, int], dict[str, InvalidArgument]]:
        """Actual cost for every product: the script picks the reserved one."""
        if actual is None:
            return {}, {}
        plans = self.plans
        costs: dict[str, int] = {}
        errors: dict[str, InvalidArgument] = {}
        for name in plans.products:
            try:
                costs[name] = plans.job_cost(name, actual)
            except InvalidArgument as exc:
                costs[name], errors[name] = COST_INVALID, exc
        assert COST_WHOLE_HOLD not in costs.values()
        return costs, errors

    async def release(self, account_id: str, reservation_id: str) -> ReleaseResult:
        check_id("account_id", account_id)
        check_id("reservation_id", reservation_id)
        return await self.store.release(account_id, reservation_id, self.clock.pinned_now_ms())

    async def extend(self, account_id: str, reservation_id: str, ttl_seconds: int = 0) -> int:
        """Returns the new expiry (ms)."""
        check_id("account_id", account_id)
        check_id("reservation_id", reservation_id)
        check_ttl_seconds("ttl_seconds", ttl_seconds)
        return await self.store.extend(account_id, reservation_id, ttl_seconds * 1000, self.clock.pinned_now_ms())

    async def balance(self, account_id: str) -> Balance:
        check_id("account_id", account_id)
        plans = self.plans
        products = tuple(plans.products)

        def read(tz: str, windows: tuple[Window, ...]) -> Awaitable[BalanceSnapshot]:
            return self.store.balance(account_id, time_zone=tz, windows=windows, products=products,
                                      default_plan=plans.default_plan, now_ms=self.clock.pinned_now_ms())

        snap = await self._in_account_zone(account_id, read)
        limits = {p: (plans.free_limit(snap.plan, p) if snap.plan in plans.plans else 0) for p in products}
        allowances = tuple(Allowance(p, snap.free_used.get(p, 0), limits[p], snap.free_resets_ms) for p in products)
        return Balance(account_id=account_id, plan=snap.plan, time_zone=snap.time_zone, allowances=allowances,
                       credit_balance=snap.credit_balance, lots=snap.lots, holds=snap.holds)

    # -- QuotaAdmin -------------------------------------------------------

    async def grant(self, account_id: str, credits: int, purchase_id: str, expires_ms: int | None = None) -> GrantResult:
        check_id("account_id", account_id)
        if not 1 <= credits <= MAX_GRANT_CREDITS:
            raise InvalidArgument("credits", f"must be between 1 and {MAX_GRANT_CREDITS}")
        check_id("purchase_id", purchase_id)
        now_ms = self.clock.local_now_ms()
        if expires_ms is None:
            expires_ms = add_months_ms(now_ms, self.plans.credit_validity_months)
        elif expires_ms <= now_ms:
            raise InvalidArgument("expires_at", "must be in the future")
        elif expires_ms > now_ms + MAX_LOT_LIFETIME_DAYS * 86_400_000:
            raise InvalidArgument("expires_at", "must be within 20 years")
        return await self.store.grant(account_id, purchase_id, credits, expires_ms, self.clock.pinned_now_ms())

    async def set_account(self, account_id: str, plan: str = "", tz: str = "") -> AccountSettings:
        check_id("account_id", account_id)
        plans = self.plans
        if plan:
            plans.plan(plan)
        if tz:
            time_zone(tz)
        result = await self.store.set_account(account_id, plan, tz, plans.default_plan)
        self._remember_zone(account_id, result.time_zone)
        return result

    # -- background -------------------------------------------------------

    async def sweep(self) -> int:
        """Refund expired holds of accounts nobody is calling. Returns holds expired."""
        expired = 0
        for account_id in await self.store.accounts_with_holds():
            expired += await self.store.sweep_account(account_id, self.clock.pinned_now_ms())
        return expired
