"""The error hierarchy of quota-sidecar.

Operating errors are exceptions of this module; programmer errors are
assertions. Redis errors become these in the store (quota_sidecar.storage.store),
PostgreSQL errors in the books (quota_sidecar.books.pg); these become gRPC
status codes in the servicer (quota_sidecar.server.servicer), and nowhere else.

    QuotaError
    ├── InvalidArgument      bad input; names the offending field  -> INVALID_ARGUMENT
    ├── NotFound             unknown reservation                   -> NOT_FOUND
    ├── Conflict             an id reused with different fields    -> ALREADY_EXISTS
    ├── ResolutionConflict   reservation already resolved, cost
    │                        above the hold, plan gone             -> FAILED_PRECONDITION
    ├── Unavailable          cannot answer now; retry              -> UNAVAILABLE
    │   ├── StoreUnavailable Redis unreachable or busy (the only
    │   │                    case fail_open_free decides without it)
    │   └── BooksUnavailable PostgreSQL (the books) unreachable or
    │                        failing now; decisions never wait for it
    ├── BatchAborted         an item of an all_or_nothing batch
    │                        not held because another was refused  -> ABORTED (batch item only)
    ├── PlansError           the plans file is invalid (start-up, CLI)
    └── ConfigError          a setting (flag, QUOTA_* variable) is invalid (start-up, CLI)
"""

from __future__ import annotations


class QuotaError(Exception):
    """Base of every operating error the sidecar reports."""

    #: Machine-readable reason (google.rpc.ErrorInfo.reason); stable API.
    reason: str = "QUOTA_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(QuotaError):
    """A request field is malformed or out of range; nothing was changed."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotFound(QuotaError):
    reason = "RESERVATION_NOT_FOUND"


class Conflict(QuotaError):
    """A retry reused an idempotency key with different fields."""

    reason = "RESERVATION_PARAMS_MISMATCH"


class ResolutionConflict(QuotaError):
    """The reservation cannot take this outcome (already resolved otherwise)."""

    reason = "ALREADY_RESOLVED"


class Unavailable(QuotaError):
    """The store cannot be reached or cannot answer now; retry later."""

    reason = "STORE_UNAVAILABLE"

    def __init__(self, message: str, *, retry_after_ms: int = 200, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_ms = retry_after_ms


class StoreUnavailable(Unavailable):
    """The store itself could not be reached or could not answer (a connection error, a
    timeout, Redis loading or out of memory): the only case a fail_open_free product may
    decide without it. Other Unavailable reasons (replicas behind, clock skew) never fail open."""


class BooksUnavailable(Unavailable):
    """The books (PostgreSQL, quota_sidecar.books) could not be reached or could not answer now:
    a connection error, a restart, a deadlock, a serialization failure or a timeout. The shipper
    and the books' readers (ListLedger, the audit, the finance tools) see it; a reservation never
    waits for the books, so it never decides differently because of this. Retry later: what is
    not shipped yet stays in Redis' outbox."""

    reason = "BOOKS_UNAVAILABLE"


class BatchAborted(QuotaError):
    """An item of an all_or_nothing batch that would have been allowed, not held because
    another item of the batch was not allowed. Only ever an item's result, never raised."""

    reason = "ALL_OR_NOTHING_ABORTED"

    def __init__(self, message: str = "not held: another item of this all_or_nothing batch was not allowed") -> None:
        super().__init__(message)


class PlansError(QuotaError):
    """The plans file is invalid; `field` is a dotted path such as plans.pro.sora.daily_free."""

    reason = "INVALID_PLANS"

    def __init__(self, field: str, description: str, *, source: str = "") -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {description}")
        self.field = field
        self.description = description
        self.source = source


class ConfigError(QuotaError):
    """A setting is invalid: `field` is the Settings field (its flag and QUOTA_* variable follow
    from it). Reported at start-up, never to a caller: not a request error."""

    reason = "INVALID_SETTING"

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


# Signals between the store and the engine, never reported to a caller as such.

class StaleTimeZone(Exception):
    """The store's account zone differs from the one the engine assumed.

    Not an operating error: the engine recomputes the windows for ``time_zone``
    and asks again. Nothing was written.
    """

    def __init__(self, time_zone: str) -> None:
        super().__init__(time_zone)
        self.time_zone = time_zone


class ParamsInvalidForProduct(Exception):
    """Commit params do not fit the reserved product (priced with plans version ``pv``, or
    "*" for the current plans); the engine knows why."""

    def __init__(self, product: str, pv: str = "*") -> None:
        super().__init__(product)
        self.product = product
        self.pv = pv
