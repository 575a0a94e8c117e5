"""The Redis store: the only module that talks to Redis.

Each operation is one Lua script (``quota_sidecar/lua/<name>.lua`` with the
shared ``_prelude.lua`` in front), registered once with redis-py's
``register_script`` (EVALSHA, re-loaded on NOSCRIPT) and run as ONE round
trip. All keys of an account share the hash tag of its bucket (see
account_key) so every script touches one Redis Cluster slot.

Every script is idempotent for the same arguments (reservation ids and
purchase ids are the keys), so a retried call after a timeout is safe.

Redis errors become quota_sidecar.errors here; script replies become the
plain values of quota_sidecar.model.
"""

from __future__ import annotations

import json
import zlib
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from .errors import Conflict, InvalidArgument, NotFound, QuotaError, ResolutionConflict, Unavailable
from .model import (
    AccountSettings,
    BalanceSnapshot,
    CommitResult,
    DenialReason,
    Funding,
    GrantResult,
    HoldInfo,
    ParamsInvalidForProduct,
    Lot,
    ReleaseResult,
    ReserveCommand,
    ReserveOutcome,
    StaleTimeZone,
    Window,
)

# Order matters: it is the KEYS[] order of _prelude.lua.
KEY_SUFFIXES = ("acct", "free", "lots", "lotrem", "lotexp", "holds", "res", "resdone")
SCRIPT_NAMES = ("reserve", "commit", "release", "extend", "grant", "set_account", "balance", "sweep")

# Redis replies that mean "not now" rather than "never".
_TRANSIENT_PREFIXES = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM", "NOREPLICAS")

_CONFLICTS = {"RESERVATION_PARAMS_MISMATCH", "COMMIT_COST_MISMATCH", "PURCHASE_ID_CONFLICT"}
_RESOLUTION = {"ALREADY_COMMITTED", "ALREADY_RELEASED", "EXPIRED", "COST_EXCEEDS_HOLD", "UNKNOWN_PLAN"}
_MESSAGES = {
    "RESERVATION_NOT_FOUND": "no such reservation for this account",
    "RESERVATION_PARAMS_MISMATCH": "reservation_id was already used with different parameters",
    "COMMIT_COST_MISMATCH": "the reservation was already committed at a different cost",
    "PURCHASE_ID_CONFLICT": "purchase_id was already granted with a different number of credits",
    "ALREADY_COMMITTED": "the reservation is already committed",
    "ALREADY_RELEASED": "the reservation is already released",
    "EXPIRED": "the reservation expired and its hold was refunded",
    "COST_EXCEEDS_HOLD": "the actual cost exceeds the credits held; commit without params to charge the hold",
    "UNKNOWN_PLAN": "the account's plan is not in the plans file",
    "CLOCK_SKEW": "this sidecar's clock is more than a day off Redis' clock",
}


def load_script_source(name: str) -> str:
    lua = resources.files("quota_sidecar").joinpath("lua")
    prelude = lua.joinpath("_prelude.lua").read_text(encoding="utf-8")
    body = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return f"{prelude}\n-- ==== {name}.lua ====\n{body}"


DEFAULT_KEY_BUCKETS = 256


def key_bucket(account_id: str, buckets: int) -> int:
    """The account's bucket: a stable hash, the same in every sidecar and language (CRC-32)."""
    return zlib.crc32(account_id.encode()) % buckets


def account_key(key_prefix: str, buckets: int, account_id: str, suffix: str) -> str:
    """``<prefix>:{b<bucket>}:<account>:<suffix>``.

    The hash tag is the account's bucket, not the account: every key of an
    account is still in one Redis Cluster slot, and a script can also write
    what its whole bucket shares (an events stream consumers read bucket by
    bucket). Suffixes have no ':' so names never collide.
    """
    return f"{key_prefix}:{{b{key_bucket(account_id, buckets)}}}:{account_id}:{suffix}"


def account_keys(key_prefix: str, buckets: int, account_id: str) -> list[str]:
    return [account_key(key_prefix, buckets, account_id, suffix) for suffix in KEY_SUFFIXES]


def _as_list(value: Any) -> list[Any]:
    # cjson encodes an empty Lua table as {}.
    return value if isinstance(value, list) else []


def _script_error(reply: Mapping[str, Any]) -> Exception:
    code = reply["error"]
    message = _MESSAGES.get(code, code)
    if code == "RESERVATION_NOT_FOUND":
        return NotFound(message)
    if code in _CONFLICTS:
        return Conflict(message, reason=code)
    if code in _RESOLUTION:
        return ResolutionConflict(message, reason=code)
    if code == "TZ_MISMATCH":
        return StaleTimeZone(reply["tz"])
    if code == "INVALID_PARAMS":
        return ParamsInvalidForProduct(reply["product"])
    if code == "EXPIRES_IN_PAST":
        return InvalidArgument("expires_at", "must be in the future")
    if code == "CLOCK_SKEW":
        return Unavailable(message, reason=code, retry_after_ms=1000)
    return QuotaError(f"unexpected script reply {code}", reason="STORE_ERROR")


def _redis_error(exc: redis_errors.RedisError) -> QuotaError:
    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
        return Unavailable(f"redis unreachable: {exc}")
    text = str(exc)
    if text.startswith(_TRANSIENT_PREFIXES):
        return Unavailable(f"redis cannot answer now: {text}")
    return QuotaError(f"redis error: {text}", reason="STORE_ERROR")


def _windows_args(windows: Sequence[Window]) -> list[Any]:
    args: list[Any] = [len(windows)]
    for w in windows:
        args += [w.label, w.start_ms, w.end_ms]
    return args


def _reserve_outcome(r: Mapping[str, Any]) -> ReserveOutcome:
    funding = r.get("funding")
    denial = r.get("denial")
    return ReserveOutcome(
        allowed=bool(r["allowed"]),
        plan=r["plan"],
        funding=Funding(funding) if funding else None,
        denial=DenialReason(denial) if denial else None,
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
    )


def _lots(flat: list[Any], granted: list[Any]) -> tuple[Lot, ...]:
    lots = []
    for i in range(0, len(flat), 3):
        j = 2 * (i // 3)
        lots.append(Lot(lot_id=flat[i], credits_left=int(flat[i + 1]), expires_ms=int(flat[i + 2]),
                        credits_granted=int(granted[j]), granted_ms=int(granted[j + 1])))
    return tuple(lots)


class RedisStore:
    """Quota state in one Redis (or one Redis Cluster slot per account)."""

    def __init__(self, client: aioredis.Redis, *, key_prefix: str = "qs", key_buckets: int = DEFAULT_KEY_BUCKETS,
                 retention_ms: int = 7 * 86_400_000) -> None:
        assert key_prefix and "{" not in key_prefix and "}" not in key_prefix
        assert 1 <= key_buckets <= 16384
        self._client = client
        self._prefix = key_prefix
        self._buckets = key_buckets
        self._retention_ms = retention_ms
        self._scripts = {name: client.register_script(load_script_source(name)) for name in SCRIPT_NAMES}

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float = 2.0, **kwargs: Any) -> "RedisStore":
        client = aioredis.from_url(
            url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds, decode_responses=True
        )
        return cls(client, **kwargs)

    @property
    def key_prefix(self) -> str:
        return self._prefix

    async def close(self) -> None:
        await self._client.aclose()

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc

    async def _run(self, name: str, account_id: str, args: Iterable[Any]) -> dict[str, Any]:
        try:
            raw = await self._scripts[name](keys=account_keys(self._prefix, self._buckets, account_id), args=list(args))
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc
        reply = json.loads(raw)
        if "error" in reply:
            raise _script_error(reply)
        return reply

    async def reserve(self, cmd: ReserveCommand) -> ReserveOutcome:
        args: list[Any] = [cmd.now_ms, cmd.reservation_id, cmd.product, cmd.fingerprint, cmd.ttl_ms,
                           cmd.cost_credits, self._retention_ms, cmd.default_plan, cmd.time_zone]
        args += _windows_args(cmd.windows)
        args.append(len(cmd.plan_rows))
        for row in cmd.plan_rows:
            args += [row.plan, row.free_limit, 1 if row.entitled else 0]
        return _reserve_outcome(await self._run("reserve", cmd.account_id, args))

    async def commit(self, account_id: str, reservation_id: str, costs: Mapping[str, int], now_ms: int = 0) -> CommitResult:
        args: list[Any] = [now_ms, reservation_id, self._retention_ms, len(costs)]
        for product, cost in costs.items():
            args += [product, cost]
        r = await self._run("commit", account_id, args)
        return CommitResult(funding=Funding(r["funding"]), credits_charged=int(r["charged"]),
                            credits_refunded=int(r["refunded"]), free_charged=int(r["free_charged"]),
                            credit_balance=int(r["balance"]), replayed=bool(r["replayed"]))

    async def release(self, account_id: str, reservation_id: str, now_ms: int = 0) -> ReleaseResult:
        r = await self._run("release", account_id, [now_ms, reservation_id, self._retention_ms])
        return ReleaseResult(funding=Funding(r["funding"]), credits_refunded=int(r["refunded"]),
                             free_refunded=int(r["free_refunded"]), credit_balance=int(r["balance"]),
                             replayed=bool(r["replayed"]))

    async def extend(self, account_id: str, reservation_id: str, ttl_ms: int, now_ms: int = 0) -> int:
        r = await self._run("extend", account_id, [now_ms, reservation_id, ttl_ms])
        return int(r["expires_ms"])

    async def grant(self, account_id: str, lot_id: str, credits: int, expires_ms: int, now_ms: int = 0) -> GrantResult:
        r = await self._run("grant", account_id, [now_ms, lot_id, credits, expires_ms, self._retention_ms])
        lot = Lot(lot_id=lot_id, credits_granted=int(r["granted"]), credits_left=int(r["left"]),
                  expires_ms=int(r["expires_ms"]), granted_ms=int(r["granted_ms"]))
        return GrantResult(lot=lot, credit_balance=int(r["balance"]), replayed=bool(r["replayed"]))

    async def set_account(self, account_id: str, plan: str, time_zone: str, default_plan: str) -> AccountSettings:
        r = await self._run("set_account", account_id, [plan, time_zone, default_plan])
        return AccountSettings(plan=r["plan"], time_zone=r["tz"])

    async def balance(self, account_id: str, *, time_zone: str, windows: Sequence[Window],
                      products: Sequence[str], default_plan: str, now_ms: int = 0) -> BalanceSnapshot:
        args: list[Any] = [now_ms, self._retention_ms, default_plan, time_zone]
        args += _windows_args(windows)
        args += [len(products), *products]
        r = await self._run("balance", account_id, args)
        free = _as_list(r["free"])
        holds = tuple(HoldInfo(reservation_id=h[0], product=h[1], funding=Funding(h[2]),
                               credits_held=int(h[3]), expires_ms=int(h[4])) for h in _as_list(r["holds"]))
        return BalanceSnapshot(
            plan=r["plan"], time_zone=r["tz"], now_ms=int(r["now_ms"]), free_resets_ms=int(r["resets_ms"]),
            free_used={free[i]: int(free[i + 1]) for i in range(0, len(free), 2)},
            credit_balance=int(r["balance"]), lots=_lots(_as_list(r["lots"]), _as_list(r["granted"])), holds=holds,
        )

    async def sweep_account(self, account_id: str, now_ms: int = 0) -> int:
        r = await self._run("sweep", account_id, [now_ms, self._retention_ms])
        return int(r["expired"])

    async def accounts_with_holds(self, *, batch: int = 500) -> list[str]:
        """Accounts that have unresolved holds (their holds key exists). O(keys) SCAN."""
        pattern = f"{self._prefix}:{{b*}}:*:holds"
        try:
            keys = [key async for key in self._client.scan_iter(match=pattern, count=batch, _type="zset")]
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc
        # <prefix>:{b<n>}:<account>:holds; account ids have no braces.
        return [key[key.index("}:") + 2:-len(":holds")] for key in keys]

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """A lease so that only one sidecar of a fleet runs a periodic job at a time."""
        try:
            return bool(await self._client.set(f"{self._prefix}:lock:{name}", owner, nx=True, px=ttl_ms))
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc
