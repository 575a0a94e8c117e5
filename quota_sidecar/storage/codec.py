"""What the scripts take and answer: the store's arguments encoded as ARGV blocks, and the scripts'
JSON replies decoded into the plain values of quota_sidecar.domain.model (error replies into domain errors)."""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

from quota_sidecar.domain.errors import (
    Conflict,
    InvalidArgument,
    NotFound,
    ParamsInvalidForProduct,
    QuotaError,
    ResolutionConflict,
    StaleTimeZone,
    Unavailable,
)
from quota_sidecar.domain.model import (
    ActualCost,
    Allowance,
    AutoTopUp,
    CommitResult,
    CreditPack,
    CreditSource,
    CreditTotals,
    Deltas,
    DenialReason,
    Funding,
    LedgerEntry,
    Limit,
    LimitKind,
    LimitOverride,
    LimitStatus,
    Lot,
    ReleaseResult,
    ReserveCommand,
    ReserveOutcome,
    Segment,
    Window,
    headline,
)
from quota_sidecar.storage import mux as redis_mux

NOT_FOUND = {"RESERVATION_NOT_FOUND", "PURCHASE_NOT_FOUND"}


CONFLICTS = {"RESERVATION_PARAMS_MISMATCH", "COMMIT_COST_MISMATCH", "PURCHASE_ID_CONFLICT"}


RESOLUTION = {"ALREADY_COMMITTED", "ALREADY_RELEASED", "EXPIRED", "COST_EXCEEDS_HOLD", "UNKNOWN_PLAN",
               "NOT_COMMITTED", "ACTUAL_NOT_ENTITLED"}


MESSAGES = {
    "RESERVATION_NOT_FOUND": "no such reservation for this account",
    "PURCHASE_NOT_FOUND": "no lot was granted with this purchase_id for this account",
    "RESERVATION_PARAMS_MISMATCH": "reservation_id was already used with different parameters",
    "COMMIT_COST_MISMATCH": "the reservation was already committed at a different cost",
    "PURCHASE_ID_CONFLICT": "purchase_id was already granted with a different number of credits",
    "ALREADY_COMMITTED": "the reservation is already committed",
    "ALREADY_RELEASED": "the reservation is already released",
    "EXPIRED": "the reservation expired and its hold was refunded",
    "COST_EXCEEDS_HOLD": "the actual job costs more than the one reserved (or than the credits held); commit "
                         "without params to charge the hold",
    "ACTUAL_NOT_ENTITLED": "the actual job is outside what the account's plan allowed when it was reserved",
    "UNKNOWN_PLAN": "the account's plan is not in the plans file",
    "NOT_COMMITTED": "only a committed reservation can be refunded",
    "CLOCK_SKEW": "this sidecar's clock is more than a day off Redis' clock",
    "ACCOUNT_CORRUPT": "the account's stored spend cap or auto top-up is not a number; nothing was changed "
                       "(set them again with SetAccount)",
}


# An outbox entry's delta fields (see ledger() in _prelude.lua) -> Deltas' names.
DELTA_FIELDS = {"dg": "granted", "dr": "refunded", "ds": "spent", "dx": "expired", "dv": "revoked", "dh": "held",
                "df": "free_units", "dd": "debt"}


# XRANGE's reply with decoded responses: (entry id, fields) pairs.
StreamRows = list[tuple[str, dict[str, str]]]


def as_list(value: Any) -> list[Any]:
    # cjson encodes an empty Lua table as {}.
    return value if isinstance(value, list) else []


def script_error(reply: Mapping[str, Any]) -> Exception:
    code = reply["error"]
    message = MESSAGES.get(code, code)
    if code in NOT_FOUND:
        return NotFound(message, reason=code)
    if code in CONFLICTS:
        return Conflict(message, reason=code)
    if code in RESOLUTION:
        return ResolutionConflict(message, reason=code)
    if code == "TZ_MISMATCH":
        return StaleTimeZone(reply["tz"])
    if code == "INVALID_PARAMS":
        return ParamsInvalidForProduct(reply["product"], reply.get("pv") or "*")
    if code == "EXPIRES_IN_PAST":
        return InvalidArgument("expires_at", "must be in the future")
    if code == "ACCOUNT_CORRUPT":
        return QuotaError(message, reason=code)
    if code == "CLOCK_SKEW":
        return Unavailable(message, reason=code, retry_after_ms=1000)
    return QuotaError(f"unexpected script reply {code}", reason="STORE_ERROR")


def encode_block(rows: Sequence[Sequence[Any]]) -> list[Any]:
    """A count and its rows, as the scripts' next_block() reads them."""
    args: list[Any] = [len(rows)]
    for row in rows:
        args += list(row)
    return args


def encode_windows(windows: Sequence[Window]) -> list[Any]:
    return encode_block([(w.label, w.start_ms, w.end_ms) for w in windows])


def encode_limits(limits: Sequence[Limit]) -> str:
    return json.dumps([limit.as_json() for limit in limits], separators=(",", ":"))


# A limit's value by its script row's fields (id, kind, hours, free, shadow): a decision reports
# the same few limits call after call. Bounded like the other caches of the decision path.
_LIMITS: dict[tuple[Any, ...], Limit] = {}
_LIMITS_MAX = 4096


def _limit(r: list[Any]) -> Limit:
    key = (r[0], r[1], r[2], r[4], r[6])
    limit = _LIMITS.get(key)
    if limit is None:
        if len(_LIMITS) >= _LIMITS_MAX:
            _LIMITS.clear()
        limit = _LIMITS[key] = Limit(limit_id=r[0], kind=LimitKind(r[1]), free=int(r[4]), hours=int(r[2]),
                                     shadow=bool(r[6]))
    return limit


def decode_limit_statuses(rows: Any) -> tuple[LimitStatus, ...]:
    """Script rows {id, kind, hours, used, limit, resets_ms, shadow} as values."""
    return tuple(LimitStatus(limit=_limit(r), used=int(r[3]), resets_ms=int(r[5])) for r in as_list(rows))


def decode_override(product: str, raw: str) -> LimitOverride:
    o = json.loads(raw)
    limits = tuple(Limit(limit_id=x["id"], kind=LimitKind(x["kind"]), free=int(x["free"]), hours=int(x["hours"]),
                         shadow=bool(x["shadow"])) for x in as_list(o["limits"]))
    return LimitOverride(product=product, limits=limits, max_concurrent=int(o["max_concurrent"]))


def decode_overrides(rows: Any) -> tuple[LimitOverride, ...]:
    return tuple(sorted((decode_override(p, raw) for p, raw in as_list(rows)), key=lambda o: o.product))


_FUNDINGS: dict[Any, Funding | None] = {f.value: f for f in Funding}
_DENIALS: dict[Any, DenialReason | None] = {d.value: d for d in DenialReason}


def decode_reserve_outcome(r: Mapping[str, Any]) -> ReserveOutcome:
    funding = r.get("funding")
    denial = r.get("denial")
    return ReserveOutcome(
        allowed=bool(r["allowed"]),
        plan=r["plan"],
        # By value through a dict (an Enum call costs ~1 us); an unknown value still raises ValueError.
        funding=(_FUNDINGS.get(funding) or Funding(funding)) if funding else None,
        denial=(_DENIALS.get(denial) or DenialReason(denial)) if denial else None,
        cost_credits=int(r["cost"]),
        credits_held=int(r["held"]),
        credits_short=int(r.get("short", 0)),
        free_used=int(r["free_used"]),
        free_limit=int(r["free_limit"]),
        free_resets_ms=int(r["resets_ms"]),
        credit_balance=int(r["balance"]),
        expires_ms=int(r["expires_ms"]),
        now_ms=int(r["now_ms"]),
        replayed=bool(r["replayed"]),
        limits=decode_limit_statuses(r.get("limits")),
        shadow_limits=tuple(as_list(r.get("shadow"))),
        plans_version=r.get("pv", ""),
        fees_credits=int(r.get("fees", 0)),
        cameo_id=r.get("cameo", ""),
        debt_credits=int(r.get("debt", 0)),
    )


class PackedBlocks:
    """Packed argument blocks keyed by the identity of the immutable values they encode.

    A decision's windows (the same objects all day for a zone, see windows.candidates) and
    prices (cached per job by the engine) repeat call after call; encoding them once saves
    most of the cost of sending its ~90 arguments. Holding the values keeps their ids
    from being reused while an entry lives."""

    def __init__(self, max_entries: int) -> None:
        self._entries: dict[tuple[int, ...], tuple[tuple[Any, ...], redis_mux.Packed]] = {}
        self._max_entries = max_entries

    def get(self, values: tuple[Any, ...], build: Callable[[], list[Any]]) -> redis_mux.Packed:
        key = tuple(map(id, values))
        hit = self._entries.get(key)
        # Tuple equality tests each item's identity first: the same objects compare at C speed.
        if hit is not None and hit[0] == values:
            return hit[1]
        packed = redis_mux.Packed(build())
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[key] = (values, packed)
        return packed


PACKED_BLOCKS = PackedBlocks(4096)


def encode_plan_args(segments: Sequence[Segment], packs: Sequence[CreditPack]) -> list[Any]:
    args: list[Any] = [len(segments)]
    for seg in segments:
        args += [seg.from_ms, seg.cost_credits, seg.plans_version, 1 if seg.metered else 0]
        args += encode_block([(r.plan, 1 if r.entitled else 0, r.credits_low, r.max_concurrent,
                         1 if r.concurrency_shadow else 0, encode_limits(r.limits)) for r in seg.plan_rows])
    return args + encode_block([(p.pack_id, p.credits, p.price.minor_units, p.price.currency_code) for p in packs])


def reserve_args(cmd: ReserveCommand) -> list[Any]:
    """reserve.lua's arguments after the header (reserve_all.lua reads them once per item)."""
    windows = PACKED_BLOCKS.get((cmd.windows, cmd.weeks, cmd.months), lambda: (
        encode_windows(cmd.windows) + encode_windows(cmd.weeks) + encode_windows(cmd.months)))
    plan = PACKED_BLOCKS.get((cmd.segments, cmd.packs), lambda: encode_plan_args(cmd.segments, cmd.packs))
    return [cmd.reservation_id, cmd.product, cmd.fingerprint, cmd.ttl_ms, cmd.default_plan, cmd.time_zone,
            cmd.free_warning_percent, windows, plan,
            *encode_block([(c, owner, fee, 1 if active else 0) for c, owner, fee, active in cmd.cameos])]


def commit_args(reservation_id: str, costs: Mapping[tuple[str, str], ActualCost]) -> list[Any]:
    """commit.lua's rows: overage 0 reject, 1 cap, 2 draw; the plans' debt bounds as "|plan:credits|..."."""
    return [reservation_id, *encode_block([(pv, product, c.cost_credits, "|" + "|".join(c.entitled_plans) + "|",
                                            2 if c.draw else 1 if c.cap else 0,
                                            "|" + "".join(f"{plan}:{bound}|" for plan, bound in c.max_debt))
                                           for (pv, product), c in costs.items()])]


def decode_commit_result(r: Mapping[str, Any]) -> CommitResult:
    return CommitResult(funding=Funding(r["funding"]), credits_charged=int(r["charged"]),
                        credits_refunded=int(r["refunded"]), free_charged=int(r["free_charged"]),
                        credit_balance=int(r["balance"]), replayed=bool(r["replayed"]),
                        written_off=int(r.get("written_off", 0)), credits_drawn=int(r.get("drawn", 0)),
                        debt_credits=int(r.get("debt", 0)), included_usage_credits=int(r.get("usage", 0)))


def decode_release_result(r: Mapping[str, Any]) -> ReleaseResult:
    return ReleaseResult(funding=Funding(r["funding"]), credits_refunded=int(r["refunded"]),
                         free_refunded=int(r["free_refunded"]), credit_balance=int(r["balance"]),
                         replayed=bool(r["replayed"]))


def decode_allowance(row: list[Any], default_resets_ms: int) -> Allowance:
    statuses = decode_limit_statuses(row[1])
    used, limit, resets_ms = headline(statuses, default_resets_ms)
    return Allowance(product=row[0], free_used=used, free_limit=limit, free_resets_ms=resets_ms, limits=statuses,
                     jobs_in_flight=int(row[2]), max_concurrent=int(row[3]), overridden=bool(row[4]))


def decode_live_lots(flat: list[Any], metas: Mapping[str, Lot]) -> tuple[Lot, ...]:
    lots = []
    for i in range(0, len(flat), 3):
        meta = metas[flat[i]]
        lots.append(Lot(lot_id=flat[i], credits_left=int(flat[i + 1]), expires_ms=int(flat[i + 2]),
                        credits_granted=meta.credits_granted, granted_ms=meta.granted_ms, source=meta.source))
    return tuple(lots)


def decode_all_lots(rows: list[Any]) -> tuple[Lot, ...]:
    lots = [Lot(lot_id=r[0], credits_granted=int(r[1]), credits_left=int(r[2]), expires_ms=int(r[3]),
                granted_ms=int(r[4]), source=CreditSource(r[5]), revoked=bool(r[6])) for r in rows]
    return tuple(sorted(lots, key=lambda lot: (lot.expires_ms, lot.source.rank, lot.lot_id)))


def decode_totals(values: Mapping[str, Any], available: int, debt: int = 0) -> CreditTotals:
    def get(name: str) -> int:
        return int(values.get(name) or 0)

    return CreditTotals(granted=get("credits_granted"), spent=get("credits_spent"), expired=get("credits_expired"),
                        revoked=get("credits_revoked"), refunded=get("credits_refunded"), held=get("credits_held"),
                        available=available, debt=debt)


def decode_auto_topup(r: Mapping[str, Any]) -> AutoTopUp:
    return AutoTopUp(enabled=r["at_on"] == "1", threshold_credits=int(r["at_thr"]), pack_id=r["at_pack"])


def stream_rows(raw: Any) -> StreamRows:
    """An XRANGE reply as (id, fields) pairs: redis-py's already are; the multiplexed
    connection's are [id, [field, value, ...]]."""
    return [(row[0], row[1] if isinstance(row[1], dict) else _pairs(row[1])) for row in raw or []]


def _pairs(flat: list[str]) -> dict[str, str]:
    it = iter(flat)
    return dict(zip(it, it))


_NO_DELTAS = Deltas()


def outbox_entry(bucket: int, stream_id: str, raw: Mapping[str, str]) -> LedgerEntry:
    """An outbox stream entry as a LedgerEntry (totals_after left zero: readers sum the deltas)."""
    return _outbox_entry(bucket, stream_id, dict(raw))


def outbox_entries(bucket: int, rows: StreamRows) -> list[LedgerEntry]:
    """A bucket's outbox rows (stream_rows' fresh pairs) as LedgerEntries. Consumes the rows' dicts:
    each becomes its entry's ``fields`` (the shipper's path, for every entry: no copy)."""
    return [_outbox_entry(bucket, stream_id, fields) for stream_id, fields in rows]


def _outbox_entry(bucket: int, stream_id: str, fields: dict[str, str]) -> LedgerEntry:
    """Pops every entry's own fields (account, seq, time, kind) and the deltas out of ``fields``; what
    remains is the kind's fields."""
    pop = fields.pop
    account_id, seq, at_ms, kind = pop("a", ""), pop("q", ""), pop("t", ""), pop("k", "")
    present = DELTA_FIELDS.keys() & fields.keys()  # usually one or two of the seven
    deltas = Deltas(**{DELTA_FIELDS[short]: int(pop(short) or 0) for short in present}) if present else _NO_DELTAS
    return LedgerEntry(entry_id=outbox_entry_id(bucket, stream_id), account_id=account_id, seq=int(seq or 0),
                       at_ms=int(at_ms or 0), type=kind, fields=fields, deltas=deltas)


def outbox_entry_id(bucket: int, stream_id: str) -> str:
    """``b<bucket>:<stream id>``: unique across the buckets' outboxes."""
    return f"b{bucket}:{stream_id}"


def parse_outbox_entry_id(entry_id: str) -> tuple[int, str]:
    """(bucket, stream id) of an outbox_entry_id; ValueError when it is not one."""
    head, _, stream_id = entry_id.partition(":")
    ms, dash, seq = stream_id.partition("-")
    if not (head.startswith("b") and head[1:].isdigit() and ms.isdigit() and dash and seq.isdigit()):
        raise ValueError(f"not an outbox entry id: {entry_id!r}")
    return int(head[1:]), stream_id
