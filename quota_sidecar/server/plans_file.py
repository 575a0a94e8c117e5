"""The plans file: its format as pydantic models, the JSON Schema they publish, and loading it.

The plans file (YAML, see quota_sidecar/default_plans.yaml) is validated strictly: an unknown
key, a wrong type or a dangling reference raises PlansError naming the field as a dotted path such
as ``plans.pro.sora.daily_free``. A sidecar must refuse to start on a file it half understands,
because every sidecar of a deployment prices jobs itself.

``parse_plans`` validates a parsed document in two layers, both in the models below:

- the fields state each section's keys and types, strictly (``"5"`` is not 5 and ``yes`` is not
  1; unknown keys are refused). They are what ``plans_json_schema()`` publishes for editors
  (``python -m quota_sidecar.server.plans_file`` prints it; the package carries a copy,
  quota_sidecar/plans.schema.json, that a test keeps in step);
- their validators check what a schema cannot state: names that must refer to a product or a
  plan, what a plan allows against its product's bounds, and the ``scheduled`` changes, each
  validated as a whole file once applied.

Every refusal keeps the wording the file has always had: ``_problem`` turns the first pydantic
error into PlansError(dotted path, description). What the file means (pricing, entitlements)
stays in quota_sidecar.domain.plans; this module only builds its objects.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import sys
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterable, Literal, Mapping, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from quota_sidecar.domain.errors import PlansError
from quota_sidecar.domain.model import CreditPack, Limit, LimitKind, Money
from quota_sidecar.domain.plans import (
    MAX_ROLLING_HOURS,
    METERED,
    MILLI_PER_CREDIT,
    OVERAGE_POLICIES,
    TASK,
    VIDEO,
    Notifications,
    Plan,
    Plans,
    Product,
    ProductRules,
    Rate,
    format_seconds,
    resolution_height,
    seconds_to_ms,
)

DEFAULT_PLANS_FILE = "default_plans.yaml"
SCHEMA_FILE = "plans.schema.json"  # in the package, next to DEFAULT_PLANS_FILE

_NAME_PATTERN = "[a-z][a-z0-9_.-]{0,31}"
_RESOLUTION_PATTERN = "[0-9]{3,4}p"
# Plain decimal notation only: "1e3", "+4" or " 4" are more likely typos than intent, and the
# amount is money.
_PRICE_RE = re.compile(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,2})?")
_MINOR_UNITS_PER_MAJOR = 100  # every accepted price has at most 2 decimals
# A metered rate: credits per 1M tokens with at most 3 decimals (exact in milli-credits).
_RATE_RE = re.compile(r"(0|[1-9][0-9]{0,6})(\.[0-9]{1,3})?")
_MAX_TOKENS_BOUND = 1_000_000_000

_MAX_CREDITS = 1_000_000
_MAX_MULTIPLIER = 1_000
_MAX_DAILY_FREE = 1_000_000
_MAX_TTL_SECONDS = 86_400
_MAX_VALIDITY_MONTHS = 120
_MAX_SECONDS_PER_STEP = 86_400
_MAX_DURATION_BOUND_SECONDS = 86_400
_MAX_UNITS_BOUND = 1_000_000
_MAX_VERSION_CHARS = 64
_MAX_CONCURRENT = 10_000
_MAX_DEGRADED_FREE = 1_000
_MAX_DEBT_CREDITS = 1_000_000_000

FAILURE_POLICIES = ("fail_closed", "fail_open_free")
_OVERLAID = ("plans", "products", "packs", "notifications")  # the sections a scheduled change may replace
# What a plan's rules may say for a product of each kind.
_RULE_KEYS = {
    VIDEO: ("daily_free", "limits", "max_concurrent", "max_duration_seconds", "max_resolution", "models"),
    TASK: ("daily_free", "limits", "max_concurrent", "models", "max_units"),
    # A metered product's limits count included usage in credits-equivalent, not jobs.
    METERED: ("daily_free", "limits", "max_concurrent", "models", "max_debt_credits"),
}
_DEFAULT_NOTIFICATIONS = Notifications()

# The default of an optional key without a default value: an absent key reads as None, while an
# explicit null (``max_resolution:`` left empty) is refused by the field's type like any wrong value.
_ABSENT: Any = None


# --- refusals in the file's own words ---------------------------------------


def _type_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _listing(names: Iterable[str], key: Callable[[str], int] | None = None) -> str:
    return ", ".join(sorted(names, key=key)) or "(none)"


def _refusal(description: str, *at: str | int, field: str = "") -> PydanticCustomError:
    """A refusal worded as the file always was. ``at`` extends the error's location (keys as str,
    list indexes as int); ``field`` replaces it (the path within a scheduled variant)."""
    return PydanticCustomError("plans", "{description}", {"description": description, "at": at, "field": field})


class _Says:
    """Annotated metadata: whatever the annotated type refuses is refused with ``describe(value)``.

    For scalars: around a container it would hide where in it an item's error is.
    """

    def __init__(self, describe: Callable[[Any], str]) -> None:
        self.describe = describe

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_wrap_validator_function(self._validate, self._inner(source, handler))

    def _inner(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return handler(source)

    def _validate(self, value: Any, handler: core_schema.ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _refusal(self.describe(value)) from None


class _Between(_Says):
    """``Annotated[int, _Between(low, high)]``: an integer in [low, high]; never a bool nor a float."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__(lambda value: f"must be an integer >= {low} and <= {high} (got {value!r})")
        self.low, self.high = low, high

    def _inner(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return handler.generate_schema(Annotated[int, Field(ge=self.low, le=self.high)])


def _key(describe: Callable[[str], str]) -> _Says:
    """The refusal of a mapping's key: YAML keys can be numbers or dates, which no name is."""
    return _Says(lambda key: describe(key) if isinstance(key, str) else f"keys must be strings (got {_type_name(key)})")


def _a_mapping(if_empty: str = "") -> BeforeValidator:
    def check(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _refusal(f"must be a mapping (got {_type_name(value)})")
        if if_empty and not value:
            raise _refusal(if_empty)
        return value
    return BeforeValidator(check)


def _a_list(what: str, *, non_empty: bool = False) -> BeforeValidator:
    def check(value: Any) -> Any:
        if not isinstance(value, list) or (non_empty and not value):
            raise _refusal(f"must be {what} (got {_type_name(value)})")
        return value
    return BeforeValidator(check)


def _string_keys(mapping: dict[Any, Any]) -> None:
    for key in mapping:
        if not isinstance(key, str):
            raise _refusal(f"keys must be strings (got {_type_name(key)})", str(key))


def _name_refusal(value: Any) -> str:
    return f"must be a name matching {_NAME_PATTERN} (got {value!r})"


def _at_least_a_millisecond(seconds: float) -> float:
    if seconds_to_ms(seconds) == 0:
        raise _refusal("must be at least 0.001")
    return float(seconds)


def _price_minor_units(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _refusal(f"must be a decimal amount such as \"4.00\" (got {_type_name(value)})")
    # repr() of a float is its shortest exact spelling: 4.0 -> "4.0", 4.001 -> "4.001".
    text = value if isinstance(value, str) else repr(value)
    if not _PRICE_RE.fullmatch(text):
        raise _refusal(f"must be a positive amount with at most 2 decimals such as \"4.00\" (got {text!r})")
    minor_units = int(Decimal(text) * _MINOR_UNITS_PER_MAJOR)
    if minor_units <= 0:
        raise _refusal("must be greater than 0")
    return minor_units


def _rate_milli(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _refusal(f"must be credits per 1M tokens such as \"12.5\" (got {_type_name(value)})")
    text = value if isinstance(value, str) else repr(value)
    if not _RATE_RE.fullmatch(text):
        raise _refusal(f"must be credits per 1M tokens >= 0 with at most 3 decimals such as \"1.875\" "
                       f"(got {text!r})")
    return int(Decimal(text) * MILLI_PER_CREDIT)


def _instant(value: Any) -> datetime:
    if isinstance(value, datetime):  # YAML parses unquoted timestamps
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _refusal(f"must be an RFC 3339 time such as 2026-12-01T00:00:00Z (got {value!r})") from None
    else:
        raise _refusal(f"must be an RFC 3339 time (got {_type_name(value)})")
    if moment.tzinfo is None:
        raise _refusal("must carry a zone (Z or +hh:mm)")
    return moment


# --- field types ----------------------------------------------------------------

Name = Annotated[str, Field(pattern=f"^{_NAME_PATTERN}$"), _Says(_name_refusal)]
NameKey = Annotated[str, Field(pattern=f"^{_NAME_PATTERN}$"), _key(_name_refusal)]
AnyKey = Annotated[str, _key(str)]  # a product or plan name, checked against them by a validator
ResolutionKey = Annotated[str, Field(pattern=f"^{_RESOLUTION_PATTERN}$"),
                          _key(lambda _: "must be a resolution such as 720p (3 or 4 digits then p)")]
NonEmptyText = Annotated[str, Field(min_length=1), _Says(lambda value: f"must be a non-empty string (got {value!r})")]
Version = Annotated[str, Field(min_length=1, max_length=_MAX_VERSION_CHARS), _Says(
    # An unquoted 2026-11-01 is a YAML date; say how to fix it.
    lambda value: f"must be 1..{_MAX_VERSION_CHARS} characters" if isinstance(value, str)
    else f"must be a quoted string (got {_type_name(value)})")]
Currency = Annotated[str, Field(pattern="^[A-Z]{3}$"),
                     _Says(lambda value: f"must be a 3-letter ISO 4217 code such as USD (got {value!r})")]
# Validated into integer minor units ("4.00" -> 400): a price is never a float.
Price = Annotated[int, PlainValidator(_price_minor_units), WithJsonSchema({
    "anyOf": [{"type": "string", "pattern": f"^{_PRICE_RE.pattern}$"}, {"type": "number", "exclusiveMinimum": 0}],
})]
Seconds = Annotated[float, Field(gt=0, le=_MAX_DURATION_BOUND_SECONDS), _Says(
    lambda value: f"must be a number of seconds > 0 and <= {_MAX_DURATION_BOUND_SECONDS:g} (got {value!r})"),
    AfterValidator(_at_least_a_millisecond)]
Multiplier = Annotated[int, _Between(1, _MAX_MULTIPLIER)]
FailurePolicy = Annotated[Literal["fail_closed", "fail_open_free"], _Says(
    lambda value: f"must be one of {', '.join(FAILURE_POLICIES)} (got {value!r})")]
LimitKindName = Annotated[Literal["day", "week", "rolling"], _Says(
    lambda value: f"must be one of {', '.join(kind.value for kind in LimitKind)} (got {value!r})")]
Flag = Annotated[bool, _Says(lambda value: f"must be true or false (got {_type_name(value)})")]
Names = Annotated[list[str], _Says(lambda value: f"must be a list of names (got {_type_name(value)})")]
# Validated into integer milli-credits per 1M tokens ("1.875" -> 1875): a rate is never a float.
RateMilli = Annotated[int, PlainValidator(_rate_milli), WithJsonSchema({
    "anyOf": [{"type": "string", "pattern": f"^{_RATE_RE.pattern}$"}, {"type": "number", "minimum": 0}],
})]
OveragePolicy = Annotated[Literal["reject", "cap", "draw"], _Says(
    lambda value: f"must be one of {', '.join(OVERAGE_POLICIES)} (got {value!r})")]
Instant = Annotated[datetime, PlainValidator(_instant), WithJsonSchema({"type": "string", "format": "date-time"})]


# --- sections -----------------------------------------------------------------


class _Section(BaseModel):
    """A mapping of the file: known keys only, each strictly typed."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, cls):  # a section already validated (scheduled changes reuse them)
            return data
        if not isinstance(data, dict):
            raise _refusal(f"must be a mapping (got {_type_name(data)})")
        _string_keys(data)
        if cls.model_config.get("extra") == "forbid":
            for key in data:
                if key not in cls.model_fields:
                    raise _refusal(f"unknown key; expected one of: {', '.join(cls.model_fields)}", key)
        return data


class PackSection(_Section):
    """A credit pack offered when a job is denied for lack of credits."""

    credits: Annotated[int, _Between(1, _MAX_CREDITS)]
    price: Price = Field(description='A decimal amount with at most 2 decimals, quoted so YAML keeps it exact: "4.00".')
    currency: Currency


class _ProductSection(_Section):
    kind: str
    if TYPE_CHECKING:  # declared by each kind after its own keys, the order the file lists them in
        on_redis_failure: str
        degraded_free_per_window: int | None
    unit: Name = Field(description="What one unit of a job is called (generation, task).")
    default_ttl_seconds: Annotated[int, _Between(1, _MAX_TTL_SECONDS)] = Field(
        description="A hold not committed or released within this time is released.")
    models: Annotated[dict[NameKey, Multiplier], Field(min_length=1), _a_mapping("must list at least one entry")] = (
        Field(description="Model -> price multiplier."))
    default_model: NonEmptyText

    @model_validator(mode="after")
    def _consistent(self) -> _ProductSection:
        if self.default_model not in self.models:
            raise _refusal(f"unknown model {self.default_model!r}; known: {_listing(self.models)}", "default_model")
        policy, allowance = self.on_redis_failure, self.degraded_free_per_window
        if (policy == "fail_open_free") != (allowance is not None):
            raise _refusal("is required with fail_open_free and only with it", "degraded_free_per_window")
        if policy == "fail_open_free" and allowance is not None and allowance < 1:
            raise _refusal("must be at least 1", "degraded_free_per_window")
        return self


_FAILURE_POLICY_DESCRIPTION = ("When Redis cannot be reached: fail_closed (UNAVAILABLE) or fail_open_free "
                               "(up to degraded_free_per_window free jobs per account, per sidecar, per local day).")


class VideoProductSection(_ProductSection):
    """Priced ceil(duration / seconds_per_step) * credits_per_step * resolutions[r] * models[m]."""

    kind: Literal["video"]
    seconds_per_step: Annotated[int, _Between(1, _MAX_SECONDS_PER_STEP)]
    credits_per_step: Annotated[int, _Between(1, _MAX_CREDITS)]
    max_duration_seconds: Seconds = Field(description="A longer job is refused as invalid, whatever the plan.")
    resolutions: Annotated[dict[ResolutionKey, Multiplier], Field(min_length=1),
                           _a_mapping("must list at least one entry")] = Field(
        description='Resolution ("<height>p") -> price multiplier.')
    on_redis_failure: FailurePolicy = Field(default="fail_closed", description=_FAILURE_POLICY_DESCRIPTION)
    degraded_free_per_window: Annotated[int, _Between(0, _MAX_DEGRADED_FREE)] = _ABSENT


class TaskProductSection(_ProductSection):
    """Priced units * models[m] (units 0 means 1)."""

    kind: Literal["task"]
    max_units: Annotated[int, _Between(1, _MAX_UNITS_BOUND)] = Field(
        description="Sanity bound on units per job, whatever the plan.")
    on_redis_failure: FailurePolicy = Field(default="fail_closed", description=_FAILURE_POLICY_DESCRIPTION)
    degraded_free_per_window: Annotated[int, _Between(0, _MAX_DEGRADED_FREE)] = _ABSENT


class RateSection(_Section):
    """A metered model's rate card: credits per 1M tokens, at most 3 decimals (exact milli-credits)."""

    input: RateMilli
    cached_input: RateMilli
    output: RateMilli


class MeteredProductSection(_ProductSection):
    """Priced by usage: ceil(sum(tokens * rate) / 1M) milli-credits per models[m], times
    fast_multiplier in the fast mode; a job costs that rounded up to whole credits."""

    kind: Literal["metered"]
    models: Annotated[dict[NameKey, RateSection], Field(min_length=1),
                      _a_mapping("must list at least one entry")] = Field(  # type: ignore[assignment]
        description="Model -> rate card (credits per 1M input, cached input and output tokens).")
    fast_multiplier: Annotated[int, _Between(1, _MAX_MULTIPLIER)] = Field(
        default=1, description="The fast mode's price multiplier.")
    default_hold_credits: Annotated[int, _Between(1, _MAX_CREDITS)] = Field(
        description="Credits held when the worker gives no usage estimate.")
    max_tokens: Annotated[int, _Between(1, _MAX_TOKENS_BOUND)] = Field(
        description="Sanity bound on each token count of a job, whatever the plan.")
    overage: OveragePolicy = Field(default="reject", description="Usage above the hold at Commit: reject "
                                   "(COST_EXCEEDS_HOLD), cap (charge the hold, the excess written off) or draw "
                                   "(charge the hold, the excess from the account's lots, soonest expiring first, "
                                   "then as debt up to the plan's max_debt_credits, the rest written off).")
    on_redis_failure: FailurePolicy = Field(default="fail_closed", description=_FAILURE_POLICY_DESCRIPTION)
    degraded_free_per_window: Annotated[int, _Between(0, _MAX_DEGRADED_FREE)] = _ABSENT

    @model_validator(mode="after")
    def _fails_closed(self) -> MeteredProductSection:
        # A job decided without Redis is a free job whose usage nothing settles: free tokens without
        # bound, no included-usage window and no credits charged. Metered products fail closed.
        if self.on_redis_failure != "fail_closed":
            raise _refusal("must be fail_closed for a metered product: without Redis its usage could be "
                           "neither counted nor charged", "on_redis_failure")
        return self


_KINDS = (METERED, TASK, VIDEO)


def _product_kind(value: Any) -> Any:
    """Before the kinds' models: say which kinds there are (they decide the other keys)."""
    if isinstance(value, dict):
        _string_keys(value)
        if value.get("kind") not in _KINDS:
            raise _refusal(f"must be one of {_listing(_KINDS)} (got {value.get('kind')!r})", "kind")
    elif not isinstance(value, _ProductSection):
        raise _refusal(f"must be a mapping (got {_type_name(value)})")
    return value


AnyProductSection = Union[VideoProductSection, TaskProductSection, MeteredProductSection]
ProductSection = Annotated[AnyProductSection, Field(discriminator="kind"),
                           BeforeValidator(_product_kind)]


class LimitSection(_Section):
    """Free units per window (a metered product: included usage in credits); all of a plan's enforced
    limits must have room for a job to be free."""

    id: Name
    kind: LimitKindName = Field(description="day and week: calendar windows in the account's zone; "
                                            "rolling: the last `hours` hours, exact.")
    free: Annotated[int, _Between(0, _MAX_DAILY_FREE)]
    hours: Annotated[int, _Between(1, MAX_ROLLING_HOURS)] = Field(default=_ABSENT, description="Rolling limits only.")
    shadow: Flag = Field(default=False, description="Evaluated and reported, never enforced.")

    @model_validator(mode="after")
    def _hours_for_rolling(self) -> LimitSection:
        if (self.kind == LimitKind.ROLLING.value) != (self.hours is not None):
            raise _refusal("is required for rolling limits and only for them", "hours")
        return self


class RulesSection(_Section):
    """What one plan allows for one product. The product's kind decides which keys apply."""

    # Other keys are kept, not refused here: PlansVersion refuses them, listing the keys of the
    # product's kind, which this section cannot know.
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    daily_free: Annotated[int, _Between(0, _MAX_DAILY_FREE)] = Field(
        default=_ABSENT, description="Free jobs per local day (a metered product: included usage in credits): "
                                     "short for limits: [{id: daily, kind: day, free: N}].")
    limits: Annotated[list[LimitSection], Field(min_length=1), _a_list("a non-empty list", non_empty=True)] = _ABSENT
    max_concurrent: Annotated[int, _Between(0, _MAX_CONCURRENT)] = Field(
        default=0, description="Jobs in flight per account; 0 = no cap.")
    # The next ones depend on the product (its bounds, resolutions and models): checked by
    # PlansVersion, which knows it; the schema states what it can.
    max_duration_seconds: Seconds = Field(
        default=_ABSENT, description="(video) Longest video allowed; omitted = product bound.")
    max_resolution: Annotated[Any, WithJsonSchema({"type": "string", "pattern": f"^{_RESOLUTION_PATTERN}$"})] = Field(
        default=_ABSENT, description="(video) Highest resolution allowed, one of the product's; omitted = all.")
    models: Annotated[list[Any], _a_list("a non-empty list of models", non_empty=True), WithJsonSchema(
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": True})] = Field(
        default=_ABSENT, description="Models allowed; omitted = every model of the product.")
    max_units: Annotated[Any, WithJsonSchema({"type": "integer", "minimum": 1})] = Field(
        default=_ABSENT, description="(task) Most units per job, up to the product's max_units; omitted = that.")
    max_debt_credits: Annotated[int, _Between(0, _MAX_DEBT_CREDITS)] = Field(
        default=0, description="(metered, overage: draw) The debt a commit may raise the account's to: usage past "
                               "the hold and the account's credits, owed until credits come in; 0 = none, the "
                               "excess is written off.")

    @model_validator(mode="after")
    def _one_way_to_limit(self) -> RulesSection:
        if self.model_extra:  # an unknown key: refused first, by PlansVersion
            return self
        if (self.daily_free is None) == (self.limits is None):
            raise _refusal("give either daily_free or limits (not both)", "limits")
        if self.limits is not None:
            ids = [limit.id for limit in self.limits]
            if len(set(ids)) != len(ids):
                raise _refusal(f"limit ids must be unique (got {', '.join(ids)})", "limits")
        return self


PlanSection = Annotated[dict[AnyKey, RulesSection], _a_mapping()]


class NotificationsSection(_Section):
    """When usage events fire."""

    free_warning_percent: Annotated[int, _Between(1, 100)] = Field(
        default=_DEFAULT_NOTIFICATIONS.free_warning_percent,
        description="free_warning fires when this share of a window's free allowance is used.")
    lot_expiry_notice_days: Annotated[int, _Between(1, 365)] = Field(
        default=_DEFAULT_NOTIFICATIONS.lot_expiry_notice_days,
        description="lot_expiring fires this many days before a lot with credits left expires.")
    credits_low: Annotated[dict[AnyKey, Annotated[int, _Between(0, _MAX_CREDITS)]], _a_mapping()] = Field(
        default_factory=dict, description="Plan -> credits_low fires when the balance falls below this; 0 = never.")


class ShadowSection(_Section):
    """Every limit (and concurrency cap) of these plans and products is evaluated, not enforced."""

    plans: Names = Field(default_factory=list)
    products: Names = Field(default_factory=list)


PacksSection = Annotated[dict[NameKey, PackSection], _a_mapping()]
ProductsSection = Annotated[dict[NameKey, ProductSection], _a_mapping()]
PlansSection = Annotated[dict[NameKey, PlanSection], _a_mapping()]


class ScheduledChange(_Section):
    """From ``effective_from`` on, these entries replace the file's entries of the same names."""

    effective_from: Instant = Field(description="RFC 3339 with a zone, e.g. 2027-01-01T00:00:00Z.")
    plans: PlansSection = _ABSENT
    products: ProductsSection = _ABSENT
    packs: PacksSection = _ABSENT
    notifications: NotificationsSection = _ABSENT


class PlansVersion(_Section):
    """One version of the plans: the file without its ``scheduled`` changes, or a variant they make."""

    version: Version = Field(description="Changes whenever prices or allowances change; reported by the sidecar.")
    default_plan: NonEmptyText = Field(description="Plan of an account that was never given one.")
    credit_validity_months: Annotated[int, _Between(1, _MAX_VALIDITY_MONTHS)] = Field(
        description="Granted credits expire this many calendar months after the grant unless it names its own expiry.")
    packs: PacksSection
    products: Annotated[dict[NameKey, ProductSection], Field(min_length=1),
                        _a_mapping("must define at least one product")]
    plans: Annotated[dict[NameKey, PlanSection], Field(min_length=1), _a_mapping("must define at least one plan")] = (
        Field(description="Plan -> product -> what the plan allows; a plan without a product does not include it."))
    notifications: NotificationsSection = NotificationsSection()
    shadow: ShadowSection = ShadowSection()

    @field_validator("packs")
    @classmethod
    def _one_currency(cls, packs: dict[str, PackSection]) -> dict[str, PackSection]:
        currencies = {pack.currency for pack in packs.values()}
        if len(currencies) > 1:
            # Offers are ranked by total price, which means nothing across currencies.
            raise _refusal(f"all packs must share one currency (got {_listing(currencies)})")
        return packs

    @model_validator(mode="after")
    def _references(self) -> PlansVersion:
        """Every name used refers to something defined, and plans stay within their products."""
        products, plans = self.products, self.plans
        unknown = set(self.shadow.products) - set(products)
        if unknown:
            raise _refusal(f"unknown product {sorted(unknown)[0]!r}; known: {_listing(products)}", "shadow", "products")
        for plan_name, rules_by_product in plans.items():
            for product_name, rules in rules_by_product.items():
                if product_name not in products:
                    raise _refusal(f"unknown product; known products: {_listing(products)}",
                                   "plans", plan_name, product_name)
                _check_rules(rules, product_name, products[product_name], ("plans", plan_name, product_name))
        unknown = set(self.shadow.plans) - set(plans)
        if unknown:
            raise _refusal(f"unknown plan {sorted(unknown)[0]!r}; known: {_listing(plans)}", "shadow", "plans")
        if self.default_plan not in plans:
            raise _refusal(f"unknown plan {self.default_plan!r}; known plans: {_listing(plans)}", "default_plan")
        for plan_name in self.notifications.credits_low:
            if plan_name not in plans:
                raise _refusal(f"unknown plan; known plans: {_listing(plans)}", "notifications", "credits_low",
                               plan_name)
        return self


def _check_rules(rules: RulesSection, name: str, product: AnyProductSection,
                 at: tuple[str, ...]) -> None:
    """A plan's rules (at ``at``) against the product they are for."""
    allowed = _RULE_KEYS[product.kind]
    given = [*(rules.model_extra or {}), *(key for key in RulesSection.model_fields if key in rules.model_fields_set)]
    for key in given:
        if key not in allowed:
            raise _refusal(f"unknown key; expected one of: {', '.join(allowed)}", *at, key)
    if isinstance(product, VideoProductSection):
        if rules.max_duration_seconds is not None and rules.max_duration_seconds > product.max_duration_seconds:
            bound = format_seconds(seconds_to_ms(product.max_duration_seconds))
            raise _refusal(f"must not exceed products.{name}.max_duration_seconds ({bound})", *at,
                           "max_duration_seconds")
        value = rules.max_resolution
        if "max_resolution" in rules.model_fields_set and (not isinstance(value, str) or
                                                           value not in product.resolutions):
            known = _listing(product.resolutions, key=resolution_height)
            raise _refusal(f"must be a resolution of {name}: {known} (got {value!r})", *at, "max_resolution")
    if rules.models is not None:
        for model in rules.models:
            if not isinstance(model, str) or model not in product.models:
                raise _refusal(f"unknown model {model!r}; known: {_listing(product.models)}", *at, "models")
        if len(set(rules.models)) != len(rules.models):
            raise _refusal("lists a model twice", *at, "models")
    if isinstance(product, TaskProductSection) and "max_units" in rules.model_fields_set:
        value = rules.max_units
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= product.max_units:
            raise _refusal(f"must be an integer >= 1 and <= {product.max_units} (got {value!r})", *at, "max_units")


class PlansFile(PlansVersion):
    """The plans file: a version of the plans, and the changes scheduled to it."""

    model_config = ConfigDict(title="quota-sidecar plans file")

    scheduled: Annotated[list[ScheduledChange], _a_list("a list")] = Field(
        default_factory=list, description="Changes announced in advance, in order; each variant they make is "
                                          "validated like a whole file. Its version is <version>@<instant UTC>.")
    _variants: tuple[tuple[int, PlansVersion], ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _schedule(self) -> PlansFile:
        """Applies each change to the previous variant (the first to the file) and validates the result."""
        sections: dict[str, Any] = {name: getattr(self, name) for name in PlansVersion.model_fields}
        variants: list[tuple[int, PlansVersion]] = []
        for index, change in enumerate(self.scheduled):
            from_ms = int(change.effective_from.timestamp() * 1000)
            if variants and from_ms <= variants[-1][0]:
                raise _refusal("must be later than the previous scheduled change", "scheduled", index, "effective_from")
            for name in ("plans", "products", "packs"):  # named entries replace the previous ones
                if getattr(change, name) is not None:
                    sections[name] = {**sections[name], **getattr(change, name)}
            if change.notifications is not None:  # and so do the keys given
                given = change.notifications.model_fields_set
                sections["notifications"] = sections["notifications"].model_copy(
                    update={name: getattr(change.notifications, name) for name in given})
            stamp = datetime.fromtimestamp(from_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            try:
                variant = PlansVersion.model_validate({**sections, "version": f"{self.version}@{stamp}"})
            except ValidationError as exc:
                field, description = _problem(exc)
                raise _refusal(description, field=f"scheduled[{index}]: {field}") from None
            variants.append((from_ms, variant))
        self._variants = tuple(variants)
        return self

    @property
    def variants(self) -> tuple[tuple[int, PlansVersion], ...]:
        """(effective_from in ms, the plans in force from then on), in order."""
        return self._variants


# --- errors -------------------------------------------------------------------


def _problem(exc: ValidationError) -> tuple[str, str]:
    """(dotted path, description) of the first error: ``plans.pro.codex.limits[0].kind``."""
    error = exc.errors(include_url=False)[0]
    loc: tuple[str | int, ...] = error["loc"]
    context = error.get("ctx") or {}
    if error["type"] == "plans":
        if context["field"]:
            return context["field"], context["description"]
        loc, description = loc + tuple(context["at"]), context["description"]
    elif error["type"] == "missing":
        description = "is required"
    else:  # not expected: every field type words its refusals; pydantic's words then
        description = error["msg"]
    return _dotted(loc) or "<file>", description


def _dotted(loc: tuple[str | int, ...]) -> str:
    parts = list(loc)
    prefix = ""
    if len(parts) > 2 and parts[0] == "scheduled" and isinstance(parts[1], int) and parts[2] in _OVERLAID:
        # Within a scheduled change, paths read as in a whole file: "scheduled[0]: plans.free...".
        prefix, parts = f"scheduled[{parts[1]}]: ", parts[2:]
    if len(parts) > 2 and parts[0] == "products" and parts[2] in _KINDS:
        del parts[2]  # the tag pydantic adds for the product's kind
    path = ""
    for index, part in enumerate(parts):
        if part == "[key]":  # the error is the key's, which the path already ends with
            continue
        if isinstance(part, int) and parts[index + 1:index + 2] != ["[key]"]:
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return prefix + path


# --- building the domain's plans --------------------------------------------------


def _product(name: str, section: AnyProductSection) -> Product:
    product = Product(
        name=name,
        kind=section.kind,
        unit_name=section.unit,
        default_ttl_seconds=section.default_ttl_seconds,
        models=MappingProxyType({model: 1 for model in section.models} if isinstance(section, MeteredProductSection)
                                else dict(section.models)),
        default_model=section.default_model,
        on_redis_failure=section.on_redis_failure,
        degraded_free_per_window=section.degraded_free_per_window or 0,
    )
    if isinstance(section, TaskProductSection):
        return replace(product, max_units=section.max_units)
    if isinstance(section, MeteredProductSection):
        rates = {model: Rate(r.input, r.cached_input, r.output) for model, r in section.models.items()}
        return replace(product, rates=MappingProxyType(rates), fast_multiplier=section.fast_multiplier,
                       default_hold_credits=section.default_hold_credits, max_tokens=section.max_tokens,
                       overage=section.overage)
    return replace(
        product,
        seconds_per_step=section.seconds_per_step,
        credits_per_step=section.credits_per_step,
        resolutions=MappingProxyType(dict(section.resolutions)),
        max_duration_seconds=section.max_duration_seconds,
    )


def _rules(section: RulesSection, shadow: bool) -> ProductRules:
    if section.daily_free is not None:
        limits: tuple[Limit, ...] = (Limit("daily", LimitKind.DAY, section.daily_free, shadow=shadow),)
    else:
        limits = tuple(Limit(limit.id, LimitKind(limit.kind), limit.free, hours=limit.hours or 0,
                             shadow=shadow or limit.shadow) for limit in section.limits)
    given = section.model_fields_set
    return ProductRules(
        limits=limits,
        max_duration_seconds=None if section.max_duration_seconds is None else float(section.max_duration_seconds),
        max_resolution=section.max_resolution if "max_resolution" in given else None,
        models=frozenset(section.models) if section.models is not None else None,
        max_units=section.max_units if "max_units" in given else None,
        max_concurrent=section.max_concurrent,
        concurrency_shadow=shadow,
        max_debt_credits=section.max_debt_credits,
    )


def _plans(version: PlansVersion, effective_from_ms: int = 0) -> Plans:
    shadow_plans, shadow_products = set(version.shadow.plans), set(version.shadow.products)
    plans = {
        plan_name: Plan(plan_name, MappingProxyType({
            product_name: _rules(rules, plan_name in shadow_plans or product_name in shadow_products)
            for product_name, rules in rules_by_product.items()}))
        for plan_name, rules_by_product in version.plans.items()
    }
    notifications = version.notifications
    return Plans(
        version=version.version,
        default_plan=version.default_plan,
        credit_validity_months=version.credit_validity_months,
        packs=tuple(CreditPack(pack_id, pack.credits, Money(pack.currency, pack.price))
                    for pack_id, pack in version.packs.items()),
        products=MappingProxyType({name: _product(name, section) for name, section in version.products.items()}),
        plans=MappingProxyType(plans),
        notifications=Notifications(
            free_warning_percent=notifications.free_warning_percent,
            lot_expiry_notice_days=notifications.lot_expiry_notice_days,
            credits_low=MappingProxyType(dict(notifications.credits_low)),
        ),
        effective_from_ms=effective_from_ms,
    )


def parse_plans(data: object, *, source: str = "<plans>") -> Plans:
    """Validate the parsed YAML document ``data``; PlansError names the bad field."""
    if not isinstance(data, Mapping):
        raise PlansError("<file>", f"must be a mapping at the top level (got {_type_name(data)})", source=source)
    try:
        document = PlansFile.model_validate(dict(data))
    except ValidationError as exc:
        raise PlansError(*_problem(exc), source=source) from None
    schedule = tuple((from_ms, _plans(variant, from_ms)) for from_ms, variant in document.variants)
    return replace(_plans(document), schedule=schedule)


# --- loading ----------------------------------------------------------------------


def load_plans(path: str | None = None) -> Plans:
    """Load and validate a plans file; None loads the packaged default_plans.yaml."""
    if path is None:
        source = f"quota_sidecar/{DEFAULT_PLANS_FILE}"
        resource = importlib.resources.files("quota_sidecar").joinpath(DEFAULT_PLANS_FILE)
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


# --- the JSON Schema ----------------------------------------------------------------


class _SchemaGenerator(GenerateJsonSchema):
    """Pydantic's JSON Schema, tightened to what the loader accepts and trimmed for editors."""

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        result = super().dict_schema(schema)
        if "patternProperties" in result:  # names are keys: a key that is not one is refused
            result.setdefault("additionalProperties", False)
        return result

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        if schema.get("default", ...) is None:  # _ABSENT: optional, without a default value
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False  # "Daily Free" says less than the key itself

    def generate(self, schema: core_schema.CoreSchema, mode: JsonSchemaMode = "validation") -> JsonSchemaValue:
        return {"$schema": self.schema_dialect, **super().generate(schema, mode)}


def plans_json_schema() -> dict[str, Any]:
    """The JSON Schema of the plans file (draft 2020-12), from the models that validate it.

    It states the structure; what only a validator can check (names that refer to a product or a
    plan, plans within their products' bounds, the scheduled variants) still needs check-plans.
    """
    schema = PlansFile.model_json_schema(schema_generator=_SchemaGenerator)
    schema["description"] = ("The plans file of quota-sidecar: products, prices and what each plan allows. "
                             "Validate one with `quota-sidecar check-plans FILE`.")
    return schema


def plans_json_schema_text() -> str:
    """The schema as checked in (quota_sidecar/plans.schema.json)."""
    return json.dumps(plans_json_schema(), indent=2) + "\n"


def schema_location() -> str:
    """Where the package's copy of the schema is (what the default plans' modeline names)."""
    return str(importlib.resources.files("quota_sidecar").joinpath(SCHEMA_FILE))


def main() -> int:
    """``python -m quota_sidecar.server.plans_file``: print the JSON Schema of the plans file."""
    sys.stdout.write(plans_json_schema_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
