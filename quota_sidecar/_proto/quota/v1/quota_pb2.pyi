import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Funding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUNDING_UNSPECIFIED: _ClassVar[Funding]
    FUNDING_FREE_QUOTA: _ClassVar[Funding]
    FUNDING_CREDITS: _ClassVar[Funding]

class DenialReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENIAL_REASON_UNSPECIFIED: _ClassVar[DenialReason]
    DENIAL_REASON_PURCHASE_REQUIRED: _ClassVar[DenialReason]
    DENIAL_REASON_NOT_ENTITLED: _ClassVar[DenialReason]
    DENIAL_REASON_BUDGET_EXCEEDED: _ClassVar[DenialReason]
    DENIAL_REASON_CONCURRENCY_LIMIT: _ClassVar[DenialReason]

class LimitKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIMIT_KIND_UNSPECIFIED: _ClassVar[LimitKind]
    LIMIT_KIND_DAY: _ClassVar[LimitKind]
    LIMIT_KIND_WEEK: _ClassVar[LimitKind]
    LIMIT_KIND_ROLLING: _ClassVar[LimitKind]

class CreditSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CREDIT_SOURCE_UNSPECIFIED: _ClassVar[CreditSource]
    CREDIT_SOURCE_PURCHASE: _ClassVar[CreditSource]
    CREDIT_SOURCE_PROMO: _ClassVar[CreditSource]
    CREDIT_SOURCE_REFUND: _ClassVar[CreditSource]
    CREDIT_SOURCE_COMPENSATION: _ClassVar[CreditSource]
FUNDING_UNSPECIFIED: Funding
FUNDING_FREE_QUOTA: Funding
FUNDING_CREDITS: Funding
DENIAL_REASON_UNSPECIFIED: DenialReason
DENIAL_REASON_PURCHASE_REQUIRED: DenialReason
DENIAL_REASON_NOT_ENTITLED: DenialReason
DENIAL_REASON_BUDGET_EXCEEDED: DenialReason
DENIAL_REASON_CONCURRENCY_LIMIT: DenialReason
LIMIT_KIND_UNSPECIFIED: LimitKind
LIMIT_KIND_DAY: LimitKind
LIMIT_KIND_WEEK: LimitKind
LIMIT_KIND_ROLLING: LimitKind
CREDIT_SOURCE_UNSPECIFIED: CreditSource
CREDIT_SOURCE_PURCHASE: CreditSource
CREDIT_SOURCE_PROMO: CreditSource
CREDIT_SOURCE_REFUND: CreditSource
CREDIT_SOURCE_COMPENSATION: CreditSource

class JobParams(_message.Message):
    __slots__ = ("duration_seconds", "resolution", "model", "units", "extra", "cameo_ids", "input_tokens", "cached_input_tokens", "output_tokens", "fast")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    CAMEO_IDS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FAST_FIELD_NUMBER: _ClassVar[int]
    duration_seconds: float
    resolution: str
    model: str
    units: int
    extra: _containers.ScalarMap[str, str]
    cameo_ids: _containers.RepeatedScalarFieldContainer[str]
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    fast: bool
    def __init__(self, duration_seconds: _Optional[float] = ..., resolution: _Optional[str] = ..., model: _Optional[str] = ..., units: _Optional[int] = ..., extra: _Optional[_Mapping[str, str]] = ..., cameo_ids: _Optional[_Iterable[str]] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., fast: _Optional[bool] = ...) -> None: ...

class LimitStatus(_message.Message):
    __slots__ = ("limit_id", "kind", "rolling_hours", "used", "limit", "resets_at", "shadow")
    LIMIT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLLING_HOURS_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    limit_id: str
    kind: LimitKind
    rolling_hours: int
    used: int
    limit: int
    resets_at: _timestamp_pb2.Timestamp
    shadow: bool
    def __init__(self, limit_id: _Optional[str] = ..., kind: _Optional[_Union[LimitKind, str]] = ..., rolling_hours: _Optional[int] = ..., used: _Optional[int] = ..., limit: _Optional[int] = ..., resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., shadow: _Optional[bool] = ...) -> None: ...

class LimitSpec(_message.Message):
    __slots__ = ("limit_id", "kind", "free", "rolling_hours", "shadow")
    LIMIT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    ROLLING_HOURS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    limit_id: str
    kind: LimitKind
    free: int
    rolling_hours: int
    shadow: bool
    def __init__(self, limit_id: _Optional[str] = ..., kind: _Optional[_Union[LimitKind, str]] = ..., free: _Optional[int] = ..., rolling_hours: _Optional[int] = ..., shadow: _Optional[bool] = ...) -> None: ...

class LimitOverride(_message.Message):
    __slots__ = ("product", "limits", "max_concurrent")
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    product: str
    limits: _containers.RepeatedCompositeFieldContainer[LimitSpec]
    max_concurrent: int
    def __init__(self, product: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[LimitSpec, _Mapping]]] = ..., max_concurrent: _Optional[int] = ...) -> None: ...

class Money(_message.Message):
    __slots__ = ("currency_code", "minor_units")
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    MINOR_UNITS_FIELD_NUMBER: _ClassVar[int]
    currency_code: str
    minor_units: int
    def __init__(self, currency_code: _Optional[str] = ..., minor_units: _Optional[int] = ...) -> None: ...

class CreditPack(_message.Message):
    __slots__ = ("pack_id", "credits", "price", "quantity", "total_price")
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PRICE_FIELD_NUMBER: _ClassVar[int]
    pack_id: str
    credits: int
    price: Money
    quantity: int
    total_price: Money
    def __init__(self, pack_id: _Optional[str] = ..., credits: _Optional[int] = ..., price: _Optional[_Union[Money, _Mapping]] = ..., quantity: _Optional[int] = ..., total_price: _Optional[_Union[Money, _Mapping]] = ...) -> None: ...

class Denial(_message.Message):
    __slots__ = ("reason", "message", "credits_short", "offers", "cameo_id", "debt_credits")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREDITS_SHORT_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    CAMEO_ID_FIELD_NUMBER: _ClassVar[int]
    DEBT_CREDITS_FIELD_NUMBER: _ClassVar[int]
    reason: DenialReason
    message: str
    credits_short: int
    offers: _containers.RepeatedCompositeFieldContainer[CreditPack]
    cameo_id: str
    debt_credits: int
    def __init__(self, reason: _Optional[_Union[DenialReason, str]] = ..., message: _Optional[str] = ..., credits_short: _Optional[int] = ..., offers: _Optional[_Iterable[_Union[CreditPack, _Mapping]]] = ..., cameo_id: _Optional[str] = ..., debt_credits: _Optional[int] = ...) -> None: ...

class CheckAndReserveRequest(_message.Message):
    __slots__ = ("account_id", "product", "reservation_id", "params", "ttl_seconds")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    product: str
    reservation_id: str
    params: JobParams
    ttl_seconds: int
    def __init__(self, account_id: _Optional[str] = ..., product: _Optional[str] = ..., reservation_id: _Optional[str] = ..., params: _Optional[_Union[JobParams, _Mapping]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CheckAndReserveResponse(_message.Message):
    __slots__ = ("allowed", "reservation_id", "funding", "credits_held", "free_used", "free_limit", "free_resets_at", "credit_balance", "expires_at", "denial", "job_cost_credits", "replayed", "limits", "shadow_limits", "plans_version", "degraded", "cameo_fees_credits", "allowance_unit")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    FUNDING_FIELD_NUMBER: _ClassVar[int]
    CREDITS_HELD_FIELD_NUMBER: _ClassVar[int]
    FREE_USED_FIELD_NUMBER: _ClassVar[int]
    FREE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    FREE_RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BALANCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DENIAL_FIELD_NUMBER: _ClassVar[int]
    JOB_COST_CREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_LIMITS_FIELD_NUMBER: _ClassVar[int]
    PLANS_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    CAMEO_FEES_CREDITS_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCE_UNIT_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reservation_id: str
    funding: Funding
    credits_held: int
    free_used: int
    free_limit: int
    free_resets_at: _timestamp_pb2.Timestamp
    credit_balance: int
    expires_at: _timestamp_pb2.Timestamp
    denial: Denial
    job_cost_credits: int
    replayed: bool
    limits: _containers.RepeatedCompositeFieldContainer[LimitStatus]
    shadow_limits: _containers.RepeatedScalarFieldContainer[str]
    plans_version: str
    degraded: bool
    cameo_fees_credits: int
    allowance_unit: str
    def __init__(self, allowed: _Optional[bool] = ..., reservation_id: _Optional[str] = ..., funding: _Optional[_Union[Funding, str]] = ..., credits_held: _Optional[int] = ..., free_used: _Optional[int] = ..., free_limit: _Optional[int] = ..., free_resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., credit_balance: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., denial: _Optional[_Union[Denial, _Mapping]] = ..., job_cost_credits: _Optional[int] = ..., replayed: _Optional[bool] = ..., limits: _Optional[_Iterable[_Union[LimitStatus, _Mapping]]] = ..., shadow_limits: _Optional[_Iterable[str]] = ..., plans_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., cameo_fees_credits: _Optional[int] = ..., allowance_unit: _Optional[str] = ...) -> None: ...

class QuoteRequest(_message.Message):
    __slots__ = ("account_id", "product", "reservation_id", "params", "ttl_seconds")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    product: str
    reservation_id: str
    params: JobParams
    ttl_seconds: int
    def __init__(self, account_id: _Optional[str] = ..., product: _Optional[str] = ..., reservation_id: _Optional[str] = ..., params: _Optional[_Union[JobParams, _Mapping]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class QuoteResponse(_message.Message):
    __slots__ = ("allowed", "reservation_id", "funding", "credits_held", "free_used", "free_limit", "free_resets_at", "credit_balance", "expires_at", "denial", "job_cost_credits", "replayed", "limits", "shadow_limits", "plans_version", "degraded", "cameo_fees_credits", "allowance_unit")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    FUNDING_FIELD_NUMBER: _ClassVar[int]
    CREDITS_HELD_FIELD_NUMBER: _ClassVar[int]
    FREE_USED_FIELD_NUMBER: _ClassVar[int]
    FREE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    FREE_RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BALANCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DENIAL_FIELD_NUMBER: _ClassVar[int]
    JOB_COST_CREDITS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_LIMITS_FIELD_NUMBER: _ClassVar[int]
    PLANS_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    CAMEO_FEES_CREDITS_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCE_UNIT_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reservation_id: str
    funding: Funding
    credits_held: int
    free_used: int
    free_limit: int
    free_resets_at: _timestamp_pb2.Timestamp
    credit_balance: int
    expires_at: _timestamp_pb2.Timestamp
    denial: Denial
    job_cost_credits: int
    replayed: bool
    limits: _containers.RepeatedCompositeFieldContainer[LimitStatus]
    shadow_limits: _containers.RepeatedScalarFieldContainer[str]
    plans_version: str
    degraded: bool
    cameo_fees_credits: int
    allowance_unit: str
    def __init__(self, allowed: _Optional[bool] = ..., reservation_id: _Optional[str] = ..., funding: _Optional[_Union[Funding, str]] = ..., credits_held: _Optional[int] = ..., free_used: _Optional[int] = ..., free_limit: _Optional[int] = ..., free_resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., credit_balance: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., denial: _Optional[_Union[Denial, _Mapping]] = ..., job_cost_credits: _Optional[int] = ..., replayed: _Optional[bool] = ..., limits: _Optional[_Iterable[_Union[LimitStatus, _Mapping]]] = ..., shadow_limits: _Optional[_Iterable[str]] = ..., plans_version: _Optional[str] = ..., degraded: _Optional[bool] = ..., cameo_fees_credits: _Optional[int] = ..., allowance_unit: _Optional[str] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("account_id", "reservation_id", "params")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    reservation_id: str
    params: JobParams
    def __init__(self, account_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., params: _Optional[_Union[JobParams, _Mapping]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("credits_charged", "credits_refunded", "free_charged", "funding", "credit_balance", "replayed", "degraded", "credits_written_off", "credits_drawn", "debt_credits", "included_usage_credits")
    CREDITS_CHARGED_FIELD_NUMBER: _ClassVar[int]
    CREDITS_REFUNDED_FIELD_NUMBER: _ClassVar[int]
    FREE_CHARGED_FIELD_NUMBER: _ClassVar[int]
    FUNDING_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BALANCE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    CREDITS_WRITTEN_OFF_FIELD_NUMBER: _ClassVar[int]
    CREDITS_DRAWN_FIELD_NUMBER: _ClassVar[int]
    DEBT_CREDITS_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_USAGE_CREDITS_FIELD_NUMBER: _ClassVar[int]
    credits_charged: int
    credits_refunded: int
    free_charged: int
    funding: Funding
    credit_balance: int
    replayed: bool
    degraded: bool
    credits_written_off: int
    credits_drawn: int
    debt_credits: int
    included_usage_credits: int
    def __init__(self, credits_charged: _Optional[int] = ..., credits_refunded: _Optional[int] = ..., free_charged: _Optional[int] = ..., funding: _Optional[_Union[Funding, str]] = ..., credit_balance: _Optional[int] = ..., replayed: _Optional[bool] = ..., degraded: _Optional[bool] = ..., credits_written_off: _Optional[int] = ..., credits_drawn: _Optional[int] = ..., debt_credits: _Optional[int] = ..., included_usage_credits: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("account_id", "reservation_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    reservation_id: str
    def __init__(self, account_id: _Optional[str] = ..., reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("credits_refunded", "free_refunded", "funding", "credit_balance", "replayed", "degraded")
    CREDITS_REFUNDED_FIELD_NUMBER: _ClassVar[int]
    FREE_REFUNDED_FIELD_NUMBER: _ClassVar[int]
    FUNDING_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BALANCE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    credits_refunded: int
    free_refunded: int
    funding: Funding
    credit_balance: int
    replayed: bool
    degraded: bool
    def __init__(self, credits_refunded: _Optional[int] = ..., free_refunded: _Optional[int] = ..., funding: _Optional[_Union[Funding, str]] = ..., credit_balance: _Optional[int] = ..., replayed: _Optional[bool] = ..., degraded: _Optional[bool] = ...) -> None: ...

class ExtendReservationRequest(_message.Message):
    __slots__ = ("account_id", "reservation_id", "ttl_seconds")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    reservation_id: str
    ttl_seconds: int
    def __init__(self, account_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ExtendReservationResponse(_message.Message):
    __slots__ = ("expires_at",)
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class ProductAllowance(_message.Message):
    __slots__ = ("product", "free_used", "free_limit", "free_resets_at", "limits", "jobs_in_flight", "max_concurrent", "overridden", "upcoming", "unit")
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    FREE_USED_FIELD_NUMBER: _ClassVar[int]
    FREE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    FREE_RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    JOBS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    OVERRIDDEN_FIELD_NUMBER: _ClassVar[int]
    UPCOMING_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    product: str
    free_used: int
    free_limit: int
    free_resets_at: _timestamp_pb2.Timestamp
    limits: _containers.RepeatedCompositeFieldContainer[LimitStatus]
    jobs_in_flight: int
    max_concurrent: int
    overridden: bool
    upcoming: _containers.RepeatedCompositeFieldContainer[ScheduledChange]
    unit: str
    def __init__(self, product: _Optional[str] = ..., free_used: _Optional[int] = ..., free_limit: _Optional[int] = ..., free_resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limits: _Optional[_Iterable[_Union[LimitStatus, _Mapping]]] = ..., jobs_in_flight: _Optional[int] = ..., max_concurrent: _Optional[int] = ..., overridden: _Optional[bool] = ..., upcoming: _Optional[_Iterable[_Union[ScheduledChange, _Mapping]]] = ..., unit: _Optional[str] = ...) -> None: ...

class ScheduledChange(_message.Message):
    __slots__ = ("effective_from", "limits", "max_concurrent")
    EFFECTIVE_FROM_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    effective_from: _timestamp_pb2.Timestamp
    limits: _containers.RepeatedCompositeFieldContainer[LimitSpec]
    max_concurrent: int
    def __init__(self, effective_from: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limits: _Optional[_Iterable[_Union[LimitSpec, _Mapping]]] = ..., max_concurrent: _Optional[int] = ...) -> None: ...

class CreditLot(_message.Message):
    __slots__ = ("lot_id", "credits_granted", "credits_left", "expires_at", "granted_at", "source", "revoked")
    LOT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_GRANTED_FIELD_NUMBER: _ClassVar[int]
    CREDITS_LEFT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    lot_id: str
    credits_granted: int
    credits_left: int
    expires_at: _timestamp_pb2.Timestamp
    granted_at: _timestamp_pb2.Timestamp
    source: CreditSource
    revoked: bool
    def __init__(self, lot_id: _Optional[str] = ..., credits_granted: _Optional[int] = ..., credits_left: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., granted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[_Union[CreditSource, str]] = ..., revoked: _Optional[bool] = ...) -> None: ...

class Hold(_message.Message):
    __slots__ = ("reservation_id", "product", "funding", "credits_held", "expires_at")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    FUNDING_FIELD_NUMBER: _ClassVar[int]
    CREDITS_HELD_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    product: str
    funding: Funding
    credits_held: int
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, reservation_id: _Optional[str] = ..., product: _Optional[str] = ..., funding: _Optional[_Union[Funding, str]] = ..., credits_held: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetBalanceResponse(_message.Message):
    __slots__ = ("account_id", "plan", "time_zone", "allowances", "credit_balance", "lots", "holds", "credits_held", "holds_total", "credits_expiring_30d", "expiring_lots", "debt_credits")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    ALLOWANCES_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BALANCE_FIELD_NUMBER: _ClassVar[int]
    LOTS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_HELD_FIELD_NUMBER: _ClassVar[int]
    HOLDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CREDITS_EXPIRING_30D_FIELD_NUMBER: _ClassVar[int]
    EXPIRING_LOTS_FIELD_NUMBER: _ClassVar[int]
    DEBT_CREDITS_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    plan: str
    time_zone: str
    allowances: _containers.RepeatedCompositeFieldContainer[ProductAllowance]
    credit_balance: int
    lots: _containers.RepeatedCompositeFieldContainer[CreditLot]
    holds: _containers.RepeatedCompositeFieldContainer[Hold]
    credits_held: int
    holds_total: int
    credits_expiring_30d: int
    expiring_lots: _containers.RepeatedCompositeFieldContainer[CreditLot]
    debt_credits: int
    def __init__(self, account_id: _Optional[str] = ..., plan: _Optional[str] = ..., time_zone: _Optional[str] = ..., allowances: _Optional[_Iterable[_Union[ProductAllowance, _Mapping]]] = ..., credit_balance: _Optional[int] = ..., lots: _Optional[_Iterable[_Union[CreditLot, _Mapping]]] = ..., holds: _Optional[_Iterable[_Union[Hold, _Mapping]]] = ..., credits_held: _Optional[int] = ..., holds_total: _Optional[int] = ..., credits_expiring_30d: _Optional[int] = ..., expiring_lots: _Optional[_Iterable[_Union[CreditLot, _Mapping]]] = ..., debt_credits: _Optional[int] = ...) -> None: ...

class GrantCreditsRequest(_message.Message):
    __slots__ = ("account_id", "credits", "purchase_id", "expires_at", "source", "reason", "price_minor_units", "currency", "pack_id")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    PURCHASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PRICE_MINOR_UNITS_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    credits: int
    purchase_id: str
    expires_at: _timestamp_pb2.Timestamp
    source: CreditSource
    reason: str
    price_minor_units: int
    currency: str
    pack_id: str
    def __init__(self, account_id: _Optional[str] = ..., credits: _Optional[int] = ..., purchase_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source: _Optional[_Union[CreditSource, str]] = ..., reason: _Optional[str] = ..., price_minor_units: _Optional[int] = ..., currency: _Optional[str] = ..., pack_id: _Optional[str] = ...) -> None: ...

class GrantCreditsResponse(_message.Message):
    __slots__ = ("lot", "credit_balance", "replayed", "debt_paid_credits")
    LOT_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BALANCE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    DEBT_PAID_CREDITS_FIELD_NUMBER: _ClassVar[int]
    lot: CreditLot
    credit_balance: int
    replayed: bool
    debt_paid_credits: int
    def __init__(self, lot: _Optional[_Union[CreditLot, _Mapping]] = ..., credit_balance: _Optional[int] = ..., replayed: _Optional[bool] = ..., debt_paid_credits: _Optional[int] = ...) -> None: ...

class RevokeCreditsRequest(_message.Message):
    __slots__ = ("account_id", "purchase_id", "reason")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PURCHASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    purchase_id: str
    reason: str
    def __init__(self, account_id: _Optional[str] = ..., purchase_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeCreditsResponse(_message.Message):
    __slots__ = ("credits_revoked", "credits_spent", "credits_held", "credit_balance", "replayed")
    CREDITS_REVOKED_FIELD_NUMBER: _ClassVar[int]
    CREDITS_SPENT_FIELD_NUMBER: _ClassVar[int]
    CREDITS_HELD_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BALANCE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    credits_revoked: int
    credits_spent: int
    credits_held: int
    credit_balance: int
    replayed: bool
    def __init__(self, credits_revoked: _Optional[int] = ..., credits_spent: _Optional[int] = ..., credits_held: _Optional[int] = ..., credit_balance: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RefundJobRequest(_message.Message):
    __slots__ = ("account_id", "reservation_id", "reason")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    reservation_id: str
    reason: str
    def __init__(self, account_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RefundJobResponse(_message.Message):
    __slots__ = ("credits_refunded", "free_refunded", "credit_balance", "replayed")
    CREDITS_REFUNDED_FIELD_NUMBER: _ClassVar[int]
    FREE_REFUNDED_FIELD_NUMBER: _ClassVar[int]
    CREDIT_BALANCE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    credits_refunded: int
    free_refunded: int
    credit_balance: int
    replayed: bool
    def __init__(self, credits_refunded: _Optional[int] = ..., free_refunded: _Optional[int] = ..., credit_balance: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class AutoTopUp(_message.Message):
    __slots__ = ("enabled", "threshold_credits", "pack_id")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_CREDITS_FIELD_NUMBER: _ClassVar[int]
    PACK_ID_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    threshold_credits: int
    pack_id: str
    def __init__(self, enabled: _Optional[bool] = ..., threshold_credits: _Optional[int] = ..., pack_id: _Optional[str] = ...) -> None: ...

class SetAccountRequest(_message.Message):
    __slots__ = ("account_id", "plan", "time_zone", "monthly_spend_cap_credits", "auto_topup", "overrides", "clear_overrides")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_SPEND_CAP_CREDITS_FIELD_NUMBER: _ClassVar[int]
    AUTO_TOPUP_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    CLEAR_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    plan: str
    time_zone: str
    monthly_spend_cap_credits: int
    auto_topup: AutoTopUp
    overrides: _containers.RepeatedCompositeFieldContainer[LimitOverride]
    clear_overrides: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, account_id: _Optional[str] = ..., plan: _Optional[str] = ..., time_zone: _Optional[str] = ..., monthly_spend_cap_credits: _Optional[int] = ..., auto_topup: _Optional[_Union[AutoTopUp, _Mapping]] = ..., overrides: _Optional[_Iterable[_Union[LimitOverride, _Mapping]]] = ..., clear_overrides: _Optional[_Iterable[str]] = ...) -> None: ...

class SetAccountResponse(_message.Message):
    __slots__ = ("plan", "time_zone", "monthly_spend_cap_credits", "auto_topup", "overrides")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_SPEND_CAP_CREDITS_FIELD_NUMBER: _ClassVar[int]
    AUTO_TOPUP_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    plan: str
    time_zone: str
    monthly_spend_cap_credits: int
    auto_topup: AutoTopUp
    overrides: _containers.RepeatedCompositeFieldContainer[LimitOverride]
    def __init__(self, plan: _Optional[str] = ..., time_zone: _Optional[str] = ..., monthly_spend_cap_credits: _Optional[int] = ..., auto_topup: _Optional[_Union[AutoTopUp, _Mapping]] = ..., overrides: _Optional[_Iterable[_Union[LimitOverride, _Mapping]]] = ...) -> None: ...

class GetAccountRequest(_message.Message):
    __slots__ = ("account_id",)
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    def __init__(self, account_id: _Optional[str] = ...) -> None: ...

class CreditTotals(_message.Message):
    __slots__ = ("granted", "spent", "expired", "revoked", "refunded", "held", "available")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    granted: int
    spent: int
    expired: int
    revoked: int
    refunded: int
    held: int
    available: int
    def __init__(self, granted: _Optional[int] = ..., spent: _Optional[int] = ..., expired: _Optional[int] = ..., revoked: _Optional[int] = ..., refunded: _Optional[int] = ..., held: _Optional[int] = ..., available: _Optional[int] = ...) -> None: ...

class GetAccountResponse(_message.Message):
    __slots__ = ("balance", "monthly_spend_cap_credits", "month_spend_credits", "month_resets_at", "auto_topup", "totals", "all_lots", "overrides")
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    MONTHLY_SPEND_CAP_CREDITS_FIELD_NUMBER: _ClassVar[int]
    MONTH_SPEND_CREDITS_FIELD_NUMBER: _ClassVar[int]
    MONTH_RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    AUTO_TOPUP_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    ALL_LOTS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    balance: GetBalanceResponse
    monthly_spend_cap_credits: int
    month_spend_credits: int
    month_resets_at: _timestamp_pb2.Timestamp
    auto_topup: AutoTopUp
    totals: CreditTotals
    all_lots: _containers.RepeatedCompositeFieldContainer[CreditLot]
    overrides: _containers.RepeatedCompositeFieldContainer[LimitOverride]
    def __init__(self, balance: _Optional[_Union[GetBalanceResponse, _Mapping]] = ..., monthly_spend_cap_credits: _Optional[int] = ..., month_spend_credits: _Optional[int] = ..., month_resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., auto_topup: _Optional[_Union[AutoTopUp, _Mapping]] = ..., totals: _Optional[_Union[CreditTotals, _Mapping]] = ..., all_lots: _Optional[_Iterable[_Union[CreditLot, _Mapping]]] = ..., overrides: _Optional[_Iterable[_Union[LimitOverride, _Mapping]]] = ...) -> None: ...

class ListLedgerRequest(_message.Message):
    __slots__ = ("account_id", "page_size", "page_token")
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account_id: str
    page_size: int
    page_token: str
    def __init__(self, account_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("id", "at", "type", "reservation_id", "purchase_id", "product", "funding", "credits", "free_units", "plans_version", "reason", "totals_after", "seq", "credits_available_delta", "credits_held_delta", "free_units_delta", "debt_delta", "lots", "royalties", "fees_credits", "cost_credits", "credits_returned", "credits_written_off", "credits_drawn", "drawn_lots", "usage_credits")
    ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    PURCHASE_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    FUNDING_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    FREE_UNITS_FIELD_NUMBER: _ClassVar[int]
    PLANS_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TOTALS_AFTER_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CREDITS_AVAILABLE_DELTA_FIELD_NUMBER: _ClassVar[int]
    CREDITS_HELD_DELTA_FIELD_NUMBER: _ClassVar[int]
    FREE_UNITS_DELTA_FIELD_NUMBER: _ClassVar[int]
    DEBT_DELTA_FIELD_NUMBER: _ClassVar[int]
    LOTS_FIELD_NUMBER: _ClassVar[int]
    ROYALTIES_FIELD_NUMBER: _ClassVar[int]
    FEES_CREDITS_FIELD_NUMBER: _ClassVar[int]
    COST_CREDITS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_RETURNED_FIELD_NUMBER: _ClassVar[int]
    CREDITS_WRITTEN_OFF_FIELD_NUMBER: _ClassVar[int]
    CREDITS_DRAWN_FIELD_NUMBER: _ClassVar[int]
    DRAWN_LOTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_CREDITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    at: _timestamp_pb2.Timestamp
    type: str
    reservation_id: str
    purchase_id: str
    product: str
    funding: Funding
    credits: int
    free_units: int
    plans_version: str
    reason: str
    totals_after: CreditTotals
    seq: int
    credits_available_delta: int
    credits_held_delta: int
    free_units_delta: int
    debt_delta: int
    lots: _containers.RepeatedCompositeFieldContainer[LotPortion]
    royalties: _containers.RepeatedCompositeFieldContainer[Royalty]
    fees_credits: int
    cost_credits: int
    credits_returned: int
    credits_written_off: int
    credits_drawn: int
    drawn_lots: _containers.RepeatedCompositeFieldContainer[LotPortion]
    usage_credits: int
    def __init__(self, id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., type: _Optional[str] = ..., reservation_id: _Optional[str] = ..., purchase_id: _Optional[str] = ..., product: _Optional[str] = ..., funding: _Optional[_Union[Funding, str]] = ..., credits: _Optional[int] = ..., free_units: _Optional[int] = ..., plans_version: _Optional[str] = ..., reason: _Optional[str] = ..., totals_after: _Optional[_Union[CreditTotals, _Mapping]] = ..., seq: _Optional[int] = ..., credits_available_delta: _Optional[int] = ..., credits_held_delta: _Optional[int] = ..., free_units_delta: _Optional[int] = ..., debt_delta: _Optional[int] = ..., lots: _Optional[_Iterable[_Union[LotPortion, _Mapping]]] = ..., royalties: _Optional[_Iterable[_Union[Royalty, _Mapping]]] = ..., fees_credits: _Optional[int] = ..., cost_credits: _Optional[int] = ..., credits_returned: _Optional[int] = ..., credits_written_off: _Optional[int] = ..., credits_drawn: _Optional[int] = ..., drawn_lots: _Optional[_Iterable[_Union[LotPortion, _Mapping]]] = ..., usage_credits: _Optional[int] = ...) -> None: ...

class LotPortion(_message.Message):
    __slots__ = ("lot_id", "credits")
    LOT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    lot_id: str
    credits: int
    def __init__(self, lot_id: _Optional[str] = ..., credits: _Optional[int] = ...) -> None: ...

class Royalty(_message.Message):
    __slots__ = ("cameo_id", "owner_account_id", "credits")
    CAMEO_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    cameo_id: str
    owner_account_id: str
    credits: int
    def __init__(self, cameo_id: _Optional[str] = ..., owner_account_id: _Optional[str] = ..., credits: _Optional[int] = ...) -> None: ...

class ListLedgerResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message", "field", "reason", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    field: str
    reason: str
    retry_after_ms: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class CheckAndReserveBatchRequest(_message.Message):
    __slots__ = ("items", "all_or_nothing")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ALL_OR_NOTHING_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CheckAndReserveRequest]
    all_or_nothing: bool
    def __init__(self, items: _Optional[_Iterable[_Union[CheckAndReserveRequest, _Mapping]]] = ..., all_or_nothing: _Optional[bool] = ...) -> None: ...

class BatchReserveResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: CheckAndReserveResponse
    error: ItemError
    def __init__(self, response: _Optional[_Union[CheckAndReserveResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class CheckAndReserveBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchReserveResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchReserveResult, _Mapping]]] = ...) -> None: ...

class CommitBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[CommitRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[CommitRequest, _Mapping]]] = ...) -> None: ...

class BatchCommitResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: CommitResponse
    error: ItemError
    def __init__(self, response: _Optional[_Union[CommitResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class CommitBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchCommitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchCommitResult, _Mapping]]] = ...) -> None: ...

class ReleaseBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReleaseRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[ReleaseRequest, _Mapping]]] = ...) -> None: ...

class BatchReleaseResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: ReleaseResponse
    error: ItemError
    def __init__(self, response: _Optional[_Union[ReleaseResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ReleaseBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchReleaseResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchReleaseResult, _Mapping]]] = ...) -> None: ...

class Cameo(_message.Message):
    __slots__ = ("cameo_id", "owner_account_id", "fee_credits", "active", "updated_at")
    CAMEO_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    FEE_CREDITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    cameo_id: str
    owner_account_id: str
    fee_credits: int
    active: bool
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, cameo_id: _Optional[str] = ..., owner_account_id: _Optional[str] = ..., fee_credits: _Optional[int] = ..., active: _Optional[bool] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetCameoRequest(_message.Message):
    __slots__ = ("cameo_id", "owner_account_id", "fee_credits", "active")
    CAMEO_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    FEE_CREDITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    cameo_id: str
    owner_account_id: str
    fee_credits: int
    active: bool
    def __init__(self, cameo_id: _Optional[str] = ..., owner_account_id: _Optional[str] = ..., fee_credits: _Optional[int] = ..., active: _Optional[bool] = ...) -> None: ...

class SetCameoResponse(_message.Message):
    __slots__ = ("cameo",)
    CAMEO_FIELD_NUMBER: _ClassVar[int]
    cameo: Cameo
    def __init__(self, cameo: _Optional[_Union[Cameo, _Mapping]] = ...) -> None: ...

class GetCameoRequest(_message.Message):
    __slots__ = ("cameo_id",)
    CAMEO_ID_FIELD_NUMBER: _ClassVar[int]
    cameo_id: str
    def __init__(self, cameo_id: _Optional[str] = ...) -> None: ...

class GetCameoResponse(_message.Message):
    __slots__ = ("cameo",)
    CAMEO_FIELD_NUMBER: _ClassVar[int]
    cameo: Cameo
    def __init__(self, cameo: _Optional[_Union[Cameo, _Mapping]] = ...) -> None: ...
