"""The store on a real Redis Cluster: 3 masters + 3 replicas from the newest redis-server found.

The core behaviour (free jobs, credits, commit/release/expiry/extend, idempotent
and conflicting retries, NOSCRIPT, the sweeper, the audit, the admin reads) on
accounts spread over every master; then a slot migration during traffic and a
master failover (CLUSTER FAILOVER), after which every acknowledged decision is
there exactly once and the audit is clean.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from quota_fixtures import T0_MS, retrying
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.domain.audit import audit_account, audit_all, audit_state
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine, ReserveItem
from quota_sidecar.domain.errors import ConfigError, Conflict, Unavailable
from quota_sidecar.domain.model import DenialReason, Funding, JobParams, LedgerEntry
from quota_sidecar.server.app import create_admin_server
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage import scripts
from quota_sidecar.storage.connect import parse_url
from quota_sidecar.storage.keys import key_bucket
from quota_sidecar.storage.redis_server import RedisServerProcess, redis_server_version
from quota_sidecar.storage.store import RedisStore
from quota_sidecar.storage.transport import domain_error

pytestmark = [pytest.mark.slow, pytest.mark.all_redis_versions]

V10 = JobParams(duration_seconds=10, resolution="720p")  # 1 credit
_SETTLE_SECONDS = 30.0


def _free_port(avoid: set[int], *, below: int = 65536) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid and port < below:
            avoid.add(port)
            return port
    raise RuntimeError("no free loopback port")


def _ports_of_a_node(used: set[int], version: tuple[int, ...]) -> tuple[int, list[str]]:
    """A node's port and the arguments placing its cluster bus. Redis 7 takes any bus port
    (cluster-port); before 7 the bus is always the port + 10000, so that one must be free too."""
    if version >= (7,):
        port, bus = _free_port(used), _free_port(used)
        return port, ["--cluster-port", str(bus)]
    for _ in range(50):
        port = _free_port(used, below=65536 - 10000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        if port + 10000 not in used:
            used.add(port + 10000)
            return port, []
    raise RuntimeError("no free loopback port pair")


def _redis_cli(binary: str) -> str:
    for candidate in ("/usr/bin/redis-cli", shutil.which("redis-cli") or "",
                      str(Path(binary).with_name("redis-cli"))):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("no redis-cli to form the cluster with")


@dataclass
class Cluster:
    nodes: list[RedisServerProcess]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def topology(self) -> dict[str, dict[str, object]]:
        """node id -> port, master?, master id (replicas), from any reachable node's CLUSTER NODES."""
        for node in self.nodes:
            try:
                nodes = self.client(node.port).execute_command("CLUSTER NODES")
            except redis.RedisError:
                continue
            return {n["node_id"]: {"port": int(addr.rsplit(":", 1)[1].split("@")[0]), "master": "master" in n["flags"],
                                   "of": n["master_id"]} for addr, n in nodes.items()}
        raise RuntimeError("no cluster node answers")

    def node_id(self, port: int) -> str:
        return str(self.client(port).execute_command("CLUSTER MYID"))

    def owner_port(self, slot: int) -> int:
        for start, end, master, *_ in self.client(self.nodes[0].port).execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise AssertionError(f"slot {slot} is not served")

    def wait_settled(self) -> None:
        """Every node says cluster_state:ok, agrees on the slot map, and every replica is in sync."""
        deadline = time.monotonic() + _SETTLE_SECONDS
        while time.monotonic() < deadline:
            if self._settled():
                return
            time.sleep(0.1)
        raise AssertionError("the cluster did not settle in time")

    def _settled(self) -> bool:
        try:
            views = set()
            for node in self.nodes:
                c = self.client(node.port)
                if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return False
                views.add(tuple(sorted((r[0], r[1], r[2][1]) for r in c.execute_command("CLUSTER SLOTS"))))
                info = c.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            return len(views) == 1
        except redis.RedisError:
            return False


def _start_cluster(base: Path, binary: str) -> Iterator[Cluster]:
    version = redis_server_version(binary)
    used: set[int] = set()
    nodes = []
    for i in range(6):
        port, bus_args = _ports_of_a_node(used, version)
        data = base / f"node{i}"
        nodes.append(RedisServerProcess(binary, data, port=port, appendfsync="always", extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", str(data / "nodes.conf"),
            "--cluster-node-timeout", "2000", *bus_args]))
    try:
        for node in nodes:
            node.start()
        subprocess.run([_redis_cli(binary), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        cluster = Cluster(nodes)
        cluster.wait_settled()
        yield cluster
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _start_cluster(tmp_path_factory.mktemp("cluster"), redis_binary)


@pytest.fixture
async def store(cluster: Cluster) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(cluster.url, key_prefix="t" + uuid.uuid4().hex[:12], grant_min_replicas=1)
    yield s
    await s.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0_MS)


@pytest.fixture
def engine(store: RedisStore, clock: ManualClock) -> QuotaEngine:
    return QuotaEngine(load_plans(), store, clock)


def raw_client(store: RedisStore) -> RedisCluster:
    client = store._client  # the tests look at where keys live; the product never needs to
    assert isinstance(client, RedisCluster)
    return client


async def owner_of(store: RedisStore, account: str) -> str:
    client = raw_client(store)
    await client.initialize()
    return str(client.get_node_from_key(store.key(account, "acct")).name)


async def accounts_on_distinct_masters(store: RedisStore, count: int) -> list[str]:
    found: dict[str, str] = {}
    for i in range(200):
        owner = await owner_of(store, f"acct{i}")
        found.setdefault(owner, f"acct{i}")
        if len(found) == count:
            return list(found.values())
    raise AssertionError(f"accounts landed on only {len(found)} masters")


async def use_free(engine: QuotaEngine, account: str, n: int) -> None:
    for i in range(n):
        d = await engine.check_and_reserve(account, "sora", f"free-{i}", V10)
        assert d.outcome.allowed and d.outcome.funding is Funding.FREE_QUOTA, d
        await engine.commit(account, f"free-{i}")


def ledger_ids(entries: list, kind: str) -> list[str]:
    return [e.fields.get("rid", "") for e in entries if e.type == kind]


# -- URLs and errors (no cluster needed) ------------------------------------------


@pytest.mark.parametrize("url,mode,expected", [
    ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001/", "auto",
     ("cluster", (("127.0.0.1", 7000), ("127.0.0.1", 7001)))),
    ("redis://127.0.0.1:7000/0", "cluster", ("cluster", (("127.0.0.1", 7000),))),
    ("redis+sentinel://h1:26380,h2/mymaster?db=2", "auto", ("sentinel", (("h1", 26380), ("h2", 26379)))),
    ("redis://127.0.0.1:6379/0", "auto", ("single", ())),
])
def test_redis_url_forms(url: str, mode: str, expected: tuple[str, tuple[tuple[str, int], ...]]) -> None:
    parsed = parse_url(url, mode)
    assert (parsed.mode, parsed.hosts) == expected


@pytest.mark.parametrize("url,mode,words", [
    ("redis+cluster://", "auto", "no host"),
    ("redis+cluster://a:1,,b:2", "auto", "empty host"),
    ("redis+cluster://a:99999", "auto", "bad port"),
    ("redis+cluster://a:1/3", "auto", "database 0"),
    ("redis+sentinel://a:1/", "auto", "names the master"),
    ("redis+sentinel://a:1/m?x=1", "auto", "unknown option"),
    ("redis://a:1/0", "sentinel", "cannot be used"),
    ("redis+cluster://a:1", "single", "cannot be used"),
    ("http://a:1", "auto", "must start with"),
])
def test_bad_redis_urls_name_the_setting(url: str, mode: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings(redis_url=url, redis_mode=mode)
    assert err.value.field == "redis_url" and words in err.value.description


def test_cluster_and_failover_replies_are_retryable() -> None:
    for exc in (redis_errors.TryAgainError("Multiple keys request during rehashing of slot"),
                redis_errors.ClusterDownError("The cluster is down"), redis_errors.ClusterError("TTL exhausted."),
                redis_errors.ReadOnlyError("You can't write against a read only replica."),
                redis_errors.SlotNotCoveredError("Slot 5 is not covered")):
        assert isinstance(domain_error(exc), Unavailable), exc


# -- the core behaviour ---------------------------------------------------------


async def test_free_jobs_then_credits_and_every_resolution(engine: QuotaEngine, clock: ManualClock) -> None:
    await use_free(engine, "a", 30)
    d = await engine.check_and_reserve("a", "sora", "r1", V10)
    assert (d.outcome.allowed, d.outcome.denial) == (False, DenialReason.PURCHASE_REQUIRED)
    assert (await engine.grant("a", 10, "purchase-1")).credit_balance == 10
    d = await engine.check_and_reserve("a", "sora", "r1", V10)
    assert (d.outcome.allowed, d.outcome.funding, d.outcome.credit_balance) == (True, Funding.CREDITS, 9)
    assert (await engine.commit("a", "r1")).credits_charged == 1
    await engine.check_and_reserve("a", "sora", "r2", V10)
    assert (await engine.release("a", "r2")).credits_refunded == 1
    await engine.check_and_reserve("a", "sora", "r3", V10, ttl_seconds=60)
    extended = await engine.extend("a", "r3", 600)
    assert extended == T0_MS + 600_000
    clock.advance(seconds=601)
    b = await engine.balance("a")
    assert (b.credit_balance, b.holds) == (9, ())
    assert (await audit_account(engine.store, "a")).ok


async def test_idempotent_and_conflicting_retries(engine: QuotaEngine) -> None:
    first = await engine.check_and_reserve("a", "sora", "same", V10)
    again = await engine.check_and_reserve("a", "sora", "same", V10)
    assert (first.outcome.replayed, again.outcome.replayed, again.outcome.free_used) == (False, True, 1)
    with pytest.raises(Conflict):
        await engine.check_and_reserve("a", "sora", "same", JobParams(duration_seconds=5, resolution="480p"))
    g1, g2 = await engine.grant("a", 5, "p"), await engine.grant("a", 5, "p")
    assert (g1.replayed, g2.replayed, g2.credit_balance) == (False, True, 5)
    with pytest.raises(Conflict):
        await engine.grant("a", 6, "p")
    c1, c2 = await engine.commit("a", "same"), await engine.commit("a", "same")
    assert (c1.replayed, c2.replayed) == (False, True)


def flush_scripts(cluster: Cluster, ports: list[int] | None = None) -> None:
    """SCRIPT FLUSH on every node (or those of ``ports``), and FUNCTION FLUSH on the masters among
    them on Redis 7 (a master's replicas follow it; a replica refuses the write)."""
    topology = cluster.topology().values()
    for node in topology:
        if ports is None or node["port"] in ports:
            client = cluster.client(int(str(node["port"])))
            client.script_flush()
            if node["master"] and redis_server_version(cluster.nodes[0].binary) >= (7,):
                client.function_flush()


async def test_script_flush_on_every_master_then_calls_still_work(engine: QuotaEngine, store: RedisStore,
                                                                  cluster: Cluster) -> None:
    accounts = await accounts_on_distinct_masters(store, 3)
    for account in accounts:
        await engine.check_and_reserve(account, "sora", "before", V10)
    flush_scripts(cluster)
    for account in accounts:
        d = await engine.check_and_reserve(account, "sora", "after", V10)
        assert d.outcome.free_used == 2
        # The WAIT path (grant_min_replicas=1) reloads the script on the slot's master itself.
        assert (await engine.grant(account, 3, "p")).credit_balance == 3


# Functions exist only on Redis 7: run on the newest server (a 6.2-only machine skips).
@pytest.mark.newest_redis_only
async def test_function_flush_of_one_master_then_calls_work_on_every_master(
        engine: QuotaEngine, store: RedisStore, cluster: Cluster) -> None:
    if redis_server_version(cluster.nodes[0].binary) < (7,):
        pytest.skip("Redis 6.2 has no Functions")
    accounts = await accounts_on_distinct_masters(store, 3)
    for account in accounts:
        await engine.check_and_reserve(account, "sora", "before", V10)
    assert store.script_verb == "FCALL"
    lost = int((await owner_of(store, accounts[0])).rsplit(":", 1)[1])
    cluster.client(lost).function_flush()
    for account in accounts:  # "Function not found" on one master: the library loaded again, the call sent again
        assert (await engine.check_and_reserve(account, "sora", "after", V10)).outcome.free_used == 2
    masters = [int(str(n["port"])) for n in cluster.topology().values() if n["master"]]
    for port in masters:  # the library on every master, each serving FCALL
        assert [lib for lib in cluster.client(port).function_list() if store_library(lib)], port
        assert cluster.client(port).info("commandstats").get("cmdstat_fcall", {}).get("calls", 0) > 0, port
    cluster.client(lost).function_flush()  # the WAIT path (grant_min_replicas=1) loads it on the slot's master
    assert (await engine.grant(accounts[0], 3, "p")).credit_balance == 3


def store_library(library: list[object]) -> bool:
    """Whether a FUNCTION LIST entry is this code's library."""
    return dict(zip(library[::2], library[1::2]))["library_name"] == scripts.library_name()


async def test_batches_across_masters_after_script_flush(engine: QuotaEngine, store: RedisStore,
                                                        cluster: Cluster) -> None:
    # redis-py refuses EVALSHA in cluster pipelines: the store runs a batch account by account.
    accounts = await accounts_on_distinct_masters(store, 3)
    flush_scripts(cluster)
    items = [ReserveItem(a, "sora", f"r{i}", V10) for i in range(3) for a in accounts]
    decisions = await engine.check_and_reserve_many(items)
    assert [d.outcome.free_used for d in decisions] == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # in order per account
    commits = await engine.commit_many([(a, f"r{i}", None) for i in range(3) for a in accounts])
    assert [c.replayed for c in commits] == [False] * 9
    assert all(a.ok for a in await audit_all(store))


async def test_accounts_on_every_master_ledger_audit_and_sweeper(engine: QuotaEngine, store: RedisStore,
                                                                 clock: ManualClock) -> None:
    accounts = await accounts_on_distinct_masters(store, 3)
    assert len({await owner_of(store, a) for a in accounts}) == 3
    for account in accounts:
        await use_free(engine, account, 2)
        await engine.grant(account, 4, "p")
        await engine.check_and_reserve(account, "sora", "held", V10, ttl_seconds=60)
    assert await store.accounts_to_sweep() == sorted(accounts)
    assert await store.all_accounts() == sorted(accounts)
    clock.advance(seconds=61)
    assert await engine.sweep() == 3  # one expired hold on each master
    for account in accounts:
        entries, _ = await engine.ledger(account)
        assert [e.type for e in entries] == ["hold", "commit", "hold", "commit", "grant", "hold", "expire"]
    audits = await audit_all(store)
    assert [a.account_id for a in audits] == sorted(accounts) and all(a.ok for a in audits), audits


async def test_get_account_and_list_ledger_over_grpc(engine: QuotaEngine) -> None:
    settings = Settings(listen=("127.0.0.1:0",), admin_listen=("127.0.0.1:0",))
    server, port = create_admin_server(settings, engine)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            from quota_sidecar._proto.quota.v1 import quota_pb2_grpc

            admin = quota_pb2_grpc.QuotaAdminStub(channel)
            await admin.GrantCredits(pb.GrantCreditsRequest(account_id="w", credits=10, purchase_id="p"))
            await engine.check_and_reserve("w", "sora", "r", V10)
            a = await admin.GetAccount(pb.GetAccountRequest(account_id="w"))
            assert (a.totals.granted, a.balance.credit_balance) == (10, 10)
            page = await admin.ListLedger(pb.ListLedgerRequest(account_id="w", page_size=1))
            assert [e.type for e in page.entries] == ["grant"] and page.next_page_token
            rest = await admin.ListLedger(pb.ListLedgerRequest(account_id="w", page_token=page.next_page_token))
            assert [e.type for e in rest.entries] == ["hold"] and not rest.next_page_token
    finally:
        await server.stop(None)


async def test_raw_state_and_events_read_one_slot(engine: QuotaEngine, store: RedisStore) -> None:
    await use_free(engine, "e", 30)  # the last one emits free_exhausted into the bucket's stream
    await engine.grant("e", 2, "p")
    await engine.check_and_reserve("e", "sora", "r", V10)
    state = await store.raw_state("e")
    assert [e.type for e in state["outbox"]][-2:] == ["grant", "hold"] and len(state["holds"]) == 1
    assert [e.seq for e in state["outbox"]] == list(range(1, state["seq"] + 1))
    events = await store.events(key_bucket("e", store.key_buckets))
    assert [f["type"] for _, f in events if f["account"] == "e"][:2] == ["free_warning", "free_exhausted"]
    assert await store.try_lock("sweeper", "me", 1000) and not await store.try_lock("sweeper", "you", 1000)


async def test_the_outbox_on_every_master(engine: QuotaEngine, store: RedisStore) -> None:
    """Each bucket's outbox lives in its accounts' slot: the scripts write it with them, and the
    shipper's reads, trims and stats (one pipeline over every master) reach it."""
    accounts = await accounts_on_distinct_masters(store, 3)
    for account in accounts:
        await use_free(engine, account, 2)
        await engine.grant(account, 0, "p", pack_id="pack_10")
        await engine.check_and_reserve(account, "sora", "held", V10)
    assert (await store.outbox_stats()).entries == 3 * 6
    shipped: dict[str, list[LedgerEntry]] = {}
    for account in accounts:
        bucket = key_bucket(account, store.buckets)
        entries = await store.read_outbox(bucket, 100)
        assert [(e.account_id, e.seq) for e in entries] == [(account, seq) for seq in range(1, 7)]
        assert await store.trim_outbox(bucket, entries[2].entry_id) == 3
        shipped[account] = entries[:3]
    assert (await store.outbox_stats()).entries == 3 * 3
    for account in accounts:
        state = await store.raw_state(account)
        assert ([e.seq for e in state["outbox"]], state["seq"]) == ([4, 5, 6], 6)
        assert audit_state(account, state, books=shipped[account]).ok
        assert audit_state(account, state).ledger_trimmed
        with pytest.raises(Unavailable):  # no books on this engine, and the outbox was trimmed
            await engine.ledger(account)


# -- topology changes (last: they change which node serves what) -----------------


async def _traffic(engine: QuotaEngine, account: str, worker: int, jobs: int, acked: dict[str, set[str]],
                   stop: asyncio.Event | None = None) -> None:
    for i in range(jobs):
        if stop is not None:
            if stop.is_set():
                return
            await asyncio.sleep(0.005)  # paced, so the traffic spans the failover
        rid = f"w{worker}-{i}"
        d = await retrying(lambda: engine.check_and_reserve(account, "sora", rid, V10))
        if not d.outcome.allowed:
            continue
        acked["held"].add(rid)
        await retrying(lambda: engine.commit(account, rid))
        acked["committed"].add(rid)


async def _migrate_slot(cluster: Cluster, slot: int, source: int, target: int) -> int:
    """The standard steps, a few keys per MIGRATE so traffic sees the slot half moved."""
    src, dst = aioredis.Redis(port=source, decode_responses=True), aioredis.Redis(port=target, decode_responses=True)
    try:
        src_id, dst_id = await src.execute_command("CLUSTER MYID"), await dst.execute_command("CLUSTER MYID")
        await dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        await src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        moved = 0
        for _ in range(1000):
            keys = await src.execute_command("CLUSTER GETKEYSINSLOT", slot, 3)
            if not keys:
                break
            await src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            await asyncio.sleep(0.01)  # let the traffic run against the half-moved slot
        else:
            raise AssertionError("the slot never emptied")
        for port in [target, source] + [n.port for n in cluster.nodes if n.port not in (source, target)]:
            node = aioredis.Redis(port=port, decode_responses=True)
            try:
                if (await node.info("replication"))["role"] == "master":
                    await node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            finally:
                await node.aclose()
        return moved
    finally:
        await src.aclose()
        await dst.aclose()


async def test_slot_migration_during_traffic_loses_and_doubles_nothing(engine: QuotaEngine, store: RedisStore,
                                                                       cluster: Cluster) -> None:
    account = "migrating"
    await retrying(lambda: engine.grant(account, 200, "p"))
    slot = raw_client(store).keyslot(store.key(account, "acct"))
    source = cluster.owner_port(slot)
    target = next(n.port for n in cluster.nodes
                  if n.port != source and cluster.client(n.port).info("replication")["role"] == "master")
    acked: dict[str, set[str]] = {"held": set(), "committed": set()}
    traffic = asyncio.gather(*(_traffic(engine, account, w, 15, acked) for w in range(10)))  # 300 decisions
    for _ in range(200):  # start moving once traffic is flowing
        if len(acked["held"]) >= 10:
            break
        await asyncio.sleep(0.01)
    before = len(acked["held"])
    moved = await _migrate_slot(cluster, slot, source, target)
    during = len(acked["held"]) - before
    assert during > 0, "the traffic did not overlap the migration"
    await traffic
    assert moved > 0 and cluster.owner_port(slot) == target
    assert len(acked["held"]) == 150 and acked["committed"] == acked["held"]
    entries, _ = await engine.ledger(account, page_size=1000)
    holds, commits = ledger_ids(entries, "hold"), ledger_ids(entries, "commit")
    assert sorted(holds) == sorted(acked["held"]) and sorted(commits) == sorted(acked["committed"])
    b = await engine.balance(account)
    assert (b.allowances[0].free_used, b.credit_balance, b.holds) == (30, 200 - 120, ())
    assert (await audit_account(store, account)).ok
    cluster.wait_settled()


async def _until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert condition(), "timed out"


async def test_master_failover_the_sidecar_recovers(engine: QuotaEngine, store: RedisStore,
                                                    cluster: Cluster) -> None:
    account = "failing-over"
    await retrying(lambda: engine.grant(account, 1000, "p"))
    await use_free(engine, account, 5)
    old_master = cluster.owner_port(raw_client(store).keyslot(store.key(account, "acct")))
    old_id = cluster.node_id(old_master)
    replica = next(int(n["port"]) for n in cluster.topology().values() if n["of"] == old_id)
    acked: dict[str, set[str]] = {"held": set(), "committed": set()}
    stop = asyncio.Event()
    # Traffic straight through the failover: calls may fail for a moment, the retries (same ids) land.
    traffic = asyncio.gather(*(_traffic(engine, account, w, 200, acked, stop) for w in range(4)))
    await _until(lambda: len(acked["held"]) >= 10, 10)
    cluster.client(replica).execute_command("CLUSTER FAILOVER")
    await _until(lambda: cluster.client(replica).info("replication")["role"] == "master", _SETTLE_SECONDS)
    at_switch = len(acked["held"])
    await _until(lambda: len(acked["held"]) >= at_switch + 20, 10)  # and on, against the new master
    stop.set()
    await traffic
    assert cluster.client(old_master).info("replication")["role"] == "slave"
    cluster.wait_settled()
    d = await retrying(lambda: engine.check_and_reserve(account, "sora", "after", V10))
    assert d.outcome.allowed and await owner_of(store, account) == f"127.0.0.1:{replica}"
    assert acked["committed"] == acked["held"]
    entries, _ = await engine.ledger(account, page_size=1000)
    expected = acked["held"] | {f"free-{i}" for i in range(5)} | {"after"}
    assert sorted(ledger_ids(entries, "hold")) == sorted(expected)
    assert sorted(ledger_ids(entries, "commit")) == sorted(acked["committed"] | {f"free-{i}" for i in range(5)})
    assert (await engine.grant(account, 1, "after-failover")).credit_balance > 0  # WAIT on the new master
    assert (await audit_account(store, account)).ok


async def test_moving_one_redis_to_a_cluster_keeps_every_account(cluster: Cluster, tmp_path: Path) -> None:
    """The README's migration: drain the sidecars, `redis-cli --cluster import --cluster-copy`, point
    them at the cluster. Keys of an account share one slot, so each moves whole."""
    prefix = "m" + uuid.uuid4().hex[:10]
    single = RedisServerProcess(cluster.nodes[0].binary, tmp_path / "single")
    single.start()
    clock = ManualClock(T0_MS)
    before: dict[str, tuple[int, int, int]] = {}
    try:
        old = RedisStore.from_url(single.url, key_prefix=prefix)
        engine = QuotaEngine(load_plans(), old, clock)
        for a in range(12):
            account = f"move-{a}"
            await engine.grant(account, 10 + a, f"order-{a}")
            await use_free(engine, account, 3)
            await engine.check_and_reserve(account, "sora", "open-hold", JobParams(duration_seconds=10,
                                                                                    resolution="720p"))
            b = await engine.balance(account)
            before[account] = (b.credit_balance, b.allowances[0].free_used, len(b.holds))
        await old.close()
        subprocess.run([_redis_cli(single.binary), "--cluster", "import", f"127.0.0.1:{cluster.nodes[0].port}",
                        "--cluster-from", f"127.0.0.1:{single.port}", "--cluster-copy"],
                       check=True, capture_output=True, timeout=120)
    finally:
        single.stop()

    new = RedisStore.from_url(cluster.url, key_prefix=prefix)
    try:
        moved = QuotaEngine(load_plans(), new, clock)
        for account, (credits, free_used, holds) in before.items():
            b = await moved.balance(account)
            assert (b.credit_balance, b.allowances[0].free_used, len(b.holds)) == (credits, free_used, holds)
            assert (await moved.commit(account, "open-hold")).free_charged == 1  # the hold moved too
            d = await moved.check_and_reserve(account, "sora", "after-move", JobParams(duration_seconds=10,
                                                                                        resolution="720p"))
            assert d.outcome.free_used == free_used + 1
        audits = [await audit_account(new, account) for account in before]
        assert [a for a in audits if a.violations] == [] and all(a.entries_checked > 0 for a in audits)
        assert len({await owner_of(new, account) for account in before}) >= 2  # spread over the masters
    finally:
        await new.close()
