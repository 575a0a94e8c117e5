"""Plans, products and prices: the plans file, validated, and what it implies.

The plans file (YAML, see default_plans.yaml) is loaded once at start-up and
validated strictly: an unknown key, a wrong type or a dangling reference
raises PlansError naming the field as a dotted path such as
``plans.pro.sora.daily_free``. A sidecar must refuse to start on a file it
half understands, because every sidecar of a deployment prices jobs itself.

Everything here is pure: no Redis, no protobuf. Credits are integers, money is
integer minor units, and durations are converted to integer milliseconds
before any arithmetic so that 20.001 s is never priced as 20 s by rounding.
"""

from __future__ import annotations

import importlib.resources
import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Callable, Iterable, Mapping, TypeVar

import yaml

from quota_sidecar.domain.errors import InvalidArgument, PlansError
from quota_sidecar.domain.model import CreditPack, JobParams, Limit, LimitKind, Money, Offer

_T = TypeVar("_T")

VIDEO = "video"
TASK = "task"

_DEFAULT_PLANS_FILE = "default_plans.yaml"

_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
_RESOLUTION_RE = re.compile(r"[0-9]{3,4}p")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
# Plain decimal notation only: "1e3", "+4" or " 4" are more likely typos than
# intent, and the amount is money.
_PRICE_RE = re.compile(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,2})?")
_MINOR_UNITS_PER_MAJOR = 100  # every accepted price has at most 2 decimals

_MAX_CREDITS = 1_000_000
_MAX_MULTIPLIER = 1_000
_MAX_DAILY_FREE = 1_000_000
_MAX_TTL_SECONDS = 86_400
_MAX_VALIDITY_MONTHS = 120
_MAX_SECONDS_PER_STEP = 86_400
_MAX_DURATION_BOUND_SECONDS = 86_400.0
_MAX_UNITS_BOUND = 1_000_000
_MAX_VERSION_CHARS = 64

_MAX_EXTRA_ENTRIES = 32
_MAX_EXTRA_KEY_CHARS = 64
_MAX_EXTRA_VALUE_CHARS = 256

_TOP_KEYS = ("version", "default_plan", "credit_validity_months", "packs", "products", "plans")
_TOP_OPTIONAL_KEYS = ("notifications", "shadow")
_SCHEDULED_SECTIONS = ("plans", "products", "packs", "notifications")
_LIMIT_KEYS = ("daily_free", "limits", "max_concurrent")
_MAX_CONCURRENT = 10_000
MAX_ROLLING_HOURS = 168
_NOTIFICATION_KEYS = ("free_warning_percent", "lot_expiry_notice_days", "credits_low")
_PACK_KEYS = ("credits", "price", "currency")
_PRODUCT_KEYS = ("kind", "unit", "default_ttl_seconds", "models", "default_model")
_FAILURE_KEYS = ("on_redis_failure", "degraded_free_per_window")
FAILURE_POLICIES = ("fail_closed", "fail_open_free")
_PRODUCT_KIND_KEYS = {
    VIDEO: ("seconds_per_step", "credits_per_step", "max_duration_seconds", "resolutions"),
    TASK: ("max_units",),
}
_RULE_KIND_KEYS = {
    VIDEO: ("max_duration_seconds", "max_resolution", "models"),
    TASK: ("models", "max_units"),
}


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

    @property
    def daily_free(self) -> int:
        """The free units of the calendar-day limit (0 when there is none)."""
        return next((limit.free for limit in self.limits if limit.kind is LimitKind.DAY), 0)


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
    schedule: tuple[tuple[int, "Plans"], ...] = ()
    # When these plans took effect (ms); 0 for the file's base plans.
    effective_from_ms: int = 0

    def at(self, at_ms: int) -> "Plans":
        """The plans in force at ``at_ms``: the latest scheduled change at or before it, else the base."""
        current = self
        for from_ms, variant in self.schedule:
            if from_ms <= at_ms:
                current = variant
        return current

    def switches_between(self, start_ms: int, end_ms: int) -> tuple[int, ...]:
        """Scheduled instants in [start_ms, end_ms)."""
        return tuple(from_ms for from_ms, _ in self.schedule if start_ms <= from_ms < end_ms)

    def variants(self) -> tuple["Plans", ...]:
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
            return _video_cost(found, job)
        return _task_cost(found, job)

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
        bound = _format_seconds(_seconds_to_ms(product.max_duration_seconds))
        raise InvalidArgument(field_name, f"must be at most {bound} s for {product.name} (got {duration_seconds})")
    duration_ms = _seconds_to_ms(duration_seconds)
    if duration_ms == 0:
        raise InvalidArgument(field_name, "must be at least 0.001 s")
    return duration_ms


def _resolution_multiplier(product: Product, resolution: str) -> int:
    known = _listing(product.resolutions, key=_resolution_height)
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
        asked_ms = _seconds_to_ms(job.duration_seconds)
        allowed_ms = _seconds_to_ms(rules.max_duration_seconds)
        if asked_ms > allowed_ms:
            allowed, asked = _format_seconds(allowed_ms), _format_seconds(asked_ms)
            return f"{prefix} allows videos up to {allowed} s (asked {asked} s)"
    if rules.max_resolution is not None:
        if _resolution_height(job.resolution) > _resolution_height(rules.max_resolution):
            return f"{prefix} allows resolutions up to {rules.max_resolution} (asked {job.resolution})"
    return None


def _resolution_height(resolution: str) -> int:
    return int(resolution[:-1])


def _seconds_to_ms(seconds: float) -> int:
    return round(seconds * 1000)


def _format_seconds(duration_ms: int) -> str:
    """15000 -> "15", 15001 -> "15.001": exact, without float noise."""
    whole, fraction_ms = divmod(duration_ms, 1000)
    if fraction_ms == 0:
        return str(whole)
    return f"{whole}.{fraction_ms:03d}".rstrip("0")


def _listing(names: Iterable[str], key: Callable[[str], int] | None = None) -> str:
    return ", ".join(sorted(names, key=key)) or "(none)"


# --- loading ---------------------------------------------------------------


def load_plans(path: str | None = None) -> Plans:
    """Load and validate a plans file; None loads the packaged default_plans.yaml."""
    if path is None:
        source = f"quota_sidecar/{_DEFAULT_PLANS_FILE}"
        resource = importlib.resources.files("quota_sidecar").joinpath(_DEFAULT_PLANS_FILE)
        text = _read_text(lambda: resource.read_text(encoding="utf-8"), source)
    else:
        source = path
        text = _read_text(lambda: _read_file(path), source)
    return parse_plans(_parse_yaml(text, source), source=source)


def _read_file(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _read_text(read: Callable[[], str], source: str) -> str:
    try:
        return read()
    except OSError as exc:
        raise PlansError("<file>", f"cannot read: {exc.strerror or exc}", source=source) from exc
    except UnicodeDecodeError as exc:
        raise PlansError("<file>", f"not UTF-8 text ({exc.reason})", source=source) from exc


def _parse_yaml(text: str, source: str) -> object:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PlansError("<file>", f"invalid YAML{where}: {problem}", source=source) from exc


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML silently lets win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float)):
                continue  # unhashable keys are refused by the base class
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_plans(data: object, *, source: str = "<plans>") -> Plans:
    """Validate the parsed YAML document ``data``; PlansError names the bad field."""
    try:
        return _parse_document(data)
    except PlansError as exc:
        raise PlansError(exc.field, exc.description, source=source) from None


def _parse_document(data: object) -> Plans:
    if not isinstance(data, Mapping):
        raise PlansError("<file>", f"must be a mapping at the top level (got {_type_name(data)})")
    top = _mapping(data, "")
    _check_keys(top, "", required=_TOP_KEYS, optional=_TOP_OPTIONAL_KEYS + ("scheduled",))
    base = _parse_version(top)
    schedule = _parse_schedule(top, base.version)
    return replace(base, schedule=schedule)


def _parse_schedule(top: Mapping[str, object], version: str) -> tuple[tuple[int, Plans], ...]:
    """``scheduled``: changes announced in advance. Each entry's plans/products/packs/notifications
    replace the named entries of the file from ``effective_from`` (RFC 3339 with a zone) on; the
    result is validated like a whole file. Its version is "<version>@<effective_from UTC>"."""
    raw = top.get("scheduled", [])
    if not isinstance(raw, list):
        raise PlansError("scheduled", f"must be a list (got {_type_name(raw)})")
    document = {key: value for key, value in top.items() if key != "scheduled"}
    schedule: list[tuple[int, Plans]] = []
    for index, item in enumerate(raw):
        path = f"scheduled[{index}]"
        entry = _mapping(item, path)
        _check_keys(entry, path, required=("effective_from",), optional=_SCHEDULED_SECTIONS)
        from_ms = _instant_ms(entry["effective_from"], f"{path}.effective_from")
        if schedule and from_ms <= schedule[-1][0]:
            raise PlansError(f"{path}.effective_from", "must be later than the previous scheduled change")
        document = _overlay(document, entry)
        stamp = datetime.fromtimestamp(from_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            variant = _parse_version({**document, "version": f"{version}@{stamp}"})
        except PlansError as exc:
            raise PlansError(f"{path}: {exc.field}", exc.description) from None
        schedule.append((from_ms, replace(variant, effective_from_ms=from_ms)))
    return tuple(schedule)


def _overlay(document: Mapping[str, object], entry: Mapping[str, object]) -> dict[str, object]:
    """Named entries of each section replace the document's (later changes build on earlier ones)."""
    result = dict(document)
    for section in _SCHEDULED_SECTIONS:
        if section in entry:
            merged = dict(_mapping(result.get(section, {}), section))
            merged.update(_mapping(entry[section], section))
            result[section] = merged
    return result


def _instant_ms(value: object, path: str) -> int:
    if isinstance(value, datetime):  # YAML parses unquoted timestamps
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise PlansError(path, f"must be an RFC 3339 time such as 2026-12-01T00:00:00Z (got {value!r})") from None
    else:
        raise PlansError(path, f"must be an RFC 3339 time (got {_type_name(value)})")
    if moment.tzinfo is None:
        raise PlansError(path, "must carry a zone (Z or +hh:mm)")
    return int(moment.timestamp() * 1000)


def _parse_version(top: Mapping[str, object]) -> Plans:
    products = _parse_products(top["products"])
    shadow = _parse_shadow(top.get("shadow", {}), products)
    plans = _parse_plans_section(top["plans"], products, shadow)
    unknown_shadow = shadow[0] - set(plans)
    if unknown_shadow:
        raise PlansError("shadow.plans", f"unknown plan {sorted(unknown_shadow)[0]!r}; known: {_listing(plans)}")
    default_plan = _string(top["default_plan"], "default_plan")
    if default_plan not in plans:
        raise PlansError("default_plan", f"unknown plan {default_plan!r}; known plans: {_listing(plans)}")
    return Plans(
        version=_version(top["version"]),
        default_plan=default_plan,
        credit_validity_months=_int(top["credit_validity_months"], "credit_validity_months", 1, _MAX_VALIDITY_MONTHS),
        packs=_parse_packs(top["packs"]),
        products=products,
        plans=plans,
        notifications=_parse_notifications(top.get("notifications", {}), plans),
    )


def _parse_notifications(value: object, plans: Mapping[str, Plan]) -> Notifications:
    entry = _mapping(value, "notifications")
    _check_keys(entry, "notifications", required=(), optional=_NOTIFICATION_KEYS)
    defaults = Notifications()
    thresholds: dict[str, int] = {}
    for plan, raw in _mapping(entry.get("credits_low", {}), "notifications.credits_low").items():
        path = _join("notifications.credits_low", str(plan))
        if plan not in plans:
            raise PlansError(path, f"unknown plan; known plans: {_listing(plans)}")
        thresholds[plan] = _int(raw, path, 0, _MAX_CREDITS)
    return Notifications(
        free_warning_percent=_int(entry.get("free_warning_percent", defaults.free_warning_percent),
                                  "notifications.free_warning_percent", 1, 100),
        lot_expiry_notice_days=_int(entry.get("lot_expiry_notice_days", defaults.lot_expiry_notice_days),
                                    "notifications.lot_expiry_notice_days", 1, 365),
        credits_low=MappingProxyType(thresholds),
    )


def _version(value: object) -> str:
    if not isinstance(value, str):
        # An unquoted 2026-11-01 is a YAML date; say how to fix it.
        raise PlansError("version", f"must be a quoted string (got {_type_name(value)})")
    if not 1 <= len(value) <= _MAX_VERSION_CHARS:
        raise PlansError("version", f"must be 1..{_MAX_VERSION_CHARS} characters")
    return value


def _parse_packs(value: object) -> tuple[CreditPack, ...]:
    packs = []
    for pack_id, raw in _mapping(value, "packs").items():
        path = _join("packs", _name(pack_id, "packs"))
        entry = _mapping(raw, path)
        _check_keys(entry, path, required=_PACK_KEYS)
        credits = _int(entry["credits"], f"{path}.credits", 1, _MAX_CREDITS)
        currency = _currency(entry["currency"], f"{path}.currency")
        minor_units = _price_minor_units(entry["price"], f"{path}.price")
        packs.append(CreditPack(pack_id, credits, Money(currency, minor_units)))
    currencies = {pack.price.currency_code for pack in packs}
    if len(currencies) > 1:
        # Offers are ranked by total price, which means nothing across currencies.
        raise PlansError("packs", f"all packs must share one currency (got {_listing(currencies)})")
    return tuple(packs)


def _currency(value: object, path: str) -> str:
    if not isinstance(value, str) or not _CURRENCY_RE.fullmatch(value):
        raise PlansError(path, f"must be a 3-letter ISO 4217 code such as USD (got {value!r})")
    return value


def _price_minor_units(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PlansError(path, f"must be a decimal amount such as \"4.00\" (got {_type_name(value)})")
    # repr() of a float is its shortest exact spelling: 4.0 -> "4.0", 4.001 -> "4.001".
    text = value if isinstance(value, str) else repr(value)
    if not _PRICE_RE.fullmatch(text):
        raise PlansError(path, f"must be a positive amount with at most 2 decimals such as \"4.00\" (got {text!r})")
    minor_units = int(Decimal(text) * _MINOR_UNITS_PER_MAJOR)
    if minor_units <= 0:
        raise PlansError(path, "must be greater than 0")
    return minor_units


def _parse_products(value: object) -> Mapping[str, Product]:
    raw_products = _mapping(value, "products")
    if not raw_products:
        raise PlansError("products", "must define at least one product")
    products = {}
    for name, raw in raw_products.items():
        path = _join("products", _name(name, "products"))
        products[name] = _parse_product(name, raw, path)
    return MappingProxyType(products)


def _parse_product(name: str, value: object, path: str) -> Product:
    entry = _mapping(value, path)
    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in _PRODUCT_KIND_KEYS:
        raise PlansError(f"{path}.kind", f"must be one of {_listing(_PRODUCT_KIND_KEYS)} (got {kind!r})")
    _check_keys(entry, path, required=_PRODUCT_KEYS + _PRODUCT_KIND_KEYS[kind], optional=_FAILURE_KEYS)
    models = _multipliers(entry["models"], f"{path}.models", key_check=_name)
    default_model = _string(entry["default_model"], f"{path}.default_model")
    if default_model not in models:
        raise PlansError(f"{path}.default_model", f"unknown model {default_model!r}; known: {_listing(models)}")
    common = dict(
        name=name,
        kind=kind,
        unit_name=_name(entry["unit"], f"{path}.unit", in_path=False),
        default_ttl_seconds=_int(entry["default_ttl_seconds"], f"{path}.default_ttl_seconds", 1, _MAX_TTL_SECONDS),
        models=models,
        default_model=default_model,
        **_failure_policy(entry, path),
    )
    if kind == TASK:
        return Product(**common, max_units=_int(entry["max_units"], f"{path}.max_units", 1, _MAX_UNITS_BOUND))
    return Product(
        **common,
        seconds_per_step=_int(entry["seconds_per_step"], f"{path}.seconds_per_step", 1, _MAX_SECONDS_PER_STEP),
        credits_per_step=_int(entry["credits_per_step"], f"{path}.credits_per_step", 1, _MAX_CREDITS),
        resolutions=_multipliers(entry["resolutions"], f"{path}.resolutions", key_check=_resolution_key),
        max_duration_seconds=_seconds(entry["max_duration_seconds"], f"{path}.max_duration_seconds"),
    )


def _failure_policy(entry: Mapping[str, object], path: str) -> dict[str, object]:
    policy = entry.get("on_redis_failure", "fail_closed")
    if policy not in FAILURE_POLICIES:
        raise PlansError(f"{path}.on_redis_failure", f"must be one of {', '.join(FAILURE_POLICIES)} (got {policy!r})")
    if (policy == "fail_open_free") != ("degraded_free_per_window" in entry):
        raise PlansError(f"{path}.degraded_free_per_window", "is required with fail_open_free and only with it")
    allowance = _int(entry.get("degraded_free_per_window", 0), f"{path}.degraded_free_per_window", 0, 1000)
    if policy == "fail_open_free" and allowance < 1:
        raise PlansError(f"{path}.degraded_free_per_window", "must be at least 1")
    return {"on_redis_failure": policy, "degraded_free_per_window": allowance}


def _multipliers(value: object, path: str, *, key_check: Callable[[object, str], str]) -> Mapping[str, int]:
    raw = _mapping(value, path)
    if not raw:
        raise PlansError(path, "must list at least one entry")
    result = {}
    for key, multiplier in raw.items():
        key_check(key, path)
        result[key] = _int(multiplier, _join(path, key), 1, _MAX_MULTIPLIER)
    return MappingProxyType(result)


def _resolution_key(key: object, path: str) -> str:
    if not isinstance(key, str) or not _RESOLUTION_RE.fullmatch(key):
        raise PlansError(_join(path, str(key)), "must be a resolution such as 720p (3 or 4 digits then p)")
    return key


def _parse_plans_section(value: object, products: Mapping[str, Product],
                         shadow: tuple[frozenset[str], frozenset[str]]) -> Mapping[str, Plan]:
    raw_plans = _mapping(value, "plans")
    if not raw_plans:
        raise PlansError("plans", "must define at least one plan")
    shadow_plans, shadow_products = shadow
    plans = {}
    for plan_name, raw in raw_plans.items():
        path = _join("plans", _name(plan_name, "plans"))
        rules = {}
        for product_name, raw_rules in _mapping(raw, path).items():
            rules_path = _join(path, str(product_name))
            if product_name not in products:
                raise PlansError(rules_path, f"unknown product; known products: {_listing(products)}")
            in_shadow = plan_name in shadow_plans or product_name in shadow_products
            rules[product_name] = _parse_rules(products[product_name], raw_rules, rules_path, in_shadow)
        plans[plan_name] = Plan(plan_name, MappingProxyType(rules))
    return MappingProxyType(plans)


def _parse_shadow(value: object, products: Mapping[str, Product]) -> tuple[frozenset[str], frozenset[str]]:
    """``shadow: {plans: [...], products: [...]}``: every limit of those is evaluated, not enforced."""
    entry = _mapping(value, "shadow")
    _check_keys(entry, "shadow", required=(), optional=("plans", "products"))
    names: list[frozenset[str]] = []
    for key in ("plans", "products"):
        raw = entry.get(key, [])
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise PlansError(f"shadow.{key}", f"must be a list of names (got {_type_name(raw)})")
        names.append(frozenset(raw))
    unknown = names[1] - set(products)
    if unknown:
        raise PlansError("shadow.products", f"unknown product {sorted(unknown)[0]!r}; known: {_listing(products)}")
    return names[0], names[1]


def _parse_rules(product: Product, value: object, path: str, shadow: bool) -> ProductRules:
    entry = _mapping(value, path)
    _check_keys(entry, path, required=(), optional=_LIMIT_KEYS + _RULE_KIND_KEYS[product.kind])
    return ProductRules(
        limits=_parse_limits(entry, path, shadow),
        max_concurrent=_int(entry.get("max_concurrent", 0), f"{path}.max_concurrent", 0, _MAX_CONCURRENT),
        concurrency_shadow=shadow,
        max_duration_seconds=_optional(entry, "max_duration_seconds", path, product, _rule_duration),
        max_resolution=_optional(entry, "max_resolution", path, product, _rule_resolution),
        models=_optional(entry, "models", path, product, _rule_models),
        max_units=_optional(entry, "max_units", path, product, _rule_units),
    )


def _parse_limits(entry: Mapping[str, object], path: str, shadow: bool) -> tuple[Limit, ...]:
    """``daily_free: N`` is short for ``limits: [{id: daily, kind: day, free: N}]``."""
    if ("daily_free" in entry) == ("limits" in entry):
        raise PlansError(_join(path, "limits"), "give either daily_free or limits (not both)")
    if "daily_free" in entry:
        free = _int(entry["daily_free"], f"{path}.daily_free", 0, _MAX_DAILY_FREE)
        return (Limit("daily", LimitKind.DAY, free, shadow=shadow),)
    raw = entry["limits"]
    if not isinstance(raw, list) or not raw:
        raise PlansError(f"{path}.limits", f"must be a non-empty list (got {_type_name(raw)})")
    limits = tuple(parse_limit(item, f"{path}.limits[{i}]", shadow) for i, item in enumerate(raw))
    ids = [limit.limit_id for limit in limits]
    if len(set(ids)) != len(ids):
        raise PlansError(f"{path}.limits", f"limit ids must be unique (got {', '.join(ids)})")
    return limits


def parse_limit(value: object, path: str, shadow: bool = False) -> Limit:
    """One limit entry: {id, kind: day|week|rolling, free, hours (rolling), shadow}."""
    entry = _mapping(value, path)
    _check_keys(entry, path, required=("id", "kind", "free"), optional=("hours", "shadow"))
    kinds = {kind.value: kind for kind in LimitKind}
    kind = kinds.get(entry["kind"]) if isinstance(entry["kind"], str) else None
    if kind is None:
        raise PlansError(f"{path}.kind", f"must be one of {', '.join(kinds)} (got {entry['kind']!r})")
    if (kind is LimitKind.ROLLING) != ("hours" in entry):
        raise PlansError(f"{path}.hours", "is required for rolling limits and only for them")
    hours = _int(entry["hours"], f"{path}.hours", 1, MAX_ROLLING_HOURS) if "hours" in entry else 0
    own_shadow = entry.get("shadow", False)
    if not isinstance(own_shadow, bool):
        raise PlansError(f"{path}.shadow", f"must be true or false (got {_type_name(own_shadow)})")
    return Limit(limit_id=_name(entry["id"], f"{path}.id", in_path=False), kind=kind,
                 free=_int(entry["free"], f"{path}.free", 0, _MAX_DAILY_FREE), hours=hours,
                 shadow=shadow or own_shadow)


def _optional(
    entry: Mapping[str, object], key: str, path: str, product: Product, parse: Callable[[object, str, Product], _T]
) -> _T | None:
    if key not in entry:
        return None
    return parse(entry[key], f"{path}.{key}", product)


def _rule_duration(value: object, path: str, product: Product) -> float:
    seconds = _seconds(value, path)
    if seconds > product.max_duration_seconds:
        bound = _format_seconds(_seconds_to_ms(product.max_duration_seconds))
        raise PlansError(path, f"must not exceed products.{product.name}.max_duration_seconds ({bound})")
    return seconds


def _rule_resolution(value: object, path: str, product: Product) -> str:
    if not isinstance(value, str) or value not in product.resolutions:
        known = _listing(product.resolutions, key=_resolution_height)
        raise PlansError(path, f"must be a resolution of {product.name}: {known} (got {value!r})")
    return value


def _rule_models(value: object, path: str, product: Product) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise PlansError(path, f"must be a non-empty list of models (got {_type_name(value)})")
    for model in value:
        if not isinstance(model, str) or model not in product.models:
            raise PlansError(path, f"unknown model {model!r}; known: {_listing(product.models)}")
    if len(set(value)) != len(value):
        raise PlansError(path, "lists a model twice")
    return frozenset(value)


def _rule_units(value: object, path: str, product: Product) -> int:
    return _int(value, path, 1, product.max_units)


# --- field checks ----------------------------------------------------------


def _mapping(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise PlansError(path or "<file>", f"must be a mapping (got {_type_name(value)})")
    for key in value:
        if not isinstance(key, str):
            raise PlansError(_join(path, str(key)), f"keys must be strings (got {_type_name(key)})")
    return value


def _check_keys(
    entry: Mapping[str, object], path: str, *, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    allowed = required + optional
    for key in entry:
        if key not in allowed:
            raise PlansError(_join(path, key), f"unknown key; expected one of: {', '.join(allowed)}")
    for key in required:
        if key not in entry:
            raise PlansError(_join(path, key), "is required")


def _name(value: object, path: str, *, in_path: bool = True) -> str:
    """Check a name; ``in_path`` when the name is a key (and so part of the path)."""
    where = _join(path, str(value)) if in_path else path
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise PlansError(where, f"must be a name matching {_NAME_RE.pattern} (got {value!r})")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise PlansError(path, f"must be a non-empty string (got {value!r})")
    return value


def _int(value: object, path: str, low: int, high: int) -> int:
    # bool is an int subclass; "yes" parsing to 1 would be a silent surprise.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PlansError(path, f"must be an integer >= {low} and <= {high} (got {value!r})")
    return value


def _seconds(value: object, path: str) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not 0 < value <= _MAX_DURATION_BOUND_SECONDS:  # NaN fails too
        raise PlansError(path, f"must be a number of seconds > 0 and <= {_MAX_DURATION_BOUND_SECONDS:g} (got {value!r})")
    if _seconds_to_ms(value) == 0:
        raise PlansError(path, "must be at least 0.001")
    return float(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__
