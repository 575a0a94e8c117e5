"""gRPC servicers: the only module that touches protobuf.

Requests become plain domain values (quota_sidecar.domain.model), the engine
decides, results become responses. Domain errors become gRPC status codes
with google.rpc details here and nowhere else:

    InvalidArgument     -> INVALID_ARGUMENT     + BadRequest(field_violations)
    NotFound            -> NOT_FOUND            + ErrorInfo(reason)
    Conflict            -> ALREADY_EXISTS       + ErrorInfo(reason)
    ResolutionConflict  -> FAILED_PRECONDITION  + ErrorInfo(reason)
    Unavailable         -> UNAVAILABLE          + ErrorInfo(reason), RetryInfo(retry_delay)
    BatchAborted        -> ABORTED              (batch items only)
    other QuotaError    -> INTERNAL             + ErrorInfo(reason)

A batch item's error is a quota.v1.ItemError with the same code (by name),
message and reason, the field prefixed with the item's place (items[3].params...).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from typing import Any, Awaitable, Callable, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.domain.engine import QuotaEngine, ReserveItem
from quota_sidecar.domain.errors import (
    BatchAborted,
    Conflict,
    InvalidArgument,
    NotFound,
    QuotaError,
    ResolutionConflict,
    Unavailable,
)
from quota_sidecar.domain.ledger import lot_portions, royalty_shares
from quota_sidecar.domain.model import (
    Account,
    AutoTopUp,
    Balance,
    Cameo,
    CommitResult,
    CreditSource,
    CreditTotals,
    Decision,
    Funding,
    JobParams,
    LedgerEntry,
    Limit,
    LimitKind,
    LimitOverride,
    LimitStatus,
    Lot,
    Money,
    Offer,
    ReleaseResult,
)
from quota_sidecar.server.metrics import Metrics
from quota_sidecar.server.telemetry import Telemetry

log = logging.getLogger("quota_sidecar.server.servicer")

ERROR_DOMAIN = "quota-sidecar"

_FUNDING = {Funding.FREE_QUOTA: pb.FUNDING_FREE_QUOTA, Funding.CREDITS: pb.FUNDING_CREDITS,
            None: pb.FUNDING_UNSPECIFIED}
_DENIAL = {"PURCHASE_REQUIRED": pb.DENIAL_REASON_PURCHASE_REQUIRED, "NOT_ENTITLED": pb.DENIAL_REASON_NOT_ENTITLED,
           "BUDGET_EXCEEDED": pb.DENIAL_REASON_BUDGET_EXCEEDED,
           "CONCURRENCY_LIMIT": pb.DENIAL_REASON_CONCURRENCY_LIMIT}
_KIND_TO_PB = {LimitKind.DAY: pb.LIMIT_KIND_DAY, LimitKind.WEEK: pb.LIMIT_KIND_WEEK,
               LimitKind.ROLLING: pb.LIMIT_KIND_ROLLING}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_SOURCE_TO_PB = {CreditSource.PURCHASE: pb.CREDIT_SOURCE_PURCHASE, CreditSource.PROMO: pb.CREDIT_SOURCE_PROMO,
                 CreditSource.REFUND: pb.CREDIT_SOURCE_REFUND, CreditSource.COMPENSATION: pb.CREDIT_SOURCE_COMPENSATION}
_SOURCE_FROM_PB = {v: k for k, v in _SOURCE_TO_PB.items()} | {pb.CREDIT_SOURCE_UNSPECIFIED: CreditSource.PURCHASE}

R = TypeVar("R")


# google.protobuf.Timestamp's valid range, 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_TIMESTAMP_MIN_SECONDS = -62_135_596_800
_TIMESTAMP_MAX_SECONDS = 253_402_300_799
_TIMESTAMP_MAX_NANOS = 999_999_999


def _ts(ms: int) -> timestamp_pb2.Timestamp:
    """Timestamp.FromMilliseconds, ValueError out of range included, built by the message's C
    constructor: FromMilliseconds is Python, and a decision's response holds three or more."""
    seconds = ms // 1000
    if not _TIMESTAMP_MIN_SECONDS <= seconds <= _TIMESTAMP_MAX_SECONDS:
        raise ValueError(f"Timestamp is not valid: Seconds {seconds} must be in range "
                         f"[{_TIMESTAMP_MIN_SECONDS}, {_TIMESTAMP_MAX_SECONDS}].")
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=ms % 1000 * 1_000_000)


def _request_ms(ts: timestamp_pb2.Timestamp, field: str) -> int:
    """A Timestamp of a request in ms. Checked here because protobuf's conversion raises
    ValueError outside the valid range, which gRPC answers UNKNOWN with a traceback in the log."""
    if not _TIMESTAMP_MIN_SECONDS <= ts.seconds <= _TIMESTAMP_MAX_SECONDS:
        raise InvalidArgument(field, f"seconds must be {_TIMESTAMP_MIN_SECONDS} to {_TIMESTAMP_MAX_SECONDS} "
                                     "(0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z)")
    if not 0 <= ts.nanos <= _TIMESTAMP_MAX_NANOS:
        raise InvalidArgument(field, f"nanos must be 0 to {_TIMESTAMP_MAX_NANOS}")
    return ts.ToMilliseconds()


def _packed(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_ERROR_CODES = ((InvalidArgument, code_pb2.INVALID_ARGUMENT), (NotFound, code_pb2.NOT_FOUND),
                (Conflict, code_pb2.ALREADY_EXISTS), (ResolutionConflict, code_pb2.FAILED_PRECONDITION),
                (Unavailable, code_pb2.UNAVAILABLE), (BatchAborted, code_pb2.ABORTED))
# Errors that are the caller's business, not worth a warning in the log.
_CLIENT_ERRORS = (InvalidArgument, NotFound, Conflict, ResolutionConflict, BatchAborted)


def error_code(exc: QuotaError) -> int:
    """The google.rpc.Code of a domain error."""
    for kind, code in _ERROR_CODES:
        if isinstance(exc, kind):
            return code
    return code_pb2.INTERNAL


def error_status(exc: QuotaError) -> grpc.Status:
    """The gRPC status (with google.rpc details) for a domain error."""
    code = error_code(exc)
    details = [_packed(error_details_pb2.ErrorInfo(reason=exc.reason, domain=ERROR_DOMAIN))]
    if isinstance(exc, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)
        details = [_packed(error_details_pb2.BadRequest(field_violations=[violation]))]
    elif isinstance(exc, Unavailable):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(exc.retry_after_ms)
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    return rpc_status.to_status(status_pb2.Status(code=code, message=exc.message, details=details))


def item_error(exc: QuotaError, index: int) -> pb.ItemError:
    """A batch item's error: the single call's code, message and reason; the field as items[index].<field>."""
    error = pb.ItemError(code=code_pb2.Code.Name(error_code(exc)), reason=exc.reason)
    if isinstance(exc, InvalidArgument):
        error.field = f"items[{index}].{exc.field}"
        error.message = f"{error.field}: {exc.description}"
    else:
        error.message = exc.message
    if isinstance(exc, Unavailable):
        error.retry_after_ms = exc.retry_after_ms
    return error


if sys.version_info >= (3, 11):
    class _Deadline:
        """asyncio.timeout's rule for one call, without its state machine and second Python class
        (~5% of a decision's Python time): at the deadline the task is cancelled, and a
        cancellation that is that one (no other request pending) becomes TimeoutError."""

        __slots__ = ("_task", "_cancelling", "expired")

        def __init__(self, task: asyncio.Task[Any]) -> None:
            self._task, self._cancelling, self.expired = task, task.cancelling(), False

        def expire(self) -> None:
            self.expired = True
            self._task.cancel()

        def passed(self, exc: BaseException | None) -> bool:
            """After the call (``exc``: what it raised): whether it was cut short by this deadline."""
            if not self.expired:
                return False
            return self._task.uncancel() <= self._cancelling and isinstance(exc, asyncio.CancelledError)

    async def _within(call: Awaitable[R], seconds: float) -> R:
        # Cancels this task at the deadline: no extra task per call, as wait_for makes
        # before 3.12 (a tenth of a decision's CPU in profiles).
        task = asyncio.current_task()
        assert task is not None
        deadline = _Deadline(task)
        timer = asyncio.get_running_loop().call_later(seconds, deadline.expire)
        try:
            result = await call
        except BaseException as exc:
            timer.cancel()
            if deadline.passed(exc):
                raise asyncio.TimeoutError from None
            raise
        timer.cancel()
        deadline.passed(None)
        return result
else:  # pragma: no cover - Python 3.10
    async def _within(call: Awaitable[R], seconds: float) -> R:
        return await asyncio.wait_for(call, seconds)


def _rpc(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turns domain errors raised by a servicer method into gRPC status; times and traces the call."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        telemetry: Telemetry = self._telemetry
        with telemetry.rpc(self.SERVICE, name, context.invocation_metadata() if telemetry.tracer else None) as call:
            try:
                # The caller's deadline bounds the work: past it, the answer would be thrown away.
                remaining = context.time_remaining()
                if remaining is None:
                    return await method(self, request, context)
                if remaining <= 0:
                    raise asyncio.TimeoutError
                return await _within(method(self, request, context), remaining)
            except asyncio.TimeoutError:
                call.code = "DEADLINE_EXCEEDED"
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before Redis "
                                    "answered; retrying with the same ids is safe")
                raise AssertionError("abort returned") from None  # pragma: no cover
            except QuotaError as exc:
                call.code = code_pb2.Code.Name(error_code(exc))
                if not isinstance(exc, _CLIENT_ERRORS):
                    _log_failure(logging.WARNING, name, request, exc)
                elif log.isEnabledFor(logging.DEBUG):
                    # The caller's mistake: answered, and logged only when debugging (a client
                    # retrying a bad request must not flood the log).
                    _log_failure(logging.DEBUG, name, request, exc)
                await context.abort_with_status(error_status(exc))
                raise AssertionError("abort_with_status returned") from None  # pragma: no cover

    return wrapper


def _log_failure(level: int, method: str, request: Any, exc: QuotaError) -> None:
    account_id = getattr(request, "account_id", "")
    reservation_id = getattr(request, "reservation_id", "")
    log.log(level, "%s failed for account %r reservation %r: %s (%s)", method, account_id, reservation_id,
            exc.message, exc.reason,
            extra={"method": method, "account_id": account_id, "reservation_id": reservation_id,
                   "reason": exc.reason})


# Distinct job sizes remembered by job_params; beyond it the cache starts again.
JOB_CACHE_ENTRIES = 4096
_jobs: dict[bytes, JobParams] = {}


def job_params(params: pb.JobParams) -> JobParams:
    """The request's job, remembered by the message's bytes: workers send the same few job sizes
    over and over, and equal bytes parse to equal fields (JobParams is immutable, so shared)."""
    key = params.SerializeToString()
    job = _jobs.get(key)
    if job is None:
        if len(_jobs) >= JOB_CACHE_ENTRIES:
            _jobs.clear()
        job = _jobs[key] = _new_job_params(params)
    return job


def _new_job_params(params: pb.JobParams) -> JobParams:
    return JobParams(duration_seconds=params.duration_seconds, resolution=params.resolution, model=params.model,
                     units=params.units, extra=dict(params.extra), cameo_ids=tuple(params.cameo_ids),
                     input_tokens=params.input_tokens, cached_input_tokens=params.cached_input_tokens,
                     output_tokens=params.output_tokens, fast=params.fast)


def _money(money: Money) -> pb.Money:
    return pb.Money(currency_code=money.currency_code, minor_units=money.minor_units)


def _offer(offer: Offer) -> pb.CreditPack:
    pack = offer.pack
    return pb.CreditPack(pack_id=pack.pack_id, credits=pack.credits, price=_money(pack.price),
                         quantity=offer.quantity, total_price=_money(offer.total_price))


def _limit_status(st: LimitStatus) -> pb.LimitStatus:
    return pb.LimitStatus(limit_id=st.limit.limit_id, kind=_KIND_TO_PB[st.limit.kind], rolling_hours=st.limit.hours,
                          used=st.used, limit=st.limit.free, resets_at=_ts(st.resets_ms), shadow=st.limit.shadow)


def _limit_spec(x: Limit) -> pb.LimitSpec:
    return pb.LimitSpec(limit_id=x.limit_id, kind=_KIND_TO_PB[x.kind], free=x.free, rolling_hours=x.hours,
                        shadow=x.shadow)


def _override_pb(o: LimitOverride) -> pb.LimitOverride:
    return pb.LimitOverride(product=o.product, max_concurrent=o.max_concurrent,
                            limits=[_limit_spec(x) for x in o.limits])


def _override(o: pb.LimitOverride, index: int) -> LimitOverride:
    limits = []
    for spec in o.limits:
        if spec.kind not in _KIND_FROM_PB:
            raise InvalidArgument(f"overrides[{index}].limits.kind", "must be DAY, WEEK or ROLLING")
        limits.append(Limit(limit_id=spec.limit_id, kind=_KIND_FROM_PB[spec.kind], free=spec.free,
                            hours=spec.rolling_hours, shadow=spec.shadow))
    return LimitOverride(product=o.product, limits=tuple(limits), max_concurrent=o.max_concurrent)


# CheckAndReserve's answer, or Quote's: the same fields under the same names.
_Answer = TypeVar("_Answer", pb.CheckAndReserveResponse, pb.QuoteResponse)


def _answer(kind: type[_Answer], decision: Decision) -> _Answer:
    o = decision.outcome
    # An allowed answer has expires_at, a denied one its denial: set in the one constructor call.
    extra: dict[str, Any]
    if o.allowed:
        extra = {"expires_at": _ts(o.expires_ms)}
    else:
        assert o.denial is not None
        extra = {"denial": pb.Denial(reason=_DENIAL[o.denial.value], message=decision.denial_message,
                                     credits_short=o.credits_short, cameo_id=o.cameo_id,
                                     offers=[_offer(x) for x in decision.offers], debt_credits=o.debt_credits)}
    return kind(
        allowed=o.allowed, reservation_id=decision.reservation_id, funding=_FUNDING[o.funding],
        credits_held=o.credits_held, free_used=o.free_used, free_limit=o.free_limit,
        free_resets_at=_ts(o.free_resets_ms), credit_balance=o.credit_balance,
        job_cost_credits=o.cost_credits, replayed=o.replayed, plans_version=o.plans_version, degraded=o.degraded,
        cameo_fees_credits=o.fees_credits, allowance_unit=decision.allowance_unit,
        limits=[_limit_status(st) for st in o.limits], shadow_limits=o.shadow_limits, **extra,
    )


def decision_response(decision: Decision) -> pb.CheckAndReserveResponse:
    return _answer(pb.CheckAndReserveResponse, decision)


def quote_response(decision: Decision) -> pb.QuoteResponse:
    return _answer(pb.QuoteResponse, decision)


def _lot(lot: Lot) -> pb.CreditLot:
    return pb.CreditLot(lot_id=lot.lot_id, credits_granted=lot.credits_granted, credits_left=lot.credits_left,
                        expires_at=_ts(lot.expires_ms), granted_at=_ts(lot.granted_ms),
                        source=_SOURCE_TO_PB[lot.source], revoked=lot.revoked)


def _totals(t: CreditTotals) -> pb.CreditTotals:
    return pb.CreditTotals(granted=t.granted, spent=t.spent, expired=t.expired, revoked=t.revoked,
                           refunded=t.refunded, held=t.held, available=t.available)


def _topup(t: AutoTopUp) -> pb.AutoTopUp:
    return pb.AutoTopUp(enabled=t.enabled, threshold_credits=t.threshold_credits, pack_id=t.pack_id)


def _source(value: int) -> CreditSource:
    source = _SOURCE_FROM_PB.get(value)  # type: ignore[call-overload]  # an int from the wire, any value
    if source is None:
        raise InvalidArgument("source", f"unknown credit source {value}")
    return source


def account_response(a: Account) -> pb.GetAccountResponse:
    return pb.GetAccountResponse(
        balance=balance_response(a.balance), monthly_spend_cap_credits=a.monthly_spend_cap_credits,
        month_spend_credits=a.month_spend_credits, month_resets_at=_ts(a.month_resets_ms),
        auto_topup=_topup(a.auto_topup), totals=_totals(a.totals), all_lots=[_lot(lot) for lot in a.all_lots],
        overrides=[_override_pb(o) for o in a.overrides])


def ledger_entry_pb(e: LedgerEntry) -> pb.LedgerEntry:
    funding = e.fields.get("funding", "")
    return pb.LedgerEntry(
        id=e.entry_id, at=_ts(e.at_ms), type=e.type, reservation_id=e.fields.get("rid", ""),
        purchase_id=e.fields.get("pid", ""), product=e.fields.get("product", ""),
        funding=_FUNDING[Funding(funding)] if funding else pb.FUNDING_UNSPECIFIED,
        credits=e.int_field("credits"), free_units=e.int_field("free"), plans_version=e.fields.get("pv", ""),
        reason=e.fields.get("reason", ""), totals_after=_totals(e.totals_after), seq=e.seq,
        credits_available_delta=e.deltas.available, credits_held_delta=e.deltas.held,
        free_units_delta=e.deltas.free_units, debt_delta=e.deltas.debt,
        lots=[pb.LotPortion(lot_id=p.lot_id, credits=p.credits) for p in lot_portions(e)],
        royalties=[pb.Royalty(cameo_id=r.cameo_id, owner_account_id=r.owner_account_id, credits=r.credits)
                   for r in royalty_shares(e)],
        fees_credits=e.int_field("fees"), cost_credits=e.int_field("cost") if e.type == "hold" else 0,
        credits_returned=e.int_field("returned"), credits_written_off=e.int_field("wo"),
        credits_drawn=e.int_field("drawn"),
        drawn_lots=[pb.LotPortion(lot_id=p.lot_id, credits=p.credits) for p in lot_portions(e, "drawn_lots")],
        usage_credits=e.int_field("usage"))


def balance_response(b: Balance) -> pb.GetBalanceResponse:
    return pb.GetBalanceResponse(
        account_id=b.account_id, plan=b.plan, time_zone=b.time_zone, credit_balance=b.credit_balance,
        credits_held=b.credits_held, holds_total=b.holds_total,
        allowances=[pb.ProductAllowance(product=a.product, free_used=a.free_used, free_limit=a.free_limit,
                                        free_resets_at=_ts(a.free_resets_ms),
                                        limits=[_limit_status(st) for st in a.limits],
                                        jobs_in_flight=a.jobs_in_flight, max_concurrent=a.max_concurrent,
                                        overridden=a.overridden, unit=a.unit,
                                        upcoming=[pb.ScheduledChange(effective_from=_ts(u.effective_from_ms),
                                                                     limits=[_limit_spec(x) for x in u.limits],
                                                                     max_concurrent=u.max_concurrent)
                                                  for u in a.upcoming]) for a in b.allowances],
        lots=[_lot(lot) for lot in b.lots],
        holds=[pb.Hold(reservation_id=h.reservation_id, product=h.product, funding=_FUNDING[h.funding],
                       credits_held=h.credits_held, expires_at=_ts(h.expires_ms)) for h in b.holds],
        credits_expiring_30d=b.credits_expiring, expiring_lots=[_lot(lot) for lot in b.expiring_lots],
        debt_credits=b.debt_credits,
    )


def cameo_pb(c: Cameo) -> pb.Cameo:
    return pb.Cameo(cameo_id=c.cameo_id, owner_account_id=c.owner_account_id, fee_credits=c.fee_credits,
                    active=c.active, updated_at=_ts(c.updated_ms))


def commit_response(r: CommitResult) -> pb.CommitResponse:
    return pb.CommitResponse(credits_charged=r.credits_charged, credits_refunded=r.credits_refunded,
                             free_charged=r.free_charged, funding=_FUNDING[r.funding],
                             credit_balance=r.credit_balance, replayed=r.replayed, degraded=r.degraded,
                             credits_written_off=r.written_off, credits_drawn=r.credits_drawn,
                             debt_credits=r.debt_credits, included_usage_credits=r.included_usage_credits)


def release_response(r: ReleaseResult) -> pb.ReleaseResponse:
    return pb.ReleaseResponse(credits_refunded=r.credits_refunded, free_refunded=r.free_refunded,
                              funding=_FUNDING[r.funding], credit_balance=r.credit_balance,
                              replayed=r.replayed, degraded=r.degraded)


def _log_decision(account_id: str, product: str, decision: Decision) -> None:
    o = decision.outcome
    fields = {"account_id": account_id, "reservation_id": decision.reservation_id,
              "product": product, "allowed": o.allowed, "funding": o.funding.value if o.funding else "none",
              "denial": o.denial.value if o.denial else "none", "credits_held": o.credits_held,
              "cost_credits": o.cost_credits, "replayed": o.replayed, "degraded": o.degraded,
              "plans_version": o.plans_version}
    log.debug("decision %s/%s for account %r: %s", product, decision.reservation_id, account_id,
              "allowed" if o.allowed else f"denied ({fields['denial']})", extra=fields)


def _log_item_errors(method: str, results: list[Any]) -> None:
    failed = [r for r in results if isinstance(r, QuotaError) and not isinstance(r, _CLIENT_ERRORS)]
    if failed:
        log.warning("%s: %d item(s) failed, first: %s (%s)", method, len(failed), failed[0].message, failed[0].reason)


class QuotaService(pb_grpc.QuotaServiceServicer):
    SERVICE = pb.DESCRIPTOR.services_by_name["QuotaService"].full_name

    def __init__(self, engine: QuotaEngine, metrics: Metrics | None = None, *, max_batch_items: int = 100,
                 tracer: Any = None) -> None:
        self._engine = engine
        self._telemetry = Telemetry(metrics, tracer)
        self._max_batch_items = max_batch_items

    def _observe(self, account_id: str, product: str, decision: Decision) -> None:
        outcome = decision.outcome
        if log.isEnabledFor(logging.DEBUG):
            _log_decision(account_id, product, decision)
        metrics = self._telemetry.metrics
        if metrics is None:
            return
        metrics.decision(product, outcome.allowed, outcome.funding.value if outcome.funding else "none",
                               outcome.denial.value if outcome.denial else "none", outcome.replayed)
        if not outcome.replayed:
            if outcome.shadow_limits:
                metrics.shadow_decision(product, outcome.shadow_limits)
            if outcome.degraded:
                metrics.degraded_decision(product)

    def _check_batch_size(self, items: Any) -> None:
        if len(items) > self._max_batch_items:
            raise InvalidArgument("items", f"at most {self._max_batch_items} items per batch, got {len(items)}")

    @_rpc
    async def CheckAndReserve(self, request: pb.CheckAndReserveRequest, context: Any) -> pb.CheckAndReserveResponse:
        decision = await self._engine.check_and_reserve(
            request.account_id, request.product, request.reservation_id, job_params(request.params),
            request.ttl_seconds)
        self._observe(request.account_id, request.product, decision)
        return decision_response(decision)

    @_rpc
    async def Quote(self, request: pb.QuoteRequest, context: Any) -> pb.QuoteResponse:
        decision = await self._engine.quote(request.account_id, request.product, request.reservation_id,
                                            job_params(request.params), request.ttl_seconds)
        metrics = self._telemetry.metrics
        if metrics is not None:
            o = decision.outcome
            metrics.quote(request.product, o.allowed, o.denial.value if o.denial else "none")
        return quote_response(decision)

    @_rpc
    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        actual = job_params(request.params) if request.HasField("params") else None
        return commit_response(await self._engine.commit(request.account_id, request.reservation_id, actual))

    @_rpc
    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        return release_response(await self._engine.release(request.account_id, request.reservation_id))

    @_rpc
    async def CheckAndReserveBatch(self, request: pb.CheckAndReserveBatchRequest,
                                   context: Any) -> pb.CheckAndReserveBatchResponse:
        self._check_batch_size(request.items)
        items = [ReserveItem(account_id=r.account_id, product=r.product, reservation_id=r.reservation_id,
                             job=job_params(r.params), ttl_seconds=r.ttl_seconds) for r in request.items]
        if request.all_or_nothing:
            results = await self._engine.check_and_reserve_all(items)
        else:
            results = await self._engine.check_and_reserve_many(items)
        _log_item_errors("CheckAndReserveBatch", results)
        out = []
        for i, (item, r) in enumerate(zip(items, results)):
            if isinstance(r, QuotaError):
                out.append(pb.BatchReserveResult(error=item_error(r, i)))
            else:
                self._observe(item.account_id, item.product, r)
                out.append(pb.BatchReserveResult(response=decision_response(r)))
        return pb.CheckAndReserveBatchResponse(results=out)

    @_rpc
    async def CommitBatch(self, request: pb.CommitBatchRequest, context: Any) -> pb.CommitBatchResponse:
        self._check_batch_size(request.items)
        results = await self._engine.commit_many([
            (r.account_id, r.reservation_id, job_params(r.params) if r.HasField("params") else None)
            for r in request.items])
        _log_item_errors("CommitBatch", results)
        return pb.CommitBatchResponse(results=[
            pb.BatchCommitResult(error=item_error(r, i)) if isinstance(r, QuotaError)
            else pb.BatchCommitResult(response=commit_response(r)) for i, r in enumerate(results)])

    @_rpc
    async def ReleaseBatch(self, request: pb.ReleaseBatchRequest, context: Any) -> pb.ReleaseBatchResponse:
        self._check_batch_size(request.items)
        results = await self._engine.release_many([(r.account_id, r.reservation_id) for r in request.items])
        _log_item_errors("ReleaseBatch", results)
        return pb.ReleaseBatchResponse(results=[
            pb.BatchReleaseResult(error=item_error(r, i)) if isinstance(r, QuotaError)
            else pb.BatchReleaseResult(response=release_response(r)) for i, r in enumerate(results)])

    @_rpc
    async def ExtendReservation(self, request: pb.ExtendReservationRequest,
                                context: Any) -> pb.ExtendReservationResponse:
        expires_ms = await self._engine.extend(request.account_id, request.reservation_id, request.ttl_seconds)
        return pb.ExtendReservationResponse(expires_at=_ts(expires_ms))

    @_rpc
    async def GetBalance(self, request: pb.GetBalanceRequest, context: Any) -> pb.GetBalanceResponse:
        return balance_response(await self._engine.balance(request.account_id))


class QuotaAdmin(pb_grpc.QuotaAdminServicer):
    SERVICE = pb.DESCRIPTOR.services_by_name["QuotaAdmin"].full_name

    def __init__(self, engine: QuotaEngine, metrics: Metrics | None = None, *, tracer: Any = None) -> None:
        self._engine = engine
        self._telemetry = Telemetry(metrics, tracer)

    @_rpc
    async def GrantCredits(self, request: pb.GrantCreditsRequest, context: Any) -> pb.GrantCreditsResponse:
        expires_ms = _request_ms(request.expires_at, "expires_at") if request.HasField("expires_at") else None
        # 0 with no currency: the price is unknown (or the pack's, with a pack_id).
        price = request.price_minor_units if request.price_minor_units or request.currency else None
        r = await self._engine.grant(request.account_id, request.credits, request.purchase_id, expires_ms,
                                     source=_source(request.source), reason=request.reason,
                                     price_minor_units=price, currency=request.currency, pack_id=request.pack_id)
        return pb.GrantCreditsResponse(lot=_lot(r.lot), credit_balance=r.credit_balance, replayed=r.replayed,
                                       debt_paid_credits=r.debt_paid_credits)

    @_rpc
    async def RevokeCredits(self, request: pb.RevokeCreditsRequest, context: Any) -> pb.RevokeCreditsResponse:
        r = await self._engine.revoke(request.account_id, request.purchase_id, request.reason)
        return pb.RevokeCreditsResponse(credits_revoked=r.credits_revoked, credits_spent=r.credits_spent,
                                        credits_held=r.credits_held, credit_balance=r.credit_balance,
                                        replayed=r.replayed)

    @_rpc
    async def RefundJob(self, request: pb.RefundJobRequest, context: Any) -> pb.RefundJobResponse:
        r = await self._engine.refund_job(request.account_id, request.reservation_id, request.reason)
        return pb.RefundJobResponse(credits_refunded=r.credits_refunded, free_refunded=r.free_refunded,
                                    credit_balance=r.credit_balance, replayed=r.replayed)

    @_rpc
    async def SetAccount(self, request: pb.SetAccountRequest, context: Any) -> pb.SetAccountResponse:
        cap = request.monthly_spend_cap_credits if request.HasField("monthly_spend_cap_credits") else None
        topup = None
        if request.HasField("auto_topup"):
            t = request.auto_topup
            topup = AutoTopUp(enabled=t.enabled, threshold_credits=t.threshold_credits, pack_id=t.pack_id)
        overrides = tuple(_override(o, i) for i, o in enumerate(request.overrides))
        r = await self._engine.set_account(request.account_id, request.plan, request.time_zone,
                                           monthly_spend_cap_credits=cap, auto_topup=topup, overrides=overrides,
                                           clear_overrides=tuple(request.clear_overrides))
        return pb.SetAccountResponse(plan=r.plan, time_zone=r.time_zone,
                                     monthly_spend_cap_credits=r.monthly_spend_cap_credits,
                                     auto_topup=_topup(r.auto_topup), overrides=[_override_pb(o) for o in r.overrides])

    @_rpc
    async def GetAccount(self, request: pb.GetAccountRequest, context: Any) -> pb.GetAccountResponse:
        return account_response(await self._engine.account(request.account_id))

    @_rpc
    async def SetCameo(self, request: pb.SetCameoRequest, context: Any) -> pb.SetCameoResponse:
        cameo = await self._engine.set_cameo(request.cameo_id, request.owner_account_id, request.fee_credits,
                                             request.active)
        return pb.SetCameoResponse(cameo=cameo_pb(cameo))

    @_rpc
    async def GetCameo(self, request: pb.GetCameoRequest, context: Any) -> pb.GetCameoResponse:
        cameo = await self._engine.get_cameo(request.cameo_id)
        if cameo is None:
            raise NotFound(f"no cameo {request.cameo_id!r}", reason="CAMEO_NOT_FOUND")
        return pb.GetCameoResponse(cameo=cameo_pb(cameo))

    @_rpc
    async def ListLedger(self, request: pb.ListLedgerRequest, context: Any) -> pb.ListLedgerResponse:
        entries, token = await self._engine.ledger(request.account_id, request.page_size, request.page_token)
        return pb.ListLedgerResponse(entries=[ledger_entry_pb(e) for e in entries], next_page_token=token)


# The services' full names (health and reflection list them), from the generated descriptors.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QuotaService"].full_name
ADMIN_NAME = pb.DESCRIPTOR.services_by_name["QuotaAdmin"].full_name


def add_quota_service(server: grpc.aio.Server, service: QuotaService) -> None:
    """Registers QuotaService on ``server`` (the app never touches the generated code itself)."""
    pb_grpc.add_QuotaServiceServicer_to_server(service, server)


def add_quota_admin(server: grpc.aio.Server, admin: QuotaAdmin) -> None:
    """Registers QuotaAdmin on ``server``."""
    pb_grpc.add_QuotaAdminServicer_to_server(admin, server)
