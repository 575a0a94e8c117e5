"""The conservation audit: replays an account's movements (the books, then the Redis outbox)
against its state in Redis.

    quota-sidecar audit [--account ID | --all] --redis-url URL [--books-url URL]

Pure logic over the plain data ``RedisStore.raw_state(account)`` returns and the
books' entries of the account (no redis or PostgreSQL import here, so the checks
can be exercised on hand-made state). The scripts keep, per account,

    granted + refunded + debt = available + held + spent + expired + revoked

(debt: credits spent past the lots under `overage: draw`, not paid yet) with available the
stored sum of every lot's ``lotrem`` (lots past their
expiry that nobody has settled yet still hold their credits there). The
audit checks that identity, each lot, the hold index; that the books and the
outbox together hold every sequence number 1..seq once, each entry moving what
its kind says, and their deltas summing to Redis' totals; that each reservation
resolves at most once, every purchase has its lot, the free-window counters and
the monthly spend counters; and that the account's debt is the sum of the entries' debt
deltas and never negative. Every violation names its numbers.

Credits and free units are integers; times are milliseconds since the epoch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from quota_sidecar.domain.ledger import merge_by_seq, parse_lots, royalty_shares, summed
from quota_sidecar.domain.model import CreditTotals, Deltas, LedgerEntry
from quota_sidecar.domain.ports import Books

TOTAL_NAMES = ("granted", "spent", "expired", "revoked", "refunded", "held")
RESOLUTIONS = frozenset({"commit", "release", "expire"})
# Ledger fields that are amounts: a negative one is never written by a script.
AMOUNT_FIELDS = ("credits", "returned", "to_lots", "to_expired", "to_revoked", "used", "limit", "cost", "drawn", "debt",
                 "debt_cancelled")
# The scripts' ledger types; anything else was not written by them.
ENTRY_TYPES = frozenset({"hold", "commit", "release", "expire", "grant", "revoke", "lot_expire", "refund",
                         "degraded_conflict", "account", "debt_repay"})
# The lotrem field suffix that counts a lot's credits in open holds (see _prelude.lua hold_lots).
LOT_HELD_SUFFIX = "|h"

Totals = dict[str, int]
Found = list[tuple[str, str]]  # (check, detail), wrapped into Violations by audit_state


@dataclass(frozen=True)
class Violation:
    account_id: str
    check: str  # short stable name, e.g. "conservation"
    detail: str


@dataclass(frozen=True)
class AccountAudit:
    account_id: str
    entries_checked: int
    ledger_trimmed: bool  # movements 1..unchecked_seqs were not checked: shipped, and no books given
    violations: tuple[Violation, ...]
    unchecked_seqs: int = 0
    books_given: bool = False

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def coverage(self) -> str:
        """Which movements were checked, for the report."""
        if self.ledger_trimmed:
            return f"seq {self.unchecked_seqs + 1} on; seq 1..{self.unchecked_seqs} not checked: books not given"
        return "books and outbox" if self.books_given else "outbox only, complete"


# -- parsing the raw state ----------------------------------------------------


@dataclass
class _Parsed:
    """The raw state as numbers; what did not parse is reported as "malformed"."""

    totals: Totals
    lotrem: dict[str, int]
    lotheld: dict[str, int]  # lot -> credits in open holds, as the scripts keep it
    lots: dict[str, dict[str, Any]]
    records: dict[str, dict[str, Any]]
    holds: dict[str, float]
    lotexp: dict[str, float]
    free: dict[str, int]
    spend: dict[str, int]
    found: Found = field(default_factory=list)
    debt: int = 0  # the acct hash's debt: credits owed


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _int_map(what: str, raw: Mapping[str, Any], found: Found) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in raw.items():
        number = _int_or_none(value)
        if number is None:
            found.append(("malformed", f"{what} field {name!r} is not an integer: {value!r}"))
        out[name] = number or 0
    return out


def _json_map(what: str, raw: Mapping[str, Any], found: Found) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        try:
            decoded = json.loads(value)
        except (TypeError, ValueError):
            decoded = None
        if not isinstance(decoded, dict):
            found.append(("malformed", f"{what} {name!r} is not a JSON object: {value!r}"))
            continue
        out[name] = decoded
    return out


def _scores(rows: Iterable[Any]) -> dict[str, float]:
    return {member: float(score) for member, score in rows}


def _parse(state: Mapping[str, Any]) -> _Parsed:
    found: Found = []
    acct = _int_map("acct", {f"credits_{n}": v for n in TOTAL_NAMES
                             if (v := state.get("acct", {}).get(f"credits_{n}")) is not None}, found)
    totals = {n: acct.get(f"credits_{n}", 0) for n in TOTAL_NAMES}
    debt = _int_map("acct", {"debt": state.get("acct", {}).get("debt") or 0}, found)["debt"]
    lotrem_raw = state.get("lotrem", {})
    lotrem = {k: v for k, v in lotrem_raw.items() if not k.endswith(LOT_HELD_SUFFIX)}
    lotheld = {k[:-len(LOT_HELD_SUFFIX)]: v for k, v in lotrem_raw.items() if k.endswith(LOT_HELD_SUFFIX)}
    return _Parsed(totals=totals, lotrem=_int_map("lotrem", lotrem, found),
                   lotheld=_int_map("lotrem held", lotheld, found),
                   lots=_json_map("lot", state.get("lots", {}), found),
                   records=_json_map("reservation record", state.get("res", {}), found),
                   holds=_scores(state.get("holds", [])), lotexp=_scores(state.get("lotexp", [])),
                   free=_int_map("free", state.get("free", {}), found),
                   spend=_int_map("spend", state.get("spend", {}), found), found=found, debt=debt)


def _num(value: Any) -> int:
    return _int_or_none(value) or 0


def _triples(rec: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(lot_id, credits) a record holds; cjson writes an empty list as {}."""
    flat = rec.get("l")
    if not isinstance(flat, list):
        return []
    return [(str(flat[i]), _num(flat[i + 1])) for i in range(0, len(flat) - 2, 3)]


def _held_records(records: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {rid: rec for rid, rec in records.items() if rec.get("s") == "held"}


def _totals_text(t: Mapping[str, int]) -> str:
    return " ".join(f"{n}={t[n]}" for n in TOTAL_NAMES)


# -- state checks --------------------------------------------------------------


def check_counters(totals: Mapping[str, int], lotrem: Mapping[str, int], debt: int = 0) -> Found:
    found: Found = [("counter_negative", f"credits_{n} = {v} < 0") for n, v in totals.items() if v < 0]
    if debt < 0:
        found.append(("debt_negative", f"debt = {debt} < 0"))
    found += [("lot_negative", f"lot {lot!r}: lotrem = {v} < 0") for lot, v in sorted(lotrem.items()) if v < 0]
    return found


def check_conservation(totals: Mapping[str, int], lotrem: Mapping[str, int], debt: int = 0) -> Found:
    available = sum(lotrem.values())
    t = totals
    expected = t["granted"] + t["refunded"] - t["spent"] - t["expired"] - t["revoked"] - t["held"] + debt
    if available == expected:
        return []
    return [("conservation",
             f"available (sum of lotrem over {len(lotrem)} lots) = {available} but granted {t['granted']} + "
             f"refunded {t['refunded']} - spent {t['spent']} - expired {t['expired']} - revoked {t['revoked']} "
             f"- held {t['held']} + debt {debt} = {expected} (off by {available - expected:+d})")]


def lot_held_credits(records: Mapping[str, Mapping[str, Any]]) -> Counter[str]:
    held: Counter[str] = Counter()
    for rec in _held_records(records).values():
        for lot_id, credits in _triples(rec):
            held[lot_id] += credits
    return held


def check_lots(totals: Mapping[str, int], lots: Mapping[str, Mapping[str, Any]], lotrem: Mapping[str, int],
               records: Mapping[str, Mapping[str, Any]]) -> Found:
    """Per lot: granted = left + held + expired + revoked + net spent, net spent >= 0;
    and the lots' own expired/revoked/granted add up to the account's totals."""
    found: Found = []
    held = lot_held_credits(records)
    for lot_id in sorted(lots):
        meta = lots[lot_id]
        g, x, vr = _num(meta.get("g")), _num(meta.get("x")), _num(meta.get("vr"))
        rem, in_holds = lotrem.get(lot_id, 0), held.get(lot_id, 0)
        net_spent = g - rem - in_holds - x - vr
        if net_spent < 0:
            found.append(("lot_overdrawn", f"lot {lot_id!r}: granted {g} - left {rem} - held {in_holds} - expired {x} "
                                           f"- revoked {vr} = net spent {net_spent} < 0"))
    for lot_id in sorted((set(lotrem) | set(held)) - set(lots)):
        found.append(("lot_unknown", f"lot {lot_id!r} has lotrem {lotrem.get(lot_id, 0)} / held "
                                     f"{held.get(lot_id, 0)} but no lot record"))
    for name, short in (("granted", "g"), ("expired", "x"), ("revoked", "vr")):
        summed = sum(_num(m.get(short)) for m in lots.values())
        if summed != totals[name]:
            found.append(("lot_totals", f"sum of lot {short} = {summed} but credits_{name} = {totals[name]}"))
    return found


def check_lot_held(lotheld: Mapping[str, int], records: Mapping[str, Mapping[str, Any]]) -> Found:
    """The per-lot held counters (what RevokeCredits reports) against the open holds' records."""
    held = lot_held_credits(records)
    return [("lot_held", f"lot {lot_id!r}: held counter {lotheld.get(lot_id, 0)} but open holds take "
                         f"{held.get(lot_id, 0)} credits from it")
            for lot_id in sorted(set(lotheld) | set(held)) if lotheld.get(lot_id, 0) != held.get(lot_id, 0)]


def check_journal(records: Mapping[str, Mapping[str, Any]]) -> Found:
    """Outcomes a sidecar acknowledged while Redis was away (its degraded journal) that Redis
    could not apply because the reservation had been resolved the other way meanwhile."""
    return [("degraded_journal", f"reservation {rid!r}: the degraded journal acknowledged {rec.get('dj')!r} at "
                                 f"{_num(rec.get('djr'))} ms but Redis holds it {rec.get('s')!r}")
            for rid, rec in sorted(records.items()) if rec.get("dj") is not None]


def check_lot_index(lots: Mapping[str, Mapping[str, Any]], lotrem: Mapping[str, int],
                    lotexp: Mapping[str, float]) -> Found:
    """A lot with credits left must be in the spending index, or its credits are stranded."""
    found: Found = []
    for lot_id, rem in sorted(lotrem.items()):
        meta = lots.get(lot_id)
        if rem > 0 and meta is not None and lot_id not in lotexp:
            found.append(("lot_index", f"lot {lot_id!r} has {rem} credits left but is not in lotexp"))
    for lot_id, score in sorted(lotexp.items()):
        meta = lots.get(lot_id)
        if meta is not None and _num(meta.get("v")) == 1:
            found.append(("lot_index", f"revoked lot {lot_id!r} is still in lotexp (score {score:.0f})"))
    for lot_id, meta in sorted(lots.items()):
        if _num(meta.get("v")) == 1 and lotrem.get(lot_id, 0) != 0:
            found.append(("lot_index", f"revoked lot {lot_id!r} has {lotrem[lot_id]} credits left"))
    return found


def check_holds(totals: Mapping[str, int], records: Mapping[str, Mapping[str, Any]],
                holds: Mapping[str, float]) -> Found:
    held = _held_records(records)
    found: Found = []
    held_sum = sum(_num(rec.get("c")) for rec in held.values())
    if held_sum != totals["held"]:
        found.append(("held_counter", f"credits_held = {totals['held']} but the {len(held)} held records hold "
                                      f"{held_sum} credits (off by {totals['held'] - held_sum:+d})"))
    for rid in sorted(set(holds) - set(held)):
        state = records[rid].get("s") if rid in records else "no record"
        found.append(("hold_index", f"reservation {rid!r} is in the holds index but its record is {state!r}"))
    for rid in sorted(set(held) - set(holds)):
        found.append(("hold_index", f"reservation {rid!r} is held ({_num(held[rid].get('c'))} credits) "
                                    f"but missing from the holds index"))
    for rid in sorted(set(held) & set(holds)):
        if int(holds[rid]) != _num(held[rid].get("e")):
            found.append(("hold_index", f"reservation {rid!r} expires at {_num(held[rid].get('e'))} but is "
                                        f"indexed at {int(holds[rid])}"))
    return found


# -- the ledger: sequence, deltas, totals ----------------------------------------------


def entry_int(entry: LedgerEntry, name: str) -> int:
    return _num(entry.fields.get(name))


def _by_funding(entry: LedgerEntry) -> bool:
    """Whether the entry moves credits: a credits job, or a free job's cameo fees (``fees``)."""
    return entry.fields.get("funding") == "credits" or _num(entry.fields.get("fees")) > 0


def _free_unit(entry: LedgerEntry) -> bool:
    return entry.fields.get("funding") == "free"


def _free_amount(entry: LedgerEntry) -> int:
    """What each window's use of a free job counts: 1, or a metered job's included usage
    (``usage``, in credits) as the entry records it."""
    return _num(entry.fields["usage"]) if "usage" in entry.fields else 1


def expected_deltas(entry: LedgerEntry) -> Deltas:
    """What an entry of its kind must move, from its own fields (see ledger() in _prelude.lua)."""
    credits, kind = entry_int(entry, "credits"), entry.type
    to_expired, to_revoked = entry_int(entry, "to_expired"), entry_int(entry, "to_revoked")
    # A free job with cameo fees moves both its free unit (its included usage) and the fees' credits.
    unit = _free_amount(entry) if _free_unit(entry) else 0
    if kind == "hold":
        return Deltas(held=credits if _by_funding(entry) else 0, free_units=unit)
    if kind == "commit":
        # Included usage settles at the actual usage: the windows move by actual - estimate.
        adjusted = unit - entry_int(entry, "usage_held") if "usage" in entry.fields else 0
        # overage draw: credits = the hold's charge + drawn + the debt opened, only the first one held.
        past_hold, debt = entry_int(entry, "drawn") + entry_int(entry, "debt"), entry_int(entry, "debt")
        return Deltas(held=-(credits - past_hold + entry_int(entry, "returned")), spent=credits,
                      expired=to_expired, revoked=to_revoked, free_units=adjusted, debt=debt)
    if kind in ("release", "expire"):
        return Deltas(held=-credits, expired=to_expired, revoked=to_revoked, free_units=-unit) \
            if _by_funding(entry) else Deltas(free_units=-unit)
    if kind == "refund":
        return Deltas(refunded=credits, expired=to_expired, revoked=to_revoked, free_units=-unit,
                      debt=-entry_int(entry, "debt_cancelled")) \
            if _by_funding(entry) else Deltas(free_units=-unit)
    if kind == "debt_repay":
        return Deltas(debt=-credits)
    if kind == "grant":
        return Deltas(granted=credits)
    if kind == "revoke":
        return Deltas(revoked=credits)
    if kind == "lot_expire":
        return Deltas(expired=credits)
    return Deltas()  # account, degraded_conflict: nothing moves


def _deltas_text(d: Deltas) -> str:
    return " ".join(f"{n}={getattr(d, n):+d}" for n in (*TOTAL_NAMES, "free_units", "debt") if getattr(d, n)) \
        or "none"


def _as_totals(t: CreditTotals) -> Totals:
    return {n: getattr(t, n) for n in TOTAL_NAMES}


def check_entry_fields(entry: LedgerEntry) -> Found:
    found: Found = []
    where = f"entry {entry.entry_id} (seq {entry.seq}, {entry.type})"
    if entry.type not in ENTRY_TYPES:
        found.append(("ledger_chain", f"{where}: unknown entry type"))
    for name in AMOUNT_FIELDS:
        raw = entry.fields.get(name)
        if raw not in (None, "") and _int_or_none(raw) is None:
            found.append(("ledger_chain", f"{where}: {name} = {raw!r} is not an integer"))
        elif _num(raw) < 0:
            found.append(("ledger_chain", f"{where}: {name} = {raw} < 0"))
    if entry.type in ("commit", "release", "expire", "refund") and _by_funding(entry):
        given_back = entry_int(entry, "returned" if entry.type == "commit" else "credits")
        given_back -= entry_int(entry, "debt_cancelled")  # a refund cancels open debt instead of lots
        placed = sum(entry_int(entry, n) for n in ("to_lots", "to_expired", "to_revoked"))
        if placed != given_back:
            found.append(("ledger_chain", f"{where}: to_lots + to_expired + to_revoked = {placed} but "
                                          f"{given_back} credits were given back"))
    want = expected_deltas(entry)
    if entry.deltas != want:
        found.append(("ledger_chain", f"{where} {entry.fields.get('rid') or entry.fields.get('pid') or ''}: "
                                      f"moves {_deltas_text(entry.deltas)} but its fields call for "
                                      f"{_deltas_text(want)}"))
    return found


def merge_entries(outbox: Sequence[LedgerEntry], books: Sequence[LedgerEntry]) -> tuple[list[LedgerEntry], Found]:
    """The account's entries from both stores, each entry_id once, in seq order; a seq held under
    two entry_ids (Redis lost movements and numbered new ones again) is a violation, and the
    books' entry is the one replayed."""
    found: Found = []
    by_id: dict[str, LedgerEntry] = {e.entry_id: e for e in outbox}
    by_id.update((e.entry_id, e) for e in books)
    by_seq: dict[int, list[LedgerEntry]] = {}
    for entry in by_id.values():
        by_seq.setdefault(entry.seq, []).append(entry)
    for seq in sorted(seq for seq, same in by_seq.items() if len(same) > 1):
        found.append(("ledger_seq", f"seq {seq} is held by {len(by_seq[seq])} entries: "
                                    f"{', '.join(sorted(e.entry_id for e in by_seq[seq]))}"))
    return merge_by_seq(books, outbox), found


def check_sequence(entries: Sequence[LedgerEntry], last_seq: int, first_seq: int) -> Found:
    """``entries`` (one per seq, in order) must be exactly first_seq .. last_seq, Redis' own count."""
    found: Found = []
    seqs = [e.seq for e in entries]
    missing = sorted(set(range(first_seq, last_seq + 1)) - set(seqs))
    if missing:
        found.append(("ledger_seq", f"{len(missing)} seq(s) of {first_seq}..{last_seq} are in neither the books "
                                    f"nor the outbox: {_ranges_text(missing)}"))
    ahead = [s for s in seqs if s > last_seq or s < 1]
    if ahead:
        found.append(("ledger_seq", f"entries with seq {_ranges_text(ahead)} but Redis' account seq is {last_seq}: "
                                    "Redis lost movements the books hold"))
    return found


def _ranges_text(numbers: Sequence[int], shown: int = 10) -> str:
    text = ", ".join(map(str, numbers[:shown]))
    return text + (f", ... ({len(numbers) - shown} more)" if len(numbers) > shown else "")


def check_totals(entries: Sequence[LedgerEntry], totals: Mapping[str, int], lotrem: Mapping[str, int],
                 debt: int = 0) -> Found:
    """Every movement from seq 1 summed: Redis' totals, its debt, and its available credits (the lots' sum)."""
    summed_up = summed(entries)
    found: Found = []
    if summed_up.debt != debt:
        found.append(("ledger_debt", f"the account's debt is {debt} but the entries' debt deltas sum to "
                                     f"{summed_up.debt} (off by {debt - summed_up.debt:+d})"))
    if _as_totals(summed_up) != dict(totals):
        found.append(("ledger_chain", f"current totals ({_totals_text(totals)}) differ from the sum of the "
                                      f"{len(entries)} entries' deltas ({_totals_text(_as_totals(summed_up))}): "
                                      "changed outside the scripts"))
    available, want = sum(lotrem.values()), summed_up.available
    if want != available:
        found.append(("ledger_available", f"the entries' deltas sum to {want} credits available but the lots "
                                          f"hold {available} (off by {available - want:+d})"))
    return found


def check_purchases(entries: Sequence[LedgerEntry], lots: Mapping[str, Mapping[str, Any]], complete: bool) -> Found:
    """Every grant's lot is in Redis (or was expired or revoked); with every entry at hand, every
    lot in Redis was granted by an entry."""
    gone = {e.fields.get("pid", "") for e in entries if e.type in ("revoke", "lot_expire")}
    granted = {e.fields.get("pid", ""): e for e in entries if e.type == "grant"}
    found: Found = [("purchase_lot", f"grant {e.entry_id} (seq {e.seq}) of purchase {pid!r} ({entry_int(e, 'credits')} "
                                     "credits) has no lot in Redis, and no entry expired or revoked it")
                    for pid, e in sorted(granted.items()) if pid not in lots and pid not in gone]
    if complete:
        found += [("purchase_lot", f"lot {lot_id!r} ({_num(meta.get('g'))} credits) is in Redis but no grant "
                                   "entry made it")
                  for lot_id, meta in sorted(lots.items()) if lot_id not in granted]
    return found


# -- reservations -------------------------------------------------------------------


def check_resolutions(ledger: Sequence[LedgerEntry]) -> Found:
    """Each reservation: one hold, then at most one resolution, then at most one refund after a commit."""
    found: Found = []
    hold_at: dict[str, int] = {}
    resolved: dict[str, LedgerEntry] = {}
    refunded: set[str] = set()
    for index, entry in enumerate(ledger):
        rid = entry.fields.get("rid", "")
        if entry.type == "hold":
            if rid in hold_at:
                found.append(("held_twice", f"reservation {rid!r} has a second hold entry {entry.entry_id}"))
            hold_at.setdefault(rid, index)
    for index, entry in enumerate(ledger):
        rid = entry.fields.get("rid", "")
        kind = entry.type
        if kind not in RESOLUTIONS and kind != "refund":
            continue
        if rid in hold_at and hold_at[rid] > index:
            found.append(("resolution_order", f"reservation {rid!r}: {kind} {entry.entry_id} comes before its hold "
                                              f"{ledger[hold_at[rid]].entry_id}"))
        if kind in RESOLUTIONS:
            if rid in resolved:
                first = resolved[rid]
                found.append(("resolved_twice", f"reservation {rid!r}: {kind} {entry.entry_id} after "
                                                f"{first.type} {first.entry_id}"))
            resolved.setdefault(rid, entry)
            continue
        found += _check_refund(rid, entry, resolved, hold_at, refunded)
    return found


def _check_refund(rid: str, entry: LedgerEntry, resolved: Mapping[str, LedgerEntry], hold_at: Mapping[str, int],
                  refunded: set[str]) -> Found:
    found: Found = []
    if rid in refunded:
        found.append(("refunded_twice", f"reservation {rid!r}: a second refund {entry.entry_id}"))
    refunded.add(rid)
    resolution = resolved.get(rid)
    if resolution is not None and resolution.type != "commit":
        found.append(("resolution_order", f"reservation {rid!r}: refund {entry.entry_id} of a reservation that was "
                                          f"resolved by {resolution.type} {resolution.entry_id}"))
    elif resolution is None and rid in hold_at:
        found.append(("resolution_order", f"reservation {rid!r}: refund {entry.entry_id} before any commit"))
    return found


def check_royalties(ledger: Sequence[LedgerEntry]) -> Found:
    """Cameo royalties are conserved: an entry's owners' shares add up to its fees, which are part of
    the credits it moved; a commit pays exactly the shares stamped on the hold, a refund gives exactly
    those back (negated), and a release or an expiry pays nobody."""
    found: Found = []
    stamped: dict[str, dict[tuple[str, str], int]] = {}
    for entry in ledger:
        rid, kind = entry.fields.get("rid", ""), entry.type
        shares = royalty_shares(entry)
        by_owner = {(s.cameo_id, s.owner_account_id): s.credits for s in shares}
        fees, total = entry_int(entry, "fees"), sum(s.credits for s in shares)
        if kind in ("release", "expire") and shares:
            found.append(("royalty", f"{kind} {entry.entry_id} of {rid!r} pays royalties: {entry.fields['roy']}"))
        if kind not in ("hold", "commit", "refund") or not (shares or fees):
            continue
        sign = -1 if kind == "refund" else 1
        if total != sign * fees or fees > entry_int(entry, "credits") or any(sign * s.credits <= 0 for s in shares):
            found.append(("royalty", f"{kind} {entry.entry_id} of {rid!r}: shares {entry.fields.get('roy', '')!r} "
                                     f"do not add up to {sign * fees} credit(s) of fees within its "
                                     f"{entry_int(entry, 'credits')} credit(s)"))
        if kind == "hold":
            stamped[rid] = by_owner
        elif rid in stamped and by_owner != {k: sign * v for k, v in stamped[rid].items()}:
            found.append(("royalty", f"{kind} {entry.entry_id} of {rid!r}: shares {entry.fields.get('roy', '')!r} "
                                     f"differ from those stamped on its hold"))
    return found


def lots_taken(text: str) -> list[tuple[str, int]]:
    """The ledger's "lot:credits,lot:credits" text as (lot_id, credits) pairs."""
    return [(p.lot_id, p.credits) for p in parse_lots(text)]


def check_hold_sources(ledger: Sequence[LedgerEntry]) -> Found:
    """A credits hold takes exactly its cost, only from lots still spendable at that moment."""
    found: Found = []
    expires_ms: dict[str, int] = {}
    revoked: set[str] = set()
    for entry in ledger:
        pid = entry.fields.get("pid", "")
        if entry.type == "grant":
            expires_ms[pid] = entry_int(entry, "expires_ms")
        elif entry.type == "revoke":
            revoked.add(pid)
        elif entry.type == "hold" and _by_funding(entry):
            found += _hold_source_problems(entry, expires_ms, revoked)
    return found


def _hold_source_problems(entry: LedgerEntry, expires_ms: Mapping[str, int], revoked: set[str]) -> Found:
    where = f"hold {entry.entry_id} ({entry.fields.get('rid', '')})"
    taken = lots_taken(entry.fields.get("lots", ""))
    found: Found = []
    if sum(c for _, c in taken) != entry_int(entry, "credits"):
        found.append(("lot_spendable", f"{where}: takes {sum(c for _, c in taken)} credits from its lots but "
                                       f"holds {entry_int(entry, 'credits')}"))
    for lot_id, _ in taken:
        if lot_id in revoked:
            found.append(("lot_spendable", f"{where}: takes credits from lot {lot_id!r} after it was revoked"))
        elif lot_id in expires_ms and expires_ms[lot_id] <= entry.at_ms:
            found.append(("lot_spendable", f"{where} at {entry.at_ms}: takes credits from lot {lot_id!r} "
                                           f"that expired at {expires_ms[lot_id]}"))
    return found


def check_returns(ledger: Sequence[LedgerEntry]) -> Found:
    """Credits given back to a revoked lot are revoked, to an expired one expired (see return_credits)."""
    found: Found = []
    expires_ms: dict[str, int] = {}
    revoked: set[str] = set()
    hold_lots: dict[str, Counter[str]] = {}
    for entry in ledger:
        fields = entry.fields
        if entry.type == "grant":
            expires_ms[fields.get("pid", "")] = entry_int(entry, "expires_ms")
        elif entry.type == "revoke":
            revoked.add(fields.get("pid", ""))
        elif _by_funding(entry) and entry.type in ("hold", "commit", "release", "expire", "refund"):
            listed = Counter(_sum_by_lot(lots_taken(fields.get("lots", ""))))
            if entry.type == "hold":
                hold_lots[fields.get("rid", "")] = listed
                continue
            back = listed
            if entry.type == "commit":
                if fields.get("rid", "") not in hold_lots:
                    continue
                back = hold_lots[fields.get("rid", "")] - listed
            found += _placement_problems(entry, back, expires_ms, revoked)
    return found


def _sum_by_lot(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, value in pairs:
        out[name] = out.get(name, 0) + value
    return out


def _placement_problems(entry: LedgerEntry, back: Mapping[str, int], expires_ms: Mapping[str, int],
                        revoked: set[str]) -> Found:
    if any(lot not in revoked and lot not in expires_ms for lot in back):
        return []  # a lot granted before the retained ledger: its expiry is unknown
    want_revoked = sum(c for lot, c in back.items() if lot in revoked)
    want_expired = sum(c for lot, c in back.items() if lot not in revoked and expires_ms[lot] <= entry.at_ms)
    got_revoked, got_expired = entry_int(entry, "to_revoked"), entry_int(entry, "to_expired")
    if (got_revoked, got_expired) == (want_revoked, want_expired):
        return []
    return [("return_placement", f"{entry.type} {entry.entry_id} ({entry.fields.get('rid', '')}) at {entry.at_ms}: "
                                 f"to_revoked {got_revoked} / to_expired {got_expired} but its lots "
                                 f"{dict(back)} call for {want_revoked} / {want_expired}")]


# -- free windows and monthly spend -------------------------------------------------


def _free_units(entry: LedgerEntry) -> list[Any]:
    """The free units an entry took ({k, u, l, s} on holds) or gave back (keys), as recorded."""
    try:
        units = json.loads(entry.fields.get("free_units") or "[]")
    except ValueError:
        return []
    return units if isinstance(units, list) else []


def check_free_windows(ledger: Sequence[LedgerEntry], free: Mapping[str, int], *, complete: bool = True) -> Found:
    """Replays each day/week counter ("h<field>" units) from the free holds and the units given
    back; every enforced unit, rolling ones included, must be within its limit when taken.
    ``complete``: the entries start at seq 1, so every counter starts at zero."""
    found: Found = []
    count: dict[str, int] = {}
    reported: set[tuple[str, str]] = set()

    def once(check: str, window: str, detail: str) -> None:
        if (check, window) not in reported:
            reported.add((check, window))
            found.append((check, detail))

    for entry in ledger:
        if entry.fields.get("free") != "1":
            continue
        amount = _free_amount(entry)
        if entry.type == "hold":
            for unit in _free_units(entry):
                key, used, limit = str(unit.get("k", "")), _num(unit.get("u")), _num(unit.get("l"))
                window = key[1:]
                expected = used
                if key.startswith("h"):
                    # Entries shipped and not given start mid-window: the first hold seen sets the baseline.
                    expected = count.get(window, 0 if complete else used - amount) + amount
                    if used != expected:
                        once("free_counter", window, f"window {window}: hold {entry.entry_id} recorded used={used} "
                                                     f"but the replay counts {expected}: the counter was changed "
                                                     "outside the scripts")
                    count[window] = expected
                if not unit.get("s") and max(used, expected) > limit:
                    once("free_over_limit", window, f"window {window}: hold {entry.entry_id} makes "
                                                    f"{max(used, expected)} free units used, over the limit {limit}")
        elif entry.type in ("release", "expire", "refund"):
            for key in _free_units(entry):
                window = str(key)[1:]
                # Like return_free_units: never below zero; before the baseline it is already counted.
                if str(key).startswith("h") and count.get(window, 0) > 0:
                    count[window] = max(count[window] - amount, 0)
        elif entry.type == "commit" and "usage" in entry.fields:
            # Like adjust_free_units: a counter moves from the estimate to the actual usage, never
            # below zero, and one no longer there (pruned, or before the baseline) stays so.
            for key in _free_units(entry):
                window = str(key)[1:]
                if str(key).startswith("h") and count.get(window, 0) > 0:
                    count[window] = max(count[window] + amount - entry_int(entry, "usage_held"), 0)
    for window, stored in sorted(free.items()):
        if window in count and stored != count[window]:
            found.append(("free_counter", f"window {window}: stored {stored} free units used but the ledger "
                                          f"replays {count[window]}"))
    return found


def replay_month_spend(ledger: Sequence[LedgerEntry]) -> tuple[dict[str, int], str]:
    """Credits held or spent per month, and the month of the first credits hold seen."""
    spend: dict[str, int] = {}
    month_of: dict[str, str] = {}
    first_month = ""
    for entry in ledger:
        rid = entry.fields.get("rid", "")
        if entry.type == "hold" and _by_funding(entry):
            month = entry.fields.get("month", "")
            month_of[rid] = month
            first_month = first_month or month
            spend[month] = spend.get(month, 0) + entry_int(entry, "credits")
            continue
        back = _spend_given_back(entry)
        given_back_month = month_of.get(rid)
        if back and given_back_month is not None:
            # Like unspend(): never below zero.
            spend[given_back_month] -= min(spend[given_back_month], back)
    return spend, first_month


def _spend_given_back(entry: LedgerEntry) -> int:
    if not _by_funding(entry):
        return 0
    if entry.type == "commit":
        # An overage drawn past the hold counts in the hold's month, like the hold.
        return entry_int(entry, "returned") - entry_int(entry, "drawn") - entry_int(entry, "debt")
    if entry.type in ("release", "expire", "refund"):
        return entry_int(entry, "credits")
    return 0


def check_spend(ledger: Sequence[LedgerEntry], stored: Mapping[str, int], trimmed: bool) -> Found:
    """The spend cap's measure per month against the replay. After a trim only months that
    began after the first retained credits hold are complete in the ledger."""
    replayed, first_month = replay_month_spend(ledger)
    found: Found = []
    for month, value in sorted(stored.items()):
        if trimmed and not (first_month and month > first_month):
            continue
        want = replayed.get(month, 0)
        if value != want:
            found.append(("spend_counter", f"month {month}: stored spend {value} credits but the ledger "
                                           f"replays {want}"))
    return found


# -- entry points ----------------------------------------------------------------------


def audit_state(account_id: str, state: Mapping[str, Any], books: Sequence[LedgerEntry] | None = None) -> AccountAudit:
    """Every check over one account's raw state (see RedisStore.raw_state: its keys, its outbox
    entries and its seq) and, when given, the books' entries of the account (read after Redis:
    an entry shipped in between is then in both, and counted once).

    Without books, entries already shipped and trimmed from the outbox (its first seq > 1) are
    not checked: reported as such, not as a violation."""
    p = _parse(state)
    last_seq = _num(state.get("seq"))
    entries, found = merge_entries(state.get("outbox", []), books or [])
    if books is not None:
        first_seq = 1
    elif entries:
        first_seq = min(entries[0].seq, last_seq + 1)
    else:
        first_seq = last_seq + 1  # every movement shipped (or none yet)
    trimmed = first_seq > 1
    found = list(p.found) + found
    found += check_counters(p.totals, p.lotrem, p.debt)
    found += check_conservation(p.totals, p.lotrem, p.debt)
    found += check_lots(p.totals, p.lots, p.lotrem, p.records)
    found += check_lot_index(p.lots, p.lotrem, p.lotexp)
    found += check_lot_held(p.lotheld, p.records)
    found += check_journal(p.records)
    found += check_holds(p.totals, p.records, p.holds)
    found += check_sequence(entries, last_seq, first_seq)
    for entry in entries:
        found += check_entry_fields(entry)
    if not trimmed:
        found += check_totals(entries, p.totals, p.lotrem, p.debt)
    found += check_purchases(entries, p.lots, complete=not trimmed)
    found += check_resolutions(entries)
    found += check_royalties(entries)
    found += check_hold_sources(entries)
    found += check_returns(entries)
    found += check_free_windows(entries, p.free, complete=not trimmed)
    found += check_spend(entries, p.spend, trimmed)
    return AccountAudit(account_id=account_id, entries_checked=len(entries), ledger_trimmed=trimmed,
                        violations=tuple(Violation(account_id, check, detail) for check, detail in found),
                        unchecked_seqs=first_seq - 1, books_given=books is not None)


async def audit_account(store: Any, account_id: str, books: Books | None = None) -> AccountAudit:
    """``store``: RedisStore (its raw_state). Redis first, then the books (see audit_state)."""
    state = await store.raw_state(account_id)
    if books is None:
        return audit_state(account_id, state, None)
    audit = audit_state(account_id, state, await books.account_entries(account_id))
    # A movement the books set aside: its seq was already stored under another entry id (Redis lost
    # acknowledged writes and numbered new ones again). Never resolved silently: support must look.
    found = [Violation(account_id, "ledger_conflict",
                       f"outbox entry {c.entry_id} ({c.type}, seq {c.seq}) reuses a sequence number the books "
                       "already hold under another entry id; kept in quota_ledger_conflicts")
             for c in await books.conflicts(account_id)]
    return replace(audit, violations=audit.violations + tuple(found)) if found else audit


async def audit_all(store: Any, books: Books | None = None) -> list[AccountAudit]:
    return [await audit_account(store, account_id, books) for account_id in await store.all_accounts()]


def format_report(audits: Sequence[AccountAudit]) -> str:
    bad = [a for a in audits if a.violations]
    lines = [f"quota-sidecar audit: {len(audits)} account(s), {len(bad)} with violations, "
             f"{sum(len(a.violations) for a in audits)} violation(s)"]
    for a in audits:
        status = "OK" if a.ok else f"{len(a.violations)} violation(s)"
        lines.append(f"account {a.account_id}: {a.entries_checked} ledger entries checked ({a.coverage}): {status}")
        lines += [f"  [{v.check}] {v.detail}" for v in a.violations]
    return "\n".join(lines)
