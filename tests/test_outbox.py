"""The outbox, on a real Redis: one entry per movement in the bucket's stream, numbered per account
with no gap, carrying its deltas; the shipper's reads, trims and stats; ListLedger over the books and
the outbox; and an account whose memory no longer grows with its history."""

from __future__ import annotations

from importlib import resources

import pytest
import redis.asyncio as aioredis
import yaml
from quota_fixtures import T0_MS, ShippedBooks, keys_with_prefix

from quota_sidecar.domain.audit import audit_account
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine, ReserveItem
from quota_sidecar.domain.errors import QuotaError, Unavailable
from quota_sidecar.domain.ledger import before, contiguous, merge_by_seq, summed, with_running_totals
from quota_sidecar.domain.model import CreditSource, Deltas, JobParams, LedgerEntry, OutboxStats, Stamp
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.storage.keys import key_bucket, outbox_key
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

V10 = JobParams(duration_seconds=10, resolution="720p")  # 1 credit
V15 = JobParams(duration_seconds=15, resolution="720p")  # 2 credits
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def two_free_a_day() -> Plans:
    """The default plans with 2 free sora jobs a day, so credits move after the second."""
    data = yaml.safe_load(resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text(encoding="utf-8"))
    data["plans"]["free"]["sora"]["daily_free"] = 2
    return parse_plans(data)


@pytest.fixture
def engine(store: RedisStore, clock: ManualClock) -> QuotaEngine:
    return QuotaEngine(two_free_a_day(), store, clock)


async def new_entries(store: RedisStore, account: str, seen: list[LedgerEntry]) -> list[LedgerEntry]:
    """The account's entries written since the last call (``seen`` keeps what was read)."""
    everything = await store.account_outbox(account)
    fresh = everything[len(seen):]
    seen[:] = everything
    return fresh


def moved(entries: list[LedgerEntry]) -> list[tuple[str, Deltas]]:
    return [(e.type, e.deltas) for e in entries]


async def test_each_movement_writes_one_entry_with_its_deltas(engine: QuotaEngine, store: RedisStore,
                                                              clock: ManualClock) -> None:
    seen: list[LedgerEntry] = []
    await engine.grant("a", 0, "p1", pack_id="pack_10", reason="stripe pi_1")
    await engine.grant("a", 3, "promo", T0_MS + HOUR_MS, source=CreditSource.PROMO)
    grant, promo = await new_entries(store, "a", seen)
    assert (grant.type, grant.deltas, grant.account_id, grant.seq, grant.at_ms) == (
        "grant", Deltas(granted=10), "a", 1, T0_MS)
    assert {k: grant.fields[k] for k in ("pid", "credits", "source", "reason", "price", "cur", "pack")} == {
        "pid": "p1", "credits": "10", "source": "purchase", "reason": "stripe pi_1", "price": "400", "cur": "USD",
        "pack": "pack_10"}
    assert grant.entry_id.startswith(f"b{key_bucket('a', store.buckets)}:") and "price" not in promo.fields

    for rid in ("f1", "f2"):  # the day's two free jobs: a unit held, then kept by the commit
        await engine.check_and_reserve("a", "sora", rid, V10)
    await engine.commit("a", "f1")
    await engine.release("a", "f2")
    assert moved(await new_entries(store, "a", seen)) == [
        ("hold", Deltas(free_units=1)), ("hold", Deltas(free_units=1)), ("commit", Deltas()),
        ("release", Deltas(free_units=-1))]
    await engine.check_and_reserve("a", "sora", "f3", V10)  # the unit f2 gave back
    await engine.commit("a", "f3")
    await engine.refund_job("a", "f3")
    assert moved((await new_entries(store, "a", seen))[2:]) == [("refund", Deltas(free_units=-1))]
    await engine.commit("a", (await engine.check_and_reserve("a", "sora", "f4", V10)).reservation_id)
    await new_entries(store, "a", seen)  # the allowance used up again

    await engine.check_and_reserve("a", "sora", "c1", V15)  # 2 credits: promo first (sooner)
    await engine.commit("a", "c1", V10)  # 1 spent, 1 back to its lot
    await engine.refund_job("a", "c1")
    await engine.check_and_reserve("a", "sora", "c2", V15)
    await engine.release("a", "c2")
    assert moved(await new_entries(store, "a", seen)) == [
        ("hold", Deltas(held=2)), ("commit", Deltas(held=-2, spent=1)), ("refund", Deltas(refunded=1)),
        ("hold", Deltas(held=2)), ("release", Deltas(held=-2))]

    await engine.check_and_reserve("a", "sora", "c3", V15, ttl_seconds=60)  # from promo, then from p1
    await engine.revoke("a", "p1")  # what p1 has left, now
    clock.advance(hours=2)  # c3 and the promo lot expire
    await engine.sweep()
    hold, revoke, lot_expire, expire = await new_entries(store, "a", seen)
    assert (hold.deltas, hold.fields["lots"]) == (Deltas(held=2), "promo:2")
    assert (revoke.deltas, revoke.fields["pid"]) == (Deltas(revoked=10), "p1")
    assert (lot_expire.type, lot_expire.deltas) == ("lot_expire", Deltas(expired=1))
    assert (expire.type, expire.deltas, expire.fields["to_expired"]) == ("expire", Deltas(held=-2, expired=2), "2")

    await engine.set_account("a", plan="plus", monthly_spend_cap_credits=50)
    await engine.set_account("a", plan="plus", monthly_spend_cap_credits=50)  # changes nothing: no entry
    await engine.set_account("a", tz="Europe/Paris")
    account_entries = await new_entries(store, "a", seen)
    assert [(e.type, dict(e.fields), e.deltas) for e in account_entries] == [
        ("account", {"plan": "plus", "cap": "50"}, Deltas()), ("account", {"tz": "Europe/Paris"}, Deltas())]
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1)) == list(range(1, await store.account_seq("a") + 1))
    assert (await audit_account(store, "a")).ok


async def test_credits_given_back_to_a_revoked_lot_move_as_revoked(engine: QuotaEngine, store: RedisStore) -> None:
    await engine.grant("a", 5, "p1")
    for rid in ("f1", "f2"):
        await engine.commit("a", (await engine.check_and_reserve("a", "sora", rid, V10)).reservation_id)
    await engine.check_and_reserve("a", "sora", "r", V15)
    await engine.revoke("a", "p1")  # 3 left are revoked now; the 2 held are revoked when given back
    await engine.release("a", "r")
    revoke, release = (await store.account_outbox("a"))[-2:]
    assert (revoke.deltas, release.deltas, release.fields["to_revoked"]) == (
        Deltas(revoked=3), Deltas(held=-2, revoked=2), "2")


async def test_degraded_replays_write_their_movements(store: RedisStore, engine: QuotaEngine) -> None:
    stamp = Stamp(now_ms=T0_MS, plans_version=engine.plans.version)

    async def replay(rid: str, state: str) -> tuple[str, str]:
        return await store.replay_degraded("d", rid, product="sora", fingerprint="fp", window_label="20261121",
                                           allowance=5, ttl_ms=60_000, state=state, resolved_ms=T0_MS + 1000,
                                           stamp=stamp)

    assert await replay("kept", "committed") == ("written", "committed")
    assert await replay("given-back", "released") == ("written", "released")
    await engine.commit("d", "kept")  # already committed: the journal's release now conflicts
    assert await replay("kept", "released") == ("conflict", "committed")
    entries = await store.account_outbox("d")
    assert [(e.type, e.deltas, e.fields.get("degraded")) for e in entries] == [
        ("hold", Deltas(free_units=1), "1"), ("commit", Deltas(), "1"),
        ("hold", Deltas(free_units=1), "1"), ("release", Deltas(free_units=-1), "1"),
        ("degraded_conflict", Deltas(), None)]
    assert [e.at_ms for e in entries] == [T0_MS, T0_MS + 1000, T0_MS, T0_MS + 1000, T0_MS]
    assert entries[-1].fields["journal"] == "released"


async def test_the_raw_entry_is_compact(store: RedisStore, engine: QuotaEngine, redis_client: aioredis.Redis,
                                        key_prefix: str) -> None:
    """Only the non-zero deltas, no totals snapshot, no per-account ledger key."""
    await engine.grant("a", 4, "p1")
    await engine.check_and_reserve("a", "sora", "f1", V10)
    rows = await redis_client.xrange(outbox_key(key_prefix, key_bucket("a", store.buckets)))
    assert [list(f)[:6] for _, f in rows] == [["a", "q", "t", "k", "dg", "pid"], ["a", "q", "t", "k", "df", "rid"]]
    assert not {"g", "s", "x", "v", "r", "h", "type"} & {k for _, f in rows for k in f}
    assert not [k for k in await keys_with_prefix(redis_client, key_prefix) if k.endswith(":ledger")]


async def test_a_refused_all_or_nothing_batch_leaves_no_gap(engine: QuotaEngine, store: RedisStore) -> None:
    await engine.grant("a", 1, "p1")
    refused = await engine.check_and_reserve_all([ReserveItem("a", "sora", f"n{i}", V10) for i in range(4)])
    assert all(isinstance(r, QuotaError) or not r.outcome.allowed for r in refused)  # 2 free + 1 credit < 4
    assert [e.seq for e in await store.account_outbox("a")] == [1]
    await engine.check_and_reserve("a", "sora", "after", V10)
    held = await engine.check_and_reserve_all([ReserveItem("a", "sora", f"y{i}", V10) for i in range(2)])
    assert all(not isinstance(r, QuotaError) and r.outcome.allowed for r in held)
    entries = await store.account_outbox("a")
    assert [(e.seq, e.type, e.fields.get("rid")) for e in entries] == [
        (1, "grant", None), (2, "hold", "after"), (3, "hold", "y0"), (4, "hold", "y1")]
    assert await store.account_seq("a") == 4 and (await audit_account(store, "a")).ok


def same_bucket_accounts(buckets: int, count: int) -> list[str]:
    first = "acct0"
    found = [first] + [f"acct{i}" for i in range(1, 10_000) if key_bucket(f"acct{i}", buckets) ==
                       key_bucket(first, buckets)]
    return found[:count]


async def test_trim_outbox_drops_exactly_through_the_entry(engine: QuotaEngine, store: RedisStore) -> None:
    one, two = same_bucket_accounts(store.buckets, 2)
    bucket = key_bucket(one, store.buckets)
    for i in range(3):
        await engine.grant(one, 1, f"p{i}")
        await engine.grant(two, 1, f"p{i}")
    entries = await store.read_outbox(bucket, 100)
    assert [(e.account_id, e.seq) for e in entries] == [(one, 1), (two, 1), (one, 2), (two, 2), (one, 3), (two, 3)]
    assert [e.entry_id for e in await store.read_outbox(bucket, 2)] == [e.entry_id for e in entries[:2]]
    assert await store.trim_outbox(bucket, entries[2].entry_id) == 3
    assert await store.read_outbox(bucket, 100) == entries[3:]
    assert await store.trim_outbox(bucket, entries[2].entry_id) == 0  # again: nothing more
    await engine.grant(one, 1, "later")  # written after the read: the next trim keeps it
    assert await store.trim_outbox(bucket, entries[-1].entry_id) == 3
    assert [e.fields["pid"] for e in await store.read_outbox(bucket, 100)] == ["later"]
    with pytest.raises(ValueError):
        await store.trim_outbox(bucket + 1, entries[-1].entry_id)  # another bucket's entry
    with pytest.raises(ValueError):
        await store.trim_outbox(bucket, "1700000000000-0")  # not an entry id


async def test_trim_outbox_at_the_largest_sequence_part(store: RedisStore, redis_client: aioredis.Redis,
                                                        key_prefix: str) -> None:
    """Through <ms>-<2^64 - 1> the next id is <ms + 1>-0: that one stays."""
    key = outbox_key(key_prefix, 7)
    last = 2**64 - 1
    for stream_id in ("5-1", f"5-{last}", "6-0", "6-1"):
        await redis_client.xadd(key, {"a": "x", "q": "1", "t": "0", "k": "grant"}, id=stream_id)
    assert await store.trim_outbox(7, f"b7:5-{last}") == 2
    assert [e.entry_id for e in await store.read_outbox(7, 10)] == ["b7:6-0", "b7:6-1"]


async def test_outbox_stats_count_every_bucket(engine: QuotaEngine, store: RedisStore,
                                               redis_client: aioredis.Redis, key_prefix: str) -> None:
    assert await store.outbox_stats() == OutboxStats(entries=0, oldest_ms=None)
    accounts = ["a", "b", "c"]
    assert len({key_bucket(a, store.buckets) for a in accounts}) == 3
    for account in accounts:
        await engine.grant(account, 1, "p")
        await engine.check_and_reserve(account, "sora", "r", V10)
    stats = await store.outbox_stats()
    first_ids = []
    for account in accounts:
        rows = await redis_client.xrange(outbox_key(key_prefix, key_bucket(account, store.buckets)), count=1)
        first_ids.append(int(rows[0][0].split("-")[0]))
    # The oldest entry's time is when Redis took it (its stream id), not the movement's pinned time.
    assert stats == OutboxStats(entries=6, oldest_ms=min(first_ids)) and stats.oldest_ms != T0_MS
    bucket = key_bucket("a", store.buckets)
    await store.trim_outbox(bucket, (await store.read_outbox(bucket, 10))[-1].entry_id)
    assert (await store.outbox_stats()).entries == 4


async def test_the_ledger_without_books_needs_the_whole_outbox(engine: QuotaEngine, store: RedisStore) -> None:
    for i in range(3):
        await engine.grant("a", 2, f"p{i}")
    entries, token = await engine.ledger("a")
    assert ([e.totals_after.granted for e in entries], token) == ([2, 4, 6], "")
    bucket = key_bucket("a", store.buckets)
    await store.trim_outbox(bucket, entries[0].entry_id)  # a shipper shipped the first
    with pytest.raises(Unavailable) as err:
        await engine.ledger("a")
    assert "books are not configured on this sidecar" in err.value.message
    await store.trim_outbox(bucket, entries[-1].entry_id)  # and every other
    with pytest.raises(Unavailable):
        await engine.ledger("a")
    assert (await engine.ledger("never-moved")) == ([], "")


async def busy(engine: QuotaEngine, clock: ManualClock, account: str) -> None:
    await engine.grant(account, 20, "p1")
    await engine.grant(account, 5, "promo", clock.now_ms + 2 * DAY_MS, source=CreditSource.PROMO)
    for day in range(3):
        for i in range(4):
            d = await engine.check_and_reserve(account, "sora", f"d{day}-{i}", V15 if i % 2 else V10)
            if i < 3:
                await engine.commit(account, d.reservation_id, V10 if i == 1 else None)
        await engine.refund_job(account, f"d{day}-1")
        clock.advance(days=1)  # the day's last hold expires
    await engine.sweep()
    await engine.set_account(account, plan="plus")


@pytest.mark.parametrize("shipped_first,ship_on_read", [(0, 0), (20, 0), (1000, 0), (20, 1), (0, 1), (5, 7)])
async def test_the_ledger_reads_the_books_then_the_outbox(store: RedisStore, clock: ManualClock,
                                                          shipped_first: int, ship_on_read: int) -> None:
    """Pages across the books/outbox boundary, with a shipper at work between the engine's reads:
    every movement once, in seq order, with the running totals."""
    plain = QuotaEngine(two_free_a_day(), store, clock)
    await busy(plain, clock, "a")
    truth = with_running_totals(await store.account_outbox("a"))
    books = ShippedBooks(store, key_bucket("a", store.buckets))
    await books.ship(shipped_first)
    books.ship_on_read = ship_on_read
    engine = QuotaEngine(two_free_a_day(), store, clock, books=books)
    pages, token = [], ""
    while True:
        page, token = await engine.ledger("a", 4, token)
        pages.append(page)
        if not token:
            break
    assert [e.seq for page in pages for e in page] == [e.seq for e in truth]
    assert [(e.entry_id, e.totals_after) for page in pages for e in page] == [(e.entry_id, e.totals_after)
                                                                               for e in truth]
    assert truth[-1].totals_after == (await plain.account("a")).totals
    assert all(len(page) == 4 for page in pages[:-1])


def test_merging_the_books_and_the_outbox_is_pure() -> None:
    def entry(entry_id: str, seq: int, **deltas: int) -> LedgerEntry:
        return LedgerEntry(entry_id=entry_id, at_ms=0, type="grant", fields={}, seq=seq, deltas=Deltas(**deltas))

    books = with_running_totals([entry("b1:1-0", 1, granted=5), entry("b1:2-0", 2, held=2)])
    outbox = [entry("b1:2-0", 2, held=2), entry("b1:3-0", 3, held=-2, spent=2), entry("b1:9-9", 1, granted=7)]
    merged = merge_by_seq(books, outbox)
    assert [(e.entry_id, e.seq) for e in merged] == [("b1:1-0", 1), ("b1:2-0", 2), ("b1:3-0", 3)]  # the books' seq 1
    assert [e.seq for e in merge_by_seq(books, outbox, after_seq=2)] == [3]
    totals = with_running_totals(merged)
    assert [(t.totals_after.available, t.totals_after.held) for t in totals] == [(5, 0), (3, 2), (3, 0)]
    assert before(totals[2]) == totals[1].totals_after and summed(merged) == totals[-1].totals_after
    assert contiguous(merged[1:], 2) and not contiguous(merged, 2)


async def test_memory_per_account_does_not_grow_with_its_history(redis_server: RedisServerProcess, key_prefix: str,
                                                                 redis_client: aioredis.Redis) -> None:
    """20 committed jobs a day, the outbox shipped (trimmed) every day: after the first days
    (records kept one day, windows pruned) an account's keys stay the same size."""
    clock = ManualClock(T0_MS)
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix, retention_ms=DAY_MS)
    try:
        engine = QuotaEngine(two_free_a_day(), store, clock)
        await engine.grant("a", 10_000, "p1", T0_MS + 300 * DAY_MS)
        bucket = key_bucket("a", store.buckets)
        sizes = []
        for day in range(12):
            for i in range(20):
                d = await engine.check_and_reserve("a", "sora", f"d{day}-{i}", V10)
                await engine.commit("a", d.reservation_id)
                clock.advance(ms=minutes_ms(30))
            shipped = await store.read_outbox(bucket, 1000)
            assert await store.trim_outbox(bucket, shipped[-1].entry_id) == len(shipped) >= 40
            sizes.append(await bytes_of(redis_client, key_prefix))
            clock.advance(ms=DAY_MS - 20 * minutes_ms(30))
        assert await store.account_seq("a") == 1 + 12 * 20 * 2
        # Day 3 on: flat (a ledger kept in Redis would add ~20 entries, kilobytes, a day).
        assert max(sizes[2:]) - min(sizes[2:]) < 512, sizes
    finally:
        await store.close()


def minutes_ms(minutes: int) -> int:
    return minutes * 60_000


async def bytes_of(client: aioredis.Redis, key_prefix: str) -> int:
    total = 0
    for key in await keys_with_prefix(client, key_prefix):
        total += int(await client.memory_usage(key, samples=0) or 0)
    return total
