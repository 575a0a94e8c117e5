"""The conservation audit: replays an account's ledger against its stored state.

    quota-sidecar audit [--account ID | --all] --redis-url URL

Pure logic over the plain data ``RedisStore.raw_state(account)`` returns (no
redis import here, so the checks can be exercised on hand-made state). The
scripts keep, per account,

    granted + refunded = available + held + spent + expired + revoked

with available the stored sum of every lot's ``lotrem`` (lots past their
expiry that nobody has settled yet still hold their credits there). The
audit checks that identity, each lot, the hold index, every ledger link,
that each reservation resolves at most once, the free-window counters and
the monthly spend counters. Every violation names its numbers.

Credits and free units are integers; times are milliseconds since the epoch.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from quota_sidecar.domain.model import LedgerEntry

TOTAL_NAMES = ("granted", "spent", "expired", "revoked", "refunded", "held")
RESOLUTIONS = frozenset({"commit", "release", "expire"})
# Ledger fields that are amounts: a negative one is never written by a script.
AMOUNT_FIELDS = ("credits", "returned", "to_lots", "to_expired", "to_revoked", "used", "limit", "cost")
# The scripts' ledger types; anything else was not written by them.
ENTRY_TYPES = frozenset({"hold", "commit", "release", "expire", "grant", "revoke", "lot_expire", "refund",
                         "degraded_conflict"})
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
    ledger_trimmed: bool
    violations: tuple[Violation, ...]

    @property
    def ok(self) -> bool:
        return not self.violations


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
    lotrem_raw = state.get("lotrem", {})
    lotrem = {k: v for k, v in lotrem_raw.items() if not k.endswith(LOT_HELD_SUFFIX)}
    lotheld = {k[:-len(LOT_HELD_SUFFIX)]: v for k, v in lotrem_raw.items() if k.endswith(LOT_HELD_SUFFIX)}
    return _Parsed(totals=totals, lotrem=_int_map("lotrem", lotrem, found),
                   lotheld=_int_map("lotrem held", lotheld, found),
                   lots=_json_map("lot", state.get("lots", {}), found),
                   records=_json_map("reservation record", state.get("res", {}), found),
                   holds=_scores(state.get("holds", [])), lotexp=_scores(state.get("lotexp", [])),
                   free=_int_map("free", state.get("free", {}), found),
                   spend=_int_map("spend", state.get("spend", {}), found), found=found)


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


def check_counters(totals: Mapping[str, int], lotrem: Mapping[str, int]) -> Found:
    found: Found = [("counter_negative", f"credits_{n} = {v} < 0") for n, v in totals.items() if v < 0]
    found += [("lot_negative", f"lot {lot!r}: lotrem = {v} < 0") for lot, v in sorted(lotrem.items()) if v < 0]
    return found


def check_conservation(totals: Mapping[str, int], lotrem: Mapping[str, int]) -> Found:
    available = sum(lotrem.values())
    t = totals
    expected = t["granted"] + t["refunded"] - t["spent"] - t["expired"] - t["revoked"] - t["held"]
    if available == expected:
        return []
    return [("conservation",
             f"available (sum of lotrem over {len(lotrem)} lots) = {available} but granted {t['granted']} + "
             f"refunded {t['refunded']} - spent {t['spent']} - expired {t['expired']} - revoked {t['revoked']} "
             f"- held {t['held']} = {expected} (off by {available - expected:+d})")]


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


# -- the ledger chain ------------------------------------------------------------


def entry_int(entry: LedgerEntry, name: str) -> int:
    return _num(entry.fields.get(name))


def _by_funding(entry: LedgerEntry) -> bool:
    return entry.fields.get("funding") == "credits"


def entry_deltas(entry: LedgerEntry) -> Totals:
    """What an entry of its type moves between the totals before and after it."""
    d = dict.fromkeys(TOTAL_NAMES, 0)
    credits, kind = entry_int(entry, "credits"), entry.type
    returned_expired, returned_revoked = entry_int(entry, "to_expired"), entry_int(entry, "to_revoked")
    if kind == "hold" and _by_funding(entry):
        d["held"] = credits
    elif kind == "commit":
        d.update(held=-(credits + entry_int(entry, "returned")), spent=credits, expired=returned_expired,
                 revoked=returned_revoked)
    elif kind in ("release", "expire") and _by_funding(entry):
        d.update(held=-credits, expired=returned_expired, revoked=returned_revoked)
    elif kind == "refund" and _by_funding(entry):
        d.update(refunded=credits, expired=returned_expired, revoked=returned_revoked)
    elif kind == "grant":
        d["granted"] = credits
    elif kind == "revoke":
        d["revoked"] = credits
    elif kind == "lot_expire":
        d["expired"] = credits
    return d


def totals_after(entry: LedgerEntry) -> Totals:
    t = entry.totals_after
    return {n: getattr(t, n) for n in TOTAL_NAMES}


def _minus(a: Mapping[str, int], b: Mapping[str, int]) -> Totals:
    return {n: a[n] - b[n] for n in TOTAL_NAMES}


def _diff_text(got: Mapping[str, int], want: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {got[n]:+d} (expected {want[n]:+d})" for n in TOTAL_NAMES if got[n] != want[n])


def ledger_start(ledger: Sequence[LedgerEntry]) -> tuple[Totals, bool]:
    """Totals before the first retained entry, and whether older entries were trimmed."""
    zero = dict.fromkeys(TOTAL_NAMES, 0)
    if not ledger:
        return zero, False
    before = _minus(totals_after(ledger[0]), entry_deltas(ledger[0]))
    return before, before != zero


def check_entry_fields(entry: LedgerEntry) -> Found:
    found: Found = []
    where = f"entry {entry.entry_id} ({entry.type})"
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
        placed = sum(entry_int(entry, n) for n in ("to_lots", "to_expired", "to_revoked"))
        if placed != given_back:
            found.append(("ledger_chain", f"{where}: to_lots + to_expired + to_revoked = {placed} but "
                                          f"{given_back} credits were given back"))
    return found


def check_chain(ledger: Sequence[LedgerEntry], totals: Mapping[str, int]) -> tuple[Found, bool]:
    previous, trimmed = ledger_start(ledger)
    found: Found = []
    for entry in ledger:
        found += check_entry_fields(entry)
        after = totals_after(entry)
        moved, want = _minus(after, previous), entry_deltas(entry)
        if moved != want:
            found.append(("ledger_chain", f"entry {entry.entry_id} ({entry.type} {entry.fields.get('rid') or ''}"
                                          f"{entry.fields.get('pid') or ''}): {_diff_text(moved, want)}"))
        previous = after
    if dict(totals) != previous:
        last = f"last entry {ledger[-1].entry_id}" if ledger else "an empty ledger"
        found.append(("ledger_chain", f"current totals ({_totals_text(totals)}) differ from {last} "
                                      f"({_totals_text(previous)}): changed outside the scripts"))
    return found, trimmed


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


def lots_taken(text: str) -> list[tuple[str, int]]:
    """The ledger's "lot:credits,lot:credits" text."""
    pairs = [part.rsplit(":", 1) for part in text.split(",") if part]
    return [(pair[0], _num(pair[1]) if len(pair) == 2 else 0) for pair in pairs]


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


def check_free_windows(ledger: Sequence[LedgerEntry], free: Mapping[str, int]) -> Found:
    """Replays each day/week counter ("h<field>" units) from the free holds and the units given
    back; every enforced unit, rolling ones included, must be within its limit when taken."""
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
        if entry.type == "hold":
            for unit in _free_units(entry):
                key, used, limit = str(unit.get("k", "")), _num(unit.get("u")), _num(unit.get("l"))
                window = key[1:]
                expected = used
                if key.startswith("h"):
                    # A trimmed ledger starts mid-window: the first hold we see sets the baseline.
                    expected = count.get(window, used - 1) + 1
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
                    count[window] -= 1
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
        return entry_int(entry, "returned")
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


def audit_state(account_id: str, state: Mapping[str, Any]) -> AccountAudit:
    """Every check over one account's raw state (see RedisStore.raw_state)."""
    p = _parse(state)
    ledger: Sequence[LedgerEntry] = state.get("ledger", [])
    found = list(p.found)
    found += check_counters(p.totals, p.lotrem)
    found += check_conservation(p.totals, p.lotrem)
    found += check_lots(p.totals, p.lots, p.lotrem, p.records)
    found += check_lot_index(p.lots, p.lotrem, p.lotexp)
    found += check_lot_held(p.lotheld, p.records)
    found += check_journal(p.records)
    found += check_holds(p.totals, p.records, p.holds)
    chain, trimmed = check_chain(ledger, p.totals)
    found += chain
    found += check_resolutions(ledger)
    found += check_hold_sources(ledger)
    found += check_returns(ledger)
    found += check_free_windows(ledger, p.free)
    found += check_spend(ledger, p.spend, trimmed)
    return AccountAudit(account_id=account_id, entries_checked=len(ledger), ledger_trimmed=trimmed,
                        violations=tuple(Violation(account_id, check, detail) for check, detail in found))


async def audit_account(store: Any, account_id: str) -> AccountAudit:
    return audit_state(account_id, await store.raw_state(account_id))


async def audit_all(store: Any) -> list[AccountAudit]:
    return [await audit_account(store, account_id) for account_id in await store.all_accounts()]


def format_report(audits: Sequence[AccountAudit]) -> str:
    bad = [a for a in audits if a.violations]
    lines = [f"quota-sidecar audit: {len(audits)} account(s), {len(bad)} with violations, "
             f"{sum(len(a.violations) for a in audits)} violation(s)"]
    for a in audits:
        ledger = "ledger trimmed" if a.ledger_trimmed else "full ledger"
        status = "OK" if a.ok else f"{len(a.violations)} violation(s)"
        lines.append(f"account {a.account_id}: {a.entries_checked} ledger entries checked ({ledger}): {status}")
        lines += [f"  [{v.check}] {v.detail}" for v in a.violations]
    return "\n".join(lines)
