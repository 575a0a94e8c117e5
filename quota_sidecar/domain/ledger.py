"""An account's ledger from its two halves: the books (what the shipper stored) and the Redis
outbox (what it has not trimmed yet). Pure: ListLedger (engine), the audit and the books' readers
share it.

Every movement carries the account's sequence number (1, 2, ... with no gap) and its deltas; the
totals after a movement are the running sum of the deltas from seq 1. The books hold a prefix of
the sequence and the outbox a suffix; read the outbox first and the books second, and an entry
shipped and trimmed between the two reads is in the books, so together they miss nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from quota_sidecar.domain.model import CreditTotals, Deltas, LedgerEntry


def plus(totals: CreditTotals, deltas: Deltas) -> CreditTotals:
    """``totals`` after a movement of ``deltas``."""
    return CreditTotals(granted=totals.granted + deltas.granted, spent=totals.spent + deltas.spent,
                        expired=totals.expired + deltas.expired, revoked=totals.revoked + deltas.revoked,
                        refunded=totals.refunded + deltas.refunded, held=totals.held + deltas.held,
                        available=totals.available + deltas.available, debt=totals.debt + deltas.debt)


def before(entry: LedgerEntry) -> CreditTotals:
    """The totals before an entry whose ``totals_after`` is known (a row of the books)."""
    t, d = entry.totals_after, entry.deltas
    return CreditTotals(granted=t.granted - d.granted, spent=t.spent - d.spent, expired=t.expired - d.expired,
                        revoked=t.revoked - d.revoked, refunded=t.refunded - d.refunded, held=t.held - d.held,
                        available=t.available - d.available, debt=t.debt - d.debt)


def summed(entries: Iterable[LedgerEntry], start: CreditTotals = CreditTotals()) -> CreditTotals:
    """``start`` plus every entry's deltas (from seq 1 with the default start: the account's totals)."""
    totals = start
    for entry in entries:
        totals = plus(totals, entry.deltas)
    return totals


def merge_by_seq(books: Sequence[LedgerEntry], outbox: Sequence[LedgerEntry], *,
                 after_seq: int = 0) -> list[LedgerEntry]:
    """The entries of both with seq > ``after_seq``, each seq once, in seq order. The books' copy
    wins a seq both hold: it is the record (an outbox entry under another entry_id with the same
    seq is a conflict the audit reports, not something a reader resolves)."""
    by_seq: dict[int, LedgerEntry] = {}
    for entry in outbox:
        if entry.seq > after_seq:
            by_seq[entry.seq] = entry
    for entry in books:
        if entry.seq > after_seq:
            by_seq[entry.seq] = entry
    return [by_seq[seq] for seq in sorted(by_seq)]


def with_running_totals(entries: Sequence[LedgerEntry], start: CreditTotals = CreditTotals()) -> list[LedgerEntry]:
    """``entries`` (in seq order) with ``totals_after`` filled as ``start`` plus the running sum of
    their deltas; ``start`` is the totals before the first one (zeros before seq 1)."""
    out = []
    totals = start
    for entry in entries:
        totals = plus(totals, entry.deltas)
        out.append(replace(entry, totals_after=totals))
    return out


def contiguous(entries: Sequence[LedgerEntry], first_seq: int) -> bool:
    """Whether ``entries`` are exactly seq first_seq, first_seq + 1, ... in order."""
    return all(entry.seq == first_seq + i for i, entry in enumerate(entries))



@dataclass(frozen=True)
class LotPortion:
    """Credits one movement moved to or from one lot (the lot id is its purchase id)."""

    lot_id: str
    credits: int


@dataclass(frozen=True)
class RoyaltyShare:
    """One cameo owner's share of a job's charge; negative when a refund gives it back."""

    cameo_id: str
    owner_account_id: str
    credits: int


def parse_lots(text: str) -> tuple[LotPortion, ...]:
    """``"<lot_id>:<credits>,..."`` as the scripts write a ``lots`` field (':' and ',' are outside the
    id alphabet), soonest-expiring lot first; a malformed amount reads as 0 (the audit reports what
    does not add up, it does not stop on it)."""
    portions = []
    for part in filter(None, text.split(",")):
        lot_id, sep, credits = part.rpartition(":")
        if not sep:
            lot_id, credits = part, ""
        portions.append(LotPortion(lot_id, _int_or_zero(credits)))
    return tuple(portions)


def _int_or_zero(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def lot_portions(entry: LedgerEntry, name: str = "lots") -> tuple[LotPortion, ...]:
    """The entry's ``lots`` (or ``drawn_lots``) field, parsed (parse_lots)."""
    return parse_lots(entry.fields.get(name, ""))


def royalty_shares(entry: LedgerEntry) -> tuple[RoyaltyShare, ...]:
    """The entry's ``roy`` field, ``"<cameo>|<owner>|<credits>,..."`` ('|' and ',' are outside the id
    alphabet; a refund's amounts are negative)."""
    shares = []
    for part in filter(None, entry.fields.get("roy", "").split(",")):
        cameo_id, owner, credits = part.split("|")
        shares.append(RoyaltyShare(cameo_id, owner, int(credits)))
    return tuple(shares)
