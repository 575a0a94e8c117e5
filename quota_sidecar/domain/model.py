"""Plain domain values shared by the engine, the store and the servicer.

No protobuf and no redis types here: the servicer converts protobuf to these,
the store converts these to Lua arguments and back. Times are integer
milliseconds since the Unix epoch (``*_ms``); credits and units are integers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class JobParams:
    """The size of a job, as the worker describes it.

    ``duration_seconds`` 0.0, ``resolution``/``model`` "" and ``units`` 0 mean
    "not given"; which fields a product needs is the plans file's business.
    """

    duration_seconds: float = 0.0
    resolution: str = ""
    model: str = ""
    units: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)
    # The cameos (characters, likenesses) the job uses; each active one's fee is added to its cost.
    cameo_ids: tuple[str, ...] = ()
    # Usage of a metered product (see the plans file's `kind: metered`): at CheckAndReserve the
    # worker's estimate (all 0: the product's default hold), at Commit the actual usage.
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    fast: bool = False  # the fast mode: the rate card times the product's fast_multiplier

    @property
    def has_usage(self) -> bool:
        return bool(self.input_tokens or self.cached_input_tokens or self.output_tokens)


@dataclass(frozen=True)
class Cameo:
    """A rights-holder's character or likeness: each job using it pays ``fee_credits`` (per use),
    the owner's royalty. Admin data, like the plans: every sidecar keeps them in memory."""

    cameo_id: str
    owner_account_id: str
    fee_credits: int
    active: bool
    updated_ms: int = 0


class Funding(enum.Enum):
    FREE_QUOTA = "free"
    CREDITS = "credits"


class DenialReason(enum.Enum):
    PURCHASE_REQUIRED = "PURCHASE_REQUIRED"
    NOT_ENTITLED = "NOT_ENTITLED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    CONCURRENCY_LIMIT = "CONCURRENCY_LIMIT"


class CreditSource(enum.Enum):
    """Where a lot came from; ``rank`` orders lots of equal expiry (lowest spent first)."""

    PROMO = "promo"
    COMPENSATION = "compensation"
    REFUND = "refund"
    PURCHASE = "purchase"

    @property
    def rank(self) -> int:
        return _SOURCE_RANKS[self]


_SOURCE_RANKS = {CreditSource.PROMO: 0, CreditSource.COMPENSATION: 1, CreditSource.REFUND: 2, CreditSource.PURCHASE: 3}


@dataclass(frozen=True)
class Stamp:
    """What every store call carries: the pinned time (0: Redis decides) and the plans version."""

    now_ms: int = 0
    plans_version: str = ""


@dataclass(frozen=True)
class Money:
    currency_code: str
    minor_units: int


@dataclass(frozen=True)
class CreditPack:
    pack_id: str
    credits: int
    price: Money


@dataclass(frozen=True)
class Offer:
    """``quantity`` of ``pack`` cover a shortfall; total is quantity * price."""

    pack: CreditPack
    quantity: int

    @property
    def total_price(self) -> Money:
        return Money(self.pack.price.currency_code, self.pack.price.minor_units * self.quantity)


class LimitKind(enum.Enum):
    DAY = "day"  # the calendar day in the account's zone
    WEEK = "week"  # the calendar week (Monday to Sunday) in the account's zone
    ROLLING = "rolling"  # the last `hours` hours, exact


@dataclass(frozen=True)
class Limit:
    """A free-allowance limit: ``free`` units per window. A shadow limit is evaluated, not enforced."""

    limit_id: str
    kind: LimitKind
    free: int
    hours: int = 0  # rolling windows only
    shadow: bool = False

    def as_json(self) -> dict[str, object]:
        return {"id": self.limit_id, "kind": self.kind.value, "free": self.free, "hours": self.hours,
                "shadow": 1 if self.shadow else 0}


@dataclass(frozen=True)
class LimitOverride:
    """An account's own limits for one product, replacing its plan's (an enterprise contract)."""

    product: str
    limits: tuple[Limit, ...]
    max_concurrent: int = 0

    def as_json(self) -> dict[str, object]:
        return {"limits": [limit.as_json() for limit in self.limits], "max_concurrent": self.max_concurrent}


@dataclass(frozen=True)
class LimitStatus:
    limit: Limit
    used: int
    resets_ms: int


@dataclass(frozen=True)
class Window:
    """A free-allowance window [start_ms, end_ms), labelled by its local date (YYYYMMDD)."""

    label: str
    start_ms: int
    end_ms: int


@dataclass(frozen=True)
class PlanRow:
    """What one plan means for one reservation: its free limits, whether the job is allowed,
    below which balance its credits_low event fires (0: never), and its concurrency cap."""

    plan: str
    limits: tuple[Limit, ...]
    entitled: bool
    credits_low: int = 0
    max_concurrent: int = 0
    concurrency_shadow: bool = False


@dataclass(frozen=True)
class Segment:
    """The plans in force from ``from_ms`` on (0: before every scheduled change): the job's
    price under them, their version and what each plan allows. The script uses the last
    segment that has begun by Redis' now."""

    from_ms: int
    cost_credits: int
    plans_version: str
    plan_rows: tuple[PlanRow, ...]
    # A metered product: its limits count included usage, a free job taking its cost_credits of
    # each (else one unit per job).
    metered: bool = False


@dataclass(frozen=True)
class ReserveCommand:
    account_id: str
    reservation_id: str
    product: str
    fingerprint: str
    ttl_ms: int
    segments: tuple[Segment, ...]
    default_plan: str
    time_zone: str  # the zone the windows were computed for
    windows: tuple[Window, ...]
    weeks: tuple[Window, ...]
    months: tuple[Window, ...]
    packs: tuple[CreditPack, ...]
    free_warning_percent: int
    stamp: Stamp
    # The job's cameos as the registry knows them: (cameo_id, owner, fee, active); unknown: ("", 0, False).
    cameos: tuple[tuple[str, str, int, bool], ...] = ()


@dataclass(frozen=True)
class ReserveOutcome:
    allowed: bool
    plan: str
    funding: Funding | None
    denial: DenialReason | None
    cost_credits: int
    credits_held: int
    credits_short: int
    free_used: int
    free_limit: int
    free_resets_ms: int
    credit_balance: int
    expires_ms: int
    now_ms: int
    replayed: bool
    limits: tuple[LimitStatus, ...] = ()
    shadow_limits: tuple[str, ...] = ()
    plans_version: str = ""
    degraded: bool = False  # decided without Redis (fail_open_free)
    fees_credits: int = 0  # the cameo fees in cost_credits (paid from credits even on a free job)
    cameo_id: str = ""  # NOT_ENTITLED because of this cameo (unknown or inactive)
    # The account's open debt when it refused the job (PURCHASE_REQUIRED; included in credits_short).
    debt_credits: int = 0


@dataclass(frozen=True)
class Decision:
    """The answer to CheckAndReserve, as the servicer reports it."""

    reservation_id: str
    outcome: ReserveOutcome
    denial_message: str = ""
    offers: tuple[Offer, ...] = ()
    # What the free allowance counts (Plans.allowance_unit): the product's unit, or "credits" of
    # included usage for a metered product.
    allowance_unit: str = ""


@dataclass(frozen=True)
class CommitResult:
    funding: Funding
    credits_charged: int
    credits_refunded: int
    free_charged: int
    credit_balance: int
    replayed: bool
    degraded: bool = False
    written_off: int = 0  # credits of usage above the hold not charged (overage: cap, or draw past the debt bound)
    credits_drawn: int = 0  # overage: draw: credits of usage above the hold taken from the lots
    debt_credits: int = 0  # overage: draw: the debt this commit opened (in credits_charged)
    included_usage_credits: int = 0  # a metered job on included usage: the usage charged to the windows


@dataclass(frozen=True)
class ReleaseResult:
    funding: Funding
    credits_refunded: int
    free_refunded: int
    credit_balance: int
    replayed: bool
    degraded: bool = False


@dataclass(frozen=True)
class Lot:
    lot_id: str
    credits_granted: int
    credits_left: int
    expires_ms: int
    granted_ms: int
    source: CreditSource = CreditSource.PURCHASE
    revoked: bool = False


@dataclass(frozen=True)
class GrantResult:
    lot: Lot
    credit_balance: int
    replayed: bool
    debt_paid_credits: int = 0  # of the account's open debt, paid by this grant's credits


@dataclass(frozen=True)
class HoldInfo:
    reservation_id: str
    product: str
    funding: Funding
    credits_held: int
    expires_ms: int


@dataclass(frozen=True)
class Allowance:
    """A product's free allowance: the most constrained enforced limit, and all of them."""

    product: str
    free_used: int
    free_limit: int
    free_resets_ms: int
    limits: tuple[LimitStatus, ...] = ()
    jobs_in_flight: int = 0
    max_concurrent: int = 0
    overridden: bool = False
    upcoming: tuple[ScheduledLimits, ...] = ()
    # What used and limit count: the product's unit (one per job), or "credits" for a metered
    # product's included usage (credits-equivalent).
    unit: str = ""


@dataclass(frozen=True)
class ScheduledLimits:
    """A change to a product's limits announced in the plans file, from ``effective_from_ms`` on."""

    effective_from_ms: int
    limits: tuple[Limit, ...]
    max_concurrent: int


def headline(statuses: tuple[LimitStatus, ...], default_resets_ms: int) -> tuple[int, int, int]:
    """(used, limit, resets_ms) of the enforced limit with the least room; zeros when none."""
    enforced = [s for s in statuses if not s.limit.shadow]
    if not enforced:
        return 0, 0, default_resets_ms
    tightest = min(enforced, key=lambda s: s.limit.free - s.used)
    return tightest.used, tightest.limit.free, tightest.resets_ms


@dataclass(frozen=True)
class AutoTopUp:
    enabled: bool = False
    threshold_credits: int = 0
    pack_id: str = ""


@dataclass(frozen=True)
class CreditTotals:
    """Since the first grant: granted + refunded + debt = available + held + spent + expired + revoked
    (debt: credits spent that no lot has paid yet)."""

    granted: int = 0
    spent: int = 0
    expired: int = 0
    revoked: int = 0
    refunded: int = 0
    held: int = 0
    available: int = 0
    debt: int = 0


@dataclass(frozen=True)
class BalanceSnapshot:
    """What the store reads; free limits come from the plans, not the store."""

    plan: str
    time_zone: str
    now_ms: int
    free_resets_ms: int
    allowances: tuple[Allowance, ...]
    credit_balance: int
    lots: tuple[Lot, ...]
    holds: tuple[HoldInfo, ...]
    holds_total: int = 0
    all_lots: tuple[Lot, ...] = ()
    monthly_spend_cap_credits: int = 0
    month_spend_credits: int = 0
    month_resets_ms: int = 0
    auto_topup: AutoTopUp = AutoTopUp()
    totals: CreditTotals = CreditTotals()
    overrides: tuple[LimitOverride, ...] = ()
    debt_credits: int = 0


@dataclass(frozen=True)
class Balance:
    account_id: str
    plan: str
    time_zone: str
    allowances: tuple[Allowance, ...]
    credit_balance: int
    lots: tuple[Lot, ...]
    # The soonest-expiring open holds (at most 100: see lua/balance.lua) ...
    holds: tuple[HoldInfo, ...]
    # ... and all of them: their number and the credits they hold.
    holds_total: int = 0
    credits_held: int = 0
    # Lots (of lots) expiring within EXPIRING_WINDOW_MS of Redis' clock at the read, and their credits left.
    expiring_lots: tuple[Lot, ...] = ()
    credits_expiring: int = 0
    # Credits owed: usage drawn past the lots (overage: draw), paid first by the next credits in.
    debt_credits: int = 0


# GetBalance's "credits expiring soon": the next 30 days.
EXPIRING_WINDOW_MS = 30 * 24 * 3600 * 1000


@dataclass(frozen=True)
class Account:
    """GetAccount: the balance view plus what support staff need."""

    balance: Balance
    monthly_spend_cap_credits: int
    month_spend_credits: int
    month_resets_ms: int
    auto_topup: AutoTopUp
    totals: CreditTotals
    all_lots: tuple[Lot, ...]
    overrides: tuple[LimitOverride, ...] = ()


@dataclass(frozen=True)
class AccountSettings:
    plan: str
    time_zone: str
    monthly_spend_cap_credits: int = 0
    auto_topup: AutoTopUp = AutoTopUp()
    overrides: tuple[LimitOverride, ...] = ()


@dataclass(frozen=True)
class AccountChanges:
    """SetAccount: None leaves a setting unchanged."""

    plan: str | None = None
    time_zone: str | None = None
    monthly_spend_cap_credits: int | None = None
    auto_topup: AutoTopUp | None = None
    overrides: tuple[LimitOverride, ...] = ()
    clear_overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class RevokeResult:
    credits_revoked: int
    credits_spent: int
    credits_held: int
    credit_balance: int
    replayed: bool


@dataclass(frozen=True)
class RefundResult:
    credits_refunded: int
    free_refunded: int
    credit_balance: int
    replayed: bool


@dataclass(frozen=True)
class Deltas:
    """What one movement changed in the account's totals (credits and free units, signed integers).

    The available credits are not counted by the scripts; they follow from the identity
    granted + refunded + debt = available + held + spent + expired + revoked."""

    granted: int = 0
    refunded: int = 0
    spent: int = 0
    expired: int = 0
    revoked: int = 0
    held: int = 0
    free_units: int = 0
    debt: int = 0  # credits owed: + opened by an overage drawn past the lots, - repaid or cancelled

    @property
    def available(self) -> int:
        return self.granted + self.refunded - self.spent - self.expired - self.revoked - self.held + self.debt


@dataclass(frozen=True)
class LedgerEntry:
    """One movement of credits or free units, as the scripts wrote it to the bucket's outbox and as
    the books keep it (docs/books.md).

    ``entry_id`` is ``"b<bucket>:<outbox stream id>"``: unique, and a movement Redis lost and wrote
    again under the same ``seq`` gets another one, so the books detect it. ``seq`` is the account's
    own sequence number (1, 2, ... with no gap). ``fields`` holds the kind-specific ones (credits,
    lots, window, source, ...). ``totals_after`` is the running sum of every delta up to this entry
    (filled by the reader; a raw outbox entry has all zeros there)."""

    entry_id: str
    at_ms: int
    type: str
    fields: Mapping[str, str]
    totals_after: CreditTotals = CreditTotals()
    account_id: str = ""
    seq: int = 0
    deltas: Deltas = Deltas()

    def int_field(self, name: str) -> int:
        return int(self.fields.get(name) or 0)


@dataclass(frozen=True)
class AppendResult:
    """What one books transaction did with a batch of outbox entries."""

    inserted: int  # new rows
    duplicates: int  # already in the books under the same entry_id (a retried batch)
    conflicts: int  # an (account, seq) the books hold under another entry_id: kept aside, audited


@dataclass(frozen=True)
class OutboxStats:
    """The outbox across every bucket: what is not yet in the books."""

    entries: int
    oldest_ms: int | None  # the oldest unshipped movement's time; None when empty


# Commit cost table markers (see lua/commit.lua): a product missing from the
# table, or COST_WHOLE_HOLD, charges the whole hold.
COST_WHOLE_HOLD = -1
COST_INVALID = -2


@dataclass(frozen=True)
class ActualCost:
    """A commit's actual job under one plans version and product: its cost, and the plans
    entitled to it (the script refuses it for a reservation made under another plan)."""

    cost_credits: int
    entitled_plans: tuple[str, ...] = ()
    # The product's overage policy is cap: a cost above the hold charges the hold, the excess
    # written off (recorded as "wo" in the commit's outbox entry); else COST_EXCEEDS_HOLD.
    cap: bool = False
    # The policy is draw: the excess from the lots, then debt up to the plan's bound, the rest
    # written off; ``max_debt``: (plan, max_debt_credits) of every plan.
    draw: bool = False
    max_debt: tuple[tuple[str, int], ...] = ()
