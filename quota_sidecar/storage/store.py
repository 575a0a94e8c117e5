"""The Redis store: the Store port of the engine (quota_sidecar.domain.ports) on Redis.

Each operation is one Lua script (``lua/<name>.lua`` with the shared ``_prelude.lua``
in front, see scripts), sent as ONE script call in one round trip: FCALL of its function in
the library of every script on Redis >= 7, EVALSHA of its SHA1 on Redis 6.2 (the mode is chosen
once, from the server's version, before the first call). It goes through a transport
(transport: the multiplexed connection, redis-py pipelines or one pipeline per cluster
master); a script or library Redis lost is loaded again (NOSCRIPT, "Function not found"). All keys of an
account share the hash tag of its bucket (keys) so every script touches one Redis
Cluster slot; arguments and replies are encoded by codec.

Every script is idempotent for the same arguments (reservation ids and
purchase ids are the keys), so a retried call after a timeout is safe.

Redis errors become quota_sidecar.domain.errors here; script replies become the
plain values of quota_sidecar.domain.model. Reads that decide nothing (an account's
outbox entries, the audit's view of an account) and the shipper's reads and trims
of the outbox (the Outbox port) are plain commands.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence, cast

from redis import exceptions as redis_errors

from quota_sidecar.domain.errors import (
    BatchAborted,
    QuotaError,
    StoreUnavailable,
    Unavailable,
)
from quota_sidecar.domain.model import (
    AccountChanges,
    AccountSettings,
    ActualCost,
    BalanceSnapshot,
    Cameo,
    CommitResult,
    CreditSource,
    Funding,
    GrantResult,
    HoldInfo,
    LedgerEntry,
    Limit,
    Lot,
    OutboxStats,
    RefundResult,
    ReleaseResult,
    ReserveCommand,
    ReserveOutcome,
    RevokeResult,
    Stamp,
    Window,
)
from quota_sidecar.storage import connect as redis_connect
from quota_sidecar.storage import mux as redis_mux
from quota_sidecar.storage.codec import (
    StreamRows,
    as_list,
    commit_args,
    decode_all_lots,
    decode_allowance,
    decode_auto_topup,
    decode_commit_result,
    decode_live_lots,
    decode_overrides,
    decode_release_result,
    decode_reserve_outcome,
    decode_totals,
    encode_block,
    encode_limits,
    encode_windows,
    outbox_entries,
    outbox_entry,
    parse_outbox_entry_id,
    reserve_args,
    script_error,
    stream_rows,
)
from quota_sidecar.storage.keys import (
    DEFAULT_KEY_BUCKETS,
    ScriptKeys,
    account_key,
    events_key,
    key_bucket,
    outbox_key,
    script_keys,
)
from quota_sidecar.storage.observe import NoObserver, ScriptObserver
from quota_sidecar.storage.scripts import SCRIPT_NAMES, function_name, library_source, load_script_source
from quota_sidecar.storage.transport import FUNCTIONS_SINCE, ClusterTransport, domain_error, transport_for

# The key of the library's load in flight (RedisStore._loading; script names never start with "_").
_LIBRARY = "_library"
# Scripts to send together: (script name, its KEYS, its ARGV) each.
_Sent = Sequence[tuple[str, ScriptKeys, list[Any]]]

# An account's outbox entries are read from its bucket's stream this many at a time, so one
# read of a long outbox (a shipper stopped) never keeps Redis busy for long.
OUTBOX_READ_PAGE = 5000
# Outbox reads in flight at once: the shipper reads many buckets together, and off the
# multiplexed connection each read holds one of redis-py's pooled connections (100 at most).
OUTBOX_READS_AT_ONCE = 16
# Plans versions whose encoded header part is kept (a few are in use at once: see PLANS_VERSIONS_KEPT).
HEADER_TAILS_KEPT = 64
# The largest stream id part: the id after <ms>-<this> is <ms + 1>-0.
_STREAM_ID_PART_MAX = 2**64 - 1


class RedisStore:
    """Quota state in one Redis (or one Redis Cluster slot per account bucket)."""

    def __init__(self, client: redis_connect.RedisClient, *, key_prefix: str = "qs",
                 key_buckets: int = DEFAULT_KEY_BUCKETS, retention_ms: int = 7 * 86_400_000,
                 events_max_entries: int = 100_000, max_records_per_account: int = 2_000,
                 max_open_holds_per_account: int = 1_000,
                 grant_min_replicas: int = 0, grant_wait_timeout_ms: int = 1000, timeout_seconds: float = 2.0,
                 multiplex: bool = True, telemetry: ScriptObserver | None = None) -> None:
        assert key_prefix and "{" not in key_prefix and "}" not in key_prefix
        assert 1 <= key_buckets <= 16384
        self._client = client
        self._prefix = key_prefix
        self._buckets = key_buckets
        self._retention_ms = retention_ms
        self._events_max = events_max_entries
        assert max_records_per_account >= 1 and max_open_holds_per_account >= 1
        self._max_records = max_records_per_account
        self._max_holds = max_open_holds_per_account
        self._grant_min_replicas = grant_min_replicas
        self._grant_wait_timeout_ms = grant_wait_timeout_ms
        self._header_tails: dict[str, redis_mux.Packed] = {}  # plans version -> its part of _header
        self._sources = {name: load_script_source(name) for name in SCRIPT_NAMES}
        self._shas = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in self._sources.items()}
        self._renew_lease = client.register_script(
            resources.files("quota_sidecar.storage").joinpath("lua").joinpath("renew_lease.lua").read_text(encoding="utf-8"))
        self._loading: dict[str, asyncio.Future[None]] = {}  # script name (or _LIBRARY) -> its load in flight
        # The script mode, chosen once from the server's version before the first script call
        # (_script_mode): FCALL of the library's functions on Redis >= 7, else EVALSHA.
        self._functions: bool | None = None
        self._refs: dict[str, str] = self._shas  # what a call names each script by, in that mode
        self._mode_chosen: asyncio.Future[None] | None = None
        self._outbox_reads = asyncio.Semaphore(OUTBOX_READS_AT_ONCE)
        # Latency and errors of each script round trip (metrics; spans when tracing is on).
        self._telemetry: ScriptObserver = telemetry or NoObserver()
        # The multiplexed connection when Redis is a plain single server; redis-py pipelines for
        # TLS and Sentinel; one pipeline per master for a cluster (see transport).
        self._transport = transport_for(client, timeout_seconds=timeout_seconds, multiplex=multiplex)

    @classmethod
    def from_url(cls, url: str, *, timeout_seconds: float = 2.0, redis_mode: str = "auto",
                 **kwargs: Any) -> RedisStore:
        """One Redis, a Redis Cluster or a Sentinel-managed master; see quota_sidecar.storage.connect."""
        return cls(redis_connect.connect(url, mode=redis_mode, timeout_seconds=timeout_seconds),
                   timeout_seconds=timeout_seconds, **kwargs)

    @property
    def key_prefix(self) -> str:
        return self._prefix

    @property
    def key_buckets(self) -> int:
        return self._buckets

    @property
    def buckets(self) -> int:
        """The Outbox port's name for key_buckets: one outbox stream per bucket."""
        return self._buckets

    def key(self, account_id: str, suffix: str) -> str:
        return account_key(self._prefix, self._buckets, account_id, suffix)

    async def close(self) -> None:
        await self._transport.close()

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    def _header(self, account_id: str, stamp: Stamp) -> list[Any]:
        """The ARGV every script starts with (see _prelude.lua), the part that changes only with the
        plans version encoded once (a redis_mux.Packed: flatten() for redis-py)."""
        tail = self._header_tails.get(stamp.plans_version)
        if tail is None:
            if len(self._header_tails) >= HEADER_TAILS_KEPT:
                self._header_tails.clear()
            tail = self._header_tails[stamp.plans_version] = redis_mux.Packed([
                self._retention_ms, self._events_max, stamp.plans_version, self._max_records, self._max_holds])
        return [stamp.now_ms, account_id, tail]

    def _argv(self, account_id: str, stamp: Stamp, args: Iterable[Any]) -> list[Any]:
        """The header and ``args``: flat for transports that take no Packed blocks."""
        argv = [*self._header(account_id, stamp), *args]
        return redis_mux.flatten(argv) if self._transport.flat_args else argv

    async def _run(self, name: str, account_id: str, stamp: Stamp, args: Iterable[Any], *,
                   min_replicas: int = 0) -> dict[str, Any]:
        argv = self._argv(account_id, stamp, args)
        keys = script_keys(self._prefix, self._buckets, account_id)
        if self._functions is None:
            await self._ensure_script_mode()
        with self._telemetry.redis_call(name, 1, self.script_verb):
            raw, acked = await self._call(name, keys, argv, min_replicas)
        reply: dict[str, Any] = json.loads(raw)
        if "error" in reply:
            raise script_error(reply)
        if acked < min_replicas:
            # Applied on the master but not yet safe from its loss: not acknowledged. The caller
            # retries with the same id; the replay waits for the replicas again.
            raise Unavailable(f"the change reached {acked} of {min_replicas} required replica(s) within "
                              f"{self._grant_wait_timeout_ms} ms; retry with the same id", reason="REPLICAS_BEHIND")
        return reply

    async def _call(self, name: str, keys: ScriptKeys, args: list[Any], min_replicas: int) -> tuple[Any, int]:
        """One script call (then WAIT when ``min_replicas``): its raw reply and the replicas that
        acknowledged it; Redis errors raised as domain errors."""
        try:
            if min_replicas:
                return await self._transport.send_and_wait((self._refs[name], keys, args), self._source(name),
                                                           min_replicas, self._grant_wait_timeout_ms)
            raw = (await self._pipeline([(name, keys, args)]))[0]
            if isinstance(raw, Exception):
                raise raw
            return raw, 0
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc
        except (AttributeError, TypeError) as exc:
            if not isinstance(self._transport, ClusterTransport):
                raise
            # redis-py's cluster client can tear down a connection another call is using
            # (CLUSTERDOWN handling closes them all) and that call then fails inside asyncio's
            # transport. The script is idempotent: report it as retryable.
            raise StoreUnavailable(f"redis connection reset while in use: {exc!r}") from exc

    # -- decisions and movements -----------------------------------------

    async def reserve(self, cmd: ReserveCommand) -> ReserveOutcome:
        return decode_reserve_outcome(await self._run("reserve", cmd.account_id, cmd.stamp, reserve_args(cmd)))

    async def quote(self, cmd: ReserveCommand) -> ReserveOutcome:
        """reserve()'s decision as a dry run (quote.lua): the same arguments and the same reply,
        nothing held. An empty reservation id quotes a new job."""
        return decode_reserve_outcome(await self._run("quote", cmd.account_id, cmd.stamp, reserve_args(cmd)))

    async def commit(self, account_id: str, reservation_id: str, costs: Mapping[tuple[str, str], ActualCost],
                     stamp: Stamp) -> CommitResult:
        """``costs``: (plans version or "*" for the current plans, product) -> actual cost."""
        return decode_commit_result(await self._run("commit", account_id, stamp, commit_args(reservation_id, costs)))

    async def release(self, account_id: str, reservation_id: str, stamp: Stamp) -> ReleaseResult:
        return decode_release_result(await self._run("release", account_id, stamp, [reservation_id]))

    async def extend(self, account_id: str, reservation_id: str, ttl_ms: int, stamp: Stamp) -> int:
        r = await self._run("extend", account_id, stamp, [reservation_id, ttl_ms])
        return int(r["expires_ms"])

    async def grant(self, account_id: str, lot_id: str, credits: int, expires_ms: int, source: CreditSource,
                    reason: str, stamp: Stamp, *, price_minor_units: int | None = None, currency: str = "",
                    pack_id: str = "") -> GrantResult:
        """``price_minor_units`` (None: unknown), ``currency`` and ``pack_id`` go to the grant's
        outbox entry only, for the books; a replay keeps the first grant's."""
        price = -1 if price_minor_units is None else price_minor_units
        r = await self._run("grant", account_id, stamp,
                            [lot_id, credits, expires_ms, source.rank, source.value, reason, price, currency, pack_id],
                            min_replicas=self._grant_min_replicas)
        lot = Lot(lot_id=lot_id, credits_granted=int(r["granted"]), credits_left=int(r["left"]),
                  expires_ms=int(r["expires_ms"]), granted_ms=int(r["granted_ms"]), source=CreditSource(r["source"]),
                  revoked=bool(r["revoked"]))
        return GrantResult(lot=lot, credit_balance=int(r["balance"]), replayed=bool(r["replayed"]),
                           debt_paid_credits=int(r.get("debt_paid", 0)))

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
        args += encode_block(overrides + [(product, "") for product in changes.clear_overrides])
        r = await self._run("set_account", account_id, stamp, args)
        return AccountSettings(plan=r["plan"], time_zone=r["tz"], monthly_spend_cap_credits=int(r["cap"]),
                               auto_topup=decode_auto_topup(r), overrides=decode_overrides(r["overrides"]))

    async def balance(self, account_id: str, *, time_zone: str, windows: Sequence[Window], weeks: Sequence[Window],
                      months: Sequence[Window], product_rows: Sequence[tuple[str, str, int, tuple[Limit, ...]]],
                      default_plan: str, stamp: Stamp) -> BalanceSnapshot:
        """``product_rows``: (product, plan, max_concurrent, limits) for every product under every plan."""
        rows = [(p, plan, cap, encode_limits(limits)) for p, plan, cap, limits in product_rows]
        args: list[Any] = [default_plan, time_zone, *encode_windows(windows), *encode_windows(weeks),
                           *encode_windows(months), *encode_block(rows)]
        r = await self._run("balance", account_id, stamp, args)
        all_lots = decode_all_lots(as_list(r["all_lots"]))
        holds = tuple(HoldInfo(reservation_id=h[0], product=h[1], funding=Funding(h[2]),
                               credits_held=int(h[3]), expires_ms=int(h[4])) for h in as_list(r["holds"]))
        return BalanceSnapshot(
            plan=r["plan"], time_zone=r["tz"], now_ms=int(r["now_ms"]), free_resets_ms=int(r["resets_ms"]),
            allowances=tuple(decode_allowance(row, int(r["resets_ms"])) for row in as_list(r["free"])),
            credit_balance=int(r["balance"]),
            lots=decode_live_lots(as_list(r["lots"]), {x.lot_id: x for x in all_lots}),
            holds=holds, holds_total=int(r["holds_total"]), all_lots=all_lots, monthly_spend_cap_credits=int(r["cap"]),
            month_spend_credits=int(r["month_spend"]), month_resets_ms=int(r["month_resets_ms"]),
            auto_topup=decode_auto_topup(r),
            totals=decode_totals(r["totals"], int(r["balance"]), int(r.get("debt", 0))),
            overrides=decode_overrides(r["overrides"]), debt_credits=int(r.get("debt", 0)),
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
            raise domain_error(exc) from exc
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
        """Every account with settings, totals or a sequence number (its acct hash). O(keys) SCAN."""
        return sorted(await self._scan_accounts(("acct",), batch))

    async def account_outbox(self, account_id: str) -> list[LedgerEntry]:
        bucket = key_bucket(account_id, self._buckets)
        try:
            rows = await self._outbox_rows(bucket)
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc
        return _account_entries(bucket, rows, account_id)

    async def _outbox_rows(self, bucket: int) -> StreamRows:
        """Every entry of a bucket's outbox, OUTBOX_READ_PAGE at a time."""
        rows: StreamRows = []
        start = "-"
        while True:
            page = await self._xrange(bucket, start, OUTBOX_READ_PAGE)
            rows += page
            if len(page) < OUTBOX_READ_PAGE:
                return rows
            start = f"({page[-1][0]}"

    async def _xrange(self, bucket: int, start: str, count: int) -> StreamRows:
        async with self._outbox_reads:
            return stream_rows(await self._transport.read("XRANGE", outbox_key(self._prefix, bucket), start, "+",
                                                          "COUNT", count))

    async def account_seq(self, account_id: str) -> int:
        try:
            return int(await self._client.hget(self.key(account_id, "acct"), "seq") or 0)
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    async def raw_state(self, account_id: str) -> dict[str, Any]:
        """Everything the audit needs of one account, read as it is in one MULTI (no script): its
        keys, and its entries of the bucket's outbox ("outbox", in seq order) with its last
        sequence number ("seq"), all at the same instant."""
        names = ("acct", "free", "lots", "lotrem", "lotexp", "res", "spend")
        bucket = key_bucket(account_id, self._buckets)
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for name in ("acct", "free", "lots", "lotrem"):
                    pipe.hgetall(self.key(account_id, name))
                pipe.zrange(self.key(account_id, "lotexp"), 0, -1, withscores=True)
                pipe.hgetall(self.key(account_id, "res"))
                pipe.hgetall(self.key(account_id, "spend"))
                pipe.zrange(self.key(account_id, "holds"), 0, -1, withscores=True)
                pipe.xrange(outbox_key(self._prefix, bucket))
                values = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc
        state = dict(zip(names, values[:7]))
        state["holds"] = values[7]
        state["outbox"] = _account_entries(bucket, values[8], account_id)
        state["seq"] = int(state["acct"].get("seq") or 0)
        return state

    async def events(self, bucket: int, after_id: str = "0", count: int = 1000) -> list[tuple[str, dict[str, str]]]:
        """Entries of a bucket's events stream (tests and tools; consumers use consumer groups)."""
        try:
            return cast(StreamRows, await self._client.xrange(
                events_key(self._prefix, bucket), min=f"({after_id}" if after_id != "0" else "-", max="+", count=count))
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    # -- the outbox (the Outbox port: the shipper) ------------------------------

    async def read_outbox(self, bucket: int, count: int) -> list[LedgerEntry]:
        try:
            rows = await self._xrange(bucket, "-", count)
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc
        return outbox_entries(bucket, rows)

    async def trim_outbox(self, bucket: int, through_id: str) -> int:
        entry_bucket, stream_id = parse_outbox_entry_id(through_id)
        if entry_bucket != bucket:
            raise ValueError(f"{through_id!r} is not an entry of bucket {bucket}'s outbox")
        try:
            # Exact (no "~"): XTRIM MINID keeps every entry from the id after through_id on, so an
            # entry not yet in the books is never dropped, and each shipped one is. Redis >= 6.2.
            return int(await self._client.xtrim(outbox_key(self._prefix, bucket), minid=_next_stream_id(stream_id),
                                                approximate=False))
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    async def outbox_stats(self) -> OutboxStats:
        """Every bucket's length and oldest entry in one pipeline (split per master on a cluster).
        ``oldest_ms`` is the oldest entry's stream id time: Redis' clock when it entered the
        outbox (an entry's ``t``, a test's pinned clock or a degraded decision's time, may be older)."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for bucket in range(self._buckets):
                    pipe.xlen(outbox_key(self._prefix, bucket))
                    pipe.xrange(outbox_key(self._prefix, bucket), count=1)
                values = await pipe.execute()
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc
        lengths, heads = values[0::2], values[1::2]
        oldest = [int(head[0][0].split("-")[0]) for head in heads if head]
        return OutboxStats(entries=sum(int(n) for n in lengths), oldest_ms=min(oldest) if oldest else None)

    # -- cameos (admin data, like the plans: no script reads this key) -----

    def _cameos_key(self) -> str:
        """One hash of every cameo (cameo_id -> JSON), under its own key: never in an account's
        slot, so a reservation script never touches it; each sidecar keeps a copy in memory."""
        return f"{self._prefix}:cameos"

    async def set_cameo(self, cameo: Cameo) -> None:
        value = json.dumps({"o": cameo.owner_account_id, "f": cameo.fee_credits, "a": 1 if cameo.active else 0,
                            "u": cameo.updated_ms}, separators=(",", ":"))
        try:
            await self._client.hset(self._cameos_key(), cameo.cameo_id, value)
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    async def cameos(self) -> dict[str, Cameo]:
        """Every cameo defined (the registry's refresh)."""
        try:
            raw = await self._client.hgetall(self._cameos_key())
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc
        out: dict[str, Cameo] = {}
        for key, value in (raw or {}).items():
            cameo_id = key.decode() if isinstance(key, bytes) else str(key)
            d = json.loads(value)
            out[cameo_id] = Cameo(cameo_id=cameo_id, owner_account_id=str(d["o"]), fee_credits=int(d["f"]),
                                  active=bool(d["a"]), updated_ms=int(d.get("u", 0)))
        return out

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """A lease so that only one sidecar of a fleet runs a periodic job at a time."""
        try:
            return bool(await self._client.set(f"{self._prefix}:lock:{name}", owner, nx=True, px=ttl_ms))
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    async def renew_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Extends a lease ``owner`` holds (try_lock) to ``ttl_ms`` from now; False when it lapsed
        or another owner holds it. One round trip (renew_lease.lua)."""
        try:
            return bool(await self._renew_lease(keys=[f"{self._prefix}:lock:{name}"], args=[owner, ttl_ms]))
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    # -- batches (CheckAndReserveBatch, CommitBatch, ReleaseBatch) ----------
    #
    # One pipelined round trip per batch (redis-py's cluster pipeline splits it per node
    # itself); never a transaction (MULTI would fail across slots). Each item's script
    # stays atomic and idempotent on its own; an item's error does not fail the others.

    async def _run_many(self, calls: Sequence[tuple[str, str, Stamp, list[Any]]]) -> list[Any]:
        """(script, account, stamp, args) each -> its reply dict, or the QuotaError it failed with."""
        sent = [(name, script_keys(self._prefix, self._buckets, account_id), self._argv(account_id, stamp, args))
                for name, account_id, stamp, args in calls]
        try:
            if self._functions is None:
                await self._ensure_script_mode()
            with self._telemetry.redis_call(calls[0][0] if calls else "", len(calls), self.script_verb):
                try:
                    raws = await self._pipeline(sent)
                except redis_errors.RedisError as exc:
                    raise domain_error(exc) from exc
        except QuotaError as error:
            return [error for _ in calls]
        return [self._reply(raw) for raw in raws]

    async def _pipeline(self, sent: _Sent) -> list[Any]:
        """Each (script, keys, args) as one FCALL (or EVALSHA), sent together in order: replies or errors.

        Items whose script Redis lost (NOSCRIPT, or "Function not found": a restart, SCRIPT FLUSH,
        FUNCTION FLUSH) did not run at all, so they are sent again, in order, once their scripts
        are loaded. The script mode is chosen already (_run, _run_many)."""
        assert self._functions is not None, "script mode not chosen before the first call"
        refs = self._refs
        raws = await self._transport.send([(refs[name], keys, args) for name, keys, args in sent])
        missing = [i for i, raw in enumerate(raws) if isinstance(raw, redis_errors.NoScriptError)]
        if missing:
            for name in {sent[i][0] for i in missing}:
                await self._load_script(name)
            again = await self._transport.send([(refs[sent[i][0]], sent[i][1], sent[i][2]) for i in missing])
            for i, raw in zip(missing, again):
                raws[i] = raw
        return raws

    @property
    def script_verb(self) -> str:
        """The command each decision is sent as: FCALL (Redis >= 7) or EVALSHA; EVALSHA until the
        mode is chosen (the first script call, or load_scripts at start-up)."""
        return "FCALL" if self._functions else "EVALSHA"

    async def _script_mode(self) -> None:
        """Chooses the script mode once, from INFO server's redis_version: the library's functions
        (FCALL) on Redis >= 7, EVALSHA below (Redis 6.2 has no Functions). Concurrent first calls
        share one INFO; a failed one is asked again by the next call."""
        if self._mode_chosen is None:
            self._mode_chosen = asyncio.ensure_future(self._choose_script_mode())

            def forget_failure(future: asyncio.Future[None]) -> None:
                if future.cancelled() or future.exception() is not None:
                    self._mode_chosen = None

            self._mode_chosen.add_done_callback(forget_failure)
        await asyncio.shield(self._mode_chosen)

    async def _ensure_script_mode(self) -> None:
        """The mode chosen before a call's span opens, so the span names the command really sent."""
        try:
            await self._script_mode()
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    async def _choose_script_mode(self) -> None:
        try:
            functions = await self._transport.server_version() >= FUNCTIONS_SINCE
        except redis_errors.ResponseError:
            functions = False  # INFO refused (an ACL, a renamed command): EVALSHA works everywhere
        self._set_script_mode(functions)

    def _set_script_mode(self, functions: bool) -> None:
        self._functions = self._transport.functions = functions
        self._refs = {name: function_name(name) for name in SCRIPT_NAMES} if functions else self._shas

    def _source(self, name: str) -> str:
        """What loads script ``name``: the library of every script, or the script alone."""
        return library_source() if self._functions else self._sources[name]

    async def load_scripts(self) -> None:
        """Chooses the script mode and loads every script (at start-up), so the first calls do not
        each meet NOSCRIPT: the one library (FUNCTION LOAD) or each script (SCRIPT LOAD)."""
        try:
            await self._script_mode()
            for name in SCRIPT_NAMES[:1] if self._functions else SCRIPT_NAMES:
                await self._load_script(name)
        except redis_errors.RedisError as exc:
            raise domain_error(exc) from exc

    async def _load_script(self, name: str) -> None:
        """FUNCTION LOAD of the library (every script in it) or SCRIPT LOAD of one script, shared
        by every caller that needs it meanwhile: after a Redis restart, the calls in flight all
        meet NOSCRIPT at once and would each load it."""
        key = _LIBRARY if self._functions else name
        loading = self._loading.get(key)
        if loading is None:
            loading = self._loading[key] = asyncio.ensure_future(self._transport.load(self._source(name)))
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        # Shielded: one caller's cancellation must not cancel the load the others wait for.
        await asyncio.shield(loading)

    @staticmethod
    def _reply(raw: Any) -> Any:
        if isinstance(raw, redis_errors.RedisError):
            return domain_error(raw)
        if isinstance(raw, Exception):
            return QuotaError(f"redis error: {raw}", reason="STORE_ERROR")
        reply = json.loads(raw)
        return script_error(reply) if "error" in reply else reply

    async def reserve_many(self, cmds: Sequence[ReserveCommand]) -> list[ReserveOutcome | Exception]:
        """Each command decided on its own, as reserve() would; in order for commands of one account.
        A failed item is its exception (StaleTimeZone included), not raised."""
        replies = await self._run_many([("reserve", c.account_id, c.stamp, reserve_args(c)) for c in cmds])
        return [r if isinstance(r, Exception) else decode_reserve_outcome(r) for r in replies]

    async def commit_many(self, items: Sequence[tuple[str, str, Mapping[tuple[str, str], ActualCost], Stamp]]
                          ) -> list[CommitResult | Exception]:
        """(account, reservation, costs, stamp) each, as commit() would apply it."""
        replies = await self._run_many([("commit", account_id, stamp, commit_args(rid, costs))
                                        for account_id, rid, costs, stamp in items])
        return [r if isinstance(r, Exception) else decode_commit_result(r) for r in replies]

    async def release_many(self, items: Sequence[tuple[str, str, Stamp]]) -> list[ReleaseResult | Exception]:
        """(account, reservation, stamp) each, as release() would apply it."""
        replies = await self._run_many([("release", a, stamp, [rid]) for a, rid, stamp in items])
        return [r if isinstance(r, Exception) else decode_release_result(r) for r in replies]

    async def reserve_all(self, cmds: Sequence[ReserveCommand]) -> list[ReserveOutcome | Exception]:
        """Commands of ONE account, all held or none (reserve_all.lua), in one script run.

        Raises StaleTimeZone (nothing written) when the account's zone is not cmds' zone. An item
        whose hold was undone because another was refused is BatchAborted."""
        first = cmds[0]
        assert all(c.account_id == first.account_id and c.time_zone == first.time_zone for c in cmds)
        args: list[Any] = [first.time_zone, first.default_plan, len(cmds)]
        for cmd in cmds:
            args += reserve_args(cmd)
        reply = await self._run("reserve_all", first.account_id, first.stamp, args)
        results: list[ReserveOutcome | Exception] = []
        for r in as_list(reply["results"]):
            if "error" in r:
                results.append(script_error(r))
            elif r.get("aborted"):
                results.append(BatchAborted())
            else:
                results.append(decode_reserve_outcome(r))
        return results


def _account_entries(bucket: int, rows: StreamRows, account_id: str) -> list[LedgerEntry]:
    """The account's entries among a bucket's outbox rows, in seq order (a bucket's stream is in
    the order the scripts wrote, which is each account's seq order; sorted all the same)."""
    entries = [outbox_entry(bucket, stream_id, fields) for stream_id, fields in rows if fields.get("a") == account_id]
    return sorted(entries, key=lambda e: e.seq)


def _next_stream_id(stream_id: str) -> str:
    """The smallest stream id after ``stream_id`` (``<ms>-<seq>``)."""
    ms, seq = (int(part) for part in stream_id.split("-"))
    return f"{ms + 1}-0" if seq == _STREAM_ID_PART_MAX else f"{ms}-{seq + 1}"
