"""Worker-side client of the quota sidecar: typed results, retries, and a job context manager.

    async with QuotaClient("127.0.0.1:50051") as client:
        async with client.job("alice", "sora", {"duration_seconds": 10, "resolution": "720p"}) as job:
            render()                      # the hold is extended in the background meanwhile
            job.actual = {"duration_seconds": 8, "resolution": "720p"}   # optional: bill less
        # committed here; released instead if the block raised or was cancelled

Protobuf stays inside this module: callers see dataclasses, datetimes and the
exceptions below. ``SyncQuotaClient`` offers the same API to threaded code.
``SyncAdminClient`` is the billing side's: GrantCredits on the sidecar's admin address.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Awaitable, Callable, Coroutine, Mapping, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc

__all__ = [
    "QuotaClient", "SyncQuotaClient", "Job", "Reservation", "Quote", "Offer", "CommitResult", "ReleaseResult",
    "Balance", "CreditLot", "Hold", "QuotaClientError", "Denied", "InvalidRequest", "Unavailable",
    "ReservationError", "SyncAdminClient", "Grant", "Cameo", "Allowance", "WindowUsage",
]

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_TIMEOUT_SECONDS = 2.0
DEFAULT_ATTEMPTS = 4
# Every product's default hold lifetime is 15 minutes or more; extending every minute keeps a
# hold alive with a wide margin when the caller does not say how long its holds last.
DEFAULT_EXTEND_EVERY_SECONDS = 60.0
# How long close() waits for commits and releases still being retried in the background.
DEFAULT_SETTLE_TIMEOUT_SECONDS = 30.0
# Codes after which the same request may be sent again: the sidecar documents that
# retrying with the same reservation_id is always safe (CANCELLED: grpc/grpc#41785).
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
_PARAM_FIELDS = {"duration_seconds", "resolution", "model", "units", "extra", "cameo_ids",
                 "input_tokens", "cached_input_tokens", "output_tokens", "fast"}


# -- results -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Offer:
    """A credit pack that covers a shortfall: buy ``quantity`` packs for ``total_minor_units``."""
    pack_id: str
    credits: int
    quantity: int
    price_minor_units: int
    total_minor_units: int
    currency: str


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    funding: str  # "free" or "credits"
    credits_held: int
    free_used: int
    free_limit: int
    free_resets_at: datetime | None
    expires_at: datetime | None
    credit_balance: int
    job_cost_credits: int
    replayed: bool
    plans_version: str
    cameo_fees_credits: int = 0  # of job_cost_credits: the cameos' fees (paid from credits)
    # What free_used / free_limit count: the product's unit (one per job), or "credits" of included
    # usage for a metered product (a job funded by it holds job_cost_credits of it).
    allowance_unit: str = ""


@dataclass(frozen=True)
class Quote:
    """What reserve() would answer now (QuotaService.Quote); nothing is held. The amounts are the
    would-be hold's: ``credit_balance`` is what would be left after it."""
    allowed: bool
    reservation_id: str  # the id quoted for; "" when none was given
    funding: str  # "free" or "credits" when allowed, else ""
    credits_held: int
    free_used: int
    free_limit: int
    free_resets_at: datetime | None
    expires_at: datetime | None  # when the hold would expire (allowed only)
    credit_balance: int
    job_cost_credits: int  # the price to show
    replayed: bool  # reservation_id names a live hold of the same request
    plans_version: str
    denial: Denied | None  # what reserve() would raise, when not allowed
    cameo_fees_credits: int = 0  # of job_cost_credits: the cameos' fees (paid from credits)
    allowance_unit: str = ""  # as Reservation.allowance_unit


@dataclass(frozen=True)
class CommitResult:
    credits_charged: int
    credits_refunded: int
    free_charged: int
    credit_balance: int
    replayed: bool
    credits_written_off: int = 0  # usage above the hold not charged (a metered product's overage cap)
    credits_drawn: int = 0  # overage draw: usage above the hold taken from the available credits
    debt_credits: int = 0  # overage draw: the debt this commit opened (usage past the credits)
    included_usage_credits: int = 0  # a metered job on included usage: the usage charged to the windows


@dataclass(frozen=True)
class ReleaseResult:
    credits_refunded: int
    free_refunded: int
    credit_balance: int
    replayed: bool


@dataclass(frozen=True)
class CreditLot:
    lot_id: str
    credits_left: int
    expires_at: datetime | None


@dataclass(frozen=True)
class Hold:
    reservation_id: str
    product: str
    funding: str
    credits_held: int
    expires_at: datetime | None


@dataclass(frozen=True)
class WindowUsage:
    """One free-allowance window of a product, in its Allowance's unit."""
    limit_id: str
    kind: str  # "day", "week" (calendar, the account's zone) or "rolling" (the last rolling_hours)
    used: int
    limit: int
    resets_at: datetime | None  # the window's end; rolling: when its oldest counted use leaves it
    rolling_hours: int = 0
    shadow: bool = False  # evaluated, not enforced

    @property
    def left(self) -> int:
        return max(0, self.limit - self.used)


@dataclass(frozen=True)
class Allowance:
    """A product's free allowance: every window, and what they count ("credits" of included usage
    for a metered product, else the product's unit, one per job)."""
    product: str
    unit: str
    windows: tuple[WindowUsage, ...]


@dataclass(frozen=True)
class Balance:
    account_id: str
    plan: str
    time_zone: str
    credit_balance: int
    credits_held: int
    free: Mapping[str, tuple[int, int]]  # product -> (used, limit) of its most constrained limit
    lots: tuple[CreditLot, ...]
    holds: tuple[Hold, ...]  # the 100 soonest-expiring open holds at most
    holds_total: int = 0  # all open holds
    credits_expiring_30d: int = 0  # credits left in the lots expiring within 30 days (Redis' clock)
    expiring_lots: tuple[CreditLot, ...] = ()  # those lots, soonest expiry first
    debt_credits: int = 0  # credits owed (usage drawn past the credits); new jobs are denied until paid
    allowances: tuple[Allowance, ...] = ()  # every product's windows: used, left and reset of each


@dataclass(frozen=True)
class Grant:
    """A GrantCredits result: the lot the purchase became and the account's balance after it."""
    lot_id: str
    credits: int
    expires_at: datetime | None
    credit_balance: int
    replayed: bool  # this purchase_id had been granted before: nothing was added
    debt_paid_credits: int = 0  # of the account's open debt, what these credits paid first


@dataclass(frozen=True)
class Cameo:
    """A cameo (SetCameo / GetCameo): each job using it pays ``fee_credits`` to its owner."""
    cameo_id: str
    owner_account_id: str
    fee_credits: int
    active: bool
    updated_at: datetime | None


# -- errors --------------------------------------------------------------------------------------

class QuotaClientError(Exception):
    """Base of everything this client raises. ``reason`` is the sidecar's ErrorInfo reason."""

    def __init__(self, message: str, *, code: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason


class Denied(QuotaClientError):
    """The job may not run. Everything a purchase prompt needs is here.

    reason: PURCHASE_REQUIRED, NOT_ENTITLED, BUDGET_EXCEEDED or CONCURRENCY_LIMIT.
    """

    def __init__(self, reason: str, message: str, *, credits_short: int, offers: tuple[Offer, ...],
                 free_resets_at: datetime | None, free_used: int, free_limit: int, credit_balance: int,
                 job_cost_credits: int, debt_credits: int = 0) -> None:
        super().__init__(f"{reason}: {message}", code="OK", reason=reason)
        self.denial_message = message
        self.credits_short = credits_short
        self.offers = offers
        self.free_resets_at = free_resets_at
        self.free_used = free_used
        self.free_limit = free_limit
        self.credit_balance = credit_balance
        self.job_cost_credits = job_cost_credits
        self.debt_credits = debt_credits  # open debt: part of credits_short


class InvalidRequest(QuotaClientError):
    """INVALID_ARGUMENT (or a params dict this client cannot send); ``field`` names the culprit."""

    def __init__(self, message: str, *, field: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message, code=code, reason="INVALID_ARGUMENT")
        self.field = field


class Unavailable(QuotaClientError):
    """Still UNAVAILABLE / DEADLINE_EXCEEDED after every attempt; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, *, code: str, reason: str = "", retry_after: float | None = None,
                 attempts: int = 0) -> None:
        super().__init__(message, code=code, reason=reason)
        self.retry_after = retry_after
        self.attempts = attempts


class ReservationError(QuotaClientError):
    """The reservation cannot take this outcome. reason: RESERVATION_NOT_FOUND, ALREADY_COMMITTED,
    ALREADY_RELEASED, EXPIRED, COST_EXCEEDS_HOLD, RESERVATION_PARAMS_MISMATCH, COMMIT_COST_MISMATCH,
    UNKNOWN_PLAN, ... (codes NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION)."""


def _details(err: grpc.RpcError) -> tuple[str, str, float | None]:
    """(ErrorInfo reason, BadRequest field, RetryInfo seconds) of a failed call."""
    reason, fld, retry = "", "", None
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fld = bad.field_violations[0].field if bad.field_violations else ""
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            detail.Unpack(ri)
            retry = ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    return reason, fld, retry


def _error(err: grpc.RpcError, attempts: int) -> QuotaClientError:
    code = err.code()
    message = err.details() or code.name
    reason, fld, retry = _details(err)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(message, field=fld)
    if code in _RETRYABLE:
        return Unavailable(message, code=code.name, reason=reason, retry_after=retry, attempts=attempts)
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
        return ReservationError(message, code=code.name, reason=reason or code.name)
    return QuotaClientError(message, code=code.name, reason=reason)


# -- conversions -----------------------------------------------------------------------------------

def _time(ts: timestamp_pb2.Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return datetime.fromtimestamp(ts.ToMilliseconds() / 1000, tz=timezone.utc)


_FUNDING_NAMES: dict[int, str] = {pb.FUNDING_FREE_QUOTA: "free", pb.FUNDING_CREDITS: "credits"}


def _funding(value: int) -> str:
    return _FUNDING_NAMES.get(value, "")


def _params(params: Mapping[str, Any]) -> pb.JobParams:
    """A plain dict to JobParams; an unknown key is refused here rather than silently ignored."""
    unknown = sorted(set(params) - _PARAM_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown job parameter {unknown[0]!r}; known: {sorted(_PARAM_FIELDS)}",
                             field=f"params.{unknown[0]}", code="")
    extra = {str(k): str(v) for k, v in dict(params.get("extra") or {}).items()}
    return pb.JobParams(duration_seconds=float(params.get("duration_seconds") or 0.0),
                        resolution=str(params.get("resolution") or ""), model=str(params.get("model") or ""),
                        units=int(params.get("units") or 0), extra=extra,
                        cameo_ids=[str(c) for c in params.get("cameo_ids") or ()],
                        input_tokens=int(params.get("input_tokens") or 0),
                        cached_input_tokens=int(params.get("cached_input_tokens") or 0),
                        output_tokens=int(params.get("output_tokens") or 0), fast=bool(params.get("fast")))


def _offer(o: pb.CreditPack) -> Offer:
    return Offer(pack_id=o.pack_id, credits=o.credits, quantity=o.quantity, price_minor_units=o.price.minor_units,
                 total_minor_units=o.total_price.minor_units, currency=o.price.currency_code)


def _denied(r: pb.CheckAndReserveResponse | pb.QuoteResponse) -> Denied:
    reason = pb.DenialReason.Name(r.denial.reason).removeprefix("DENIAL_REASON_")
    return Denied(reason, r.denial.message, credits_short=r.denial.credits_short,
                  offers=tuple(_offer(o) for o in r.denial.offers), free_resets_at=_time(r.free_resets_at),
                  free_used=r.free_used, free_limit=r.free_limit, credit_balance=r.credit_balance,
                  job_cost_credits=r.job_cost_credits, debt_credits=r.denial.debt_credits)


def _reservation(r: pb.CheckAndReserveResponse) -> Reservation:
    return Reservation(reservation_id=r.reservation_id, funding=_funding(r.funding), credits_held=r.credits_held,
                       free_used=r.free_used, free_limit=r.free_limit, free_resets_at=_time(r.free_resets_at),
                       expires_at=_time(r.expires_at), credit_balance=r.credit_balance,
                       job_cost_credits=r.job_cost_credits, replayed=r.replayed, plans_version=r.plans_version,
                       cameo_fees_credits=r.cameo_fees_credits, allowance_unit=r.allowance_unit)


def _quote(r: pb.QuoteResponse) -> Quote:
    return Quote(allowed=r.allowed, reservation_id=r.reservation_id, funding=_funding(r.funding),
                 credits_held=r.credits_held, free_used=r.free_used, free_limit=r.free_limit,
                 free_resets_at=_time(r.free_resets_at), expires_at=_time(r.expires_at),
                 credit_balance=r.credit_balance, job_cost_credits=r.job_cost_credits, replayed=r.replayed,
                 plans_version=r.plans_version, denial=None if r.allowed else _denied(r),
                 cameo_fees_credits=r.cameo_fees_credits, allowance_unit=r.allowance_unit)


def _balance(r: pb.GetBalanceResponse) -> Balance:
    lots = tuple(CreditLot(lot.lot_id, lot.credits_left, _time(lot.expires_at)) for lot in r.lots)
    holds = tuple(Hold(h.reservation_id, h.product, _funding(h.funding), h.credits_held, _time(h.expires_at))
                  for h in r.holds)
    return Balance(account_id=r.account_id, plan=r.plan, time_zone=r.time_zone, credit_balance=r.credit_balance,
                   credits_held=r.credits_held, free={a.product: (a.free_used, a.free_limit) for a in r.allowances},
                   lots=lots, holds=holds, holds_total=r.holds_total, credits_expiring_30d=r.credits_expiring_30d,
                   expiring_lots=tuple(CreditLot(lot.lot_id, lot.credits_left, _time(lot.expires_at))
                                       for lot in r.expiring_lots), debt_credits=r.debt_credits,
                   allowances=tuple(_allowance(a) for a in r.allowances))


_LIMIT_KINDS = {pb.LIMIT_KIND_DAY: "day", pb.LIMIT_KIND_WEEK: "week", pb.LIMIT_KIND_ROLLING: "rolling"}


def _allowance(a: pb.ProductAllowance) -> Allowance:
    return Allowance(product=a.product, unit=a.unit, windows=tuple(
        WindowUsage(limit_id=x.limit_id, kind=_LIMIT_KINDS.get(x.kind, ""), used=x.used, limit=x.limit,
                    resets_at=_time(x.resets_at), rolling_hours=x.rolling_hours, shadow=x.shadow)
        for x in a.limits))


# -- async client ----------------------------------------------------------------------------------

class QuotaClient:
    """Async client of one sidecar. ``target``: "host:port" or "unix:/path".

    timeout: deadline of each attempt, seconds. attempts: tries per call on UNAVAILABLE,
    DEADLINE_EXCEEDED or CANCELLED, with exponential backoff from ``backoff`` seconds (or the
    server's RetryInfo, when longer). sleep: injectable for tests (backoff and the extender).
    """

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS, attempts: int = DEFAULT_ATTEMPTS,
                 backoff: float = 0.1, max_backoff: float = 2.0, extend_every: float | None = None,
                 sleep: Sleep = asyncio.sleep) -> None:
        assert attempts >= 1 and timeout > 0
        self.target = target
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.extend_every = extend_every
        self._sleep = sleep
        self._settlements: set[asyncio.Task[None]] = set()
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.QuotaServiceStub(self._channel)

    async def __aenter__(self) -> QuotaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, settle_timeout: float = DEFAULT_SETTLE_TIMEOUT_SECONDS) -> None:
        """Waits up to ``settle_timeout`` seconds for background settlements (see drain), then closes."""
        await self.drain(settle_timeout)
        for task in self._settlements:
            task.cancel()
        await asyncio.gather(*self._settlements, return_exceptions=True)
        await self._channel.close()

    @property
    def pending_settlements(self) -> int:
        """Jobs whose commit or release is still being retried in the background."""
        return len(self._settlements)

    async def drain(self, timeout: float | None = None) -> bool:
        """Waits until every background settlement has ended (True) or ``timeout`` seconds passed (False).

        A job's commit or release that failed through every attempt with UNAVAILABLE is retried in
        the background (``job.settlement_pending``) until it lands, the server refuses it for good
        (``job.settlement_error``), or the hold's expiry has passed."""
        if not self._settlements:
            return True
        _, pending = await asyncio.wait(set(self._settlements), timeout=timeout)
        return not pending

    def _settle_in_background(self, run: _JobRun, failed: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(run, failed), name=f"settle-{run.reservation_id}")
        self._settlements.add(task)
        task.add_done_callback(self._settlements.discard)

    async def _settle(self, run: _JobRun, failed: bool) -> None:
        job = run.job
        assert job is not None
        while True:
            await self._sleep(self.max_backoff)
            try:
                await run.settle(failed)
                break
            except Unavailable as exc:
                expires_at = job.expires_at or job.reservation.expires_at
                if expires_at is not None and datetime.now(timezone.utc) > expires_at:
                    job.settlement_error = exc  # the hold has expired: the server refunds it itself
                    break
            except QuotaClientError as exc:
                job.settlement_error = exc
                break
        job.settlement_pending = False

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """One RPC with bounded retries; the request (and so its ids) is the same on every attempt."""
        rpc = getattr(self._stub, method)
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return await rpc(request, timeout=timeout or self.timeout, wait_for_ready=attempt > 1)
            except grpc.RpcError as err:
                failure = _error(err, attempt)
                if not isinstance(failure, Unavailable) or attempt == self.attempts:
                    raise failure from None
                await self._sleep(min(max(delay, failure.retry_after or 0.0), self.max_backoff))
                delay *= 2
        raise AssertionError("unreachable")

    async def reserve(self, account_id: str, product: str, params: Mapping[str, Any], *,
                      reservation_id: str | None = None, ttl_seconds: int = 0) -> Reservation:
        """CheckAndReserve. Raises Denied when the job may not run. The id is made here (uuid4)
        when not given, before the first attempt, so retries replay instead of holding twice."""
        request = pb.CheckAndReserveRequest(account_id=account_id, product=product,
                                            reservation_id=reservation_id or uuid.uuid4().hex,
                                            params=_params(params), ttl_seconds=ttl_seconds)
        r = await self._call("CheckAndReserve", request)
        if not r.allowed:
            raise _denied(r)
        return _reservation(r)

    async def quote(self, account_id: str, product: str, params: Mapping[str, Any], *,
                    reservation_id: str | None = None, ttl_seconds: int = 0) -> Quote:
        """Quote: what reserve() with these arguments would answer now, holding nothing. A would-be
        denial is not raised: it is ``quote.denial`` (``raise quote.denial`` if you want reserve's
        behaviour). No id is made when none is given: a quote records nothing."""
        request = pb.QuoteRequest(account_id=account_id, product=product, reservation_id=reservation_id or "",
                                  params=_params(params), ttl_seconds=ttl_seconds)
        return _quote(await self._call("Quote", request))

    async def commit(self, account_id: str, reservation_id: str,
                     actual: Mapping[str, Any] | None = None) -> CommitResult:
        request = pb.CommitRequest(account_id=account_id, reservation_id=reservation_id)
        if actual is not None:
            request.params.CopyFrom(_params(actual))
        r = await self._call("Commit", request)
        return CommitResult(r.credits_charged, r.credits_refunded, r.free_charged, r.credit_balance, r.replayed,
                            r.credits_written_off, r.credits_drawn, r.debt_credits, r.included_usage_credits)

    async def release(self, account_id: str, reservation_id: str) -> ReleaseResult:
        r = await self._call("Release", pb.ReleaseRequest(account_id=account_id, reservation_id=reservation_id))
        return ReleaseResult(r.credits_refunded, r.free_refunded, r.credit_balance, r.replayed)

    async def extend(self, account_id: str, reservation_id: str, ttl_seconds: int = 0) -> datetime | None:
        """Pushes the hold's expiry out (0: by the lifetime it was made with); returns the new expiry."""
        r = await self._call("ExtendReservation", pb.ExtendReservationRequest(
            account_id=account_id, reservation_id=reservation_id, ttl_seconds=ttl_seconds))
        return _time(r.expires_at)

    async def balance(self, account_id: str) -> Balance:
        return _balance(await self._call("GetBalance", pb.GetBalanceRequest(account_id=account_id)))

    def job(self, account_id: str, product: str, params: Mapping[str, Any], *, ttl_seconds: int = 0,
            reservation_id: str | None = None, extend_every: float | None = None) -> _AsyncJobContext:
        """``async with client.job(...) as job``: reserve, keep the hold alive, commit or release."""
        every = extend_every or self.extend_every or (ttl_seconds / 2 if ttl_seconds else DEFAULT_EXTEND_EVERY_SECONDS)
        run = _JobRun(self, account_id, product, dict(params), ttl_seconds, reservation_id or uuid.uuid4().hex, every)
        return _AsyncJobContext(run)


# -- the job lifecycle ---------------------------------------------------------------------------

@dataclass
class Job:
    """A running job's reservation. Set ``actual`` to commit a smaller job than reserved."""
    account_id: str
    product: str
    params: dict[str, Any]
    reservation: Reservation
    actual: dict[str, Any] | None = None
    extensions: int = 0
    expires_at: datetime | None = None
    commit_result: CommitResult | None = None
    release_result: ReleaseResult | None = None
    # True while the commit (or release) that ended the block is still being retried in the
    # background because the sidecar stayed unreachable through every attempt; see QuotaClient.drain.
    settlement_pending: bool = False
    settlement_error: QuotaClientError | None = None

    @property
    def reservation_id(self) -> str:
        return self.reservation.reservation_id

    @property
    def funding(self) -> str:
        return self.reservation.funding

    @property
    def credits_held(self) -> int:
        return self.reservation.credits_held

    @property
    def free_used(self) -> int:
        return self.reservation.free_used

    @property
    def free_limit(self) -> int:
        return self.reservation.free_limit

    @property
    def resets_at(self) -> datetime | None:
        return self.reservation.free_resets_at


class _JobRun:
    """Reserve, extend in the background, then commit or release; shared by both clients."""

    def __init__(self, client: QuotaClient, account_id: str, product: str, params: dict[str, Any],
                 ttl_seconds: int, reservation_id: str, extend_every: float) -> None:
        self.client = client
        self.account_id, self.product, self.params = account_id, product, params
        self.ttl_seconds, self.reservation_id, self.extend_every = ttl_seconds, reservation_id, extend_every
        self.job: Job | None = None
        self._extender: asyncio.Task[None] | None = None

    async def start(self) -> Job:
        r = await self.client.reserve(self.account_id, self.product, self.params,
                                      reservation_id=self.reservation_id, ttl_seconds=self.ttl_seconds)
        self.job = Job(self.account_id, self.product, self.params, r, expires_at=r.expires_at)
        self._extender = asyncio.create_task(self._extend_forever(self.job), name=f"extend-{self.reservation_id}")
        return self.job

    async def _extend_forever(self, job: Job) -> None:
        # Runs until cancelled at the block's end. A failed extension is retried at the next tick:
        # the hold still has about half its lifetime left then.
        while True:
            await self.client._sleep(self.extend_every)
            try:
                job.expires_at = await self.client.extend(self.account_id, self.reservation_id, self.ttl_seconds)
                job.extensions += 1
            except Unavailable:
                continue
            except QuotaClientError:
                return  # resolved or expired: nothing left to keep alive

    async def finish(self, failed: bool) -> None:
        """Commit on success, release otherwise. The outcome runs as its own task, shielded from a
        cancellation of the caller and bounded by the client's retries, so no hold is left to
        expire (and no commit half-sent) while this process lives."""
        outcome = asyncio.ensure_future(self._resolve(failed))
        try:
            await asyncio.shield(outcome)
        except asyncio.CancelledError:
            await asyncio.wait({outcome}, timeout=self.client.timeout * self.client.attempts + 1)
            raise

    async def _resolve(self, failed: bool) -> None:
        assert self.job is not None
        if self._extender is not None:
            self._extender.cancel()
            await asyncio.gather(self._extender, return_exceptions=True)
        try:
            await self.settle(failed)
        except Unavailable:
            # The job is over either way; its hold must not be left to expire (a commit lost would
            # make the job free, a release lost would block the allowance until the TTL). Keep
            # trying while this process lives, and tell the caller through the job.
            self.job.settlement_pending = True
            self.client._settle_in_background(self, failed)

    async def settle(self, failed: bool) -> None:
        """The commit (or, after a failure, the release) that ends the job; records its result."""
        assert self.job is not None
        job = self.job
        if failed:
            job.release_result = await self.client.release(self.account_id, self.reservation_id)
        else:
            job.commit_result = await self.client.commit(self.account_id, self.reservation_id, job.actual)


class _AsyncJobContext:
    def __init__(self, run: _JobRun) -> None:
        self._run = run

    async def __aenter__(self) -> Job:
        return await self._run.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._run.finish(failed=exc_type is not None)


# -- sync client -----------------------------------------------------------------------------------

class SyncQuotaClient:
    """Blocking client: the async client runs on a private event loop in a daemon thread.

    One implementation of retries, the extender and release-on-failure serves both APIs; the
    extender keeps running while the caller's thread is busy rendering.
    """

    def __init__(self, target: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="quota-client", daemon=True)
        self._thread.start()
        self._closed = False

        async def make() -> QuotaClient:
            return QuotaClient(target, **options)  # the channel must be made on its loop

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncQuotaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, settle_timeout: float = DEFAULT_SETTLE_TIMEOUT_SECONDS) -> None:
        if self._closed:
            return
        self._closed = True
        self._run(self._client.close(settle_timeout))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def pending_settlements(self) -> int:
        return self._client.pending_settlements

    def drain(self, timeout: float | None = None) -> bool:
        """As QuotaClient.drain: waits for commits and releases being retried in the background."""
        return self._run(self._client.drain(timeout))

    def reserve(self, account_id: str, product: str, params: Mapping[str, Any], **kw: Any) -> Reservation:
        return self._run(self._client.reserve(account_id, product, params, **kw))

    def quote(self, account_id: str, product: str, params: Mapping[str, Any], **kw: Any) -> Quote:
        return self._run(self._client.quote(account_id, product, params, **kw))

    def commit(self, account_id: str, reservation_id: str, actual: Mapping[str, Any] | None = None) -> CommitResult:
        return self._run(self._client.commit(account_id, reservation_id, actual))

    def release(self, account_id: str, reservation_id: str) -> ReleaseResult:
        return self._run(self._client.release(account_id, reservation_id))

    def extend(self, account_id: str, reservation_id: str, ttl_seconds: int = 0) -> datetime | None:
        return self._run(self._client.extend(account_id, reservation_id, ttl_seconds))

    def balance(self, account_id: str) -> Balance:
        return self._run(self._client.balance(account_id))

    def job(self, account_id: str, product: str, params: Mapping[str, Any], **kw: Any) -> _SyncJobContext:
        """``with client.job(...) as job``: as QuotaClient.job, for blocking code."""
        ctx = self._client.job(account_id, product, params, **kw)
        return _SyncJobContext(self, ctx._run)


class _SyncJobContext:
    def __init__(self, client: SyncQuotaClient, run: _JobRun) -> None:
        self._client, self._run = client, run

    def __enter__(self) -> Job:
        return self._client._run(self._run.start())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # KeyboardInterrupt included: any exception releases the hold.
        self._client._run(self._run.finish(failed=exc_type is not None))


# -- admin (billing side) --------------------------------------------------------------------------

_CREDIT_SOURCES = ("purchase", "promo", "refund", "compensation")


class SyncAdminClient:
    """Blocking client of the sidecar's admin API (QuotaAdmin, on its --admin-listen address), for the
    billing system: GrantCredits once a purchase is paid.

    token: the bearer token when the sidecar has --admin-token-file. credentials: a
    grpc.ssl_channel_credentials(...) when the admin address speaks TLS (plaintext otherwise).
    No automatic retries: a grant is idempotent by its purchase_id, so after Unavailable the
    caller calls again with the same purchase_id and the credits are never added twice.
    """

    def __init__(self, target: str, *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channel = (grpc.secure_channel(target, credentials) if credentials is not None
                         else grpc.insecure_channel(target))
        self._stub = pb_grpc.QuotaAdminStub(self._channel)

    def __enter__(self) -> SyncAdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def grant_credits(self, account_id: str, credits: int, purchase_id: str, *,
                      expires_at: datetime | None = None, source: str = "purchase", reason: str = "",
                      price_minor_units: int = 0, currency: str = "", pack_id: str = "") -> Grant:
        """Adds a lot of ``credits`` (expiring at ``expires_at``, default: the plans' validity after now).
        source: purchase, promo, refund or compensation; reason: kept in the ledger. What the buyer paid
        (``price_minor_units`` of ``currency``, e.g. 400 "USD") or the ``pack_id`` bought goes to the books
        (quota_purchases); with a pack, ``credits`` may be 0 (the pack's)."""
        if source not in _CREDIT_SOURCES:
            raise InvalidRequest(f"source must be one of {', '.join(_CREDIT_SOURCES)}, not {source!r}",
                                 field="source", code="")
        request = pb.GrantCreditsRequest(account_id=account_id, credits=credits, purchase_id=purchase_id,
                                         source=pb.CreditSource.Name(pb.CreditSource.Value(f"CREDIT_SOURCE_{source.upper()}")),
                                         reason=reason, price_minor_units=price_minor_units, currency=currency,
                                         pack_id=pack_id)
        if expires_at is not None:
            request.expires_at.FromDatetime(expires_at)
        try:
            r = self._stub.GrantCredits(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err, 1) from None
        return Grant(lot_id=r.lot.lot_id, credits=r.lot.credits_granted, expires_at=_time(r.lot.expires_at),
                     credit_balance=r.credit_balance, replayed=r.replayed, debt_paid_credits=r.debt_paid_credits)

    def set_cameo(self, cameo_id: str, owner_account_id: str, fee_credits: int, *, active: bool = True) -> Cameo:
        """Defines or changes a cameo: each job using it pays ``fee_credits`` to ``owner_account_id``.
        Every sidecar applies it within a few seconds; a hold keeps the fee it was made with."""
        request = pb.SetCameoRequest(cameo_id=cameo_id, owner_account_id=owner_account_id, fee_credits=fee_credits,
                                     active=active)
        try:
            r = self._stub.SetCameo(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err, 1) from None
        return _cameo(r.cameo)

    def get_cameo(self, cameo_id: str) -> Cameo:
        """The cameo as stored; ReservationError (NOT_FOUND, reason CAMEO_NOT_FOUND) when never set."""
        try:
            r = self._stub.GetCameo(pb.GetCameoRequest(cameo_id=cameo_id), timeout=self.timeout,
                                    metadata=self._metadata)
        except grpc.RpcError as err:
            raise _error(err, 1) from None
        return _cameo(r.cameo)


def _cameo(c: pb.Cameo) -> Cameo:
    return Cameo(cameo_id=c.cameo_id, owner_account_id=c.owner_account_id, fee_credits=c.fee_credits,
                 active=c.active, updated_at=_time(c.updated_at))
