"""The Redis store: the only module that talks to Redis.

Each operation is one Lua script (``quota_sidecar/lua/<name>.lua`` with the
shared ``_prelude.lua`` in front), registered once with redis-py's
``register_script`` (EVALSHA, re-loaded on NOSCRIPT) and run as ONE round
trip. All keys of an account share the hash tag of its bucket (see
account_key) so every script touches one Redis Cluster slot.

Every script is idempotent for the same arguments (reservation ids and
purchase ids are the keys), so a retried call after a timeout is safe.

Redis errors become quota_sidecar.domain.errors here; script replies become the
plain values of quota_sidecar.domain.model. Reads that decide nothing (the ledger
pages, the audit's view of an account) are plain commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import zlib
from importlib import resources
from typing import Any, Callable, Iterable, Mapping, Sequence

from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster

from quota_sidecar.storage import connect as redis_connect

from quota_sidecar.storage import mux as redis_mux
from quota_sidecar.domain.errors import BatchAborted, Conflict, InvalidArgument, NotFound, QuotaError, ResolutionConflict, Unavailable
from quota_sidecar.domain.model import (
    AccountChanges,
    ActualCost,
    Allowance,
    Limit,
    LimitKind,
    LimitOverride,
    LimitStatus,
    headline,
    AccountSettings,
    AutoTopUp,
    BalanceSnapshot,
    CommitResult,
    CreditPack,
    CreditSource,
    CreditTotals,
    DenialReason,
    Funding,
    GrantResult,
    HoldInfo,
    LedgerEntry,
    Lot,
    ParamsInvalidForProduct,
    RefundResult,
    ReleaseResult,
    ReserveCommand,
    ReserveOutcome,
    RevokeResult,
    Segment,
    Stamp,
    StaleTimeZone,
    Window,
)
from quota_sidecar.server.telemetry import Telemetry

# Order matters: it is the KEYS[] order of _prelude.lua. The last key is the
# bucket's events stream, shared by the bucket's accounts.
KEY_SUFFIXES = ("acct", "free", "lots", "lotrem", "lotexp", "holds", "res", "resdone", "ledger", "notes", "spend",
                "rolling", "inflight")
SCRIPT_NAMES = ("reserve", "commit", "release", "extend", "grant", "revoke", "refund_job", "set_account",
                "balance", "sweep", "degraded", "reserve_all")
# Shared pieces prepended (after _prelude.lua) to the scripts that use them: reserve_all
# runs reserve's whole decision once per item.
_SCRIPT_LIBRARIES = {"reserve": ("_reserve",), "reserve_all": ("_reserve",)}
DEFAULT_KEY_BUCKETS = 256

# Redis replies that mean "not now" rather than "never".
_TRANSIENT_PREFIXES = ("BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM", "NOREPLICAS")

_NOT_FOUND = {"RESERVATION_NOT_FOUND", "PURCHASE_NOT_FOUND"}
_CONFLICTS = {"RESERVATION_PARAMS_MISMATCH", "COMMIT_COST_MISMATCH", "PURCHASE_ID_CONFLICT"}
_RESOLUTION = {"ALREADY_COMMITTED", "ALREADY_RELEASED", "EXPIRED", "COST_EXCEEDS_HOLD", "UNKNOWN_PLAN",
               "NOT_COMMITTED", "ACTUAL_NOT_ENTITLED"}
_MESSAGES = {
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
}
_TOTAL_FIELDS = {"g": "granted", "s": "spent", "x": "expired", "v": "revoked", "r": "refunded", "h": "held"}


# Before the one retry of a script whose connection dropped (a restarted Redis).
_RECONNECT_PAUSE_SECONDS = 0.01


def load_script_source(name: str) -> str:
    lua = resources.files("quota_sidecar.storage").joinpath("lua")
    parts = [lua.joinpath("_prelude.lua").read_text(encoding="utf-8")]
    for piece in (*_SCRIPT_LIBRARIES.get(name, ()), name):
        parts.append(f"-- ==== {piece}.lua ====\n" + lua.joinpath(f"{piece}.lua").read_text(encoding="utf-8"))
    return "\n".join(parts)


def key_bucket(account_id: str, buckets: int) -> int:
    """The account's bucket: a stable hash, the same in every sidecar and language (CRC-32)."""
    return zlib.crc32(account_id.encode()) % buckets


def bucket_tag(key_prefix: str, bucket: int) -> str:
    return f"{key_prefix}:{{b{bucket}}}"


def account_key(key_prefix: str, buckets: int, account_id: str, suffix: str) -> str:
    """``<prefix>:{b<bucket>}:<account>:<suffix>``.

    The hash tag is the account's bucket, not the account: every key of an
    account is still in one Redis Cluster slot, and a script can also write
    what its whole bucket shares (the events stream consumers read bucket by
    bucket). Suffixes have no ':' so names never collide.
    """
    return f"{bucket_tag(key_prefix, key_bucket(account_id, buckets))}:{account_id}:{suffix}"


def events_key(key_prefix: str, bucket: int) -> str:
    """The bucket's usage-events stream; ``<prefix>:{b<bucket>}:events``."""
    return f"{bucket_tag(key_prefix, bucket)}:events"


def account_keys(key_prefix: str, buckets: int, account_id: str) -> list[str]:
    return list(_script_keys(key_prefix, buckets, account_id))


class _ScriptKeys(tuple):  # type: ignore[type-arg]
    """An account's KEYS[], with their encoding for the multiplexed connection."""

    packed: redis_mux.Packed


# Scripts to send together: (script name, its KEYS, its ARGV) each.
_Sent = Sequence[tuple[str, _ScriptKeys, list[Any]]]


@functools.lru_cache(maxsize=65_536)
def _script_keys(key_prefix: str, buckets: int, account_id: str) -> _ScriptKeys:
    """KEYS[] of every script of an account (cached for the accounts in recent use)."""
    keys = [account_key(key_prefix, buckets, account_id, suffix) for suffix in KEY_SUFFIXES]
    keys.append(events_key(key_prefix, key_bucket(account_id, buckets)))
    script_keys = _ScriptKeys(keys)
    script_keys.packed = redis_mux.Packed(keys)
    return script_keys


def _as_list(value: Any) -> list[Any]:
    # cjson encodes an empty Lua table as {}.
    return value if isinstance(value, list) else []


def _script_error(reply: Mapping[str, Any]) -> Exception:
    code = reply["error"]
    message = _MESSAGES.get(code, code)
    if code in _NOT_FOUND:
        return NotFound(message, reason=code)
    if code in _CONFLICTS:
        return Conflict(message, reason=code)
    if code in _RESOLUTION:
        return ResolutionConflict(message, reason=code)
    if code == "TZ_MISMATCH":
        return StaleTimeZone(reply["tz"])
    if code == "INVALID_PARAMS":
        return ParamsInvalidForProduct(reply["product"], reply.get("pv") or "*")
    if code == "EXPIRES_IN_PAST":
        return InvalidArgument("expires_at", "must be in the future")
    if code == "CLOCK_SKEW":
        return Unavailable(message, reason=code, retry_after_ms=1000)
    return QuotaError(f"unexpected script reply {code}", reason="STORE_ERROR")


# redis-py strips the code of these replies from the message, so they are known by type.
_TRANSIENT_TYPES = (redis_errors.BusyLoadingError, redis_errors.ReadOnlyError, redis_errors.TryAgainError,
                    redis_errors.OutOfMemoryError,
                    # CLUSTERDOWN, MASTERDOWN, and redirections or TRYAGAIN past redis-py's limit
                    # ("TTL exhausted") while a slot moves or a replica is promoted.
                    redis_errors.ClusterError,
                    # No node serves the slot in redis-py's map (a failover in progress).
                    redis_errors.SlotNotCoveredError)


def _redis_error(exc: redis_errors.RedisError) -> QuotaError:
    if isinstance(exc, (redis_errors.ConnectionError, redis_errors.TimeoutError)):
        return Unavailable(f"redis unreachable: {exc}")
    text = str(exc)
    if isinstance(exc, _TRANSIENT_TYPES) or text.startswith(_TRANSIENT_PREFIXES):
        code = getattr(exc, "status_code", None) or type(exc).__name__
        return Unavailable(f"redis cannot answer now: {code} {text}")
    return QuotaError(f"redis error: {text}", reason="STORE_ERROR")


def _block(rows: Sequence[Sequence[Any]]) -> list[Any]:
    """A count and its rows, as the scripts' next_block() reads them."""
    args: list[Any] = [len(rows)]
    for row in rows:
        args += list(row)
    return args


def _windows(windows: Sequence[Window]) -> list[Any]:
    return _block([(w.label, w.start_ms, w.end_ms) for w in windows])


def _limits_json(limits: Sequence[Limit]) -> str:
    return json.dumps([limit.as_json() for limit in limits], separators=(",", ":"))


def _limit_statuses(rows: Any) -> tuple[LimitStatus, ...]:
    """Script rows {id, kind, hours, used, limit, resets_ms, shadow} as values."""
    return tuple(LimitStatus(limit=Limit(limit_id=r[0], kind=LimitKind(r[1]), free=int(r[4]), hours=int(r[2]),
                                         shadow=bool(r[6])), used=int(r[3]), resets_ms=int(r[5]))
                 for r in _as_list(rows))


def _override(product: str, raw: str) -> LimitOverride:
    o = json.loads(raw)
    limits = tuple(Limit(limit_id=x["id"], kind=LimitKind(x["kind"]), free=int(x["free"]), hours=int(x["hours"]),
                         shadow=bool(x["shadow"])) for x in _as_list(o["limits"]))
    return LimitOverride(product=product, limits=limits, max_concurrent=int(o["max_concurrent"]))


def _overrides(rows: Any) -> tuple[LimitOverride, ...]:
    return tuple(sorted((_override(p, raw) for p, raw in _as_list(rows)), key=lambda o: o.product))


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
        limits=_limit_statuses(r.get("limits")),
        shadow_limits=tuple(_as_list(r.get("shadow"))),
        plans_version=r.get("pv", ""),
    )


class _PackedBlocks:
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
        if hit is not None and all(a is b for a, b in zip(hit[0], values)):
            return hit[1]
        packed = redis_mux.Packed(build())
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
        self._entries[key] = (values, packed)
        return packed


_PACKED_BLOCKS = _PackedBlocks(4096)


def _plan_args(segments: Sequence[Segment], packs: Sequence[CreditPack]) -> list[Any]:
    args: list[Any] = [len(segments)]
    for seg in segments:
        args += [seg.from_ms, seg.cost_credits, seg.plans_version]
        args += _block([(r.plan, 1 if r.entitled else 0, r.credits_low, r.max_concurrent,
                         1 if r.concurrency_shadow else 0, _limits_json(r.limits)) for r in seg.plan_rows])
    return args + _block([(p.pack_id, p.credits, p.price.minor_units, p.price.currency_code) for p in packs])


def _reserve_args(cmd: ReserveCommand) -> list[Any]:
    """reserve.lua's arguments after the header (reserve_all.lua reads them once per item)."""
    windows = _PACKED_BLOCKS.get((cmd.windows, cmd.weeks, cmd.months),
                                 lambda: _windows(cmd.windows) + _windows(cmd.weeks) + _windows(cmd.months))
    plan = _PACKED_BLOCKS.get((cmd.segments, cmd.packs), lambda: _plan_args(cmd.segments, cmd.packs))
    return [cmd.reservation_id, cmd.product, cmd.fingerprint, cmd.ttl_ms, cmd.default_plan, cmd.time_zone,
            cmd.free_warning_percent, windows, plan]


def _commit_args(reservation_id: str, costs: Mapping[tuple[str, str], ActualCost]) -> list[Any]:
    return [reservation_id, *_block([(pv, product, c.cost_credits, "|" + "|".join(c.entitled_plans) + "|")
                                     for (pv, product), c in costs.items()])]


def _commit_result(r: Mapping[str, Any]) -> CommitResult:
    return CommitResult(funding=Funding(r["funding"]), credits_charged=int(r["charged"]),
                        credits_refunded=int(r["refunded"]), free_charged=int(r["free_charged"]),
                        credit_balance=int(r["balance"]), replayed=bool(r["replayed"]))


def _release_result(r: Mapping[str, Any]) -> ReleaseResult:
    return ReleaseResult(funding=Funding(r["funding"]), credits_refunded=int(r["refunded"]),
                         free_refunded=int(r["free_refunded"]), credit_balance=int(r["balance"]),
                         replayed=bool(r["replayed"]))


def _allowance(row: list[Any], default_resets_ms: int) -> Allowance:
    statuses = _limit_statuses(row[1])
    used, limit, resets_ms = headline(statuses, default_resets_ms)
    return Allowance(product=row[0], free_used=used, free_limit=limit, free_resets_ms=resets_ms, limits=statuses,
                     jobs_in_flight=int(row[2]), max_concurrent=int(row[3]), overridden=bool(row[4]))


def _live_lots(flat: list[Any], metas: Mapping[str, Lot]) -> tuple[Lot, ...]:
    lots = []
    for i in range(0, len(flat), 3):
        meta = metas[flat[i]]
        lots.append(Lot(lot_id=flat[i], credits_left=int(flat[i + 1]), expires_ms=int(flat[i + 2]),
                        credits_granted=meta.credits_granted, granted_ms=meta.granted_ms, source=meta.source))
    return tuple(lots)


def _all_lots(rows: list[Any]) -> tuple[Lot, ...]:
    lots = [Lot(lot_id=r[0], credits_granted=int(r[1]), credits_left=int(r[2]), expires_ms=int(r[3]),
                granted_ms=int(r[4]), source=CreditSource(r[5]), revoked=bool(r[6])) for r in rows]
    return tuple(sorted(lots, key=lambda lot: (lot.expires_ms, lot.source.rank, lot.lot_id)))


def _totals(values: Mapping[str, Any], available: int) -> CreditTotals:
    def get(name: str) -> int:
        return int(values.get(name) or 0)

    return CreditTotals(granted=get("credits_granted"), spent=get("credits_spent"), expired=get("credits_expired"),
                        revoked=get("credits_revoked"), refunded=get("credits_refunded"), held=get("credits_held"),
                        available=available)


def _auto_topup(r: Mapping[str, Any]) -> AutoTopUp:
    return AutoTopUp(enabled=r["at_on"] == "1", threshold_credits=int(r["at_thr"]), pack_id=r["at_pack"])


def ledger_entry(entry_id: str, raw: Mapping[str, str]) -> LedgerEntry:
    """A ledger stream entry; the snapshot fields become ``totals_after``."""
    totals = {name: int(raw.get(short) or 0) for short, name in _TOTAL_FIELDS.items()}
    available = totals["granted"] + totals["refunded"] - totals["spent"] - totals["expired"] - totals["revoked"] \
        - totals["held"]
    rest = {k: v for k, v in raw.items() if k not in _TOTAL_FIELDS and k not in ("type", "t")}
    return LedgerEntry(entry_id=entry_id, at_ms=int(raw.get("t") or 0), type=raw.get("type", ""), fields=rest,
                       totals_after=CreditTotals(available=available, **totals))


class RedisStore:
    """Quota state in one Redis (or one Redis Cluster slot per account bucket)."""

    def __init__(self, client: redis_connect.RedisClient, *, key_prefix: str = "qs",
                 key_buckets: int = DEFAULT_KEY_BUCKETS, retention_ms: int = 7 * 86_400_000,
                 ledger_retention_ms: int = 400 * 86_400_000, events_max_entries: int = 100_000,
                 max_records_per_account: int = 2_000, max_open_holds_per_account: int = 1_000,
                 grant_min_replicas: int = 0, grant_wait_timeout_ms: int = 1000, timeout_seconds: float = 2.0,
                 multiplex: bool = True, telemetry: Telemetry | None = None) -> None:
        assert key_prefix and "{" not in key_prefix and "}" not in key_prefix
        assert 1 <= key_buckets <= 16384
        self._client = client
        self._prefix = key_prefix
        self._buckets = key_buckets
        self._retention_ms = retention_ms
        self._ledger_retention_ms = ledger_retention_ms
        self._events_max = events_max_entries
        assert max_records_per_account >= 1 and max_open_holds_per_account >= 1
        self._max_records = max_records_per_account
        self._max_holds = max_open_holds_per_account
        self._grant_min_replicas = grant_min_replicas
        self._grant_wait_timeout_ms = grant_wait_timeout_ms
        self._scripts = {name: client.register_script(load_script_source(name)) for name in SCRIPT_NAMES}
        self._renew_lease = client.register_script(
            resources.files("quota_sidecar.storage").joinpath("lua", "renew_lease.lua").read_text(encoding="utf-8"))
        self._cluster = isinstance(client, RedisCluster)
        self._loading: dict[str, asyncio.Future[None]] = {}  # script name -> its SCRIPT LOAD in flight
        # Latency and errors of each script round trip (metrics; spans when tracing is on).
        self._telemetry = telemetry or Telemetry()
        # Scripts go over one multiplexed connection when Redis is a plain single server
        # (see redis_mux); everything else, and TLS, Sentinel and Cluster, use redis-py.
        self._mux = redis_mux.MuxConnection.for_client(client, timeout_seconds=timeout_seconds) if multiplex else None

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float = 2.0, redis_mode: str = "auto",
                 **kwargs: Any) -> "RedisStore":
        """One Redis, a Redis Cluster or a Sentinel-managed master; see quota_sidecar.storage.connect."""
        return cls(redis_connect.connect(url, mode=redis_mode, timeout_seconds=timeout_seconds),
                   timeout_seconds=timeout_seconds, **kwargs)

    @property
    def key_prefix(self) -> str:
        return self._prefix

    @property
    def key_buckets(self) -> int:
        return self._buckets

    def key(self, account_id: str, suffix: str) -> str:
        return account_key(self._prefix, self._buckets, account_id, suffix)

    async def close(self) -> None:
        if self._mux is not None:
            await self._mux.aclose()
        await redis_connect.close(self._client)

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc

    def _header(self, account_id: str, stamp: Stamp) -> list[Any]:
        """The ARGV every script starts with (see _prelude.lua)."""
        return [stamp.now_ms, account_id, self._retention_ms, self._ledger_retention_ms, self._events_max,
                stamp.plans_version, self._max_records, self._max_holds]

    async def _run(self, name: str, account_id: str, stamp: Stamp, args: Iterable[Any], *,
                   min_replicas: int = 0) -> dict[str, Any]:
        header = self._header(account_id, stamp)
        keys = _script_keys(self._prefix, self._buckets, account_id)
        if self._mux is None or min_replicas:
            args = redis_mux.flatten(args)
        with self._telemetry.redis_call(name):
            raw, acked = await self._call_script(name, keys, header + list(args), min_replicas)
        reply = json.loads(raw)
        if "error" in reply:
            raise _script_error(reply)
        if acked < min_replicas:
            # Applied on the master but not yet safe from its loss: not acknowledged. The caller
            # retries with the same id; the replay waits for the replicas again.
            raise Unavailable(f"the change reached {acked} of {min_replicas} required replica(s) within "
                              f"{self._grant_wait_timeout_ms} ms; retry with the same id", reason="REPLICAS_BEHIND")
        return reply

    async def _call_script(self, name: str, keys: _ScriptKeys, args: list[Any], min_replicas: int) -> tuple[Any, int]:
        """One script call (then WAIT when ``min_replicas``): its raw reply and the replicas that
        acknowledged it; Redis errors raised as domain errors."""
        try:
            if min_replicas:
                return await self._run_and_wait(name, keys, args, min_replicas)
            if self._mux is not None:
                raw = (await self._pipeline([(name, keys, args)]))[0]
                if isinstance(raw, Exception):
                    raise raw
                return raw, 0
            return await self._scripts[name](keys=keys, args=args), 0
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc
        except (AttributeError, TypeError) as exc:
            if not self._cluster:
                raise
            # redis-py's cluster client can tear down a connection another call is using
            # (CLUSTERDOWN handling closes them all) and that call then fails inside asyncio's
            # transport. The script is idempotent: report it as retryable.
            raise Unavailable(f"redis connection reset while in use: {exc!r}") from exc

    async def _run_and_wait(self, name: str, keys: list[str], args: list[Any], min_replicas: int) -> tuple[Any, int]:
        """The script, then WAIT on the same connection (WAIT covers that connection's writes)."""
        if self._cluster:
            return await self._cluster_run_and_wait(name, keys, args, min_replicas)
        async with self._client.pipeline(transaction=False) as pipe:
            await self._scripts[name](keys=keys, args=args, client=pipe)
            pipe.wait(min_replicas, self._grant_wait_timeout_ms)
            raw, acked = await pipe.execute(raise_on_error=False)
        if isinstance(raw, Exception):
            raise raw
        if isinstance(acked, Exception):
            # "WAIT cannot be used with replica instances": the connection reached a master
            # demoted by a Sentinel failover. Transient, like the READONLY it stands for.
            raise redis_errors.ReadOnlyError(str(acked))
        return raw, int(acked)

    async def _cluster_run_and_wait(self, name: str, keys: list[str], args: list[Any],
                                    min_replicas: int) -> tuple[Any, int]:
        """EVALSHA and WAIT pipelined on one connection to the master of the account's slot.

        redis-py's cluster client sends WAIT to a default node and its pipelines may use
        different connections, so this follows MOVED / ASK and reloads the script (NOSCRIPT)
        itself, a bounded number of times.
        """
        client = self._client
        assert isinstance(client, RedisCluster)
        await client.initialize()
        script = self._scripts[name]
        node: ClusterNode = client.get_node_from_key(keys[0])
        asking = False
        for _ in range(5):
            commands = [PipelineCommand(0, "ASKING")] if asking else []
            commands += [PipelineCommand(len(commands), "EVALSHA", script.sha, len(keys), *keys, *args),
                         PipelineCommand(len(commands) + 1, "WAIT", min_replicas, self._grant_wait_timeout_ms)]
            try:
                await node.execute_pipeline(commands)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError):
                # A failover? Re-read the slot map for the next call; redis-py's refresh marks
                # connections for reconnection rather than closing ones in use (aclose would).
                with contextlib.suppress(redis_errors.RedisError):
                    await client.nodes_manager.initialize()
                raise
            result, acked = commands[-2].result, commands[-1].result
            asking = False
            if isinstance(result, redis_errors.NoScriptError):
                await node.execute_command("SCRIPT", "LOAD", script.script)
            elif isinstance(result, redis_errors.MovedError):
                await client.nodes_manager.move_slot(result)
                node = client.get_node_from_key(keys[0])
            elif isinstance(result, redis_errors.AskError):
                node, asking = client.get_node(host=result.host, port=result.port) or node, True
            elif isinstance(result, Exception):
                raise result
            elif isinstance(acked, Exception):
                raise acked
            else:
                return result, int(acked)
        raise redis_errors.ClusterError("too many redirections running a script with WAIT")

    # -- decisions and movements -----------------------------------------

    async def reserve(self, cmd: ReserveCommand) -> ReserveOutcome:
        return _reserve_outcome(await self._run("reserve", cmd.account_id, cmd.stamp, _reserve_args(cmd)))

    async def commit(self, account_id: str, reservation_id: str, costs: Mapping[tuple[str, str], ActualCost],
                     stamp: Stamp) -> CommitResult:
        """``costs``: (plans version or "*" for the current plans, product) -> actual cost."""
        return _commit_result(await self._run("commit", account_id, stamp, _commit_args(reservation_id, costs)))

    async def release(self, account_id: str, reservation_id: str, stamp: Stamp) -> ReleaseResult:
        return _release_result(await self._run("release", account_id, stamp, [reservation_id]))

    async def extend(self, account_id: str, reservation_id: str, ttl_ms: int, stamp: Stamp) -> int:
        r = await self._run("extend", account_id, stamp, [reservation_id, ttl_ms])
        return int(r["expires_ms"])

    async def grant(self, account_id: str, lot_id: str, credits: int, expires_ms: int, source: CreditSource,
                    reason: str, stamp: Stamp) -> GrantResult:
        r = await self._run("grant", account_id, stamp,
                            [lot_id, credits, expires_ms, source.rank, source.value, reason],
                            min_replicas=self._grant_min_replicas)
        lot = Lot(lot_id=lot_id, credits_granted=int(r["granted"]), credits_left=int(r["left"]),
                  expires_ms=int(r["expires_ms"]), granted_ms=int(r["granted_ms"]), source=CreditSource(r["source"]),
                  revoked=bool(r["revoked"]))
        return GrantResult(lot=lot, credit_balance=int(r["balance"]), replayed=bool(r["replayed"]))

    async def revoke(self, account_id: str, lot_id: str, reason: str, stamp: Stamp) -> RevokeResult:
        r = await self._run("revoke", account_id, stamp, [lot_id, reason])
        return RevokeResult(credits_revoked=int(r["revoked"]), credits_spent=int(r["spent"]),
                            credits_held=int(r["held"]), credit_balance=int(r["balance"]),
                            replayed=bool(r["replayed"]))

    async def refund_job(self, account_id: str, reservation_id: str, reason: str, stamp: Stamp) -> RefundResult:
        r = await self._run("refund_job", account_id, stamp, [reservation_id, reason])
        return RefundResult(credits_refunded=int(r["refunded"]), free_refunded=int(r["free_refunded"]),
                            credit_balance=int(r["balance"]), replayed=bool(r["replayed"]))

    async def set_account(self, account_id: str, changes: AccountChanges, default_plan: str,
                          stamp: Stamp) -> AccountSettings:
        topup = changes.auto_topup
        args = [changes.plan or "", changes.time_zone or "", default_plan,
                "" if changes.monthly_spend_cap_credits is None else changes.monthly_spend_cap_credits,
                "" if topup is None else (1 if topup.enabled else 0),
                "" if topup is None else topup.threshold_credits,
                "" if topup is None else topup.pack_id]
        overrides = [(o.product, json.dumps(o.as_json(), separators=(",", ":"))) for o in changes.overrides]
        args += _block(overrides + [(product, "") for product in changes.clear_overrides])
        r = await self._run("set_account", account_id, stamp, args)
        return AccountSettings(plan=r["plan"], time_zone=r["tz"], monthly_spend_cap_credits=int(r["cap"]),
                               auto_topup=_auto_topup(r), overrides=_overrides(r["overrides"]))

    async def balance(self, account_id: str, *, time_zone: str, windows: Sequence[Window], weeks: Sequence[Window],
                      months: Sequence[Window], product_rows: Sequence[tuple[str, str, int, tuple[Limit, ...]]],
                      default_plan: str, stamp: Stamp) -> BalanceSnapshot:
        """``product_rows``: (product, plan, max_concurrent, limits) for every product under every plan."""
        args: list[Any] = [default_plan, time_zone, *_windows(windows), *_windows(weeks), *_windows(months),
                           *_block([(p, plan, cap, _limits_json(limits)) for p, plan, cap, limits in product_rows])]
        r = await self._run("balance", account_id, stamp, args)
        all_lots = _all_lots(_as_list(r["all_lots"]))
        holds = tuple(HoldInfo(reservation_id=h[0], product=h[1], funding=Funding(h[2]),
                               credits_held=int(h[3]), expires_ms=int(h[4])) for h in _as_list(r["holds"]))
        return BalanceSnapshot(
            plan=r["plan"], time_zone=r["tz"], now_ms=int(r["now_ms"]), free_resets_ms=int(r["resets_ms"]),
            allowances=tuple(_allowance(row, int(r["resets_ms"])) for row in _as_list(r["free"])),
            credit_balance=int(r["balance"]), lots=_live_lots(_as_list(r["lots"]), {x.lot_id: x for x in all_lots}),
            holds=holds, holds_total=int(r["holds_total"]), all_lots=all_lots, monthly_spend_cap_credits=int(r["cap"]),
            month_spend_credits=int(r["month_spend"]), month_resets_ms=int(r["month_resets_ms"]),
            auto_topup=_auto_topup(r), totals=_totals(r["totals"], int(r["balance"])),
            overrides=_overrides(r["overrides"]),
        )

    async def replay_degraded(self, account_id: str, reservation_id: str, *, product: str, fingerprint: str,
                              window_label: str, allowance: int, ttl_ms: int, state: str, resolved_ms: int,
                              stamp: Stamp) -> tuple[str, str]:
        """Writes a reservation decided without Redis, or applies its journalled resolution to the
        record Redis already holds (see degraded.lua): (outcome, the record's state now), outcome
        one of written, resolved, present, conflict."""
        r = await self._run("degraded", account_id, stamp, [reservation_id, product, fingerprint, window_label,
                                                            allowance, ttl_ms, state, resolved_ms])
        return str(r["outcome"]), str(r["state"])

    async def sweep_account(self, account_id: str, notice_ms: int, stamp: Stamp) -> int:
        r = await self._run("sweep", account_id, stamp, [notice_ms])
        return int(r["expired"])

    # -- reads ------------------------------------------------------------

    async def _scan_accounts(self, suffixes: tuple[str, ...], batch: int) -> set[str]:
        """Accounts with a key of one of ``suffixes``: one SCAN of the keyspace, whatever their number."""
        pattern = f"{self._prefix}:{{b*}}:*"
        try:
            keys = [key async for key in self._client.scan_iter(match=pattern, count=batch)]
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc
        # <prefix>:{b<n>}:<account>:<suffix>; account ids have no braces and suffixes no ':'.
        found = set()
        for key in keys:
            account_and_suffix = key[key.index("}:") + 2:]
            account, _, suffix = account_and_suffix.rpartition(":")
            if suffix in suffixes and account:
                found.add(account)
        return found

    async def accounts_to_sweep(self, *, batch: int = 500) -> list[str]:
        """Accounts with unresolved holds, live lots or resolved records (retention reaches idle
        accounts too): their keys exist. O(keys) SCAN."""
        return sorted(await self._scan_accounts(("holds", "lotexp", "resdone"), batch))

    async def all_accounts(self, *, batch: int = 500) -> list[str]:
        """Every account that has a ledger. O(keys) SCAN."""
        return sorted(await self._scan_accounts(("ledger",), batch))

    async def ledger_page(self, account_id: str, after_id: str, count: int) -> list[LedgerEntry]:
        """Up to ``count`` entries after ``after_id`` ("" = from the oldest kept)."""
        start = f"({after_id}" if after_id else "-"
        try:
            rows = await self._client.xrange(self.key(account_id, "ledger"), min=start, max="+", count=count)
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc
        return [ledger_entry(entry_id, fields) for entry_id, fields in rows]

    async def raw_state(self, account_id: str) -> dict[str, Any]:
        """Everything the audit needs of one account, read as it is (pipelined, no script)."""
        names = ("acct", "free", "lots", "lotrem", "lotexp", "res", "spend")
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.key(account_id, "acct"))
                pipe.hgetall(self.key(account_id, "free"))
                pipe.hgetall(self.key(account_id, "lots"))
                pipe.hgetall(self.key(account_id, "lotrem"))
                pipe.zrange(self.key(account_id, "lotexp"), 0, -1, withscores=True)
                pipe.hgetall(self.key(account_id, "res"))
                pipe.hgetall(self.key(account_id, "spend"))
                pipe.zrange(self.key(account_id, "holds"), 0, -1, withscores=True)
                pipe.xrange(self.key(account_id, "ledger"))
                values = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc
        state = dict(zip(names, values[:7]))
        state["holds"] = values[7]
        state["ledger"] = [ledger_entry(i, f) for i, f in values[8]]
        return state

    async def events(self, bucket: int, after_id: str = "0", count: int = 1000) -> list[tuple[str, dict[str, str]]]:
        """Entries of a bucket's events stream (tests and tools; consumers use consumer groups)."""
        try:
            return await self._client.xrange(events_key(self._prefix, bucket), min=f"({after_id}" if after_id != "0"
                                             else "-", max="+", count=count)
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """A lease so that only one sidecar of a fleet runs a periodic job at a time."""
        try:
            return bool(await self._client.set(f"{self._prefix}:lock:{name}", owner, nx=True, px=ttl_ms))
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc

    async def renew_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Extends a lease ``owner`` holds (try_lock) to ``ttl_ms`` from now; False when it lapsed
        or another owner holds it. One round trip (renew_lease.lua)."""
        try:
            return bool(await self._renew_lease(keys=[f"{self._prefix}:lock:{name}"], args=[owner, ttl_ms]))
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc

    # -- batches (CheckAndReserveBatch, CommitBatch, ReleaseBatch) ----------
    #
    # One pipelined round trip per batch (redis-py's cluster pipeline splits it per node
    # itself); never a transaction (MULTI would fail across slots). Each item's script
    # stays atomic and idempotent on its own; an item's error does not fail the others.

    async def _run_many(self, calls: Sequence[tuple[str, str, Stamp, list[Any]]]) -> list[Any]:
        """(script, account, stamp, args) each -> its reply dict, or the QuotaError it failed with."""
        sent = []
        for name, account_id, stamp, args in calls:
            sent.append((name, _script_keys(self._prefix, self._buckets, account_id),
                         self._header(account_id, stamp) + (list(args) if self._mux else redis_mux.flatten(args))))
        try:
            with self._telemetry.redis_call(calls[0][0] if calls else "", len(calls)):
                try:
                    raws = await self._pipeline(sent)
                except redis_errors.RedisError as exc:
                    raise _redis_error(exc) from exc
        except QuotaError as error:
            return [error for _ in calls]
        return [self._reply(raw) for raw in raws]

    async def _pipeline(self, sent: _Sent) -> list[Any]:
        """Each (script, keys, args) as one EVALSHA, sent together in order: replies or errors.

        Items whose script Redis lost (NOSCRIPT: a restart, SCRIPT FLUSH) did not run at all, so
        they are sent again, in order, once their scripts are loaded."""
        raws = await self._send(sent)
        missing = [i for i, raw in enumerate(raws) if isinstance(raw, redis_errors.NoScriptError)]
        if missing:
            for name in {sent[i][0] for i in missing}:
                await self._load_script(name)
            for i, raw in zip(missing, await self._send([sent[i] for i in missing])):
                raws[i] = raw
        return raws

    async def load_scripts(self) -> None:
        """Loads every script (at start-up), so the first calls do not each meet NOSCRIPT."""
        try:
            for name in SCRIPT_NAMES:
                await self._load_script(name)
        except redis_errors.RedisError as exc:
            raise _redis_error(exc) from exc

    async def _load_script(self, name: str) -> None:
        """SCRIPT LOAD, shared by every caller that needs it meanwhile: after a Redis restart,
        the calls in flight all meet NOSCRIPT at once and would each load the script."""
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = asyncio.ensure_future(self._send_script_load(name))
            loading.add_done_callback(lambda _: self._loading.pop(name, None))
        # Shielded: one caller's cancellation must not cancel the load the others wait for.
        await asyncio.shield(loading)

    async def _send_script_load(self, name: str) -> None:
        if self._mux is not None:
            await self._mux.execute("SCRIPT", "LOAD", self._scripts[name].script)
        else:
            await self._client.script_load(self._scripts[name].script)

    async def _send(self, sent: _Sent) -> list[Any]:
        if self._cluster:
            return await self._cluster_batch(sent)
        if self._mux is not None:
            return await self._mux_send(sent)
        async with self._client.pipeline(transaction=False) as pipe:
            for name, keys, args in sent:
                # Plain EVALSHA: redis-py's script-aware pipelines add a SCRIPT EXISTS round trip.
                pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def _mux_send(self, sent: _Sent) -> list[Any]:
        """_send over the multiplexed connection (keys are _ScriptKeys: their encoding is cached).

        A dropped connection is retried once, as redis-py's client is configured to: every
        script is idempotent, so re-sending one that did run is safe."""
        mux = self._mux
        assert mux is not None
        packed = [redis_mux.pack_command(["EVALSHA", self._scripts[name].sha, len(keys), keys.packed, *args])
                  for name, keys, args in sent]
        try:
            return await mux.execute_many(packed)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError):
            await asyncio.sleep(_RECONNECT_PAUSE_SECONDS)
            return await mux.execute_many(packed)

    async def _cluster_batch(self, sent: _Sent) -> list[Any]:
        """What _pipeline returns, on a cluster: one pipeline round trip per master.

        redis-py refuses EVALSHA in cluster pipelines, so the items are grouped by the master
        of their slot and sent on that node's connection. Items redirected meanwhile (a slot
        moving: MOVED / ASK) run again one by one through the cluster client, which follows
        redirections. Errors are returned, not raised.
        """
        client = self._client
        assert isinstance(client, RedisCluster)
        await client.initialize()
        results: list[Any] = [None] * len(sent)
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, (_, keys, _) in enumerate(sent):
            node = client.get_node_from_key(keys[0])
            by_node.setdefault(node.name, (node, []))[1].append(i)

        async def on_node(node: ClusterNode, indexes: list[int]) -> None:
            commands = [PipelineCommand(j, "EVALSHA", self._scripts[sent[i][0]].sha, len(sent[i][1]), *sent[i][1],
                                        *sent[i][2]) for j, i in enumerate(indexes)]
            try:
                await node.execute_pipeline(commands)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                with contextlib.suppress(redis_errors.RedisError):
                    await client.nodes_manager.initialize()
                for i in indexes:
                    results[i] = exc
                return
            for i, command in zip(indexes, commands):
                results[i] = command.result

        await asyncio.gather(*(on_node(node, indexes) for node, indexes in by_node.values()))
        for i, result in enumerate(results):
            if isinstance(result, (redis_errors.MovedError, redis_errors.AskError)):
                name, keys, args = sent[i]
                try:
                    results[i] = await client.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
                except redis_errors.RedisError as exc:
                    results[i] = exc
        return results

    @staticmethod
    def _reply(raw: Any) -> Any:
        if isinstance(raw, redis_errors.RedisError):
            return _redis_error(raw)
        if isinstance(raw, Exception):
            return QuotaError(f"redis error: {raw}", reason="STORE_ERROR")
        reply = json.loads(raw)
        return _script_error(reply) if "error" in reply else reply

    async def reserve_many(self, cmds: Sequence[ReserveCommand]) -> list[ReserveOutcome | Exception]:
        """Each command decided on its own, as reserve() would; in order for commands of one account.
        A failed item is its exception (StaleTimeZone included), not raised."""
        replies = await self._run_many([("reserve", c.account_id, c.stamp, _reserve_args(c)) for c in cmds])
        return [r if isinstance(r, Exception) else _reserve_outcome(r) for r in replies]

    async def commit_many(self, items: Sequence[tuple[str, str, Mapping[tuple[str, str], ActualCost], Stamp]]
                          ) -> list[CommitResult | Exception]:
        """(account, reservation, costs, stamp) each, as commit() would apply it."""
        replies = await self._run_many([("commit", account_id, stamp, _commit_args(rid, costs))
                                        for account_id, rid, costs, stamp in items])
        return [r if isinstance(r, Exception) else _commit_result(r) for r in replies]

    async def release_many(self, items: Sequence[tuple[str, str, Stamp]]) -> list[ReleaseResult | Exception]:
        """(account, reservation, stamp) each, as release() would apply it."""
        replies = await self._run_many([("release", a, stamp, [rid]) for a, rid, stamp in items])
        return [r if isinstance(r, Exception) else _release_result(r) for r in replies]

    async def reserve_all(self, cmds: Sequence[ReserveCommand]) -> list[ReserveOutcome | Exception]:
        """Commands of ONE account, all held or none (reserve_all.lua), in one script run.

        Raises StaleTimeZone (nothing written) when the account's zone is not cmds' zone. An item
        whose hold was undone because another was refused is BatchAborted."""
        first = cmds[0]
        assert all(c.account_id == first.account_id and c.time_zone == first.time_zone for c in cmds)
        args: list[Any] = [first.time_zone, first.default_plan, len(cmds)]
        for cmd in cmds:
            args += _reserve_args(cmd)
        reply = await self._run("reserve_all", first.account_id, first.stamp, args)
        results: list[ReserveOutcome | Exception] = []
        for r in _as_list(reply["results"]):
            if "error" in r:
                results.append(_script_error(r))
            elif r.get("aborted"):
                results.append(BatchAborted())
            else:
                results.append(_reserve_outcome(r))
        return results
