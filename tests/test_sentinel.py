"""The store behind Redis Sentinel: a master, a replica and 3 sentinels; SENTINEL FAILOVER; the sidecar follows.

The failover is the graceful one (SENTINEL FAILOVER after the replica has caught
up), so every acknowledged decision must survive it: replication is
asynchronous, and a hard kill of the master could lose the last writes.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import pytest
import redis
from quota_fixtures import T0_MS, retrying

from quota_sidecar.domain.audit import audit_account
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.model import Funding, JobParams
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.storage.keys import key_bucket, outbox_key
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = [pytest.mark.slow, pytest.mark.all_redis_versions]

V10 = JobParams(duration_seconds=10, resolution="720p")  # 1 credit
# Retries of a call made during a failover: ~10 s at retrying()'s 50 ms pause.
FAILOVER_ATTEMPTS = 200
MASTER = "mymaster"
_SETTLE_SECONDS = 30.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=5)


def _wait(condition: Callable[[], bool], what: str, seconds: float = _SETTLE_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.RedisError:
            pass  # not up yet
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Sentinels:
    """redis-server --sentinel processes; RedisServerProcess writes data-server configs, so these are plain."""

    def __init__(self, binary: str, base: Path, master_port: int, count: int = 3) -> None:
        self.ports = [_free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, port in enumerate(self.ports):
            folder = base / f"sentinel{i}"
            folder.mkdir(parents=True)
            conf = folder / "sentinel.conf"  # sentinel rewrites it: it must be its own, writable
            conf.write_text("\n".join([
                "bind 127.0.0.1", f"port {port}", "daemonize no", f'dir "{folder}"',
                f'logfile "{folder / "sentinel.log"}"',
                f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 2",
                f"sentinel down-after-milliseconds {MASTER} 1000",
                f"sentinel failover-timeout {MASTER} 5000", ""]))
            self.procs.append(subprocess.Popen([binary, str(conf), "--sentinel"], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                               start_new_session=True))

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + f"/{MASTER}"

    def master_port(self) -> int:
        return int(_client(self.ports[0]).execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", MASTER)[1])

    def ready(self) -> bool:
        """Every sentinel sees the master, its replica and the 2 other sentinels (needed to fail over)."""
        for port in self.ports:
            state = _client(port).execute_command("SENTINEL MASTER", MASTER)
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < len(self.ports) - 1:
                return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Topology:
    def __init__(self, master: RedisServerProcess, replica: RedisServerProcess, sentinels: Sentinels) -> None:
        self.master, self.replica, self.sentinels = master, replica, sentinels


def _in_sync(master: int, replica: int) -> bool:
    offset = _client(master).info("replication")["master_repl_offset"]
    info = _client(replica).info("replication")
    return info.get("master_link_status") == "up" and info.get("slave_repl_offset") == offset


@pytest.fixture(scope="module")
def topology(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    base = tmp_path_factory.mktemp("sentinel")
    binary = redis_binary
    master = RedisServerProcess(binary, base / "master", appendfsync="always")
    master.start()
    replica = RedisServerProcess(binary, base / "replica", appendfsync="always",
                                 extra_args=["--replicaof", "127.0.0.1", str(master.port)])
    sentinels = None
    try:
        replica.start()
        _wait(lambda: _in_sync(master.port, replica.port), "the replica to sync")
        sentinels = Sentinels(binary, base, master.port)
        _wait(sentinels.ready, "the sentinels to find the replica and each other")
        yield Topology(master, replica, sentinels)
    finally:
        if sentinels is not None:
            sentinels.stop()
        replica.stop()
        master.stop()


@pytest.fixture
async def store(topology: Topology) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(topology.sentinels.url, key_prefix="t" + uuid.uuid4().hex[:12], grant_min_replicas=1)
    yield s
    await s.close()


async def jobs(engine: QuotaEngine, account: str, prefix: str, n: int) -> set[str]:
    done = set()
    for i in range(n):
        rid = f"{prefix}-{i}"
        d = await retrying(lambda: engine.check_and_reserve(account, "sora", rid, V10),
                           attempts=FAILOVER_ATTEMPTS)
        assert d.outcome.allowed, d
        await retrying(lambda: engine.commit(account, rid), attempts=FAILOVER_ATTEMPTS)
        done.add(rid)
    return done


async def test_sentinel_failover_the_sidecar_follows_and_keeps_every_decision(topology: Topology,
                                                                              store: RedisStore) -> None:
    engine = QuotaEngine(load_plans(), store, ManualClock(T0_MS))
    old_master, old_replica = topology.master.port, topology.replica.port
    assert topology.sentinels.master_port() == old_master
    before = await jobs(engine, "s", "before", 20)
    assert (await engine.grant("s", 30, "p1")).credit_balance == 30  # WAIT 1: on the replica too
    before |= await jobs(engine, "s", "credits", 15)  # 10 free left, then 5 on credits
    _wait(lambda: _in_sync(old_master, old_replica), "the replica to catch up")

    _client(topology.sentinels.ports[0]).execute_command("SENTINEL FAILOVER", MASTER)
    _wait(lambda: topology.sentinels.master_port() == old_replica, "the sentinels to promote the replica")
    _wait(lambda: _client(old_replica).info("replication")["role"] == "master", "the replica to become master")
    # Until the sentinels turn the old master into a replica it still takes writes, and those are
    # dropped when it resyncs (the Sentinel split-brain window): the exactness below needs it gone.
    _wait(lambda: _client(old_master).info("replication")["role"] == "slave", "the old master to be demoted")

    # The sidecar's pooled connections still point at the old master: the first calls may fail
    # (READONLY becomes a reconnect through the sentinels); the retries land on the new master.
    after = await jobs(engine, "s", "after", 5)
    b = await retrying(lambda: engine.balance("s"), attempts=FAILOVER_ATTEMPTS)
    assert (b.allowances[0].free_used, b.credit_balance, b.holds) == (30, 30 - 10, ())
    assert (await retrying(lambda: engine.grant("s", 1, "p2"), attempts=FAILOVER_ATTEMPTS)).credit_balance == 21
    entries, _ = await engine.ledger("s", page_size=1000)
    assert sorted(e.fields["rid"] for e in entries if e.type == "hold") == sorted(before | after)
    assert sorted(e.fields["rid"] for e in entries if e.type == "commit") == sorted(before | after)
    assert [e.fields["pid"] for e in entries if e.type == "grant"] == ["p1", "p2"]
    # Written on the promoted replica, not the old master.
    outbox = outbox_key(store.key_prefix, key_bucket("s", store.key_buckets))
    assert _client(old_replica).exists(outbox) == 1
    assert _client(old_replica).xlen(outbox) == len(entries) == await store.account_seq("s")
    assert (await audit_account(store, "s")).ok
    d = await engine.check_and_reserve("s", "sora", "last", V10)
    assert d.outcome.funding is Funding.CREDITS
