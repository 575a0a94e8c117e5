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


class Funding(enum.Enum):
    FREE_QUOTA = "free"
    CREDITS = "credits"


class DenialReason(enum.Enum):
    PURCHASE_REQUIRED = "PURCHASE_REQUIRED"
    NOT_ENTITLED = "NOT_ENTITLED"


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


@dataclass(frozen=True)
class Window:
    """A free-allowance window [start_ms, end_ms), labelled by its local date (YYYYMMDD)."""

    label: str
    start_ms: int
    end_ms: int


class StaleTimeZone(Exception):
    """The store's account zone differs from the one the engine assumed.

    Not an operating error: the engine recomputes the windows for ``time_zone``
    and asks again. Nothing was written.
    """

    def __init__(self, time_zone: str) -> None:
        super().__init__(time_zone)
        self.time_zone = time_zone


@dataclass(frozen=True)
class PlanRow:
    """What one plan means for one reservation: its free limit and whether the job is allowed."""

    plan: str
    free_limit: int
    entitled: bool


@dataclass(frozen=True)
class ReserveCommand:
    account_id: str
    reservation_id: str
    product: str
    fingerprint: str
    ttl_ms: int
    cost_credits: int
    default_plan: str
    time_zone: str  # the zone the windows were computed for
    windows: tuple[Window, ...]
    plan_rows: tuple[PlanRow, ...]
    now_ms: int = 0  # 0: Redis' clock decides


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


@dataclass(frozen=True)
class Decision:
    """The answer to CheckAndReserve, as the servicer reports it."""

    reservation_id: str
    outcome: ReserveOutcome
    denial_message: str = ""
    offers: tuple[Offer, ...] = ()


@dataclass(frozen=True)
class CommitResult:
    funding: Funding
    credits_charged: int
    credits_refunded: int
    free_charged: int
    credit_balance: int
    replayed: bool


@dataclass(frozen=True)
class ReleaseResult:
    funding: Funding
    credits_refunded: int
    free_refunded: int
    credit_balance: int
    replayed: bool


@dataclass(frozen=True)
class Lot:
    lot_id: str
    credits_granted: int
    credits_left: int
    expires_ms: int
    granted_ms: int


@dataclass(frozen=True)
class GrantResult:
    lot: Lot
    credit_balance: int
    replayed: bool


@dataclass(frozen=True)
class HoldInfo:
    reservation_id: str
    product: str
    funding: Funding
    credits_held: int
    expires_ms: int


@dataclass(frozen=True)
class Allowance:
    product: str
    free_used: int
    free_limit: int
    free_resets_ms: int


@dataclass(frozen=True)
class BalanceSnapshot:
    """What the store reads; free limits come from the plans, not the store."""

    plan: str
    time_zone: str
    now_ms: int
    free_resets_ms: int
    free_used: Mapping[str, int]
    credit_balance: int
    lots: tuple[Lot, ...]
    holds: tuple[HoldInfo, ...]


@dataclass(frozen=True)
class Balance:
    account_id: str
    plan: str
    time_zone: str
    allowances: tuple[Allowance, ...]
    credit_balance: int
    lots: tuple[Lot, ...]
    holds: tuple[HoldInfo, ...]

    @property
    def credits_held(self) -> int:
        return sum(h.credits_held for h in self.holds)


@dataclass(frozen=True)
class AccountSettings:
    plan: str
    time_zone: str


# Commit cost table markers (see lua/commit.lua): a product missing from the
# table, or COST_WHOLE_HOLD, charges the whole hold.
COST_WHOLE_HOLD = -1
COST_INVALID = -2


class ParamsInvalidForProduct(Exception):
    """Commit params do not fit the reserved product; the engine knows why."""

    def __init__(self, product: str) -> None:
        super().__init__(product)
        self.product = product
