"""The conservation audit: a long random run stays clean; each corruption is caught by name."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from quota_fixtures import ShippedBooks, key

from quota_sidecar.domain.audit import AccountAudit, audit_account, audit_all, audit_state, format_report
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Conflict, NotFound, ResolutionConflict
from quota_sidecar.domain.model import CreditSource, Deltas, Funding, JobParams
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.storage.keys import DEFAULT_KEY_BUCKETS, key_bucket, outbox_key
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore
from quota_sidecar.tools.audit import audit_main

pytestmark = pytest.mark.all_redis_versions

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
V10 = JobParams(duration_seconds=10, resolution="720p")  # 1 credit
V15 = JobParams(duration_seconds=15, resolution="720p")  # 2 credits
EXPECTED_ERRORS = (ResolutionConflict, Conflict, NotFound)


def checks(audit: AccountAudit) -> set[str]:
    return {v.check for v in audit.violations}


async def assert_clean(store: RedisStore, account: str) -> AccountAudit:
    audit = await audit_account(store, account)
    assert audit.violations == (), format_report([audit])
    return audit


def small_free_plans() -> Plans:
    """The default plans with a tiny free allowance, so the random run spends credits too."""
    text = resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    data["plans"]["free"]["sora"]["daily_free"] = 2
    # Metered codex: a little included usage (credits) per 5 hours and per week.
    data["plans"]["free"]["codex"]["limits"] = [{"id": "five_hour", "kind": "rolling", "hours": 5, "free": 6},
                                                {"id": "weekly", "kind": "week", "free": 15}]
    return parse_plans(data)


# -- the random run ------------------------------------------------------------------


@dataclass
class Book:
    """What the run knows of one account, to pick operations that are usually valid."""

    held: dict[str, JobParams] = field(default_factory=dict)
    products: dict[str, str] = field(default_factory=dict)
    committed: list[str] = field(default_factory=list)
    purchases: list[str] = field(default_factory=list)


def random_job(rng: random.Random, product: str) -> JobParams:
    if product == "sora":
        return JobParams(duration_seconds=rng.randint(1, 15), resolution="720p")
    # An estimate of 0 to 4 credits of usage (none: the default hold, 5).
    return JobParams(model="codex-mini", input_tokens=rng.randint(0, 200_000))


def smaller_job(rng: random.Random, product: str, job: JobParams) -> JobParams:
    if product == "sora":
        return JobParams(duration_seconds=rng.randint(1, int(job.duration_seconds)), resolution="720p")
    # The actual usage: below or above the estimate (above: capped, the excess written off).
    return JobParams(model="codex-mini", input_tokens=rng.randint(0, 300_000))


class RandomRun:
    def __init__(self, engine: QuotaEngine, clock: ManualClock, rng: random.Random, accounts: list[str]) -> None:
        self.engine, self.clock, self.rng = engine, clock, rng
        self.books = {a: Book() for a in accounts}
        self.serial = 0

    def _next_id(self, kind: str) -> str:
        self.serial += 1
        return f"{kind}{self.serial}"

    async def reserve(self, account: str, book: Book) -> None:
        product = self.rng.choice(("sora", "codex"))
        job = random_job(self.rng, product)
        d = await self.engine.check_and_reserve(account, product, self._next_id("r"), job)
        if d.outcome.allowed:
            book.held[d.reservation_id], book.products[d.reservation_id] = job, product

    async def commit(self, account: str, book: Book) -> None:
        if not book.held:
            return
        rid = self.rng.choice(sorted(book.held))
        job = book.held.pop(rid)
        actual = smaller_job(self.rng, book.products[rid], job) if self.rng.random() < 0.4 else None
        await self.engine.commit(account, rid, actual)
        book.committed.append(rid)

    async def release(self, account: str, book: Book) -> None:
        if book.held:
            rid = self.rng.choice(sorted(book.held))
            del book.held[rid]
            await self.engine.release(account, rid)

    async def extend(self, account: str, book: Book) -> None:
        if book.held:
            await self.engine.extend(account, self.rng.choice(sorted(book.held)), self.rng.randint(0, 3600))

    async def abandon(self, account: str, book: Book) -> None:
        # Forgotten by the worker: only expiry (lazy or the sweeper) resolves it.
        if book.held:
            del book.held[self.rng.choice(sorted(book.held))]

    async def grant(self, account: str, book: Book) -> None:
        source = self.rng.choice(list(CreditSource))
        expires_ms = self.clock.now_ms + self.rng.randint(HOUR_MS, 30 * DAY_MS)
        lot_id = self._next_id("p")
        await self.engine.grant(account, self.rng.randint(1, 40), lot_id, expires_ms, source=source,
                                reason="random run")
        if source is CreditSource.PURCHASE:
            book.purchases.append(lot_id)

    async def revoke(self, account: str, book: Book) -> None:
        if book.purchases:
            await self.engine.revoke(account, self.rng.choice(book.purchases), reason="chargeback")

    async def refund(self, account: str, book: Book) -> None:
        # Sometimes a retry of an earlier refund: it must replay, not refund twice.
        if book.committed:
            await self.engine.refund_job(account, self.rng.choice(book.committed), reason="failed render")

    async def advance(self, account: str, book: Book) -> None:
        # Mostly seconds (holds get resolved), sometimes past every TTL, rarely past midnight and lot expiries.
        roll = self.rng.random()
        if roll < 0.8:
            self.clock.advance(ms=self.rng.randint(1_000, 120_000))
            return
        self.clock.advance(ms=self.rng.randint(HOUR_MS, 8 * HOUR_MS) if roll < 0.95
                           else self.rng.randint(DAY_MS // 2, 2 * DAY_MS))
        # Past every TTL: the holds still on the books will expire; keep picking live ones.
        for other in self.books.values():
            other.held.clear()

    async def sweep(self, account: str, book: Book) -> None:
        await self.engine.sweep()

    async def step(self) -> None:
        ops = ((self.reserve, 28), (self.commit, 30), (self.release, 8), (self.extend, 5), (self.abandon, 4),
               (self.grant, 9), (self.revoke, 2), (self.refund, 6), (self.advance, 12), (self.sweep, 4))
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        account = self.rng.choice(sorted(self.books))
        try:
            await op(account, self.books[account])
        except EXPECTED_ERRORS:
            pass  # e.g. a commit of a hold that expired meanwhile


async def test_random_run_audits_clean(store: RedisStore, clock: ManualClock) -> None:
    engine = QuotaEngine(small_free_plans(), store, clock)
    accounts = [f"acct{i}" for i in range(6)]
    run = RandomRun(engine, clock, random.Random(1234), accounts)
    await engine.set_account("acct0", monthly_spend_cap_credits=60)
    await engine.set_account("acct1", tz="America/New_York")
    for _ in range(900):
        await run.step()
    audits = await audit_all(store)
    assert [a.account_id for a in audits] == accounts
    states = [await store.raw_state(a) for a in accounts]
    for audit, state in zip(audits, states):
        assert audit.violations == (), format_report(audits)
        assert audit.entries_checked == state["seq"] > 0 and not audit.ledger_trimmed
        assert [e.seq for e in state["outbox"]] == list(range(1, state["seq"] + 1))
    # The run did exercise every kind of movement.
    kinds = {e.type for s in states for e in s["outbox"]}
    assert kinds >= {"hold", "commit", "release", "expire", "grant", "revoke", "lot_expire", "refund",
                     "account"}, kinds
    # Included usage of the metered codex: taken by amount, settled below and above the estimate.
    usage = [e for s in states for e in s["outbox"] if e.type == "commit" and "usage" in e.fields]
    assert any(int(e.fields["usage"]) < int(e.fields["usage_held"]) for e in usage)
    # Above the estimate the packaged codex draws: the windows take the whole actual usage.
    assert any(int(e.fields["usage"]) > int(e.fields["usage_held"]) and "wo" not in e.fields for e in usage)
    assert any(e.type in ("release", "expire") and "usage" in e.fields for s in states for e in s["outbox"])


# -- corruptions ---------------------------------------------------------------------------


async def busy_account(engine: QuotaEngine, clock: ManualClock, account: str = "a") -> None:
    """Some history: free and credit holds, a partial commit, a release, an expiry, a refund."""
    await engine.grant(account, 20, "p1")
    await engine.grant(account, 5, "promo1", clock.now_ms + 2 * DAY_MS, source=CreditSource.PROMO)
    for i in range(30):
        await engine.check_and_reserve(account, "sora", f"free{i}", V10)
        await engine.commit(account, f"free{i}")
    await engine.check_and_reserve(account, "sora", "c1", V15)
    await engine.commit(account, "c1", V10)
    await engine.check_and_reserve(account, "sora", "c2", V15)
    await engine.release(account, "c2")
    await engine.check_and_reserve(account, "sora", "c3", V15)
    await engine.check_and_reserve(account, "sora", "held1", V15)
    await engine.commit(account, "c3")
    await engine.refund_job(account, "c3", reason="failed")
    await engine.check_and_reserve(account, "sora", "late", V10)
    clock.advance(ms=901_000)  # "late" and "held1" expire
    await engine.check_and_reserve(account, "sora", "held2", V15)


async def test_clean_history_has_no_violations(engine: QuotaEngine, store: RedisStore, clock: ManualClock) -> None:
    await busy_account(engine, clock)
    audit = await assert_clean(store, "a")
    kinds = Counter(e.type for e in (await store.raw_state("a"))["outbox"])
    assert kinds == {"grant": 2, "hold": 30 + 6, "commit": 30 + 2, "release": 1, "refund": 1, "expire": 2}
    assert audit.entries_checked == sum(kinds.values())


async def test_extra_credits_in_a_lot_break_conservation(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                                         redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    await assert_clean(store, "a")
    await redis_client.hincrby(key(key_prefix, "a", "lotrem"), "p1", 5)
    audit = await audit_account(store, "a")
    assert "conservation" in checks(audit)
    conservation = next(v for v in audit.violations if v.check == "conservation")
    assert "off by +5" in conservation.detail


async def test_negative_lot_is_reported(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                        redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    await assert_clean(store, "a")
    await redis_client.hset(key(key_prefix, "a", "lotrem"), "p1", -3)
    audit = await audit_account(store, "a")
    assert {"lot_negative", "conservation"} <= checks(audit)
    assert any("'p1'" in v.detail and "-3" in v.detail for v in audit.violations if v.check == "lot_negative")


async def test_spent_changed_outside_the_scripts(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                                 redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    await assert_clean(store, "a")
    acct = key(key_prefix, "a", "acct")
    spent = int(await redis_client.hget(acct, "credits_spent"))
    await redis_client.hset(acct, "credits_spent", spent + 7)
    audit = await audit_account(store, "a")
    assert {"ledger_chain", "conservation"} <= checks(audit)
    chain = [v.detail for v in audit.violations if v.check == "ledger_chain"]
    assert any(f"spent={spent + 7}" in d and f"spent={spent}" in d and "outside the scripts" in d for d in chain)


async def outbox_rows(redis_client: aioredis.Redis, key_prefix: str, account: str) -> list[tuple[str, dict[str, str]]]:
    rows = await redis_client.xrange(outbox_key(key_prefix, key_bucket(account, DEFAULT_KEY_BUCKETS)))
    return [(i, f) for i, f in rows if f["a"] == account]


async def test_second_commit_entry_is_resolved_twice(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                                     redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    await assert_clean(store, "a")
    commit = next(f for _, f in await outbox_rows(redis_client, key_prefix, "a") if f["k"] == "commit"
                  and f["rid"] == "c1")
    # Numbered as the script would: the sequence stays whole, the replay finds the second commit.
    seq = await redis_client.hincrby(key(key_prefix, "a", "acct"), "seq", 1)
    await redis_client.xadd(outbox_key(key_prefix, key_bucket("a", DEFAULT_KEY_BUCKETS)), {**commit, "q": seq})
    audit = await audit_account(store, "a")
    assert {"resolved_twice", "ledger_chain"} <= checks(audit) and "ledger_seq" not in checks(audit)
    assert any("'c1'" in v.detail for v in audit.violations if v.check == "resolved_twice")


async def test_a_seq_written_twice_or_skipped_is_caught(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                                        redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    outbox = outbox_key(key_prefix, key_bucket("a", DEFAULT_KEY_BUCKETS))
    rows = await outbox_rows(redis_client, key_prefix, "a")
    await redis_client.xadd(outbox, rows[3][1])  # seq 4 again, under another entry id
    await redis_client.xdel(outbox, rows[5][0])  # seq 6 lost
    audit = await audit_account(store, "a")
    details = [v.detail for v in audit.violations if v.check == "ledger_seq"]
    assert len(details) == 2, format_report([audit])
    assert details[0].startswith("seq 4 is held by 2 entries: ")
    assert details[1] == f"1 seq(s) of 1..{len(rows)} are in neither the books nor the outbox: 6"


async def test_free_counter_reset_is_caught(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                            redis_client: aioredis.Redis, key_prefix: str) -> None:
    for i in range(25):
        d = await engine.check_and_reserve("a", "sora", f"f{i}", V10)
        await engine.commit("a", d.reservation_id)
    await assert_clean(store, "a")
    await redis_client.hset(key(key_prefix, "a", "free"), "sora|daily|d20261121", 0)
    for i in range(10):  # 35 free jobs today, 30 allowed
        d = await engine.check_and_reserve("a", "sora", f"g{i}", V10)
        assert d.outcome.funding is Funding.FREE_QUOTA
    audit = await audit_account(store, "a")
    assert {"free_counter", "free_over_limit"} <= checks(audit)
    details = "\n".join(v.detail for v in audit.violations)
    assert "recorded used=1 but the replay counts 26" in details
    assert "stored 10 free units used but the ledger replays 35" in details
    assert "makes 31 free units used, over the limit 30" in details


async def test_deleted_record_of_a_held_reservation(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                                    redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    await assert_clean(store, "a")
    await redis_client.hdel(key(key_prefix, "a", "res"), "held2")
    audit = await audit_account(store, "a")
    assert {"hold_index", "held_counter"} <= checks(audit)
    assert any("'held2'" in v.detail for v in audit.violations if v.check == "hold_index")


async def test_held_counter_changed(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                    redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    await assert_clean(store, "a")
    await redis_client.hincrby(key(key_prefix, "a", "acct"), "credits_held", 4)
    audit = await audit_account(store, "a")
    assert "held_counter" in checks(audit)
    held = next(v.detail for v in audit.violations if v.check == "held_counter")
    assert "credits_held = 6 but the 1 held records hold 2 credits (off by +4)" in held


async def test_spend_counter_changed(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                     redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    await assert_clean(store, "a")
    await redis_client.hincrby(key(key_prefix, "a", "spend"), "202611", -1)
    audit = await audit_account(store, "a")
    assert "spend_counter" in checks(audit)


async def test_lot_meta_overdrawn(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                  redis_client: aioredis.Redis, key_prefix: str) -> None:
    await busy_account(engine, clock)
    await assert_clean(store, "a")
    lots = key(key_prefix, "a", "lots")
    meta = json.loads(await redis_client.hget(lots, "promo1"))
    meta["g"] = 1
    await redis_client.hset(lots, "promo1", json.dumps(meta))
    audit = await audit_account(store, "a")
    assert {"lot_overdrawn", "lot_totals"} <= checks(audit)


# -- pure logic, report and entry point -------------------------------------------------------


def test_empty_state_is_clean() -> None:
    audit = audit_state("nobody", {})
    assert (audit.entries_checked, audit.ledger_trimmed, audit.violations) == (0, False, ())
    assert audit_state("nobody", {}, books=[]).ok


async def test_without_books_a_shipped_prefix_is_not_checked(engine: QuotaEngine, store: RedisStore,
                                                             clock: ManualClock) -> None:
    await busy_account(engine, clock)
    state = await store.raw_state("a")
    state["outbox"] = state["outbox"][5:]  # as a shipper leaves it
    audit = audit_state("a", state)
    assert audit.ledger_trimmed and audit.violations == (), format_report([audit])
    assert (audit.unchecked_seqs, audit.entries_checked) == (5, state["seq"] - 5)
    assert "seq 1..5 not checked: books not given" in format_report([audit])
    state["outbox"] = []  # everything shipped
    assert audit_state("a", state).unchecked_seqs == state["seq"]
    # The same entries as the books' (given): the first five are missing from both.
    audit = audit_state("a", state | {"outbox": (await store.raw_state("a"))["outbox"][5:]}, books=[])
    assert [v.detail for v in audit.violations if v.check == "ledger_seq"] == [
        f"5 seq(s) of 1..{state['seq']} are in neither the books nor the outbox: 1, 2, 3, 4, 5"]


async def test_books_and_outbox_together_explain_redis(engine: QuotaEngine, store: RedisStore,
                                                       clock: ManualClock) -> None:
    """The books hold what a shipper stored (here: the outbox's first entries, then trimmed from
    it); with the rest of the outbox they are every movement, each counted once."""
    await busy_account(engine, clock)
    bucket = key_bucket("a", DEFAULT_KEY_BUCKETS)
    shipped = await store.read_outbox(bucket, 20)
    assert await store.trim_outbox(bucket, shipped[-1].entry_id) == 20
    state = await store.raw_state("a")
    assert state["outbox"][0].seq == 21
    audit = audit_state("a", state, books=shipped)
    assert audit.violations == () and (audit.entries_checked, audit.books_given) == (state["seq"], True)
    assert "(books and outbox)" in format_report([audit])
    # Shipped again meanwhile (read by the audit from both stores): still each once.
    assert audit_state("a", state, books=shipped + state["outbox"][:3]).ok
    # A movement the books lost, another the books hold under a second entry id.
    lost = audit_state("a", state, books=shipped[1:])  # the first grant
    assert {v.check for v in lost.violations} == {"ledger_seq", "ledger_chain", "ledger_available",
                                                  "purchase_lot"}, format_report([lost])
    assert "lot 'p1' (20 credits) is in Redis but no grant entry made it" in format_report([lost])
    twice = dataclasses.replace(shipped[2], entry_id="b0:1-1")
    assert [v.check for v in audit_state("a", state, books=[*shipped, twice]).violations] == ["ledger_seq"]


async def test_redis_behind_the_books_is_caught(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                                redis_client: aioredis.Redis, key_prefix: str) -> None:
    """Redis lost its last acknowledged movements (a failover, AOF everysec): the books hold seqs
    Redis no longer counts, and a purchase whose lot Redis no longer has."""
    await busy_account(engine, clock)
    await engine.grant("a", 4, "late-purchase")
    bucket = key_bucket("a", DEFAULT_KEY_BUCKETS)
    shipped = await store.read_outbox(bucket, 1000)
    await store.trim_outbox(bucket, shipped[-1].entry_id)
    seq = len(shipped)
    acct = key(key_prefix, "a", "acct")
    await redis_client.hset(acct, "seq", seq - 1)
    await redis_client.hincrby(acct, "credits_granted", -4)
    for name in ("lots", "lotrem"):
        await redis_client.hdel(key(key_prefix, "a", name), "late-purchase")
    await redis_client.zrem(key(key_prefix, "a", "lotexp"), "late-purchase")
    audit = audit_state("a", await store.raw_state("a"), books=shipped)
    details = {v.check: v.detail for v in audit.violations}
    assert details["ledger_seq"] == f"entries with seq {seq} but Redis' account seq is {seq - 1}: Redis lost " \
                                    "movements the books hold"
    assert details["purchase_lot"].startswith(f"grant b{bucket}:") and "'late-purchase' (4 credits) has no lot" \
        in details["purchase_lot"]
    assert {"ledger_chain", "ledger_available"} <= set(details), format_report([audit])


async def test_audit_account_reads_redis_then_the_books(engine: QuotaEngine, store: RedisStore,
                                                        clock: ManualClock) -> None:
    await busy_account(engine, clock)
    bucket = key_bucket("a", DEFAULT_KEY_BUCKETS)
    books = ShippedBooks(store, bucket)
    await books.ship(10)
    books.ship_on_read = 10  # a shipper at work between the audit's reads of Redis and of the books
    audit = await audit_account(store, "a", books)
    assert audit.ok and audit.books_given, format_report([audit])
    assert (await store.raw_state("a"))["outbox"][0].seq == 31
    # Read the other way round, what is shipped between the two reads is missed.
    books.ship_on_read = 0
    entries = await books.account_entries("a")
    await books.ship(10)
    wrong = audit_state("a", await store.raw_state("a"), books=entries)
    assert [v.detail for v in wrong.violations if v.check == "ledger_seq"] == [
        "10 seq(s) of 1..74 are in neither the books nor the outbox: 31, 32, 33, 34, 35, 36, 37, 38, 39, 40"]
    assert [a.account_id for a in await audit_all(store, books)] == ["a"]


async def test_report_and_audit_main(engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                     redis_client: aioredis.Redis, key_prefix: str,
                                     redis_server: RedisServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    await busy_account(engine, clock, "a")
    await busy_account(engine, clock, "b")
    args: dict[str, Any] = dict(key_prefix=key_prefix, key_buckets=DEFAULT_KEY_BUCKETS)
    assert await audit_main(redis_server.url, account=None, all_accounts=True, **args) == 0
    assert "2 account(s), 0 with violations" in capsys.readouterr().out
    books = ShippedBooks(store, key_bucket("a", DEFAULT_KEY_BUCKETS))
    await books.ship(1000)
    assert await audit_main(redis_server.url, account="a", all_accounts=False, books=books, **args) == 0
    assert "(books and outbox): OK" in capsys.readouterr().out
    assert await audit_main(redis_server.url, account="a", all_accounts=False, **args) == 0
    assert "not checked: books not given): OK" in capsys.readouterr().out
    await redis_client.hincrby(key(key_prefix, "b", "lotrem"), "p1", 5)
    assert await audit_main(redis_server.url, account="a", all_accounts=False, **args) == 0
    capsys.readouterr()
    assert await audit_main(redis_server.url, account=None, all_accounts=True, **args) == 1
    out = capsys.readouterr().out
    assert "account a:" in out and "account b:" in out and "[conservation]" in out and "off by +5" in out
    with pytest.raises(ValueError):
        await audit_main(redis_server.url, account="a", all_accounts=True, **args)


async def test_credits_given_back_to_a_revoked_lot_must_be_revoked(engine: QuotaEngine, store: RedisStore) -> None:
    await engine.set_account("a", plan="free")
    await engine.grant("a", 10, "p1")
    for i in range(30):
        await engine.commit("a", (await engine.check_and_reserve("a", "sora", f"f{i}", V10)).reservation_id)
    await engine.check_and_reserve("a", "sora", "r", V15)
    await engine.revoke("a", "p1", reason="chargeback")
    await engine.release("a", "r")
    state = await store.raw_state("a")
    assert audit_state("a", state).violations == ()
    release = state["outbox"][-1]
    assert (release.type, release.fields["to_revoked"]) == ("release", "2")
    # As if the script had put them back into the revoked lot.
    state["outbox"][-1] = dataclasses.replace(release, fields={**release.fields, "to_revoked": "0", "to_lots": "2"},
                                              deltas=Deltas(held=-2))
    audit = audit_state("a", state)
    assert "return_placement" in checks(audit)
    assert "to_revoked 0 / to_expired 0 but its lots {'p1': 2} call for 2 / 0" in format_report([audit])
