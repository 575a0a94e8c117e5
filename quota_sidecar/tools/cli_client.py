"""The client side of the CLI verbs: one gRPC call each, printed for people.

Kept apart from cli.py so that ``serve`` and ``--help`` never import the
client stubs.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from typing import Any, Callable

import grpc
from google.protobuf import descriptor, json_format, message, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.domain.plans import USAGE_UNIT
from quota_sidecar.tools.common import (
    ADMIN_VERBS,
    CLIENT_TIMEOUT_SECONDS,
    DEFAULT_ADMIN_TARGET,
    DEFAULT_TARGET,
    EXIT_DENIED,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    admin_token,
    channel_credentials,
    format_time,
    print_json,
)

_FUNDING_TEXT = {pb.FUNDING_FREE_QUOTA: "free allowance", pb.FUNDING_CREDITS: "credits"}
_PLAIN_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def visible(value: object) -> str:
    """``value`` as text with every character str.isprintable() refuses shown as an escape
    (\\x9b, \\u202e, \\U000e0001, \\t): text from the server (ids, reasons, messages, possibly
    stored before the server refused such characters) must not drive the terminal (a C1 CSI
    starts an escape sequence) or reorder the line (bidi overrides)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _PLAIN_ESCAPES.get(c) or c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _say(line: str = "", *, err: bool = False) -> None:
    """print() for every human-readable line of this module, through visible()."""
    print(visible(line), file=sys.stderr if err else sys.stdout)


def _job(args: argparse.Namespace) -> pb.JobParams | None:
    given = {k: getattr(args, k, None) for k in ("duration", "resolution", "model", "units", "input_tokens",
                                                 "cached_input_tokens", "output_tokens", "fast")}
    cameos = getattr(args, "cameo", None) or []
    if all(v is None for v in given.values()) and not cameos:
        return None
    return pb.JobParams(duration_seconds=given["duration"] or 0.0, resolution=given["resolution"] or "",
                        model=given["model"] or "", units=given["units"] or 0, cameo_ids=cameos,
                        input_tokens=given["input_tokens"] or 0,
                        cached_input_tokens=given["cached_input_tokens"] or 0,
                        output_tokens=given["output_tokens"] or 0, fast=bool(given["fast"]))


def _money(m: pb.Money) -> str:
    return f"{m.currency_code} {m.minor_units // 100}.{m.minor_units % 100:02d}"


def _ms(ts: timestamp_pb2.Timestamp) -> int:
    return ts.ToMilliseconds()


def _included_usage(r: pb.CheckAndReserveResponse | pb.QuoteResponse) -> bool:
    """A metered product: its free allowance is included usage counted in credits."""
    return r.allowance_unit == USAGE_UNIT


def _funding_text(r: pb.CheckAndReserveResponse | pb.QuoteResponse) -> str:
    if r.funding == pb.FUNDING_FREE_QUOTA and _included_usage(r):
        return "included usage"
    return _FUNDING_TEXT[r.funding]


def _held_text(r: pb.CheckAndReserveResponse | pb.QuoteResponse) -> str:
    if r.funding != pb.FUNDING_FREE_QUOTA:
        return f"{r.credits_held} credit(s)"
    if _included_usage(r):
        return f"{r.job_cost_credits} credit(s) of usage"
    return "1 free unit" + (f" + {r.credits_held} credit(s) of cameo fees" if r.credits_held else "")


def _fees_text(r: pb.CheckAndReserveResponse | pb.QuoteResponse) -> str:
    return f" (cameo fees {r.cameo_fees_credits})" if r.cameo_fees_credits else ""


def _print_decision(r: pb.CheckAndReserveResponse) -> None:
    if r.allowed:
        held = _held_text(r)
        _say(f"ALLOWED  reservation {r.reservation_id}")
        _say(f"  funded by {_funding_text(r)}: {held} held until {format_time(_ms(r.expires_at))}")
    else:
        _say(f"DENIED   {_denial_text(r)}")
    _print_decision_details(r)
    _say(f"  job cost: {r.job_cost_credits} credit(s){_fees_text(r)}; credits available: {r.credit_balance}"
         + ("  (replayed earlier decision)" if r.replayed else ""))


def _print_quote(r: pb.QuoteResponse) -> None:
    """As reserve prints its decision, in the conditional: nothing was held."""
    if r.allowed:
        held = _held_text(r)
        replay = f"  (reservation {r.reservation_id} already holds it)" if r.replayed else ""
        _say(f"QUOTE  would be allowed{replay}")
        _say(f"  funded by {_funding_text(r)}: {held} would be held until {format_time(_ms(r.expires_at))}")
    else:
        _say(f"QUOTE  would be denied: {_denial_text(r)}")
    _print_decision_details(r)
    if r.replayed:  # the live hold's own decision: its balance is the one after that hold
        _say(f"  job cost: {r.job_cost_credits} credit(s); credits available: {r.credit_balance}  "
             "(replayed earlier decision)")
        return
    after = f", {r.credit_balance} after this job" if r.credits_held else ""
    _say(f"  job cost: {r.job_cost_credits} credit(s){_fees_text(r)}; credits available: "
         f"{r.credit_balance + r.credits_held}{after}")


def _denial_text(r: pb.CheckAndReserveResponse | pb.QuoteResponse) -> str:
    return f"{pb.DenialReason.Name(r.denial.reason).removeprefix('DENIAL_REASON_')}: {r.denial.message}"


def _print_decision_details(r: pb.CheckAndReserveResponse | pb.QuoteResponse) -> None:
    """The purchase offers of a denial, the free allowance and the shadow limits."""
    if not r.allowed:
        for offer in r.denial.offers:
            _say(f"  offer: {offer.quantity} x {offer.pack_id} ({offer.credits} credits, {_money(offer.price)}) "
                 f"= {_money(offer.total_price)}")
    if r.limits and (_included_usage(r) or any(x.kind != pb.LIMIT_KIND_DAY for x in r.limits)):
        # Not one calendar day: every window, with what it counts.
        what = "included usage" if _included_usage(r) else "free"
        unit = " credits" if _included_usage(r) else ""
        _say(f"  {what}: " + "; ".join(f"{visible(_limit_text(x))} {x.used}/{x.limit}{unit}, resets "
                                       f"{format_time(_ms(x.resets_at))}" for x in r.limits))
    else:
        _say(f"  free today: {r.free_used}/{r.free_limit}, resets {format_time(_ms(r.free_resets_at))}")
    if r.shadow_limits:
        _say(f"  shadow limits that would have applied: {', '.join(r.shadow_limits)}")


def _limit_text(limit: Any) -> str:
    kind = pb.LimitKind.Name(limit.kind).removeprefix("LIMIT_KIND_").lower()
    window = f"last {limit.rolling_hours} h" if limit.kind == pb.LIMIT_KIND_ROLLING else f"per {kind}"
    return f"{limit.limit_id} ({window})"


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Aligned columns; numbers right-aligned, text left-aligned; two spaces between columns."""
    # Escaped before measuring, so an escape widens its column instead of breaking the alignment.
    headers = [visible(h) for h in headers]
    cells = [[visible(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(row[i], int) for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return [line(headers), *(line(row) for row in cells)]


def _limit_rows(r: pb.GetBalanceResponse, tz: str) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for a in r.allowances:
        notes = ([f"in flight {a.jobs_in_flight}/{a.max_concurrent}"] if a.max_concurrent else []) + \
                (["account override"] if a.overridden else [])
        # A metered product's limits count included usage in credits, the others jobs (their unit).
        unit = a.unit or "-"
        for st in a.limits or [None]:
            if st is None:  # a product the plan gives no free allowance for
                rows.append([a.product, "-", a.free_used, a.free_limit, max(a.free_limit - a.free_used, 0), unit,
                             format_time(_ms(a.free_resets_at), tz), ", ".join(notes)])
                continue
            rows.append([a.product, _limit_text(st), st.used, st.limit, max(st.limit - st.used, 0), unit,
                         format_time(_ms(st.resets_at), tz), ", ".join(notes + (["shadow"] if st.shadow else []))])
    return rows


def _print_balance(r: pb.GetBalanceResponse) -> None:
    tz = r.time_zone or "UTC"
    _say(f"account {r.account_id}  plan {r.plan}  time zone {tz}")
    _say(f"credits available {r.credit_balance}, held {r.credits_held}"
         + (f", owed {r.debt_credits} (debt: paid first by the next credits; new jobs are denied until then)"
            if r.debt_credits else ""))
    _say()
    for row in table(["PRODUCT", "FREE LIMIT", "USED", "OF", "LEFT", "UNIT", "RESETS", "NOTE"], _limit_rows(r, tz)):
        _say(row)
    for a in r.allowances:
        for change in a.upcoming:
            limits = ", ".join(f"{_limit_text(x)} {x.free}" for x in change.limits)
            _say(f"  {a.product} from {format_time(_ms(change.effective_from), tz)}: {limits}")
    if r.lots:
        _say()
        for row in table(["LOT", "LEFT", "GRANTED", "SOURCE", "EXPIRES"], [
                [lot.lot_id, lot.credits_left, lot.credits_granted,
                 pb.CreditSource.Name(lot.source).removeprefix("CREDIT_SOURCE_").lower(),
                 format_time(_ms(lot.expires_at), tz)] for lot in r.lots]):
            _say(row)
    if r.expiring_lots:
        _say()
        _say(f"credits expiring in the next 30 days: {r.credits_expiring_30d}")
        for lot in r.expiring_lots:
            _say(f"  {lot.credits_left} in lot {visible(lot.lot_id)}, expires {format_time(_ms(lot.expires_at), tz)}")
    if r.holds:
        _say()
        for row in table(["HOLD", "PRODUCT", "FUNDED BY", "CREDITS", "EXPIRES"], [
                [h.reservation_id, h.product, _FUNDING_TEXT.get(h.funding, "?"), h.credits_held,
                 format_time(_ms(h.expires_at), tz)] for h in r.holds]):
            _say(row)
        if r.holds_total > len(r.holds):
            _say(f"({len(r.holds)} soonest-expiring of {r.holds_total} open holds shown)")


def _channel(args: argparse.Namespace, admin: bool) -> grpc.Channel:
    """A channel to the verb's target: the admin one (TLS when asked) or the worker-facing one."""
    target = (args.target or os.environ.get("QUOTA_ADMIN_TARGET" if admin else "QUOTA_TARGET")
              or (DEFAULT_ADMIN_TARGET if admin else DEFAULT_TARGET))
    credentials = channel_credentials(args) if admin else None
    if credentials is None:
        return grpc.insecure_channel(target)
    # Over a unix socket there is no host name to verify the certificate against: the caller names it.
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def _admin_call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of every QuotaAdmin call: the deadline and the bearer token, if any."""
    kw: dict[str, Any] = {"timeout": CLIENT_TIMEOUT_SECONDS}
    token = admin_token(args)
    if token is not None:
        kw["metadata"] = (("authorization", f"Bearer {token}"),)
    return kw


def _commit_request(args: argparse.Namespace) -> pb.CommitRequest:
    req = pb.CommitRequest(account_id=args.account, reservation_id=args.id)
    job = _job(args)
    if job is not None:
        req.params.CopyFrom(job)
    return req


def _grant_request(args: argparse.Namespace) -> pb.GrantCreditsRequest:
    req = pb.GrantCreditsRequest(account_id=args.account, credits=args.credits, purchase_id=args.purchase_id,
                                 source=_SOURCES[args.source], reason=args.reason, pack_id=args.pack,
                                 currency=args.currency)
    if args.price is not None:
        req.price_minor_units = _minor_units(args.price, "--price")
    if args.expires_at:
        req.expires_at.FromDatetime(datetime.fromisoformat(args.expires_at))
    return req


def _minor_units(text: str, flag: str) -> int:
    """A decimal amount with at most 2 decimals ("4.00") as minor units (400); ValueError otherwise."""
    from decimal import Decimal, InvalidOperation

    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{flag} must be a decimal amount such as 4.00, not {text!r}") from None
    cents = amount * 100
    if not amount.is_finite() or cents != cents.to_integral_value() or amount < 0:
        raise ValueError(f"{flag} must be a non-negative amount with at most 2 decimals, not {text!r}")
    return int(cents)


def _set_account_request(args: argparse.Namespace) -> pb.SetAccountRequest:
    req = pb.SetAccountRequest(account_id=args.account, plan=args.plan, time_zone=args.tz)
    if args.monthly_cap is not None:
        req.monthly_spend_cap_credits = args.monthly_cap
    if args.no_auto_topup:
        req.auto_topup.CopyFrom(pb.AutoTopUp(enabled=False))
    elif args.auto_topup_pack:
        req.auto_topup.CopyFrom(pb.AutoTopUp(enabled=True, threshold_credits=args.auto_topup_threshold,
                                             pack_id=args.auto_topup_pack))
    return req


_SOURCES = {"purchase": pb.CREDIT_SOURCE_PURCHASE, "promo": pb.CREDIT_SOURCE_PROMO,
            "refund": pb.CREDIT_SOURCE_REFUND, "compensation": pb.CREDIT_SOURCE_COMPENSATION}

# verb -> (RPC method, request builder)
_CALLS: dict[str, tuple[str, Callable[[argparse.Namespace], Any]]] = {
    "reserve": ("CheckAndReserve", lambda a: pb.CheckAndReserveRequest(
        account_id=a.account, product=a.product, reservation_id=a.id, ttl_seconds=a.ttl,
        params=_job(a) or pb.JobParams())),
    "quote": ("Quote", lambda a: pb.QuoteRequest(
        account_id=a.account, product=a.product, reservation_id=a.id, ttl_seconds=a.ttl,
        params=_job(a) or pb.JobParams())),
    "commit": ("Commit", _commit_request),
    "release": ("Release", lambda a: pb.ReleaseRequest(account_id=a.account, reservation_id=a.id)),
    "extend": ("ExtendReservation", lambda a: pb.ExtendReservationRequest(
        account_id=a.account, reservation_id=a.id, ttl_seconds=a.ttl)),
    "balance": ("GetBalance", lambda a: pb.GetBalanceRequest(account_id=a.account)),
    "grant": ("GrantCredits", _grant_request),
    "revoke": ("RevokeCredits", lambda a: pb.RevokeCreditsRequest(
        account_id=a.account, purchase_id=a.purchase_id, reason=a.reason)),
    "refund": ("RefundJob", lambda a: pb.RefundJobRequest(account_id=a.account, reservation_id=a.id,
                                                          reason=a.reason)),
    "set-account": ("SetAccount", _set_account_request),
    "account": ("GetAccount", lambda a: pb.GetAccountRequest(account_id=a.account)),
    "ledger": ("ListLedger", lambda a: pb.ListLedgerRequest(account_id=a.account, page_size=a.page_size,
                                                            page_token=a.page_token)),
    "set-cameo": ("SetCameo", lambda a: pb.SetCameoRequest(cameo_id=a.cameo, owner_account_id=a.owner,
                                                           fee_credits=a.fee, active=not a.inactive)),
    "cameo": ("GetCameo", lambda a: pb.GetCameoRequest(cameo_id=a.cameo)),
}


def _print_cameo(r: pb.SetCameoResponse | pb.GetCameoResponse) -> None:
    c = r.cameo
    _say(f"CAMEO  {visible(c.cameo_id)}: owner {visible(c.owner_account_id)}, fee {c.fee_credits} credit(s) per job, "
         f"{'active' if c.active else 'INACTIVE'}; updated {format_time(_ms(c.updated_at))}")


def _call(args: argparse.Namespace) -> Any:
    admin = args.verb in ADMIN_VERBS
    kw = _admin_call_kwargs(args) if admin else {"timeout": CLIENT_TIMEOUT_SECONDS}
    method, build = _CALLS[args.verb]
    request = build(args)
    channel = _channel(args, admin)
    service = pb_grpc.QuotaAdminStub(channel) if admin else pb_grpc.QuotaServiceStub(channel)
    with channel:
        response = getattr(service, method)(request, **kw)
        if args.verb == "ledger" and not args.json and not args.tz:
            # Ledger entries carry no zone; balance prints the account's, so the ledger does too.
            account = pb_grpc.QuotaAdminStub(channel).GetAccount(pb.GetAccountRequest(account_id=args.account), **kw)
            args.tz = account.balance.time_zone or "UTC"
        return response


def _replay(r: Any, text: str) -> str:
    return f"  ({text})" if r.replayed else ""


def _print_account(r: pb.GetAccountResponse) -> None:
    _print_balance(r.balance)
    tz = r.balance.time_zone or "UTC"
    cap = f"{r.monthly_spend_cap_credits}" if r.monthly_spend_cap_credits else "none"
    _say(f"  monthly cap {cap}; spent or held this month {r.month_spend_credits}, "
         f"month resets {format_time(_ms(r.month_resets_at), tz)}")
    t = r.totals
    _say(f"  totals: granted {t.granted}, spent {t.spent}, expired {t.expired}, revoked {t.revoked}, "
         f"refunded {t.refunded}, held {t.held}, available {t.available}")
    topup = r.auto_topup
    if topup.enabled:
        _say(f"  auto top-up: {topup.pack_id} when below {topup.threshold_credits} credits")
    for lot in r.all_lots:
        source = pb.CreditSource.Name(lot.source).removeprefix("CREDIT_SOURCE_").lower()
        state = " REVOKED" if lot.revoked else ""
        _say(f"    lot {lot.lot_id} ({source}){state}: {lot.credits_left}/{lot.credits_granted} left, "
             f"expires {format_time(_ms(lot.expires_at), tz)}")


def _job_detail(e: pb.LedgerEntry) -> str:
    """Where a job's credits came from and went: per lot, each owner's royalty, what went back or was
    written off (the support agent's "where did my credits go")."""
    parts = []
    if e.lots:
        parts.append("lots " + ", ".join(f"{visible(p.lot_id)} {p.credits}" for p in e.lots))
    if e.royalties:
        parts.append("royalty " + ", ".join(f"{visible(r.cameo_id)} to {visible(r.owner_account_id)} {r.credits}"
                                            for r in e.royalties))
    if e.usage_credits and e.credits:  # else the amount says it
        parts.append(f"included usage {e.usage_credits}")
    if e.credits_drawn:
        parts.append(f"drawn {e.credits_drawn} from lots "
                     + ", ".join(f"{visible(p.lot_id)} {p.credits}" for p in e.drawn_lots))
    for label, value in (("returned", e.credits_returned), ("written off", e.credits_written_off),
                         ("owed", e.debt_delta)):
        if value:
            parts.append(f"{label} {value:+d}" if label == "owed" else f"{label} {value}")
    return "  (" + "; ".join(parts) + ")" if parts else ""


def _print_ledger(r: pb.ListLedgerResponse, tz: str = "UTC") -> None:
    for e in r.entries:
        who = e.reservation_id or e.purchase_id
        amount = f"{e.credits} credit(s)" if e.credits else f"{e.usage_credits} credit(s) usage" if e.usage_credits \
            else f"{e.free_units} free unit(s)" if e.free_units else ""
        # Escaped before padding, so the columns stay aligned.
        _say(f"{e.seq:>6}  {format_time(_ms(e.at), tz)}  {visible(e.type):<10} {visible(who):<24} "
             f"{amount:<18} available {e.totals_after.available}, held {e.totals_after.held}"
             + (f"  [{e.reason}]" if e.reason else "") + _job_detail(e))
    if r.next_page_token:
        _say(f"more: --page-token {r.next_page_token}")


_PRINTERS: dict[str, Callable[[Any], None]] = {
    "reserve": _print_decision,
    "quote": _print_quote,
    "balance": _print_balance,
    "account": _print_account,
    "set-cameo": _print_cameo,
    "cameo": _print_cameo,
    "commit": lambda r: _say(
        f"COMMITTED  charged {r.credits_charged} credit(s), "
        + (f"{r.included_usage_credits} credit(s) of included usage" if r.included_usage_credits
           else f"{r.free_charged} free unit(s)") + "; refunded "
        f"{r.credits_refunded}; credits available {r.credit_balance}"
        + (f"; {r.credits_drawn} drawn from the credits past the hold" if r.credits_drawn else "")
        + (f"; {r.debt_credits} owed (debt)" if r.debt_credits else "")
        + (f"; written off {r.credits_written_off} (overage)" if r.credits_written_off else "")
        + _replay(r, "already committed")),
    "release": lambda r: _say(
        f"RELEASED  refunded {r.credits_refunded} credit(s), {r.free_refunded} free unit(s); "
        f"credits available {r.credit_balance}" + _replay(r, "already released")),
    "extend": lambda r: _say(f"EXTENDED  hold now expires {format_time(_ms(r.expires_at))}"),
    "grant": lambda r: _say(
        f"GRANTED  lot {r.lot.lot_id}: {r.lot.credits_granted} credit(s), expires "
        f"{format_time(_ms(r.lot.expires_at))}; credits available {r.credit_balance}"
        + (f"; {r.debt_paid_credits} paid the account's debt" if r.debt_paid_credits else "")
        + _replay(r, "already granted")),
    "revoke": lambda r: _say(
        f"REVOKED  {r.credits_revoked} credit(s) removed; {r.credits_spent} already spent, {r.credits_held} "
        f"in holds; credits available {r.credit_balance}" + _replay(r, "already revoked")),
    "refund": lambda r: _say(
        f"REFUNDED  {r.credits_refunded} credit(s), {r.free_refunded} free unit(s) given back; "
        f"credits available {r.credit_balance}" + _replay(r, "already refunded")),
    "set-account": lambda r: _say(
        f"ACCOUNT  plan {r.plan}, time zone {r.time_zone}, monthly cap "
        f"{r.monthly_spend_cap_credits or 'none'}"
        + (f", auto top-up {r.auto_topup.pack_id} below {r.auto_topup.threshold_credits}"
           if r.auto_topup.enabled else "")),
}


_INT64_TYPES = frozenset({descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64,
                          descriptor.FieldDescriptor.TYPE_SINT64, descriptor.FieldDescriptor.TYPE_FIXED64,
                          descriptor.FieldDescriptor.TYPE_SFIXED64})


def _int64_as_numbers(desc: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (MessageToDict of a ``desc`` message, proto field names) with its 64-bit integers as JSON
    numbers. protobuf's JSON mapping quotes them for JavaScript's doubles; credits and counts stay far
    below 2**53, and a script should not have to write int(doc["credit_balance"])."""
    for name, value in doc.items():
        field = desc.fields_by_name.get(name)
        if field is None:
            continue
        if field.type in _INT64_TYPES:
            doc[name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
            sub: Any = field.message_type
            if sub.GetOptions().map_entry:  # map<k, v>: convert the values (JSON keys stay strings)
                entry = sub.fields_by_name["value"]
                if entry.type in _INT64_TYPES:
                    doc[name] = {k: int(v) for k, v in value.items()}
                elif entry.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                    for v in value.values():
                        _int64_as_numbers(entry.message_type, v)
            else:  # well-known types (Timestamp) map to strings: nothing to walk into
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, dict):
                        _int64_as_numbers(sub, item)
    return doc


def response_json(r: message.Message) -> dict[str, Any]:
    """What --json prints: proto field names, zero values too, 64-bit integers as numbers."""
    return _int64_as_numbers(r.DESCRIPTOR, json_format.MessageToDict(
        r, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))


def _print(args: argparse.Namespace, r: Any) -> None:
    if args.json:
        print_json(response_json(r))
    elif args.verb == "ledger":
        _print_ledger(r, args.tz or "UTC")
    else:
        _PRINTERS[args.verb](r)


def _print_error(err: grpc.RpcError) -> None:
    _say(f"error: {err.code().name}: {err.details()}", err=True)
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                msg = kind()
                detail.Unpack(msg)
                _say(f"  {kind.DESCRIPTOR.name}: {json_format.MessageToJson(msg, indent=None, ensure_ascii=True)}",
                     err=True)


def _check_zone(args: argparse.Namespace) -> None:
    """ledger --tz: refused before any call, as a usage error, rather than as a traceback while printing."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    tz = getattr(args, "tz", None) if args.verb == "ledger" else None
    if tz:
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"--tz {tz!r} is not an IANA time zone (e.g. UTC, Europe/Paris)") from None


def run_verb(args: argparse.Namespace) -> int:
    """EXIT_OK; EXIT_DENIED for a denied reserve, or a quote that would be denied (printed like an
    allowed one); EXIT_ERROR when the call failed; EXIT_USAGE for a bad flag value."""
    try:
        _check_zone(args)
        response = _call(args)
    except grpc.RpcError as err:
        _print_error(err)
        return EXIT_ERROR
    except ValueError as exc:  # e.g. a malformed --expires-at
        _say(f"error: {exc}", err=True)
        return EXIT_USAGE
    _print(args, response)
    if args.verb in ("reserve", "quote") and not response.allowed:
        return EXIT_DENIED
    return EXIT_OK
