"""What finance reads from the books: the month report and the purchases list (docs/books.md).

Pure values: quota_sidecar.books.pg fills them from PostgreSQL, ``quota-sidecar books report`` and
``books purchases`` print them. Credits are integers. Money is an integer of minor units, which in
this project are hundredths of the currency's unit for every currency (as the plans file's prices:
quota_sidecar.server.plans_file), so 12345 USD minor units are "123.45". Months are calendar months in
UTC: the books do not know the accounts' zones, and finance closes months in one zone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from quota_sidecar.domain.errors import InvalidArgument

MINOR_UNITS_PER_MAJOR = 100
_MONTH_RE = re.compile(r"(\d{4})-(\d{2})")


def month_bounds_ms(month: str) -> tuple[int, int]:
    """[start, end) of calendar month ``YYYY-MM`` in UTC, in ms since the epoch."""
    match = _MONTH_RE.fullmatch(month.strip())
    if match is None:
        raise InvalidArgument("month", f"must be YYYY-MM such as 2026-11 (got {month!r})")
    year, number = int(match.group(1)), int(match.group(2))
    if not 1 <= number <= 12:
        raise InvalidArgument("month", f"month must be 01 to 12 (got {month!r})")
    if year < 1970:
        raise InvalidArgument("month", f"must be 1970-01 or later (got {month!r})")
    start = datetime(year, number, 1, tzinfo=timezone.utc)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=timezone.utc)
    return _ms(start), _ms(end)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp()) * 1000


def iso_utc(ms: int) -> str:
    """2026-11-01T00:00:00Z (milliseconds shown only when there are some)."""
    moment = datetime.fromtimestamp(ms // 1000, tz=timezone.utc)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{ms % 1000:03d}Z" if ms % 1000 else f"{text}Z"


def decimal_amount(minor_units: int) -> str:
    """12345 -> "123.45"; -5 -> "-0.05"."""
    sign = "-" if minor_units < 0 else ""
    whole, cents = divmod(abs(minor_units), MINOR_UNITS_PER_MAJOR)
    return f"{sign}{whole}.{cents:02d}"


@dataclass(frozen=True)
class SoldBySource:
    """Grants of one source (purchase, promo, compensation, refund) in the month."""

    source: str
    grants: int
    credits: int


@dataclass(frozen=True)
class MoneyByCurrency:
    """What the month's grants with a known price were paid, in one currency."""

    currency: str
    grants: int
    minor_units: int

    @property
    def amount(self) -> str:
        return decimal_amount(self.minor_units)


@dataclass(frozen=True)
class ProductUse:
    """Credits spent on one product in the month (commits), and refunded for it (RefundJob)."""

    product: str
    spent: int
    refunded: int


@dataclass(frozen=True)
class CameoRoyalty:
    """What one owner is owed for one cameo in the month: its fees of the month's commits, net of
    the refunds of the month (a refund gives the royalty back)."""

    owner_account_id: str
    cameo_id: str
    uses: int  # commits of jobs that used it
    refunds: int  # refunds of such jobs
    credits: int  # net royalty, credits


@dataclass(frozen=True)
class Balances:
    """Every account's credits at one instant, from the sum of the deltas of the movements before it;
    ``debt``: what the accounts owe (usage drawn past their lots, not paid yet)."""

    available: int
    held: int
    debt: int = 0

    @property
    def total(self) -> int:
        """The net credits: a debt is credits already spent that no lot has paid."""
        return self.available + self.held - self.debt


@dataclass(frozen=True)
class FinanceReport:
    """``quota-sidecar books report --month``: one calendar month (UTC) of the books.

    Roll-forward: opening.total + granted + refunded - spent - expired - revoked == closing.total
    (``balanced``, total = available + held - debt); it holds for any books, since every movement's
    deltas obey the same identity. Debt: opening.debt + debt_opened - debt_repaid - debt_cancelled ==
    closing.debt (the outstanding debt at the month's end)."""

    month: str
    start_ms: int
    end_ms: int
    sold: tuple[SoldBySource, ...]
    money: tuple[MoneyByCurrency, ...]
    unpriced_grants: int  # grants of the month with no price (promo, compensation, or price unknown)
    by_product: tuple[ProductUse, ...]
    granted: int
    spent: int
    refunded: int
    expired: int  # breakage: credits that expired unused
    revoked: int
    opening: Balances
    closing: Balances
    royalties: tuple[CameoRoyalty, ...] = ()  # per owner and cameo, ordered by owner
    debt_opened: int = 0  # overage drawn past the lots, owed (commits)
    debt_repaid: int = 0  # paid from credits that came in (debt_repay)
    debt_cancelled: int = 0  # by RefundJob of a job whose debt was still open

    def royalties_by_owner(self) -> dict[str, int]:
        """Net credits owed to each owner for the month."""
        owed: dict[str, int] = {}
        for r in self.royalties:
            owed[r.owner_account_id] = owed.get(r.owner_account_id, 0) + r.credits
        return owed

    @property
    def balanced(self) -> bool:
        moved = self.granted + self.refunded - self.spent - self.expired - self.revoked
        return self.opening.total + moved == self.closing.total


def to_json(report: FinanceReport) -> dict[str, object]:
    """The report as JSON values: credits and minor units as integers, amounts also as decimal strings."""
    return {
        "month": report.month,
        "start": iso_utc(report.start_ms),
        "end": iso_utc(report.end_ms),
        "credits_sold": report.granted,
        "sold_by_source": [{"source": s.source, "grants": s.grants, "credits": s.credits} for s in report.sold],
        "money_by_currency": [{"currency": m.currency, "grants": m.grants, "minor_units": m.minor_units,
                               "amount": m.amount} for m in report.money],
        "unpriced_grants": report.unpriced_grants,
        "credits_spent": report.spent,
        "spent_by_product": [{"product": p.product, "spent": p.spent, "refunded": p.refunded}
                             for p in report.by_product],
        "credits_refunded": report.refunded,
        "credits_expired": report.expired,
        "credits_revoked": report.revoked,
        "opening_balance": {"available": report.opening.available, "held": report.opening.held,
                            "debt": report.opening.debt},
        "closing_balance": {"available": report.closing.available, "held": report.closing.held,
                            "debt": report.closing.debt},
        "debt_opened": report.debt_opened,
        "debt_repaid": report.debt_repaid,
        "debt_cancelled": report.debt_cancelled,
        "debt_outstanding": report.closing.debt,
        "balanced": report.balanced,
        "royalties_by_owner": [
            {"owner_account_id": owner, "credits": credits,
             "cameos": [{"cameo_id": r.cameo_id, "uses": r.uses, "refunds": r.refunds, "credits": r.credits}
                        for r in report.royalties if r.owner_account_id == owner]}
            for owner, credits in report.royalties_by_owner().items()],
    }


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def render_text(report: FinanceReport) -> str:
    """The report for a terminal; ends with a newline."""
    lines = [f"Books for {report.month} (UTC, {iso_utc(report.start_ms)} to {iso_utc(report.end_ms)})", "",
             f"Credits sold        {report.granted:>15,}"]
    lines += [f"  {s.source or '(none)':<18}{s.credits:>15,}  in {_plural(s.grants, 'grant')}" for s in report.sold]
    lines.append("Money (grants with a price)")
    lines += [f"  {m.currency or '(none)':<18}{m.amount:>15}  ({m.minor_units} minor units, "
              f"{_plural(m.grants, 'grant')})" for m in report.money]
    if not report.money:
        lines.append("  none")
    if report.unpriced_grants:
        lines.append(f"  and {_plural(report.unpriced_grants, 'grant')} without a price")
    lines.append(f"Credits spent       {report.spent:>15,}")
    lines += [f"  {p.product or '(none)':<18}{p.spent:>15,}" + (f"  (refunded {p.refunded:,})" if p.refunded else "")
              for p in report.by_product]
    lines += [
        f"Credits refunded    {report.refunded:>15,}",
        f"Credits expired     {report.expired:>15,}  (breakage)",
        f"Credits revoked     {report.revoked:>15,}",
        "",
        f"Debt opened         {report.debt_opened:>15,}  (usage drawn past the lots)",
        f"Debt repaid         {report.debt_repaid:>15,}" + (f"  (and {report.debt_cancelled:,} cancelled by refunds)"
                                                           if report.debt_cancelled else ""),
        "",
        f"Balance at start    {report.opening.available:>15,} available, {report.opening.held:,} held, "
        f"{report.opening.debt:,} owed",
        f"Balance at end      {report.closing.available:>15,} available, {report.closing.held:,} held, "
        f"{report.closing.debt:,} owed",
        "Roll-forward        start + sold + refunded - spent - expired - revoked = end (available + held - owed): "
        + ("yes" if report.balanced else "NO (the books are inconsistent: run `quota-sidecar audit`)"),
        "",
        "Royalties owed (cameo fees of the month's commits, net of refunds; part of credits spent)",
    ]
    for owner, credits in report.royalties_by_owner().items():
        lines.append(f"  {owner:<18}{credits:>15,}")
        lines += [f"    {r.cameo_id:<16}{r.credits:>15,}  in {_plural(r.uses, 'use')}"
                  + (f", {_plural(r.refunds, 'refund')}" if r.refunds else "")
                  for r in report.royalties if r.owner_account_id == owner]
    if not report.royalties:
        lines.append("  none")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PurchaseRecord:
    """One grant the books hold (the view quota_purchases), for the billing system's reconciliation."""

    purchase_id: str
    account_id: str
    credits: int
    source: str
    price_minor_units: int | None  # None: no price was given with the grant
    currency: str
    pack_id: str
    granted_ms: int
    expires_ms: int | None  # None: never expires
    credits_expired: int
    credits_revoked: int
    reason: str = ""
    entry_id: str = ""

    def to_json(self) -> dict[str, object]:
        price = None if self.price_minor_units is None else {
            "currency": self.currency, "minor_units": self.price_minor_units,
            "amount": decimal_amount(self.price_minor_units)}
        return {
            "purchase_id": self.purchase_id, "account_id": self.account_id, "credits": self.credits,
            "source": self.source, "price": price, "pack_id": self.pack_id,
            "granted_at": iso_utc(self.granted_ms),
            "expires_at": None if self.expires_ms is None else iso_utc(self.expires_ms),
            "credits_expired": self.credits_expired, "credits_revoked": self.credits_revoked,
            "reason": self.reason, "entry_id": self.entry_id,
        }

    def describe(self) -> str:
        """One line for a terminal."""
        price = ("no price" if self.price_minor_units is None
                 else f"{self.currency} {decimal_amount(self.price_minor_units)}")
        pack = f" pack {self.pack_id}" if self.pack_id else ""
        expires = "never expires" if self.expires_ms is None else f"expires {iso_utc(self.expires_ms)}"
        taken = "".join(f", {n:,} {what}" for n, what in ((self.credits_expired, "expired"),
                                                          (self.credits_revoked, "revoked")) if n)
        return (f"{self.purchase_id}  account {self.account_id}: {self.credits:,} credits ({self.source}), "
                f"{price}{pack}, granted {iso_utc(self.granted_ms)}, {expires}{taken}")


@dataclass(frozen=True)
class JobRecord:
    """One job the books hold (the view quota_jobs): what it cost and from where."""

    account_id: str
    reservation_id: str
    product: str
    held_ms: int
    resolved_ms: int | None  # None: still held (or its resolution is still in the outbox)
    state: str  # held, committed, released, expired, refunded
    funding: str  # free or credits
    credits_charged: int  # by the commit, cameo fees included
    free_units: int
    lots: str  # "<lot>:<credits>,...": the lots charged (or held)
    royalty_credits: int
    fees: int
    written_off: int
    plans_version: str
    credits_refunded: int = 0
    credits_drawn: int = 0  # overage: draw: of credits_charged, taken from the lots past the hold ...
    debt_opened: int = 0  # ... and owed past them

    def to_json(self) -> dict[str, object]:
        return {
            "account_id": self.account_id, "reservation_id": self.reservation_id, "product": self.product,
            "held_at": iso_utc(self.held_ms),
            "resolved_at": None if self.resolved_ms is None else iso_utc(self.resolved_ms),
            "state": self.state, "funding": self.funding, "credits_charged": self.credits_charged,
            "free_units": self.free_units, "lots": self.lots, "royalty_credits": self.royalty_credits,
            "fees": self.fees, "written_off": self.written_off, "plans_version": self.plans_version,
            "credits_refunded": self.credits_refunded, "credits_drawn": self.credits_drawn,
            "debt_opened": self.debt_opened,
        }

    def describe(self) -> str:
        """One line for a terminal."""
        if self.funding == "free":
            source = f"free ({self.free_units} unit)"
        else:
            source = f"{self.credits_charged} credit(s)" + (f" from {self.lots}" if self.lots else "")
        extras = "".join(f", {what} {n}" for what, n in (("royalty", self.royalty_credits), ("fees", self.fees),
                                                          ("drawn", self.credits_drawn),
                                                          ("owed", self.debt_opened),
                                                          ("written off", self.written_off),
                                                          ("refunded", self.credits_refunded)) if n)
        return (f"{self.reservation_id}  {self.product}  {self.state}  {source}{extras}  "
                f"held {iso_utc(self.held_ms)}  plans {self.plans_version}")
