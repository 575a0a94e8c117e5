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
from .cli import (
    ADMIN_TOKEN_ENV,
    ADMIN_VERBS,
    CLIENT_TIMEOUT_SECONDS,
    DEFAULT_ADMIN_TARGET,
    DEFAULT_TARGET,
    format_time,
    print_json,
)

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


def _read_client_file(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        # ValueError: run_verb reports it as a usage error (exit 2).
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def admin_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file's first non-blank, non-# line, else $QUOTA_ADMIN_TOKEN, else None."""
    if args.token_file:
        lines = _read_client_file(args.token_file, "--token-file").decode("utf-8", "replace").splitlines()
        token = next((t for t in (line.strip() for line in lines) if t and not t.startswith("#")), "")
        if not token:
            raise ValueError(f"--token-file {args.token_file} holds no token")
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    # gRPC metadata values are printable ASCII; say so here rather than fail inside the call.
    if token and any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError("the admin token must be printable ASCII without spaces")
    return token or None


def _channel_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from --tls-ca (and --tls-cert/--tls-key for mTLS), or None for plaintext."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise ValueError("--tls-cert needs --tls-ca (the CA of the sidecar's certificate)")
    if not args.tls_ca:
        if args.tls_server_name:
            raise ValueError("--tls-server-name needs --tls-ca")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_client_file(args.tls_ca, "--tls-ca"),
        private_key=_read_client_file(args.tls_key, "--tls-key") if args.tls_key else None,
        certificate_chain=_read_client_file(args.tls_cert, "--tls-cert") if args.tls_cert else None)


def _channel(args: argparse.Namespace, admin: bool) -> grpc.Channel:
    """A channel to the verb's target: the admin one (TLS when asked) or the worker-facing one."""
    target = (args.target or os.environ.get("QUOTA_ADMIN_TARGET" if admin else "QUOTA_TARGET")
              or (DEFAULT_ADMIN_TARGET if admin else DEFAULT_TARGET))
    credentials = _channel_credentials(args) if admin else None
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


def _call(args: argparse.Namespace) -> Any:
    admin = args.verb in ADMIN_VERBS
    kw = _admin_call_kwargs(args) if admin else {"timeout": CLIENT_TIMEOUT_SECONDS}
    channel = _channel(args, admin)
    service = pb_grpc.QuotaAdminStub(channel) if admin else pb_grpc.QuotaServiceStub(channel)
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
