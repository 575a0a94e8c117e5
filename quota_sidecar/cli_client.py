"""The client side of the CLI verbs: one gRPC call each, printed for people.

Kept apart from cli.py so that ``serve`` and ``--help`` never import the
client stubs.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ._proto.quota.v1 import quota_pb2 as pb
from ._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from .cli import CLIENT_TIMEOUT_SECONDS, DEFAULT_ADMIN_TARGET, DEFAULT_TARGET, format_time, print_json

_FUNDING_TEXT = {pb.FUNDING_FREE_QUOTA: "free allowance", pb.FUNDING_CREDITS: "credits"}


def _job(args: argparse.Namespace) -> pb.JobParams | None:
    given = {k: getattr(args, k) for k in ("duration", "resolution", "model", "units")}
    if all(v is None for v in given.values()):
        return None
    return pb.JobParams(duration_seconds=given["duration"] or 0.0, resolution=given["resolution"] or "",
                        model=given["model"] or "", units=given["units"] or 0)


def _money(m: pb.Money) -> str:
    return f"{m.currency_code} {m.minor_units // 100}.{m.minor_units % 100:02d}"


def _ms(ts: timestamp_pb2.Timestamp) -> int:
    return ts.ToMilliseconds()


def _print_decision(r: pb.CheckAndReserveResponse) -> None:
    resets = format_time(_ms(r.free_resets_at))
    if r.allowed:
        held = "1 free unit" if r.funding == pb.FUNDING_FREE_QUOTA else f"{r.credits_held} credit(s)"
        print(f"ALLOWED  reservation {r.reservation_id}")
        print(f"  funded by {_FUNDING_TEXT[r.funding]}: {held} held until {format_time(_ms(r.expires_at))}")
    else:
        reason = pb.DenialReason.Name(r.denial.reason).removeprefix("DENIAL_REASON_")
        print(f"DENIED   {reason}: {r.denial.message}")
        for offer in r.denial.offers:
            print(f"  offer: {offer.quantity} x {offer.pack_id} ({offer.credits} credits, {_money(offer.price)}) "
                  f"= {_money(offer.total_price)}")
    print(f"  free today: {r.free_used}/{r.free_limit}, resets {resets}")
    print(f"  job cost: {r.job_cost_credits} credit(s); credits available: {r.credit_balance}"
          + ("  (replayed earlier decision)" if r.replayed else ""))


def _print_balance(r: pb.GetBalanceResponse) -> None:
    tz = r.time_zone or "UTC"
    print(f"account {r.account_id}  plan {r.plan}  time zone {tz}")
    for a in r.allowances:
        print(f"  {a.product:<8} free {a.free_used}/{a.free_limit}  resets {format_time(_ms(a.free_resets_at), tz)}")
    print(f"  credits available {r.credit_balance}, held {r.credits_held}")
    for lot in r.lots:
        print(f"    lot {lot.lot_id}: {lot.credits_left}/{lot.credits_granted} left, "
              f"expires {format_time(_ms(lot.expires_at), tz)}")
    for h in r.holds:
        held = "1 free unit" if h.funding == pb.FUNDING_FREE_QUOTA else f"{h.credits_held} credit(s)"
        print(f"    hold {h.reservation_id} ({h.product}): {held} until {format_time(_ms(h.expires_at), tz)}")


def _call(args: argparse.Namespace) -> Any:
    admin = args.verb in ("grant", "set-account")
    target = (args.target or os.environ.get("QUOTA_ADMIN_TARGET" if admin else "QUOTA_TARGET")
              or (DEFAULT_ADMIN_TARGET if admin else DEFAULT_TARGET))
    channel = grpc.insecure_channel(target)
    service = pb_grpc.QuotaAdminStub(channel) if admin else pb_grpc.QuotaServiceStub(channel)
    kw = {"timeout": CLIENT_TIMEOUT_SECONDS}
    with channel:
        if args.verb == "reserve":
            req = pb.CheckAndReserveRequest(account_id=args.account, product=args.product, reservation_id=args.id,
                                            ttl_seconds=args.ttl, params=_job(args) or pb.JobParams())
            return service.CheckAndReserve(req, **kw)
        if args.verb == "commit":
            req = pb.CommitRequest(account_id=args.account, reservation_id=args.id)
            job = _job(args)
            if job is not None:
                req.params.CopyFrom(job)
            return service.Commit(req, **kw)
        if args.verb == "release":
            return service.Release(pb.ReleaseRequest(account_id=args.account, reservation_id=args.id), **kw)
        if args.verb == "extend":
            return service.ExtendReservation(pb.ExtendReservationRequest(
                account_id=args.account, reservation_id=args.id, ttl_seconds=args.ttl), **kw)
        if args.verb == "balance":
            return service.GetBalance(pb.GetBalanceRequest(account_id=args.account), **kw)
        if args.verb == "grant":
            req = pb.GrantCreditsRequest(account_id=args.account, credits=args.credits, purchase_id=args.purchase_id)
            if args.expires_at:
                req.expires_at.FromDatetime(datetime.fromisoformat(args.expires_at))
            return service.GrantCredits(req, **kw)
        assert args.verb == "set-account", args.verb
        return service.SetAccount(pb.SetAccountRequest(account_id=args.account, plan=args.plan,
                                                       time_zone=args.tz), **kw)


def _print(args: argparse.Namespace, r: Any) -> None:
    if args.json:
        print_json(json_format.MessageToDict(r, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True))
    elif args.verb == "reserve":
        _print_decision(r)
    elif args.verb == "balance":
        _print_balance(r)
    elif args.verb == "commit":
        print(f"COMMITTED  charged {r.credits_charged} credit(s), {r.free_charged} free unit(s); "
              f"refunded {r.credits_refunded}; credits available {r.credit_balance}"
              + ("  (already committed)" if r.replayed else ""))
    elif args.verb == "release":
        print(f"RELEASED  refunded {r.credits_refunded} credit(s), {r.free_refunded} free unit(s); "
              f"credits available {r.credit_balance}" + ("  (already released)" if r.replayed else ""))
    elif args.verb == "extend":
        print(f"EXTENDED  hold now expires {format_time(_ms(r.expires_at))}")
    elif args.verb == "grant":
        print(f"GRANTED  lot {r.lot.lot_id}: {r.lot.credits_granted} credit(s), expires "
              f"{format_time(_ms(r.lot.expires_at))}; credits available {r.credit_balance}"
              + ("  (already granted)" if r.replayed else ""))
    else:
        print(f"ACCOUNT  plan {r.plan}, time zone {r.time_zone}")


def _print_error(err: grpc.RpcError) -> None:
    print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                msg = kind()
                detail.Unpack(msg)
                print(f"  {kind.DESCRIPTOR.name}: {json_format.MessageToJson(msg, indent=None)}", file=sys.stderr)


def run_verb(args: argparse.Namespace) -> int:
    try:
        response = _call(args)
    except grpc.RpcError as err:
        _print_error(err)
        return 1
    except ValueError as exc:  # e.g. a malformed --expires-at
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print(args, response)
    return 0
