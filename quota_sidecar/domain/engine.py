"""The quota engine: request validation, pricing and windows around the store.

Pure domain code: it knows plans, prices, windows and decisions, and asks a
Store (quota_sidecar.storage.store.RedisStore in production) to apply each decision
atomically. No protobuf and no redis types here; the clock is injected.

Every decision is one store call (one script call: FCALL, or EVALSHA on Redis
6.2). The engine never reads state to decide in Python: it passes everything
the script needs (the job's cost, each plan's free limit and entitlement,
candidate windows) and the script
decides. The only extra round trip is when an account's time zone is not the
one this sidecar assumed (first sight of a non-UTC account): the script
refuses without writing, and the engine asks again with the right zone.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from quota_sidecar.domain.clock import Clock, RedisClock
from quota_sidecar.domain.degraded import DegradedMode, DegradedReservation
from quota_sidecar.domain.errors import (
    BatchAborted,
    Conflict,
    InvalidArgument,
    ParamsInvalidForProduct,
    QuotaError,
    ResolutionConflict,
    StaleTimeZone,
    StoreUnavailable,
    Unavailable,
)
from quota_sidecar.domain.ids import check_id, new_reservation_id
from quota_sidecar.domain.ledger import before, contiguous, merge_by_seq, with_running_totals
from quota_sidecar.domain.model import (
    COST_INVALID,
    COST_WHOLE_HOLD,
    EXPIRING_WINDOW_MS,
    Account,
    AccountChanges,
    AccountSettings,
    ActualCost,
    AutoTopUp,
    Balance,
    BalanceSnapshot,
    Cameo,
    CommitResult,
    CreditPack,
    CreditSource,
    CreditTotals,
    Decision,
    DenialReason,
    Funding,
    GrantResult,
    JobParams,
    LedgerEntry,
    LimitKind,
    LimitOverride,
    PlanRow,
    RefundResult,
    ReleaseResult,
    ReserveCommand,
    ReserveOutcome,
    RevokeResult,
    ScheduledLimits,
    Segment,
    Stamp,
    Window,
)
from quota_sidecar.domain.plans import MAX_ROLLING_HOURS, METERED, Plans
from quota_sidecar.domain.ports import Books, Store
from quota_sidecar.domain.windows import candidates, daily_window, time_zone

MAX_TTL_SECONDS = 86_400
MAX_GRANT_CREDITS = 1_000_000_000
MAX_LOT_LIFETIME_DAYS = 20 * 366  # keeps every stored time within 13 digits
MAX_SPEND_CAP_CREDITS = 1_000_000_000
MAX_REASON_CHARS = 256
MAX_CAMEOS_PER_JOB = 8
MAX_CAMEO_FEE_CREDITS = 1_000_000
MAX_PRICE_MINOR_UNITS = 10**15  # far above any one purchase; keeps the books' bigint exact
MAX_LEDGER_PAGE = 1000
DEFAULT_LEDGER_PAGE = 100
DEFAULT_TIME_ZONE = "UTC"
PLANS_VERSIONS_KEPT = 16
DAY_MS = 86_400_000
# Distinct (product, job size) pricings and fingerprints kept; beyond it a cache starts again.
SEGMENTS_CACHE_ENTRIES = 4096
_PAGE_TOKEN = re.compile(r"[1-9][0-9]{0,18}")
_MAX_SEQ = 2**63 - 1  # the books' bigint
_CURRENCY = re.compile(r"[A-Z]{3}")

T = TypeVar("T")
log = logging.getLogger("quota_sidecar.domain.engine")


def fingerprint(product: str, job: JobParams, ttl_seconds: int) -> str:
    """Identity of a CheckAndReserve request, for telling a retry from a reuse."""
    fields: list[Any] = [product, repr(float(job.duration_seconds)), job.resolution, job.model, job.units,
                         sorted(job.extra.items()), ttl_seconds]
    if job.cameo_ids:  # only then: a job without cameos keeps the fingerprint it always had
        fields.append(list(job.cameo_ids))
    if job.has_usage or job.fast:  # likewise: only a metered job's estimate adds to it
        fields.append(["usage", job.input_tokens, job.cached_input_tokens, job.output_tokens, job.fast])
    canonical = json.dumps(fields, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def _job_key(job: JobParams) -> tuple[Any, ...]:
    return (job.duration_seconds, job.resolution, job.model, job.units, tuple(sorted(job.extra.items())),
            job.input_tokens, job.cached_input_tokens, job.output_tokens, job.fast)


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
    if outcome.denial is DenialReason.NOT_ENTITLED and outcome.cameo_id:
        return f"cameo {outcome.cameo_id!r} is unknown or not active; it cannot be used in a job"
    if outcome.denial is DenialReason.NOT_ENTITLED:
        return plans.entitlement_denial(outcome.plan, product, job) or "not entitled"
    if outcome.denial is DenialReason.CONCURRENCY_LIMIT:
        return f"too many {product} jobs in flight for this account; retry when one finishes"
    if outcome.denial is DenialReason.BUDGET_EXCEEDED:
        return "this job would pass the account's monthly spend cap"
    unit = plans.product(product).unit_name

    def credits(n: int) -> str:
        return "credit" if n == 1 else "credits"

    # Cost, balance and shortfall each named once, in that order: "2 more credit(s) needed for this
    # job (2 credits)" read as two different amounts.
    cost, short = outcome.cost_credits, outcome.credits_short
    if outcome.debt_credits:
        return (f"the account owes {outcome.debt_credits} {credits(outcome.debt_credits)} (metered usage past its "
                f"credits): no new job until credits pay it; {short} more {credits(short)} needed with this job")
    if outcome.fees_credits and outcome.free_used < outcome.free_limit:
        # The free allowance pays the generation; the cameo fees are paid in credits.
        return (f"this job's cameo fees cost {outcome.fees_credits} {credits(outcome.fees_credits)} (the "
                f"generation is free); {outcome.credit_balance} available, {short} more {credits(short)} needed")
    return (f"daily free {product} allowance used ({outcome.free_used}/{outcome.free_limit} {unit}s); "
            f"this job costs {cost} {credits(cost)}; {outcome.credit_balance} available, "
            f"{short} more {credits(short)} needed")


_REFUSED_TEXT = ("control characters (C0 such as tab and newline, DEL, C1), format characters (bidi "
                 "overrides, embeddings and isolates, zero-width characters), line and paragraph separators, "
                 "spaces other than the ASCII space, surrogates, private-use and unassigned code points")


def check_text(field: str, text: str, max_chars: int) -> str:
    """``text`` if a terminal, a log line or a ledger reader can show it as it is: at most
    ``max_chars`` characters, each one str.isprintable() accepts. Stored free text must not be
    able to move a cursor, reorder a line (bidi) or hide characters when someone reads it later."""
    if len(text) > max_chars:
        raise InvalidArgument(field, f"is {len(text)} characters long; at most {max_chars} allowed")
    if not text.isprintable():
        at, char = next((i, c) for i, c in enumerate(text) if not c.isprintable())
        # The code point, never the character itself: this message is printed and logged.
        raise InvalidArgument(field, f"character {at} is U+{ord(char):04X} (Unicode category "
                                     f"{unicodedata.category(char)}), which is not printable; refused: "
                                     f"{_REFUSED_TEXT}")
    return text


def check_reason(reason: str) -> str:
    return check_text("reason", reason, MAX_REASON_CHARS)


def check_auto_topup(plans: Plans, topup: AutoTopUp | None) -> None:
    """Every field is checked whatever ``enabled`` says: a disabled top-up is stored as given,
    read back by every GetAccount and may be enabled later with the same pack."""
    if topup is None:
        return
    # Disabled, 0 is fine: there is nothing to trigger.
    low = 1 if topup.enabled else 0
    if not low <= topup.threshold_credits <= MAX_GRANT_CREDITS:
        raise InvalidArgument("auto_topup.threshold_credits",
                              f"must be between {low} and {MAX_GRANT_CREDITS} when auto top-up is "
                              f"{'enabled' if topup.enabled else 'disabled'}")
    if topup.enabled and not topup.pack_id:
        raise InvalidArgument("auto_topup.pack_id", "is required when auto top-up is enabled")
    if topup.pack_id:
        plans.pack(topup.pack_id, "auto_topup.pack_id")


def page_token_seq(token: str) -> int:
    """The seq a ListLedger page token stands for (the last seq of the page before; 0: from the
    first). A token is the decimal seq, 1 to 2^63 - 1; anything else is refused."""
    if not token:
        return 0
    if not _PAGE_TOKEN.fullmatch(token) or int(token) > _MAX_SEQ:
        raise InvalidArgument("page_token", "is not a token this API returned")
    return int(token)


def check_price(price_minor_units: int | None, currency: str) -> None:
    """A price is whole minor units (cents) in an ISO 4217 code; a currency needs a price."""
    if price_minor_units is not None and not 0 <= price_minor_units <= MAX_PRICE_MINOR_UNITS:
        raise InvalidArgument("price_minor_units", f"must be between 0 and {MAX_PRICE_MINOR_UNITS}")
    if price_minor_units is not None and not _CURRENCY.fullmatch(currency):
        raise InvalidArgument("currency", "must be an ISO 4217 code (3 capital letters, e.g. USD) when a price is "
                                          f"given; got {currency!r}")
    if price_minor_units is None and currency:
        raise InvalidArgument("currency", "is given without a price; give price_minor_units too")


def pack_defaults(pack: CreditPack, credits: int, price_minor_units: int | None,
                  currency: str) -> tuple[int, int, str]:
    """A grant of ``pack``: its credits (``credits`` 0 or the same), and its price unless the one
    paid is given (a discount), in the pack's currency unless another is given with it."""
    if credits and credits != pack.credits:
        raise InvalidArgument("credits", f"{credits} differs from pack {pack.pack_id!r}'s {pack.credits} credits; "
                                         "give 0 (the pack's) or no pack_id")
    price = pack.price
    if price_minor_units is None:
        if currency and currency != price.currency_code:
            raise InvalidArgument("currency", f"{currency!r} differs from pack {pack.pack_id!r}'s "
                                              f"{price.currency_code}; give the price paid in it too")
        price_minor_units = price.minor_units
    return pack.credits, price_minor_units, currency or price.currency_code


# (time zone, candidate days, weeks, months) -> the store call
ZoneCall = Callable[[str, tuple[Window, ...], tuple[Window, ...], tuple[Window, ...]], Awaitable[T]]


def plan_rows(plans: Plans, product: str, job: JobParams) -> tuple[PlanRow, ...]:
    """What every plan means for this job; the script picks the account's."""
    rows = []
    for name in plans.plans:
        rules = plans.rules(name, product)
        rows.append(PlanRow(
            plan=name, limits=rules.limits if rules else (),
            entitled=plans.entitlement_denial(name, product, job) is None,
            credits_low=plans.notifications.credits_low_threshold(name),
            max_concurrent=rules.max_concurrent if rules else 0,
            concurrency_shadow=rules.concurrency_shadow if rules else False))
    return tuple(rows)


def check_cameo_ids(cameo_ids: Sequence[str]) -> tuple[str, ...]:
    """A job's cameos: at most MAX_CAMEOS_PER_JOB ids, each once."""
    if len(cameo_ids) > MAX_CAMEOS_PER_JOB:
        raise InvalidArgument("params.cameo_ids", f"{len(cameo_ids)} cameos; at most {MAX_CAMEOS_PER_JOB} per job")
    for cameo_id in cameo_ids:
        check_id("params.cameo_ids", cameo_id)
    if len(set(cameo_ids)) != len(cameo_ids):
        raise InvalidArgument("params.cameo_ids", "a cameo is listed more than once")
    return tuple(cameo_ids)


def check_override(plans: Plans, override: LimitOverride) -> None:
    if override.product not in plans.products:
        # plans.product() would name the request's field "product", which SetAccount does not have.
        raise InvalidArgument("overrides.product", _unknown_product(plans, override.product))
    field = f"overrides[{override.product}]"
    if not override.limits:
        raise InvalidArgument(f"{field}.limits", "at least one limit is required")
    if len({limit.limit_id for limit in override.limits}) != len(override.limits):
        raise InvalidArgument(f"{field}.limits", "limit ids must be unique")
    for limit in override.limits:
        check_id(f"{field}.limits.limit_id", limit.limit_id)
        if "|" in limit.limit_id or not 0 <= limit.free <= MAX_GRANT_CREDITS:
            raise InvalidArgument(f"{field}.limits.free", f"must be between 0 and {MAX_GRANT_CREDITS}")
        if (limit.kind is LimitKind.ROLLING) != (limit.hours > 0) or limit.hours > MAX_ROLLING_HOURS:
            raise InvalidArgument(f"{field}.limits.rolling_hours",
                                  f"1 to {MAX_ROLLING_HOURS} for rolling limits, 0 for the others")
    if not 0 <= override.max_concurrent <= MAX_GRANT_CREDITS:
        raise InvalidArgument(f"{field}.max_concurrent", "must be >= 0 (0 = no cap)")


def _unknown_product(plans: Plans, product: str) -> str:
    what = f"unknown product {product!r}" if product else "a product is required"
    return f"{what}; known products: {', '.join(sorted(plans.products)) or '(none)'}"


def check_override_products(plans: Plans, overrides: Sequence[LimitOverride],
                            clear_overrides: Sequence[str]) -> tuple[str, ...]:
    """The products to clear, each once. A product overridden twice, or overridden and cleared,
    in one request is refused: the request does not say which it means (the store would apply
    the last silently). Clearing a product twice means the same as once, so it is accepted."""
    overridden: set[str] = set()
    for override in overrides:
        if override.product in overridden:
            raise InvalidArgument("overrides", f"product {override.product!r} is overridden more than once; "
                                               "give each product at most one override per request")
        overridden.add(override.product)
    for product in clear_overrides:
        if product not in plans.products:
            raise InvalidArgument("clear_overrides", _unknown_product(plans, product))
        if product in overridden:
            raise InvalidArgument("clear_overrides", f"product {product!r} is both in overrides and in "
                                                     "clear_overrides; set it or clear it, not both")
    return tuple(dict.fromkeys(clear_overrides))


@dataclass(frozen=True)
class _Prepared:
    """A validated CheckAndReserve request, priced; the zone-dependent windows come later."""

    account_id: str
    product: str
    reservation_id: str
    job: JobParams
    plans: Plans
    ttl_seconds: int
    ttl_ms: int
    segments: tuple[Segment, ...]
    fingerprint: str


@dataclass(frozen=True)
class ReserveItem:
    """One item of CheckAndReserveBatch: CheckAndReserve's arguments."""

    account_id: str
    product: str
    reservation_id: str
    job: JobParams
    ttl_seconds: int = 0


def _quota_error(exc: Exception) -> QuotaError:
    """A store item's failure as reported (anything unexpected becomes an internal error)."""
    return exc if isinstance(exc, QuotaError) else QuotaError(f"unexpected store failure: {exc!r}",
                                                                  reason="STORE_ERROR")


async def _caught(call: Awaitable[T]) -> T | QuotaError:
    try:
        return await call
    except QuotaError as exc:
        return exc


def _complete(results: Sequence[T | None]) -> list[T]:
    assert all(r is not None for r in results), "every batch item gets a result"
    return [r for r in results if r is not None]


class QuotaEngine:
    def __init__(self, plans: Plans, store: Store, clock: Clock | None = None, *,
                 zone_cache_entries: int = 100_000, degraded: DegradedMode | None = None,
                 books: Books | None = None) -> None:
        # Replaced whole (never mutated) when plans change; read once per call.
        self.plans = plans
        self.store = store
        self.clock = clock or RedisClock()
        self._zones: OrderedDict[str, str] = OrderedDict()
        self._zone_cache_entries = zone_cache_entries
        # Recent plans (and their scheduled variants) by version: a reservation is committed
        # at the prices it was made with.
        self._plans_by_version: OrderedDict[str, Plans] = OrderedDict()
        # (product, job, schedule span) -> (the plans they were priced under, segments); see _segments.
        self._segments_cache: dict[tuple[Any, ...], tuple[Plans, tuple[Segment, ...]]] = {}
        self._fingerprints: dict[tuple[Any, ...], str] = {}
        # (plans identity, product, job) -> those plans, once plans.job_cost passed; see _check_job.
        self._checked_jobs: dict[tuple[Any, ...], Plans] = {}
        self._last_stamp = Stamp()
        # (plans identity, product, job) -> (those plans, the commit's ActualCost); see _actual_cost.
        self._actual_cache: dict[tuple[Any, ...], tuple[Plans, ActualCost]] = {}
        self.set_plans(plans)
        # Reservations decided without Redis (fail_open_free); None: every product fails closed.
        self.degraded = degraded
        # The system of record ListLedger reads (decisions never do); None: the outbox alone.
        self.books = books
        # The cameos as last read from Redis (refresh_cameos, on an interval) or set through this
        # sidecar; replaced whole, never mutated. The fee a hold is stamped with is what is charged.
        self.cameos: dict[str, Cameo] = {}

    def set_plans(self, plans: Plans) -> None:
        """Use ``plans`` for every call from now on; calls in flight finish with the plans they read."""
        for variant in plans.variants():
            self._plans_by_version[variant.version] = variant
            self._plans_by_version.move_to_end(variant.version)
        while len(self._plans_by_version) > PLANS_VERSIONS_KEPT * (1 + len(plans.schedule)):
            self._plans_by_version.popitem(last=False)
        self.plans = plans

    def _current(self) -> Plans:
        """The plans in force now by this sidecar's clock (decisions use Redis' clock, see _segments)."""
        return self.plans.at(self.clock.local_now_ms())

    def _segments(self, plans: Plans, product: str, job: JobParams, job_key: tuple[Any, ...]) -> tuple[Segment, ...]:
        """The plans in force a day either side of this sidecar's clock: one segment, or more when
        a scheduled change falls in between; the script picks by Redis' clock.

        Cached: the same job under the same plans gives the same segments until a scheduled
        change enters or leaves that two-day span, and the store reuses their encoding."""
        approx_now_ms = self.clock.local_now_ms()
        starts = (0, *plans.switches_between(approx_now_ms - DAY_MS, approx_now_ms + DAY_MS))
        key = (product, job_key, starts, id(plans.at(approx_now_ms - DAY_MS)), id(plans.at(approx_now_ms)))
        cached = self._segments_cache.get(key)
        if cached is not None and cached[0] is plans:
            return cached[1]
        segments = self._price_segments(plans, product, job, starts, approx_now_ms)
        if len(self._segments_cache) >= SEGMENTS_CACHE_ENTRIES:
            self._segments_cache.clear()
        self._segments_cache[key] = (plans, segments)
        return segments

    @staticmethod
    def _price_segments(plans: Plans, product: str, job: JobParams, starts: tuple[int, ...],
                        approx_now_ms: int) -> tuple[Segment, ...]:
        segments = []
        for from_ms in starts:
            variant = plans.at(max(from_ms, approx_now_ms - DAY_MS))
            try:
                cost, rows = variant.job_cost(product, job), plan_rows(variant, product, job)
            except InvalidArgument:
                # Valid now but not under that variant (a model withdrawn, say): not entitled there.
                cost, rows = 0, tuple(replace(r, entitled=False) for r in plan_rows(plans.at(approx_now_ms),
                                                                                    product, job))
            metered = product in variant.products and variant.product(product).kind == METERED
            segments.append(Segment(from_ms=from_ms, cost_credits=cost, plans_version=variant.version,
                                    plan_rows=rows, metered=metered))
        return tuple(segments)

    def _fingerprint(self, product: str, job: JobParams, job_key: tuple[Any, ...], ttl_seconds: int) -> str:
        """fingerprint(), remembered: workers send the same few job sizes over and over."""
        key = (product, job_key, job.cameo_ids, ttl_seconds)
        cached = self._fingerprints.get(key)
        if cached is None:
            if len(self._fingerprints) >= SEGMENTS_CACHE_ENTRIES:
                self._fingerprints.clear()
            cached = self._fingerprints[key] = fingerprint(product, job, ttl_seconds)
        return cached

    def _check_job(self, plans: Plans, product: str, job: JobParams, job_key: tuple[Any, ...]) -> None:
        """plans.job_cost(product, job) for its InvalidArgument, remembered once it passed: the same
        job under the same plans passes again (a job that fails is checked on every call)."""
        key = (id(plans), product, job_key)
        if self._checked_jobs.get(key) is plans:
            return
        plans.job_cost(product, job)
        if len(self._checked_jobs) >= SEGMENTS_CACHE_ENTRIES:
            self._checked_jobs.clear()
        self._checked_jobs[key] = plans

    def plans_versions(self) -> tuple[str, ...]:
        """Versions kept for pricing commits, oldest first."""
        return tuple(self._plans_by_version)

    def _stamp(self, plans: Plans | None = None) -> Stamp:
        now_ms, version = self.clock.pinned_now_ms(), (plans or self.plans).version
        last = self._last_stamp
        # The same stamp call after call (Redis' clock, one plans version): built once for them.
        if last.now_ms != now_ms or last.plans_version != version:
            last = self._last_stamp = Stamp(now_ms=now_ms, plans_version=version)
        return last

    # -- time zones -------------------------------------------------------

    def _remember_zone(self, account_id: str, tz: str) -> None:
        self._zones[account_id] = tz
        self._zones.move_to_end(account_id)
        if len(self._zones) > self._zone_cache_entries:
            self._zones.popitem(last=False)

    async def _in_account_zone(self, account_id: str, call: ZoneCall[T]) -> T:
        tz = self._zones.get(account_id, DEFAULT_TIME_ZONE)
        for _ in range(3):
            approx_now_ms = self.clock.local_now_ms()
            try:
                windows = candidates(tz, approx_now_ms)
                result = await call(tz, windows.days, windows.weeks, windows.months)
            except StaleTimeZone as stale:
                tz = stale.time_zone
                continue
            self._remember_zone(account_id, tz)
            return result
        raise Unavailable("the account's time zone kept changing; retry", reason="ZONE_CHANGING")

    # -- QuotaService -----------------------------------------------------

    def _prepare(self, account_id: str, product: str, reservation_id: str, job: JobParams,
                 ttl_seconds: int, *, mint_id: bool = True) -> _Prepared:
        """Validates a CheckAndReserve request (InvalidArgument naming the field) and prices it.
        Without ``mint_id`` (a quote) an empty reservation id stays empty: no record has it."""
        base = self.plans
        plans = base.at(self.clock.local_now_ms())
        check_id("account_id", account_id)
        plans.product(product)
        rid = check_id("reservation_id", reservation_id) if reservation_id else (
            new_reservation_id() if mint_id else "")
        job_key = _job_key(job)
        self._check_job(plans, product, job, job_key)
        check_cameo_ids(job.cameo_ids)
        check_ttl_seconds("ttl_seconds", ttl_seconds)
        return _Prepared(account_id=account_id, product=product, reservation_id=rid, job=job, plans=plans,
                         ttl_seconds=ttl_seconds, ttl_ms=(ttl_seconds or plans.default_ttl_seconds(product)) * 1000,
                         segments=self._segments(base, product, job, job_key),
                         fingerprint=self._fingerprint(product, job, job_key, ttl_seconds))

    def _command(self, p: _Prepared, tz: str, days: tuple[Window, ...] | None = None,
                 weeks: tuple[Window, ...] | None = None, months: tuple[Window, ...] | None = None) -> ReserveCommand:
        """The store command for ``p`` with the windows of zone ``tz`` (computed when not given)."""
        if days is None or weeks is None or months is None:
            computed = candidates(tz, self.clock.local_now_ms())
            days, weeks, months = computed.days, computed.weeks, computed.months
        return ReserveCommand(
            account_id=p.account_id, reservation_id=p.reservation_id, product=p.product,
            fingerprint=p.fingerprint, ttl_ms=p.ttl_ms, segments=p.segments, default_plan=p.plans.default_plan,
            time_zone=tz, windows=days, weeks=weeks, months=months,
            packs=p.plans.packs, free_warning_percent=p.plans.notifications.free_warning_percent,
            stamp=self._stamp(p.plans), cameos=self._job_cameos(p.job))

    def _job_cameos(self, job: JobParams) -> tuple[tuple[str, str, int, bool], ...]:
        """The job's cameos as this sidecar knows them, for the script (unknown: inactive)."""
        rows = []
        for cameo_id in job.cameo_ids:
            cameo = self.cameos.get(cameo_id)
            rows.append((cameo_id, cameo.owner_account_id, cameo.fee_credits, cameo.active) if cameo
                        else (cameo_id, "", 0, False))
        return tuple(rows)

    def _decision(self, p: _Prepared, outcome: ReserveOutcome) -> Decision:
        unit = p.plans.allowance_unit(p.product)
        if outcome.allowed:
            return Decision(reservation_id=p.reservation_id, outcome=outcome, allowance_unit=unit)
        plans = p.plans
        offers = plans.offers(outcome.credits_short) if outcome.denial is DenialReason.PURCHASE_REQUIRED else ()
        return Decision(reservation_id=p.reservation_id, outcome=outcome, allowance_unit=unit,
                        denial_message=denial_message(plans, p.product, p.job, outcome), offers=offers)

    async def check_and_reserve(self, account_id: str, product: str, reservation_id: str,
                                job: JobParams, ttl_seconds: int = 0) -> Decision:
        p = self._prepare(account_id, product, reservation_id, job, ttl_seconds)
        local = self.degraded.get(account_id, p.reservation_id) if self.degraded else None
        if local is not None and not await self.flush_degraded():
            return self._degraded_replay(local, p.fingerprint)

        def reserve(tz: str, days: tuple[Window, ...], weeks: tuple[Window, ...],
                    months: tuple[Window, ...]) -> Awaitable[ReserveOutcome]:
            return self.store.reserve(self._command(p, tz, days, weeks, months))

        try:
            outcome = await self._in_account_zone(account_id, reserve)
        except Unavailable as exc:
            product_rules = p.plans.product(product)
            # A job with cameos is never allowed without Redis: its fees must be held in credits.
            if not isinstance(exc, StoreUnavailable) or product_rules.on_redis_failure != "fail_open_free" \
                    or self.degraded is None or p.job.cameo_ids:
                raise
            return self._degraded_reserve(DegradedReservation(
                account_id=account_id, reservation_id=p.reservation_id, product=product, fingerprint=p.fingerprint,
                window_label=daily_window(self._zones.get(account_id, DEFAULT_TIME_ZONE),
                                          self.clock.local_now_ms()).label,
                allowance=product_rules.degraded_free_per_window, at_ms=self.clock.local_now_ms(),
                ttl_ms=p.ttl_ms, plans_version=p.plans.version), exc)
        return self._decision(p, outcome)

    async def quote(self, account_id: str, product: str, reservation_id: str, job: JobParams,
                    ttl_seconds: int = 0) -> Decision:
        """What check_and_reserve with these arguments would answer now, holding nothing: the same
        validation, and the store's dry run of the same script decision (store.quote).

        A reservation id decided without Redis and not yet written to it replays as
        check_and_reserve would replay it. Redis unreachable is Unavailable whatever the product's
        policy: a quote is never answered from the degraded allowance, which only a hold may use."""
        p = self._prepare(account_id, product, reservation_id, job, ttl_seconds, mint_id=False)
        local = self.degraded.get(account_id, p.reservation_id) if self.degraded and p.reservation_id else None
        if local is not None and not await self.flush_degraded():
            return self._degraded_replay(local, p.fingerprint)

        def quote(tz: str, days: tuple[Window, ...], weeks: tuple[Window, ...],
                  months: tuple[Window, ...]) -> Awaitable[ReserveOutcome]:
            return self.store.quote(self._command(p, tz, days, weeks, months))

        return self._decision(p, await self._in_account_zone(account_id, quote))

    # -- batches ----------------------------------------------------------
    #
    # Each item is validated and decided on its own and its failure is its QuotaError in the
    # returned list, never raised. The valid items' scripts go to Redis in one pipelined round
    # trip; the rare items that need more (a stale time zone, a reservation decided without
    # Redis, a fail_open_free product while Redis is away) take the single-call path after it.

    def _fails_open(self, p: _Prepared, out: object) -> bool:
        return (isinstance(out, StoreUnavailable) and self.degraded is not None and not p.job.cameo_ids
                and p.plans.product(p.product).on_redis_failure == "fail_open_free")

    def _prepare_items(self, items: Sequence[ReserveItem]) -> list[_Prepared | QuotaError]:
        """Each item validated and priced on its own; an invalid one yields its error."""
        prepared: list[_Prepared | QuotaError] = []
        for item in items:
            try:
                prepared.append(self._prepare(item.account_id, item.product, item.reservation_id, item.job,
                                              item.ttl_seconds))
            except QuotaError as exc:
                prepared.append(exc)
        return prepared

    async def check_and_reserve_many(self, items: Sequence[ReserveItem]) -> list[Decision | QuotaError]:
        """check_and_reserve for every item, in order for the items of one account."""
        results: list[Decision | QuotaError | None] = [None] * len(items)
        prepared: dict[int, _Prepared] = {}
        single: list[int] = []
        for i, p_or_error in enumerate(self._prepare_items(items)):
            if isinstance(p_or_error, QuotaError):
                results[i] = p_or_error
                continue
            p = p_or_error
            if self.degraded is not None and self.degraded.get(p.account_id, p.reservation_id):
                single.append(i)  # decided without Redis: the single path replays it
            else:
                prepared[i] = p
        pending = list(prepared)
        for _ in range(3):
            if not pending:
                break
            cmds = [self._command(prepared[i], self._zones.get(prepared[i].account_id, DEFAULT_TIME_ZONE))
                    for i in pending]
            stale = []
            for i, cmd, out in zip(pending, cmds, await self.store.reserve_many(cmds)):
                p = prepared[i]
                if isinstance(out, StaleTimeZone):
                    # Nothing written; every item of that account comes back, so their order holds.
                    self._remember_zone(p.account_id, out.time_zone)
                    stale.append(i)
                elif self._fails_open(p, out):
                    single.append(i)
                elif isinstance(out, Exception):
                    results[i] = _quota_error(out)
                else:
                    self._remember_zone(p.account_id, cmd.time_zone)
                    results[i] = self._decision(p, out)
            pending = stale
        for i in pending:
            results[i] = Unavailable("the account's time zone kept changing; retry", reason="ZONE_CHANGING")
        for i in sorted(single):
            item = items[i]
            results[i] = await _caught(self.check_and_reserve(item.account_id, item.product,
                                                              prepared[i].reservation_id if i in prepared
                                                              else item.reservation_id, item.job,
                                                              item.ttl_seconds))
        return _complete(results)

    async def check_and_reserve_all(self, items: Sequence[ReserveItem]) -> list[Decision | QuotaError]:
        """Items of ONE account: every one allowed and held, or none held (reserve_all.lua).

        A refused batch reports each refused item's denial or error, and BatchAborted for the
        items that would have been allowed. An invalid item refuses the batch undecided.
        Raises InvalidArgument("all_or_nothing") when the items are of several accounts."""
        if len({item.account_id for item in items}) > 1:
            raise InvalidArgument("all_or_nothing", "only for items of one account_id")
        errors: dict[int, QuotaError] = {}
        prepared: list[_Prepared] = []
        for i, p in enumerate(self._prepare_items(items)):
            if isinstance(p, QuotaError):
                errors[i] = p
                continue
            if any(q.reservation_id == p.reservation_id for q in prepared):
                errors[i] = InvalidArgument("reservation_id", "used by another item of this all_or_nothing batch")
            prepared.append(p)
        if errors:
            aborted = BatchAborted("not decided: another item of this all_or_nothing batch is invalid")
            return [errors.get(i, aborted) for i in range(len(items))]
        if not prepared:
            return []

        def reserve_all(tz: str, days: tuple[Window, ...], weeks: tuple[Window, ...],
                        months: tuple[Window, ...]) -> Awaitable[list[ReserveOutcome | Exception]]:
            return self.store.reserve_all([self._command(p, tz, days, weeks, months) for p in prepared])

        try:
            outcomes = await self._in_account_zone(prepared[0].account_id, reserve_all)
        except QuotaError as exc:
            return [exc for _ in prepared]
        return [_quota_error(o) if isinstance(o, Exception) else self._decision(p, o)
                for p, o in zip(prepared, outcomes)]

    async def commit_many(self, items: Sequence[tuple[str, str, JobParams | None]]) -> list[CommitResult | QuotaError]:
        """commit for every (account_id, reservation_id, actual params or None)."""
        results: list[CommitResult | QuotaError | None] = [None] * len(items)
        sent: list[tuple[int, dict[tuple[str, str], ActualCost], dict[tuple[str, str], InvalidArgument]]] = []
        single: list[int] = []
        for i, (account_id, reservation_id, actual) in enumerate(items):
            try:
                check_id("account_id", account_id)
                check_id("reservation_id", reservation_id)
                costs, errors = self._actual_costs(actual)
            except QuotaError as exc:
                results[i] = exc
                continue
            if self.degraded is not None and self.degraded.get(account_id, reservation_id):
                single.append(i)
            else:
                sent.append((i, costs, errors))
        if sent:
            stamp = self._stamp()
            outs = await self.store.commit_many([(items[i][0], items[i][1], costs, stamp) for i, costs, _ in sent])
            for (i, _, errors), out in zip(sent, outs):
                if isinstance(out, ParamsInvalidForProduct):
                    results[i] = errors[(out.pv, out.product)]
                else:
                    results[i] = _quota_error(out) if isinstance(out, Exception) else out
        for i in single:
            results[i] = await _caught(self.commit(*items[i]))
        return _complete(results)

    async def release_many(self, items: Sequence[tuple[str, str]]) -> list[ReleaseResult | QuotaError]:
        """release for every (account_id, reservation_id)."""
        results: list[ReleaseResult | QuotaError | None] = [None] * len(items)
        sent: list[int] = []
        single: list[int] = []
        for i, (account_id, reservation_id) in enumerate(items):
            try:
                check_id("account_id", account_id)
                check_id("reservation_id", reservation_id)
            except QuotaError as exc:
                results[i] = exc
                continue
            degraded = self.degraded is not None and self.degraded.get(account_id, reservation_id)
            (single if degraded else sent).append(i)
        if sent:
            stamp = self._stamp()
            outs = await self.store.release_many([(items[i][0], items[i][1], stamp) for i in sent])
            for i, out in zip(sent, outs):
                results[i] = _quota_error(out) if isinstance(out, Exception) else out
        for i in single:
            results[i] = await _caught(self.release(*items[i]))
        return _complete(results)

    # -- degraded mode ------------------------------------------------------

    def _degraded_outcome(self, res: DegradedReservation, replayed: bool) -> Decision:
        outcome = ReserveOutcome(
            allowed=True, plan="", funding=Funding.FREE_QUOTA, denial=None, cost_credits=0, credits_held=0,
            credits_short=0, free_used=0, free_limit=res.allowance, free_resets_ms=0, credit_balance=0,
            expires_ms=res.at_ms + res.ttl_ms, now_ms=res.at_ms, replayed=replayed,
            plans_version=res.plans_version, degraded=True)
        return Decision(reservation_id=res.reservation_id, outcome=outcome)

    def _degraded_reserve(self, res: DegradedReservation, cause: Unavailable) -> Decision:
        """A free job from this sidecar's own small allowance while Redis is unreachable."""
        assert self.degraded is not None
        if not self.degraded.try_reserve(res):
            raise Unavailable(f"{cause.message}; this sidecar's degraded allowance for the account is used up",
                              reason=cause.reason) from cause
        log.warning("degraded: allowed %s/%s for %s without Redis", res.product, res.reservation_id, res.account_id)
        return self._degraded_outcome(res, replayed=False)

    def _degraded_replay(self, res: DegradedReservation, fp: str) -> Decision:
        if res.fingerprint != fp:
            raise Conflict("reservation_id was already used with different parameters",
                           reason="RESERVATION_PARAMS_MISMATCH")
        if res.state != "held":
            # As in Redis: a resolved reservation never replays as allowed (see _reserve.lua).
            reason = "ALREADY_COMMITTED" if res.state == "committed" else "ALREADY_RELEASED"
            raise ResolutionConflict(f"the reservation is already {res.state}", reason=reason)
        return self._degraded_outcome(res, replayed=True)

    async def flush_degraded(self) -> bool:
        """Writes reservations decided without Redis into it; True when none is left."""
        if self.degraded is None:
            return True
        written: list[DegradedReservation] = []
        outcomes: Counter[str] = Counter()
        try:
            for res in self.degraded.pending:
                outcome, state = await self.store.replay_degraded(
                    res.account_id, res.reservation_id, product=res.product, fingerprint=res.fingerprint,
                    window_label=res.window_label, allowance=res.allowance, ttl_ms=res.ttl_ms, state=res.state,
                    resolved_ms=res.resolved_ms, stamp=Stamp(now_ms=res.at_ms, plans_version=res.plans_version))
                outcomes[outcome] += 1
                if outcome == "conflict":
                    # Kept on the record and in the ledger for the audit; support must settle it.
                    log.error("degraded: %s/%s was acknowledged %s without Redis but Redis has it %s; "
                              "recorded for the audit", res.account_id, res.reservation_id, res.state, state)
                written.append(res)
        except Unavailable:
            return False
        finally:
            if written:
                self.degraded.written(written)
                log.warning("degraded: journal replayed to Redis: %s",
                            ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())))
        return not self.degraded.pending

    async def _resolve_locally(self, account_id: str, reservation_id: str, state: str) -> DegradedReservation | None:
        """Resolves a degraded reservation while Redis is still away; None when Redis has it."""
        local = self.degraded.get(account_id, reservation_id) if self.degraded else None
        if local is None or await self.flush_degraded():
            return None
        assert self.degraded is not None
        if local.state == state:
            return local
        if local.state != "held":
            reason = "ALREADY_COMMITTED" if local.state == "committed" else "ALREADY_RELEASED"
            raise ResolutionConflict(f"the reservation is already {local.state}", reason=reason)
        return self.degraded.resolve(local, state, self.clock.local_now_ms())

    async def commit(self, account_id: str, reservation_id: str, actual: JobParams | None = None) -> CommitResult:
        check_id("account_id", account_id)
        check_id("reservation_id", reservation_id)
        local = await self._resolve_locally(account_id, reservation_id, "committed")
        if local is not None:
            return CommitResult(Funding.FREE_QUOTA, 0, 0, 1, 0, replayed=False, degraded=True)
        costs, errors = self._actual_costs(actual)
        try:
            return await self.store.commit(account_id, reservation_id, costs, self._stamp())
        except ParamsInvalidForProduct as bad:
            raise errors[(bad.pv, bad.product)] from None

    def _actual_costs(self, actual: JobParams | None) -> tuple[dict[tuple[str, str], ActualCost],
                                                               dict[tuple[str, str], InvalidArgument]]:
        """Actual cost and entitled plans for every product under every plans version kept
        ("*": the current plans); the script picks the reservation's version and product."""
        if actual is None:
            return {}, {}
        versions = [("*", self._current())] + list(self._plans_by_version.items())
        costs: dict[tuple[str, str], ActualCost] = {}
        errors: dict[tuple[str, str], InvalidArgument] = {}
        for version, plans in versions:
            for name in plans.products:
                try:
                    costs[(version, name)] = self._actual_cost(plans, name, actual)
                except InvalidArgument as exc:
                    costs[(version, name)], errors[(version, name)] = ActualCost(COST_INVALID), exc
        assert all(c.cost_credits != COST_WHOLE_HOLD for c in costs.values())
        return costs, errors

    def _actual_cost(self, plans: Plans, product: str, actual: JobParams) -> ActualCost:
        """ActualCost of one product under one plans version, remembered: workers commit the
        same few sizes over and over, and entitlement is checked for every plan."""
        key = (id(plans), product, _job_key(actual))
        cached = self._actual_cache.get(key)
        if cached is not None and cached[0] is plans:
            return cached[1]
        overage = plans.product(product).overage
        cost = ActualCost(plans.actual_cost(product, actual),
                          tuple(name for name in plans.plans
                                if plans.entitlement_denial(name, product, actual) is None),
                          cap=overage == "cap", draw=overage == "draw",
                          max_debt=tuple((name, rules.max_debt_credits) for name, plan in plans.plans.items()
                                         if (rules := plan.products.get(product)) is not None)
                          if overage == "draw" else ())
        if len(self._actual_cache) >= SEGMENTS_CACHE_ENTRIES:
            self._actual_cache.clear()
        self._actual_cache[key] = (plans, cost)
        return cost

    async def release(self, account_id: str, reservation_id: str) -> ReleaseResult:
        check_id("account_id", account_id)
        check_id("reservation_id", reservation_id)
        local = await self._resolve_locally(account_id, reservation_id, "released")
        if local is not None:
            return ReleaseResult(Funding.FREE_QUOTA, 0, 1, 0, replayed=False, degraded=True)
        return await self.store.release(account_id, reservation_id, self._stamp())

    async def extend(self, account_id: str, reservation_id: str, ttl_seconds: int = 0) -> int:
        """Returns the new expiry (ms)."""
        check_id("account_id", account_id)
        check_id("reservation_id", reservation_id)
        check_ttl_seconds("ttl_seconds", ttl_seconds)
        if self.degraded and self.degraded.get(account_id, reservation_id) and not await self.flush_degraded():
            raise Unavailable("a reservation decided without Redis cannot be extended until Redis is back")
        return await self.store.extend(account_id, reservation_id, ttl_seconds * 1000, self._stamp())

    async def _snapshot(self, account_id: str) -> BalanceSnapshot:
        check_id("account_id", account_id)
        plans = self._current()
        rows = []
        for plan in plans.plans:
            for product in plans.products:
                rules = plans.rules(plan, product)
                rows.append((product, plan, rules.max_concurrent if rules else 0, rules.limits if rules else ()))

        def read(tz: str, days: tuple[Window, ...], weeks: tuple[Window, ...],
                 months: tuple[Window, ...]) -> Awaitable[BalanceSnapshot]:
            return self.store.balance(account_id, time_zone=tz, windows=days, weeks=weeks, months=months,
                                      product_rows=rows, default_plan=plans.default_plan, stamp=self._stamp(plans))

        return await self._in_account_zone(account_id, read)

    def _balance(self, account_id: str, snap: BalanceSnapshot) -> Balance:
        plans = self._current()
        allowances = tuple(replace(a, unit=plans.allowance_unit(a.product),
                                   upcoming=() if a.overridden else self._upcoming(snap.plan, a.product))
                           for a in snap.allowances)
        # Redis' clock at the read (the one that expires lots), not this process': the script swept the
        # expired lots, so what is left with an expiry inside the window is what will lapse if unspent.
        horizon_ms = snap.now_ms + EXPIRING_WINDOW_MS
        expiring = tuple(sorted((lot for lot in snap.lots if snap.now_ms < lot.expires_ms <= horizon_ms),
                                key=lambda lot: (lot.expires_ms, lot.lot_id)))
        return Balance(account_id=account_id, plan=snap.plan, time_zone=snap.time_zone, allowances=allowances,
                       credit_balance=snap.credit_balance, lots=snap.lots, holds=snap.holds,
                       holds_total=snap.holds_total, credits_held=snap.totals.held,
                       expiring_lots=expiring, credits_expiring=sum(lot.credits_left for lot in expiring),
                       debt_credits=snap.debt_credits)

    def _upcoming(self, plan: str, product: str) -> tuple[ScheduledLimits, ...]:
        """Announced changes to what ``plan`` allows for ``product``, soonest first."""
        now_ms = self.clock.local_now_ms()
        previous = self.plans.at(now_ms).plan(plan).products.get(product) if plan in self.plans.plans else None
        changes = []
        for from_ms, variant in self.plans.schedule:
            if from_ms <= now_ms or plan not in variant.plans:
                continue
            rules = variant.plan(plan).products.get(product)
            if rules is not None and (previous is None or (rules.limits, rules.max_concurrent) !=
                                      (previous.limits, previous.max_concurrent)):
                changes.append(ScheduledLimits(from_ms, rules.limits, rules.max_concurrent))
            previous = rules
        return tuple(changes)

    async def balance(self, account_id: str) -> Balance:
        return self._balance(account_id, await self._snapshot(account_id))

    # -- QuotaAdmin -------------------------------------------------------

    async def set_cameo(self, cameo_id: str, owner_account_id: str, fee_credits: int, active: bool) -> Cameo:
        """Defines or changes a cameo. Other sidecars see it at their next refresh_cameos."""
        check_id("cameo_id", cameo_id)
        check_id("owner_account_id", owner_account_id)
        if not 0 <= fee_credits <= MAX_CAMEO_FEE_CREDITS:
            raise InvalidArgument("fee_credits", f"must be between 0 and {MAX_CAMEO_FEE_CREDITS}")
        cameo = Cameo(cameo_id=cameo_id, owner_account_id=owner_account_id, fee_credits=fee_credits,
                      active=active, updated_ms=self.clock.local_now_ms())
        await self.store.set_cameo(cameo)
        self.cameos = {**self.cameos, cameo_id: cameo}
        return cameo

    async def get_cameo(self, cameo_id: str) -> Cameo | None:
        """The cameo as Redis holds it now (None: not defined); refreshes this sidecar's copy."""
        check_id("cameo_id", cameo_id)
        await self.refresh_cameos()
        return self.cameos.get(cameo_id)

    async def refresh_cameos(self) -> int:
        """Reads every cameo from Redis into memory (the server does it every few seconds)."""
        self.cameos = await self.store.cameos()
        return len(self.cameos)

    async def grant(self, account_id: str, credits: int, purchase_id: str, expires_ms: int | None = None, *,
                    source: CreditSource = CreditSource.PURCHASE, reason: str = "",
                    price_minor_units: int | None = None, currency: str = "", pack_id: str = "") -> GrantResult:
        """``price_minor_units`` and ``currency``: what was paid (None: unknown); ``pack_id``: the
        plans' pack bought, whose credits, price and currency are then the defaults (credits 0)."""
        check_id("account_id", account_id)
        if pack_id:
            credits, price_minor_units, currency = pack_defaults(self.plans.pack(pack_id, "pack_id"), credits,
                                                                 price_minor_units, currency)
        if not 1 <= credits <= MAX_GRANT_CREDITS:
            raise InvalidArgument("credits", f"must be between 1 and {MAX_GRANT_CREDITS}")
        check_price(price_minor_units, currency)
        check_id("purchase_id", purchase_id)
        check_reason(reason)
        now_ms = self.clock.local_now_ms()
        if expires_ms is None:
            expires_ms = add_months_ms(now_ms, self.plans.credit_validity_months)
        elif expires_ms <= now_ms:
            raise InvalidArgument("expires_at", "must be in the future")
        elif expires_ms > now_ms + MAX_LOT_LIFETIME_DAYS * 86_400_000:
            raise InvalidArgument("expires_at", "must be within 20 years")
        return await self.store.grant(account_id, purchase_id, credits, expires_ms, source, reason, self._stamp(),
                                      price_minor_units=price_minor_units, currency=currency, pack_id=pack_id)

    async def revoke(self, account_id: str, purchase_id: str, reason: str = "") -> RevokeResult:
        check_id("account_id", account_id)
        check_id("purchase_id", purchase_id)
        return await self.store.revoke(account_id, purchase_id, check_reason(reason), self._stamp())

    async def refund_job(self, account_id: str, reservation_id: str, reason: str = "") -> RefundResult:
        check_id("account_id", account_id)
        check_id("reservation_id", reservation_id)
        return await self.store.refund_job(account_id, reservation_id, check_reason(reason), self._stamp())

    async def set_account(self, account_id: str, plan: str = "", tz: str = "", *,
                          monthly_spend_cap_credits: int | None = None,
                          auto_topup: AutoTopUp | None = None,
                          overrides: tuple[LimitOverride, ...] = (),
                          clear_overrides: tuple[str, ...] = ()) -> AccountSettings:
        check_id("account_id", account_id)
        plans = self.plans
        if plan:
            plans.plan(plan)
        if tz:
            time_zone(tz)
        if monthly_spend_cap_credits is not None and not 0 <= monthly_spend_cap_credits <= MAX_SPEND_CAP_CREDITS:
            raise InvalidArgument("monthly_spend_cap_credits", f"must be between 0 (none) and {MAX_SPEND_CAP_CREDITS}")
        check_auto_topup(plans, auto_topup)
        for override in overrides:
            check_override(plans, override)
        clear_overrides = check_override_products(plans, overrides, clear_overrides)
        changes = AccountChanges(plan=plan or None, time_zone=tz or None,
                                 monthly_spend_cap_credits=monthly_spend_cap_credits, auto_topup=auto_topup,
                                 overrides=overrides, clear_overrides=clear_overrides)
        result = await self.store.set_account(account_id, changes, plans.default_plan, self._stamp())
        self._remember_zone(account_id, result.time_zone)
        return result

    async def account(self, account_id: str) -> Account:
        snap = await self._snapshot(account_id)
        return Account(balance=self._balance(account_id, snap),
                       monthly_spend_cap_credits=snap.monthly_spend_cap_credits,
                       month_spend_credits=snap.month_spend_credits, month_resets_ms=snap.month_resets_ms,
                       auto_topup=snap.auto_topup, totals=snap.totals, all_lots=snap.all_lots,
                       overrides=snap.overrides)

    async def ledger(self, account_id: str, page_size: int = 0, page_token: str = "") -> tuple[list[LedgerEntry], str]:
        """A page of the account's ledger, oldest first, and the token of the next page ("" when done).

        The outbox is read first, then the books: an entry shipped and trimmed between the two
        reads is in the books, so the page misses nothing not yet shipped. Without books, the
        outbox alone, as long as it still starts at seq 1."""
        check_id("account_id", account_id)
        if not 0 <= page_size <= MAX_LEDGER_PAGE:
            raise InvalidArgument("page_size", f"must be 0 (default {DEFAULT_LEDGER_PAGE}) to {MAX_LEDGER_PAGE}")
        after_seq = page_token_seq(page_token)
        size = page_size or DEFAULT_LEDGER_PAGE
        outbox = await self.store.account_outbox(account_id)
        if self.books is None:
            entries = with_running_totals(await self._whole_outbox(account_id, outbox))
            page = [e for e in entries if e.seq > after_seq][:size + 1]
        else:
            rows = await self.books.ledger_page(account_id, after_seq, size + 1)
            page = merge_by_seq(rows, outbox, after_seq=after_seq)[:size + 1]
            if page:
                from_books = page[0].entry_id in {row.entry_id for row in rows}
                start = before(page[0]) if from_books else await self._totals_before(account_id, page[0].seq, outbox)
                page = with_running_totals(page, start)
        more = len(page) > size
        page = page[:size]
        return page, (str(page[-1].seq) if more else "")

    async def _whole_outbox(self, account_id: str, outbox: list[LedgerEntry]) -> list[LedgerEntry]:
        """The outbox when it holds the account's every movement; Unavailable once a shipper
        trimmed some: they are in books this sidecar was not given."""
        trimmed = outbox[0].seq > 1 if outbox else await self.store.account_seq(account_id) > 0
        if trimmed:
            raise Unavailable("the account's older movements were shipped to the books, and the books are not "
                              "configured on this sidecar (--books-url); ask a sidecar that has them",
                              reason="BOOKS_NOT_CONFIGURED")
        return outbox

    async def _totals_before(self, account_id: str, seq: int, outbox: list[LedgerEntry]) -> CreditTotals:
        """The totals after seq - 1, for a page that starts with an entry only the outbox holds:
        the books' last totals plus the outbox entries after them."""
        assert self.books is not None
        if seq == 1:
            return CreditTotals()
        books_seq, totals = await self.books.last_totals(account_id)
        if books_seq >= seq - 1:
            # Shipped since the books were read: the books hold seq - 1 now.
            rows = await self.books.ledger_page(account_id, seq - 2, 1)
            if rows and rows[0].seq == seq - 1:
                return rows[0].totals_after
        else:
            between = [e for e in outbox if books_seq < e.seq < seq]
            if contiguous(between, books_seq + 1) and len(between) == seq - 1 - books_seq:
                return with_running_totals(between, totals)[-1].totals_after if between else totals
        raise Unavailable(f"movements before seq {seq} are neither in the books nor in the outbox; run "
                          "`quota-sidecar audit`", reason="LEDGER_GAP")

    # -- background -------------------------------------------------------

    async def sweep(self, keep_lease: Callable[[], Awaitable[bool]] | None = None) -> int:
        """Settle expired holds and lots of accounts nobody is calling, drop their records past
        retention, and announce lots about to expire. Returns holds expired.

        ``keep_lease`` is awaited before each account (it renews the sweeper's lease when due);
        the pass stops when it answers False: another sidecar sweeps now."""
        expired = 0
        notice_ms = self.plans.notifications.lot_expiry_notice_days * 86_400_000
        for account_id in await self.store.accounts_to_sweep():
            if keep_lease is not None and not await keep_lease():
                log.warning("sweeper lost its lease mid-pass; another sidecar takes over")
                break
            expired += await self.store.sweep_account(account_id, notice_ms, self._stamp())
        return expired
