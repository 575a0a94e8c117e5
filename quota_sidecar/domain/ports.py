"""The ports the engine depends on: what it needs from storage (Store). The degraded journal's
port is quota_sidecar.domain.degraded.Journal.

Each Store method says when the engine calls it and what it costs. "One EVALSHA" is one Redis
round trip running one Lua script (atomic, idempotent by its ids); "one pipeline" is one round
trip carrying one script per item (one per master on a cluster). Failures are domain errors
(quota_sidecar.domain.errors), never Redis exceptions. tests/test_ports.py checks that
quota_sidecar.storage.store.RedisStore conforms.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from quota_sidecar.domain.model import (
    AccountChanges,
    AccountSettings,
    ActualCost,
    BalanceSnapshot,
    CommitResult,
    CreditSource,
    GrantResult,
    LedgerEntry,
    Limit,
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
        """CheckAndReserve, and again when the account's zone was stale (StaleTimeZone). One EVALSHA."""

    async def reserve_many(self, cmds: Sequence[ReserveCommand]) -> list[ReserveOutcome | Exception]:
        """CheckAndReserveBatch: each item decided as reserve() would, failures as values. One pipeline."""

    async def reserve_all(self, cmds: Sequence[ReserveCommand]) -> list[ReserveOutcome | Exception]:
        """An all_or_nothing batch of one account: all held or none. One EVALSHA."""

    async def commit(self, account_id: str, reservation_id: str, costs: Costs, stamp: Stamp) -> CommitResult:
        """Commit. One EVALSHA."""

    async def commit_many(self, items: Sequence[tuple[str, str, Costs, Stamp]]) -> list[CommitResult | Exception]:
        """CommitBatch: (account, reservation, costs, stamp) each, as commit(). One pipeline."""

    async def release(self, account_id: str, reservation_id: str, stamp: Stamp) -> ReleaseResult:
        """Release. One EVALSHA."""

    async def release_many(self, items: Sequence[tuple[str, str, Stamp]]) -> list[ReleaseResult | Exception]:
        """ReleaseBatch: (account, reservation, stamp) each, as release(). One pipeline."""

    async def extend(self, account_id: str, reservation_id: str, ttl_ms: int, stamp: Stamp) -> int:
        """ExtendReservation: the new expiry (ms). One EVALSHA."""

    async def grant(self, account_id: str, lot_id: str, credits: int, expires_ms: int, source: CreditSource,
                    reason: str, stamp: Stamp) -> GrantResult:
        """GrantCredits. One EVALSHA, then WAIT when replicas must acknowledge (same round trip)."""

    async def revoke(self, account_id: str, lot_id: str, reason: str, stamp: Stamp) -> RevokeResult:
        """RevokeCredits. One EVALSHA."""

    async def refund_job(self, account_id: str, reservation_id: str, reason: str, stamp: Stamp) -> RefundResult:
        """RefundJob. One EVALSHA."""

    async def set_account(self, account_id: str, changes: AccountChanges, default_plan: str,
                          stamp: Stamp) -> AccountSettings:
        """SetAccount, after the engine validated every field. One EVALSHA."""

    async def balance(self, account_id: str, *, time_zone: str, windows: Sequence[Window],
                      weeks: Sequence[Window], months: Sequence[Window],
                      product_rows: Sequence[tuple[str, str, int, tuple[Limit, ...]]], default_plan: str,
                      stamp: Stamp) -> BalanceSnapshot:
        """GetBalance and GetAccount (lazy expiry first). One EVALSHA."""

    async def replay_degraded(self, account_id: str, reservation_id: str, *, product: str, fingerprint: str,
                              window_label: str, allowance: int, ttl_ms: int, state: str, resolved_ms: int,
                              stamp: Stamp) -> tuple[str, str]:
        """When Redis answers again: one journalled degraded reservation, written or applied to
        the record Redis has; (outcome, the record's state). One EVALSHA."""

    async def sweep_account(self, account_id: str, notice_ms: int, stamp: Stamp) -> int:
        """The sweeper, per account returned by accounts_to_sweep: holds expired. One EVALSHA."""

    async def accounts_to_sweep(self) -> list[str]:
        """The sweeper, once per pass (lease holder only): accounts with holds, lots or records.
        O(keys): a SCAN of the keyspace."""

    async def ledger_page(self, account_id: str, after_id: str, count: int) -> list[LedgerEntry]:
        """ListLedger: up to ``count`` entries after ``after_id``. One XRANGE."""
