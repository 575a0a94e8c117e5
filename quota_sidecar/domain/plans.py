"""Plans, products and prices: what the plans file says, and what it implies.

The objects here are what quota_sidecar.server.plans_file builds from a validated plans file
(its format, its validation and its JSON Schema live there); everything here is pure: no file,
no YAML, no Redis, no protobuf. Credits are integers, money is integer minor units, and
durations are converted to integer milliseconds before any arithmetic so that 20.001 s is never
priced as 20 s by rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from quota_sidecar.domain.errors import InvalidArgument
from quota_sidecar.domain.model import CreditPack, JobParams, Limit, LimitKind, Offer

VIDEO = "video"
TASK = "task"
METERED = "metered"

# Metered prices are exact integers: a rate card's "credits per 1M tokens" is held in
# milli-credits per 1M tokens (12.5 -> 12_500, 1.875 -> 1_875), a usage's price in milli-credits
# (rounded up to the next milli-credit), and a job's cost in whole credits, rounded up: lots,
# holds, charges and the books stay integer credits.
MILLI_PER_CREDIT = 1000
TOKENS_PER_RATE = 1_000_000
OVERAGE_POLICIES = ("reject", "cap", "draw")
# What a metered product's limits count: included usage, in whole credits-equivalent.
USAGE_UNIT = "credits"

# The longest rolling window a limit may have: uses older than this are pruned.
MAX_ROLLING_HOURS = 168

_MAX_EXTRA_ENTRIES = 32
_MAX_EXTRA_KEY_CHARS = 64
_MAX_EXTRA_VALUE_CHARS = 256


@dataclass(frozen=True)
class ProductRules:
    """What one plan allows for one product."""

    # Free-allowance limits; a job is free only if every enforced one has room.
    limits: tuple[Limit, ...] = ()
    max_duration_seconds: float | None = None  # video only; None = product bound
    max_resolution: str | None = None  # video only, e.g. "720p"; None = every one
    models: frozenset[str] | None = None  # None = every model of the product
    max_units: int | None = None  # task only; None = product bound
    max_concurrent: int = 0  # jobs in flight per account; 0 = no cap
    concurrency_shadow: bool = False  # the cap is evaluated, not enforced
    # Metered products under overage draw: the debt a commit may raise the account's to (credits
    # owed past its lots); 0 = no debt, the excess past the lots is written off.
    max_debt_credits: int = 0

    @property
    def daily_free(self) -> int:
        """The free units of the calendar-day limit (0 when there is none)."""
        return next((limit.free for limit in self.limits if limit.kind is LimitKind.DAY), 0)


@dataclass(frozen=True)
class Rate:
    """A metered model's rate card, in milli-credits per 1M tokens."""

    input_milli: int
    cached_input_milli: int
    output_milli: int


@dataclass(frozen=True)
class Product:
    name: str
    kind: str  # VIDEO or TASK
    unit_name: str
    default_ttl_seconds: int
    models: Mapping[str, int]  # model -> price multiplier
    default_model: str
    seconds_per_step: int = 0
    credits_per_step: int = 0
    resolutions: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    max_duration_seconds: float = 0
    max_units: int = 0
    # When Redis cannot be reached: "fail_closed" (UNAVAILABLE) or "fail_open_free" (up to
    # degraded_free_per_window free jobs per account, per sidecar, per local day).
    on_redis_failure: str = "fail_closed"
    degraded_free_per_window: int = 0
    # Metered products only (kind METERED): the rate card per model, the fast mode's multiplier,
    # the hold when the worker gives no estimate, the sanity bound on each token count, and what
    # Commit does with usage above the hold ("reject": COST_EXCEEDS_HOLD; "cap": charge the hold,
    # the excess written off and recorded in the commit's outbox entry; "draw": charge the hold and
    # the excess from the lots, then as debt up to the plan's max_debt_credits, the rest written off).
    rates: Mapping[str, Rate] = field(default_factory=lambda: MappingProxyType({}))
    fast_multiplier: int = 1
    default_hold_credits: int = 0
    max_tokens: int = 0
    overage: str = "reject"


@dataclass(frozen=True)
class Plan:
    name: str
    products: Mapping[str, ProductRules]


@dataclass(frozen=True)
class Notifications:
    """When usage events fire (see README, "Usage events")."""

    # free_warning fires when this share of a window's free allowance is used.
    free_warning_percent: int = 80
    # lot_expiring fires this many days before a lot with credits left expires.
    lot_expiry_notice_days: int = 7
    # credits_low fires when the balance falls below the plan's threshold; 0 = never.
    credits_low: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def credits_low_threshold(self, plan: str) -> int:
        return self.credits_low.get(plan, 0)


@dataclass(frozen=True)
class Plans:
    version: str
    default_plan: str
    credit_validity_months: int
    packs: tuple[CreditPack, ...]
    products: Mapping[str, Product]
    plans: Mapping[str, Plan]
    notifications: Notifications = field(default_factory=Notifications)
    # The plans in force from each scheduled instant on (ms), in order; see at().
    schedule: tuple[tuple[int, Plans], ...] = ()
    # When these plans took effect (ms); 0 for the file's base plans.
    effective_from_ms: int = 0

    def at(self, at_ms: int) -> Plans:
        """The plans in force at ``at_ms``: the latest scheduled change at or before it, else the base."""
        current = self
        for from_ms, variant in self.schedule:
            if from_ms <= at_ms:
                current = variant
        return current

    def switches_between(self, start_ms: int, end_ms: int) -> tuple[int, ...]:
        """Scheduled instants in [start_ms, end_ms)."""
        return tuple(from_ms for from_ms, _ in self.schedule if start_ms <= from_ms < end_ms)

    def variants(self) -> tuple[Plans, ...]:
        return (self, *(variant for _, variant in self.schedule))

    def pack(self, pack_id: str, field_name: str = "pack_id") -> CreditPack:
        for pack in self.packs:
            if pack.pack_id == pack_id:
                return pack
        raise InvalidArgument(field_name, f"unknown pack {pack_id!r}; known packs: "
                              f"{', '.join(p.pack_id for p in self.packs) or '(none)'}")

    def product(self, name: str) -> Product:
        found = self.products.get(name) if name else None
        if found is None:
            known = _listing(self.products)
            what = "is required" if not name else f"unknown product {name!r}"
            raise InvalidArgument("product", f"{what}; known products: {known}")
        return found

    def plan(self, name: str) -> Plan:
        found = self.plans.get(name) if name else None
        if found is None:
            known = _listing(self.plans)
            what = "is required" if not name else f"unknown plan {name!r}"
            raise InvalidArgument("plan", f"{what}; known plans: {known}")
        return found

    def job_cost(self, product: str, job: JobParams) -> int:
        """Credits the job costs; InvalidArgument naming the field if it is malformed."""
        found = self.product(product)
        _check_extra(job.extra)
        if found.kind == VIDEO:
            _no_usage(found, job)
            return _video_cost(found, job)
        if found.kind == METERED:
            usage_milli = _usage_milli(found, job)
            return credits_of_milli(usage_milli) if job.has_usage else found.default_hold_credits
        _no_usage(found, job)
        return _task_cost(found, job)

    def actual_cost(self, product: str, job: JobParams) -> int:
        """Credits an actual job costs (what Commit charges): job_cost, except that a metered
        product prices the usage given, none being 0 credits (not the default hold)."""
        found = self.product(product)
        if found.kind != METERED:
            return self.job_cost(product, job)
        _check_extra(job.extra)
        return credits_of_milli(_usage_milli(found, job))

    def usage_milli(self, product: str, job: JobParams) -> int:
        """The exact price of a metered job's usage, in milli-credits."""
        return _usage_milli(self.product(product), job)

    def entitlement_denial(self, plan: str, product: str, job: JobParams) -> str | None:
        """Why the plan does not allow this (valid) job, or None when it does."""
        found_plan = self.plan(plan)
        found_product = self.product(product)
        rules = found_plan.products.get(found_product.name)
        if rules is None:
            return f"plan {found_plan.name} does not include product {found_product.name}"
        return _rules_denial(found_plan.name, found_product, rules, job)

    def free_limit(self, plan: str, product: str) -> int:
        """Free jobs per daily window; 0 when the plan lacks the product or has no daily limit."""
        rules = self.rules(plan, product)
        return 0 if rules is None else rules.daily_free

    def rules(self, plan: str, product: str) -> ProductRules | None:
        """What ``plan`` allows for ``product``; None when the plan does not include it."""
        return self.plan(plan).products.get(self.product(product).name)

    def offers(self, credits_short: int) -> tuple[Offer, ...]:
        """For each pack, how many cover the shortfall; cheapest total first."""
        if credits_short <= 0:
            return ()
        offers = [Offer(pack, -(-credits_short // pack.credits)) for pack in self.packs]
        offers.sort(key=lambda offer: (offer.total_price.minor_units, offer.pack.pack_id))
        return tuple(offers)

    def allowance_unit(self, product: str) -> str:
        """What a product's limits count: its unit (one per job), or for a metered product its
        included usage in credits-equivalent (USAGE_UNIT)."""
        found = self.products.get(product)
        if found is None:
            return ""
        return USAGE_UNIT if found.kind == METERED else found.unit_name

    def default_ttl_seconds(self, product: str) -> int:
        return self.product(product).default_ttl_seconds


# --- pricing ---------------------------------------------------------------


def _video_cost(product: Product, job: JobParams) -> int:
    duration_ms = _duration_ms(product, job.duration_seconds)
    resolution_multiplier = _resolution_multiplier(product, job.resolution)
    model_multiplier = product.models[_model(product, job.model)]
    if job.units not in (0, 1):
        raise InvalidArgument("params.units", f"must be 0 or 1 for {product.name} (got {job.units})")
    step_ms = product.seconds_per_step * 1000
    steps = -(-duration_ms // step_ms)  # every started step is charged
    return steps * product.credits_per_step * resolution_multiplier * model_multiplier


def _task_cost(product: Product, job: JobParams) -> int:
    model_multiplier = product.models[_model(product, job.model)]
    return _task_units(product, job.units) * model_multiplier


def credits_of_milli(milli: int) -> int:
    """Whole credits for a price in milli-credits: every started credit is charged."""
    return -(-milli // MILLI_PER_CREDIT)


def _usage_milli(product: Product, job: JobParams) -> int:
    """sum(tokens * rate) / 1M, in milli-credits rounded up, times the fast mode; exact integers."""
    if product.kind != METERED:
        raise InvalidArgument("product", f"{product.name} is not metered")
    if job.units not in (0, 1):
        raise InvalidArgument("params.units", f"must be 0 or 1 for {product.name} (got {job.units})")
    # A video's size on a token-billed job is a confused caller, not a job of 0 tokens.
    for name, given in (("duration_seconds", job.duration_seconds), ("resolution", job.resolution)):
        if given:
            raise InvalidArgument(f"params.{name}", f"applies to video products only, not {product.name}")
    rate = product.rates[_model(product, job.model)]
    total = 0
    for name, tokens, milli in (("input_tokens", job.input_tokens, rate.input_milli),
                                ("cached_input_tokens", job.cached_input_tokens, rate.cached_input_milli),
                                ("output_tokens", job.output_tokens, rate.output_milli)):
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise InvalidArgument(f"params.{name}", f"must be an integer >= 0 (got {tokens!r})")
        if tokens > product.max_tokens:
            raise InvalidArgument(f"params.{name}", f"must be at most {product.max_tokens} (got {tokens})")
        total += tokens * milli
    usage_milli = -(-total // TOKENS_PER_RATE)
    return usage_milli * (product.fast_multiplier if job.fast else 1)


def _no_usage(product: Product, job: JobParams) -> None:
    if job.has_usage or job.fast:
        raise InvalidArgument("params.input_tokens",
                              f"token usage and fast apply to metered products only, not {product.name}")


def _duration_ms(product: Product, duration_seconds: float) -> int:
    field_name = "params.duration_seconds"
    if isinstance(duration_seconds, bool) or not isinstance(duration_seconds, (int, float)):
        raise InvalidArgument(field_name, "must be a number of seconds")
    if not math.isfinite(duration_seconds):
        raise InvalidArgument(field_name, f"must be finite (got {duration_seconds})")
    if duration_seconds == 0:
        raise InvalidArgument(field_name, f"is required for {product.name} and must be > 0")
    if duration_seconds < 0:
        raise InvalidArgument(field_name, f"must be > 0 (got {duration_seconds})")
    if duration_seconds > product.max_duration_seconds:
        bound = format_seconds(seconds_to_ms(product.max_duration_seconds))
        raise InvalidArgument(field_name, f"must be at most {bound} s for {product.name} (got {duration_seconds})")
    duration_ms = seconds_to_ms(duration_seconds)
    if duration_ms == 0:
        raise InvalidArgument(field_name, "must be at least 0.001 s")
    return duration_ms


def _resolution_multiplier(product: Product, resolution: str) -> int:
    known = _listing(product.resolutions, key=resolution_height)
    if not resolution:
        raise InvalidArgument("params.resolution", f"is required for {product.name}; known: {known}")
    multiplier = product.resolutions.get(resolution)
    if multiplier is None:
        raise InvalidArgument("params.resolution", f"unknown resolution {resolution!r}; known: {known}")
    return multiplier


def _model(product: Product, model: str) -> str:
    """The model the job uses: the one named, or the product's default."""
    chosen = model or product.default_model
    if chosen not in product.models:
        known = _listing(product.models)
        raise InvalidArgument("params.model", f"unknown model {chosen!r} for {product.name}; known: {known}")
    return chosen


def _task_units(product: Product, units: int) -> int:
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise InvalidArgument("params.units", f"must be an integer >= 0 (got {units!r})")
    if units > product.max_units:
        raise InvalidArgument("params.units", f"must be at most {product.max_units} (got {units})")
    return units or 1  # 0 means "not given": one task


def _check_extra(extra: Mapping[str, str]) -> None:
    field_name = "params.extra"
    if len(extra) > _MAX_EXTRA_ENTRIES:
        raise InvalidArgument(field_name, f"has {len(extra)} entries; at most {_MAX_EXTRA_ENTRIES}")
    for key, value in extra.items():
        if not isinstance(key, str) or not 1 <= len(key) <= _MAX_EXTRA_KEY_CHARS:
            raise InvalidArgument(field_name, f"keys must be 1..{_MAX_EXTRA_KEY_CHARS} characters")
        if not isinstance(value, str) or len(value) > _MAX_EXTRA_VALUE_CHARS:
            raise InvalidArgument(
                field_name, f"value of {key!r} must be at most {_MAX_EXTRA_VALUE_CHARS} characters"
            )


# --- entitlements ----------------------------------------------------------


def _rules_denial(plan: str, product: Product, rules: ProductRules, job: JobParams) -> str | None:
    prefix = f"{product.name} on plan {plan}"
    model = job.model or product.default_model
    if rules.models is not None and model not in rules.models:
        return f"{prefix} does not include model {model} (allowed: {_listing(rules.models)})"
    if product.kind == VIDEO:
        return _video_denial(prefix, rules, job)
    units = job.units or 1
    if rules.max_units is not None and units > rules.max_units:
        return f"{prefix} allows up to {rules.max_units} {product.unit_name}s per job (asked {units})"
    return None


def _video_denial(prefix: str, rules: ProductRules, job: JobParams) -> str | None:
    if rules.max_duration_seconds is not None:
        asked_ms = seconds_to_ms(job.duration_seconds)
        allowed_ms = seconds_to_ms(rules.max_duration_seconds)
        if asked_ms > allowed_ms:
            allowed, asked = format_seconds(allowed_ms), format_seconds(asked_ms)
            return f"{prefix} allows videos up to {allowed} s (asked {asked} s)"
    if rules.max_resolution is not None:
        if resolution_height(job.resolution) > resolution_height(rules.max_resolution):
            return f"{prefix} allows resolutions up to {rules.max_resolution} (asked {job.resolution})"
    return None


def resolution_height(resolution: str) -> int:
    return int(resolution[:-1])


def seconds_to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def format_seconds(duration_ms: int) -> str:
    """15000 -> "15", 15001 -> "15.001": exact, without float noise."""
    whole, fraction_ms = divmod(duration_ms, 1000)
    if fraction_ms == 0:
        return str(whole)
    return f"{whole}.{fraction_ms:03d}".rstrip("0")


def _listing(names: Iterable[str], key: Callable[[str], int] | None = None) -> str:
    return ", ".join(sorted(names, key=key)) or "(none)"
