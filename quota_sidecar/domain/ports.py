"""The ports the engine depends on: what it needs from storage (Store). The degraded journal's
port is quota_sidecar.domain.degraded.Journal.

Each Store method says when the engine calls it and what it costs. "One script call" is one
Redis round trip running one Lua script (FCALL on Redis 7, EVALSHA on 6.2; atomic, idempotent by
its ids); "one pipeline" is one round trip carrying one script per item (one per master on a
cluster). Failures are domain errors (quota_sidecar.domain.errors), never Redis exceptions.
tests/test_ports.py checks that quota_sidecar.storage.store.RedisStore conforms.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from quota_sidecar.domain.model import (
    AccountChanges,
    AccountSettings,
    ActualCost,
    AppendResult,
    BalanceSnapshot,
    Cameo,
    CommitResult,
    CreditSource,
    CreditTotals,
    GrantResult,
    LedgerEntry,
    Limit,
    OutboxStats,
    RefundResult,
    ReleaseResult,
    ReserveCommand,
    ReserveOutcome,
    RevokeResult,
    Stamp,
    Window,
)

# Commit costs: (plans version or "*" for the current plans, product) -> the actual job's cost.
Costs = Mapping[tuple[str, str], ActualCost]


class Store(Protocol):
    """What the engine needs from storage (quota_sidecar.storage.store.RedisStore in production)."""

    async def reserve(self, cmd: ReserveCommand) -> ReserveOutcome:
        """CheckAndReserve, and again when the account's zone was stale (StaleTimeZone). One script call."""

    async def quote(self, cmd: ReserveCommand) -> ReserveOutcome:
        """Quote, and again when the account's zone was stale: what reserve(cmd) would answer now,
        decided by the same script code as a dry run, nothing held (an empty reservation_id quotes
        a new job). Writes only lazy expiry's settlements, when something is past due. One script call,
        the cost of a denied reserve()."""

    async def reserve_many(self, cmds: Sequence[ReserveCommand]) -> list[ReserveOutcome | Exception]:
        """CheckAndReserveBatch: each item decided as reserve() would, failures as values. One pipeline."""

    async def reserve_all(self, cmds: Sequence[ReserveCommand]) -> list[ReserveOutcome | Exception]:
        """An all_or_nothing batch of one account: all held or none. One script call."""

    async def commit(self, account_id: str, reservation_id: str, costs: Costs, stamp: Stamp) -> CommitResult:
        """Commit. One script call."""

    async def commit_many(self, items: Sequence[tuple[str, str, Costs, Stamp]]) -> list[CommitResult | Exception]:
        """CommitBatch: (account, reservation, costs, stamp) each, as commit(). One pipeline."""

    async def release(self, account_id: str, reservation_id: str, stamp: Stamp) -> ReleaseResult:
        """Release. One script call."""

    async def release_many(self, items: Sequence[tuple[str, str, Stamp]]) -> list[ReleaseResult | Exception]:
        """ReleaseBatch: (account, reservation, stamp) each, as release(). One pipeline."""

    async def extend(self, account_id: str, reservation_id: str, ttl_ms: int, stamp: Stamp) -> int:
        """ExtendReservation: the new expiry (ms). One script call."""

    async def grant(self, account_id: str, lot_id: str, credits: int, expires_ms: int, source: CreditSource,
                    reason: str, stamp: Stamp, *, price_minor_units: int | None = None, currency: str = "",
                    pack_id: str = "") -> GrantResult:
        """GrantCredits; the price paid and the pack go to the outbox entry (the books' quota_purchases).
        One script call, then WAIT when replicas must acknowledge (same round trip)."""

    async def revoke(self, account_id: str, lot_id: str, reason: str, stamp: Stamp) -> RevokeResult:
        """RevokeCredits. One script call."""

    async def refund_job(self, account_id: str, reservation_id: str, reason: str, stamp: Stamp) -> RefundResult:
        """RefundJob. One script call."""

    async def set_account(self, account_id: str, changes: AccountChanges, default_plan: str,
                          stamp: Stamp) -> AccountSettings:
        """SetAccount, after the engine validated every field. One script call."""

    async def balance(self, account_id: str, *, time_zone: str, windows: Sequence[Window],
                      weeks: Sequence[Window], months: Sequence[Window],
                      product_rows: Sequence[tuple[str, str, int, tuple[Limit, ...]]], default_plan: str,
                      stamp: Stamp) -> BalanceSnapshot:
        """GetBalance and GetAccount (lazy expiry first). One script call."""

    async def replay_degraded(self, account_id: str, reservation_id: str, *, product: str, fingerprint: str,
                              window_label: str, allowance: int, ttl_ms: int, state: str, resolved_ms: int,
                              stamp: Stamp) -> tuple[str, str]:
        """When Redis answers again: one journalled degraded reservation, written or applied to
        the record Redis has; (outcome, the record's state). One script call."""

    async def sweep_account(self, account_id: str, notice_ms: int, stamp: Stamp) -> int:
        """The sweeper, per account returned by accounts_to_sweep: holds expired. One script call."""

    async def set_cameo(self, cameo: Cameo) -> None:
        """Stores a cameo's definition (admin data under its own key, no account's)."""

    async def cameos(self) -> dict[str, Cameo]:
        """Every cameo defined, by id (each sidecar's registry refresh)."""

    async def accounts_to_sweep(self) -> list[str]:
        """The sweeper, once per pass (lease holder only): accounts with holds, lots or records.
        O(keys): a SCAN of the keyspace."""

    async def account_outbox(self, account_id: str) -> list[LedgerEntry]:
        """ListLedger and the audit: the account's movements not yet trimmed from its bucket's
        outbox, in ``seq`` order (totals_after left zero). One XRANGE of the bucket's outbox,
        filtered here: O(the bucket's unshipped entries), small while a shipper runs."""

    async def account_seq(self, account_id: str) -> int:
        """The account's last sequence number (0: no movement yet). One HGET."""


class Outbox(Protocol):
    """What the shipper needs from storage (RedisStore). One outbox stream per key bucket."""

    @property
    def buckets(self) -> int:
        """How many key buckets (and so outbox streams) there are."""

    async def read_outbox(self, bucket: int, count: int) -> list[LedgerEntry]:
        """The shipper, every pass: the bucket's oldest ``count`` entries. One XRANGE."""

    async def trim_outbox(self, bucket: int, through_id: str) -> int:
        """The shipper, after the books committed a batch: drops the bucket's entries up to and
        including ``through_id`` (an entry_id). One XTRIM MINID (exact). Returns entries dropped."""

    async def outbox_stats(self) -> OutboxStats:
        """The shipper's metrics, every pass: one pipeline of XLEN and XRANGE COUNT 1 per bucket."""

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """The fleet-wide lease (one SET NX PX)."""

    async def renew_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Extends a lease ``owner`` holds. One EVALSHA."""


class Books(Protocol):
    """The system of record (quota_sidecar.books.pg.PgBooks on PostgreSQL). Failures are domain
    errors: BooksUnavailable when PostgreSQL cannot be reached."""

    async def migrate(self) -> list[str]:
        """`books migrate` and every shipper start: applies the schema migrations not yet applied,
        in one transaction each, under an advisory lock; returns their names. Safe to run twice."""

    async def append(self, entries: Sequence[LedgerEntry]) -> AppendResult:
        """The shipper, once per batch: every entry stored exactly once (idempotent on entry_id),
        in one transaction (COPY into a staging table, then INSERT ... ON CONFLICT DO NOTHING)."""

    async def ledger_page(self, account_id: str, after_seq: int, count: int) -> list[LedgerEntry]:
        """ListLedger: up to ``count`` entries with seq > ``after_seq``, in seq order, with
        totals_after (a running sum over the account's entries). One query."""

    async def last_totals(self, account_id: str) -> tuple[int, CreditTotals]:
        """The account's highest seq in the books and the totals after it ((0, zeros) if none)."""

    async def account_entries(self, account_id: str) -> list[LedgerEntry]:
        """The audit: every entry of the account in the books, in seq order. One query."""

    async def conflicts(self, account_id: str | None = None) -> list[LedgerEntry]:
        """The audit, per account: outbox entries the books set aside (quota_ledger_conflicts) because
        their (account, seq) was already stored under another entry id. One query."""

    async def close(self) -> None:
        """Closes the connection (pool)."""
