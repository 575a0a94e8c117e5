"""End to end: the real ``quota-sidecar serve`` and the real CLI verbs, as subprocesses.

The sidecar listens on unix sockets in a short folder under /tmp (no port
races, and socket paths stay far below the ~107-byte limit). Readiness is the
gRPC health service answering SERVING, polled in a bounded loop. Every
subprocess is bounded by a timeout and killed in teardown if it is still alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import grpc
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from quota_fixtures import key

import quota_sidecar
from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server.settings import Settings, env_name
from quota_sidecar.storage.redis_server import RedisServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.all_redis_versions]

READY_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.05
CLI_TIMEOUT_SECONDS = 30.0
EXIT_TIMEOUT_SECONDS = 15.0
DEFAULT_PLANS = Path(quota_sidecar.__file__).with_name("default_plans.yaml")


# --------------------------------------------------------------------------- helpers


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any QUOTA_* variable (they would change what serve does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A short folder under /tmp for unix sockets and data (pytest's tmp_path is too long)."""
    path = tempfile.mkdtemp(prefix="qs", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def health_status(target: str, timeout: float = 5.0) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout).status


class ServeProcess:
    """One ``python -m quota_sidecar serve`` child; output goes to files (no pipe can fill up)."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_dir: str) -> None:
        self.args = list(args)
        self._stdout_path = os.path.join(log_dir, f"serve-{time.monotonic_ns()}.out")
        self._stderr_path = self._stdout_path[:-4] + ".err"
        with open(self._stdout_path, "wb") as out, open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "quota_sidecar", "serve", *self.args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=dict(env))

    @property
    def stderr(self) -> str:
        return Path(self._stderr_path).read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return Path(self._stdout_path).read_text(errors="replace")

    def wait_ready(self, target: str, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Polls the health service on ``target`` until SERVING; fails if the process exits first."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode} before it was ready:\n{self.stderr}")
            try:
                status = health_status(target)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = status
            except grpc.RpcError as exc:
                last = exc.code()
            time.sleep(POLL_SECONDS)
        pytest.fail(f"serve not SERVING on {target} within {timeout} s (last: {last}):\n{self.stderr}")

    def wait_exit(self, timeout: float = EXIT_TIMEOUT_SECONDS) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"serve did not exit within {timeout} s:\n{self.stderr}")

    def terminate(self, timeout: float = EXIT_TIMEOUT_SECONDS) -> int:
        """SIGTERM and wait for the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)


@dataclasses.dataclass
class Sidecar:
    serve: ServeProcess
    sock: str
    admin_sock: str
    dir: str

    @property
    def target(self) -> str:
        return f"unix:{self.sock}"

    @property
    def admin_target(self) -> str:
        return f"unix:{self.admin_sock}"


@contextlib.contextmanager
def running_sidecar(directory: str, *, redis_url: str | None, key_prefix: str | None,
                    extra: Sequence[str] = (), admin: bool = True,
                    env: Mapping[str, str] | None = None) -> Iterator[Sidecar]:
    """Starts serve on unix sockets in ``directory``, waits for SERVING, yields; always stops it.

    A clean SIGTERM stop is the test's business (it asserts the exit status);
    here, a process still alive at the end is terminated, then killed.
    """
    sock = os.path.join(directory, "q.sock")
    admin_sock = os.path.join(directory, "admin.sock")
    args = ["--listen", f"unix:{sock}", "--sweep-interval-seconds", "0"]
    if admin:
        args += ["--admin-listen", f"unix:{admin_sock}"]
    if redis_url is not None:
        args += ["--redis-url", redis_url]
    if key_prefix is not None:
        args += ["--key-prefix", key_prefix]
    args += list(extra)
    serve = ServeProcess(args, _clean_env(env), directory)
    try:
        serve.wait_ready(f"unix:{sock}")
        yield Sidecar(serve, sock, admin_sock, directory)
    finally:
        if serve.proc.poll() is None:
            serve.proc.send_signal(signal.SIGTERM)
            try:
                serve.proc.wait(timeout=EXIT_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                serve.kill()


@pytest.fixture
def sidecar(short_dir: str, redis_server: RedisServerProcess, key_prefix: str) -> Iterator[Sidecar]:
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix) as sc:
        yield sc


def cli(*args: str, env: Mapping[str, str] | None = None,
        timeout: float = CLI_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quota_sidecar", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, env=_clean_env(env), check=False)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def _sora(account: str, rid: str) -> pb.CheckAndReserveRequest:
    return pb.CheckAndReserveRequest(account_id=account, product="sora", reservation_id=rid,
                                     params=pb.JobParams(duration_seconds=10, resolution="720p"))


def _port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- 1. README walkthrough


def test_readme_walkthrough_via_cli(sidecar: Sidecar) -> None:
    account = "acct-readme"
    with grpc.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.QuotaServiceStub(channel)
        for i in range(30):
            r = stub.CheckAndReserve(_sora(account, f"free-{i}"), timeout=10)
            assert r.allowed and r.funding == pb.FUNDING_FREE_QUOTA, r
            assert r.free_used == i + 1 and r.free_limit == 30
            c = stub.Commit(pb.CommitRequest(account_id=account, reservation_id=f"free-{i}"), timeout=10)
            assert c.free_charged == 1 and c.credits_charged == 0

    denied = cli("reserve", "--account", account, "--product", "sora", "--duration", "10",
                 "--resolution", "720p", "--target", sidecar.target)
    assert denied.returncode == 3, (denied.stdout, denied.stderr)  # a denial has its own exit status
    out = denied.stdout
    assert "DENIED" in out and "PURCHASE_REQUIRED" in out, out
    assert "1 x pack_10 (10 credits, USD 4.00) = USD 4.00" in out, out
    assert "free today: 30/30" in out, out
    assert "ALLOWED" not in out

    out = _ok(cli("grant", "--account", account, "--credits", "10", "--purchase-id", "pay-1",
                  "--target", sidecar.admin_target))
    assert out.startswith("GRANTED  lot pay-1: 10 credit(s)"), out
    assert "credits available 10" in out, out

    out = _ok(cli("reserve", "--account", account, "--product", "sora", "--duration", "10",
                  "--resolution", "720p", "--id", "job-31", "--target", sidecar.target))
    assert out.startswith("ALLOWED  reservation job-31"), out
    assert "funded by credits: 1 credit(s) held" in out, out
    assert "credits available: 9" in out, out

    out = _ok(cli("commit", "--account", account, "--id", "job-31", "--target", sidecar.target))
    assert out.startswith("COMMITTED  charged 1 credit(s), 0 free unit(s)"), out
    assert "credits available 9" in out and "already committed" not in out, out

    out = _ok(cli("balance", "--account", account, "--target", sidecar.target))
    assert f"account {account}  plan free  time zone UTC" in out, out
    assert "credits available 9, held 0" in out, out
    # Tables: each limit with its reset time in the account's zone, the lots, the holds.
    assert re.search(r"^PRODUCT +FREE LIMIT +USED +OF +LEFT +UNIT +RESETS +NOTE$", out, re.MULTILINE), out
    assert re.search(r"^sora +daily \(per day\) +30 +30 +0 +generation +\d{4}-\d\d-\d\d 00:00:00 UTC$", out,
                     re.MULTILINE), out
    # codex's included usage: credits left per window.
    assert re.search(r"^codex +five_hour \(last 5 h\) +0 +10 +10 +credits +", out, re.MULTILINE), out
    assert re.search(r"^codex +weekly \(per week\) +0 +40 +40 +credits +", out, re.MULTILINE), out
    assert re.search(r"^pay-1 +9 +10 +purchase +\d{4}-", out, re.MULTILINE), out
    assert "HOLD" not in out, out  # everything was committed

    data = json.loads(_ok(cli("balance", "--account", account, "--json", "--target", sidecar.target)))
    # proto3 JSON but int64 as numbers, proto field names, zero values printed too.
    assert data["credit_balance"] == 9
    assert data["plan"] == "free"
    assert data["lots"] == [{**data["lots"][0], "lot_id": "pay-1", "credits_granted": 10, "credits_left": 9}]
    sora = next(a for a in data["allowances"] if a["product"] == "sora")
    assert sora["free_used"] == 30 and sora["free_limit"] == 30
    assert data["holds"] == [] and data["credits_held"] == 0


# --------------------------------------------------------------------------- 2. CLI errors


def test_table_aligns_text_left_and_numbers_right() -> None:
    from quota_sidecar.tools.cli_client import table

    assert table(["LOT", "LEFT", "SOURCE"], [["a", 9, "purchase"], ["longer-id", 10, "promo"]]) == [
        "LOT        LEFT  SOURCE",
        "a             9  purchase",
        "longer-id    10  promo",
    ]
    assert table(["HOLD", "CREDITS"], []) == ["HOLD  CREDITS"]


def test_cli_error_output(sidecar: Sidecar) -> None:
    r = cli("reserve", "--account", "acct-err", "--product", "sora", "--duration", "0", "--resolution", "720p",
            "--target", sidecar.target)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("error: INVALID_ARGUMENT:"), r.stderr
    assert "params.duration_seconds" in r.stderr, r.stderr
    assert "BadRequest" in r.stderr, r.stderr  # the google.rpc detail is printed too

    r = cli("commit", "--account", "acct-err", "--id", "nope", "--target", sidecar.target)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: NOT_FOUND:"), r.stderr
    assert "RESERVATION_NOT_FOUND" in r.stderr, r.stderr

    # The admin API is not served on the worker-facing --listen address.
    r = cli("grant", "--account", "acct-err", "--credits", "10", "--purchase-id", "p1", "--target", sidecar.target)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: UNIMPLEMENTED:"), r.stderr
    # ... and nothing was granted.
    out = _ok(cli("balance", "--account", "acct-err", "--target", sidecar.target))
    assert "credits available 0, held 0" in out, out


# --------------------------------------------------------------------------- 3. SIGTERM


@pytest.mark.newest_redis_only
def test_sigterm_exits_zero_and_stops_answering(short_dir: str, redis_server: RedisServerProcess,
                                                key_prefix: str) -> None:
    # An hour of grace: an idle sidecar that waited for it would outlast terminate()'s bound
    # (EXIT_TIMEOUT_SECONDS) by far, so exiting at all shows it did not (no stopwatch needed).
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix,
                         extra=["--shutdown-grace-seconds", "3600"]) as sidecar:
        assert health_status(sidecar.target) == health_pb2.HealthCheckResponse.SERVING
        assert sidecar.serve.terminate() == 0, sidecar.serve.stderr
        assert "stopping: no new calls; in-flight calls have 3600.0 s" in sidecar.serve.stderr, sidecar.serve.stderr
        assert sidecar.serve.stderr.rstrip().endswith("stopped"), sidecar.serve.stderr
        with pytest.raises(grpc.RpcError) as info:
            health_status(sidecar.target)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _grant_and_plan(sc: Sidecar, account: str, *, plan: str, credits: int) -> None:
    with grpc.insecure_channel(sc.admin_target) as channel:
        admin = pb_grpc.QuotaAdminStub(channel)
        assert admin.SetAccount(pb.SetAccountRequest(account_id=account, plan=plan), timeout=10).plan == plan
        g = admin.GrantCredits(pb.GrantCreditsRequest(account_id=account, credits=credits, purchase_id="load"),
                               timeout=10)
        assert g.credit_balance == credits


def _redis_holds_and_records(redis_url: str, prefix: str, account: str) -> tuple[list[str], set[str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        holds = client.zrange(key(prefix, account, "holds"), 0, -1)
        records = set(client.hkeys(key(prefix, account, "res")))
    finally:
        client.close()
    return holds, records


async def test_sigterm_under_load_is_graceful(short_dir: str, redis_server: RedisServerProcess,
                                              key_prefix: str) -> None:
    """50 concurrent workers keep reserving; SIGTERM lands while ~50 calls are in flight.

    Nothing may be lost or held twice: every acknowledged reservation is a hold in
    Redis, every hold was acknowledged, every failed call never reached Redis and
    succeeds (not as a replay) when retried with its id on a new sidecar.
    """
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix,
                         extra=["--shutdown-grace-seconds", str(LOAD_GRACE_SECONDS)]) as sidecar:
        await _load_then_sigterm(sidecar, redis_server, key_prefix, short_dir)


# Shorter than the calls' deadline: a call the server never finishes ends CANCELLED
# when the grace period runs out, not DEADLINE_EXCEEDED on the client.
LOAD_GRACE_SECONDS = 3.0
LOAD_CALL_TIMEOUT_SECONDS = 20.0


async def _load_then_sigterm(sidecar: Sidecar, redis_server: RedisServerProcess, key_prefix: str,
                             short_dir: str) -> None:
    account = "acct-load"
    workers, per_worker = 50, 4
    # pro (100 free sora jobs) plus credits for the rest: every call that is answered is allowed.
    _grant_and_plan(sidecar, account, plan="pro", credits=1000)

    acked: list[str] = []
    failed: dict[str, grpc.StatusCode] = {}
    unexpected: list[str] = []
    started_load = asyncio.Event()

    async def worker(stub: pb_grpc.QuotaServiceStub, w: int) -> None:
        for i in range(per_worker):
            rid = f"w{w}-{i}"
            try:
                r = await stub.CheckAndReserve(_sora(account, rid), timeout=LOAD_CALL_TIMEOUT_SECONDS)
            except grpc.RpcError as exc:
                failed[rid] = exc.code()
                return  # the sidecar is going away; this worker stops
            if not r.allowed or r.reservation_id != rid or r.replayed:
                unexpected.append(f"{rid}: {r}")
            acked.append(rid)
            if len(acked) >= workers:
                started_load.set()

    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.QuotaServiceStub(channel)
        await stub.GetBalance(pb.GetBalanceRequest(account_id=account), timeout=10)  # connected
        tasks = [asyncio.create_task(worker(stub, w)) for w in range(workers)]
        waiter = asyncio.create_task(started_load.wait())
        try:
            await asyncio.wait([waiter, *tasks], timeout=20, return_when=asyncio.FIRST_COMPLETED)
            assert waiter.done(), "the load never got going"
            sidecar.serve.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        finally:
            for t in (waiter, *tasks):
                t.cancel()
    rc = await asyncio.to_thread(sidecar.serve.wait_exit)
    assert rc == 0, sidecar.serve.stderr
    assert "Traceback" not in sidecar.serve.stderr, sidecar.serve.stderr
    assert not unexpected, unexpected
    assert len(acked) >= workers and len(set(acked)) == len(acked)
    assert len(acked) + len(failed) <= workers * per_worker

    # Never INTERNAL/UNKNOWN. UNAVAILABLE is the contract's "retry". CANCELLED is what
    # grpc core answers for calls it had received but not yet handed to a handler
    # when the server shut down (grpc/grpc#41785); see the burst test below.
    assert set(failed.values()) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, failed

    holds, records = await asyncio.to_thread(_redis_holds_and_records, redis_server.url, key_prefix, account)
    # Graceful stop lets handlers that started finish (10 s grace, far more than they
    # need), so no call was cut off after Redis applied it: holds == acknowledged
    # exactly. (Only a call cut off by the end of the grace period could leave a hold
    # without an ack, i.e. holds >= acks; that must not happen here.)
    assert sorted(holds) == sorted(acked)
    assert not set(failed) & records, "a failed call had reached Redis"

    # Retrying the failed calls with their ids on a new sidecar: each is new (not a
    # replay), so none had been applied; acknowledged ones replay.
    retry_dir = os.path.join(short_dir, "r")
    os.mkdir(retry_dir)
    with running_sidecar(retry_dir, redis_url=redis_server.url, key_prefix=key_prefix) as sc2:
        with grpc.insecure_channel(sc2.target) as channel:
            stub2 = pb_grpc.QuotaServiceStub(channel)
            for rid in failed:
                r = stub2.CheckAndReserve(_sora(account, rid), timeout=10)
                assert r.allowed and not r.replayed, (rid, r)
            for rid in acked[:3]:
                r = stub2.CheckAndReserve(_sora(account, rid), timeout=10)
                assert r.allowed and r.replayed, (rid, r)
        assert sc2.serve.terminate() == 0, sc2.serve.stderr
    holds, _ = await asyncio.to_thread(_redis_holds_and_records, redis_server.url, key_prefix, account)
    assert sorted(holds) == sorted([*acked, *failed])


async def test_sigterm_burst_refuses_only_calls_that_never_reached_redis(
        sidecar: Sidecar, redis_server: RedisServerProcess, key_prefix: str) -> None:
    """30 calls sent at once, then SIGTERM at once.

    Every refused call is UNAVAILABLE or CANCELLED and left nothing in Redis, so a
    retry with the same id is safe. CANCELLED comes from grpc core, which ends calls
    it received but had not yet handed to a handler that way (grpc/grpc#41785, open;
    the proto documents it as retryable).
    """
    account = "acct-burst"
    acked: list[str] = []
    failed: dict[str, grpc.StatusCode] = {}

    async def one(stub: pb_grpc.QuotaServiceStub, rid: str) -> None:
        try:
            # Longer than the 10 s grace: a call caught in grpc.aio's rare shutdown race
            # lasts the grace period and must end by the server's stop, not our deadline.
            r = await stub.CheckAndReserve(_sora(account, rid), timeout=20)
        except grpc.RpcError as exc:
            failed[rid] = exc.code()
            return
        assert r.allowed and r.reservation_id == rid
        acked.append(rid)

    async with grpc.aio.insecure_channel(sidecar.target) as channel:
        stub = pb_grpc.QuotaServiceStub(channel)
        await stub.GetBalance(pb.GetBalanceRequest(account_id=account), timeout=10)  # connected
        tasks = [asyncio.create_task(one(stub, f"b{i}")) for i in range(30)]  # free plan: 30 a day
        for _ in range(3):
            await asyncio.sleep(0)  # let the calls be written to the socket
        sidecar.serve.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        finally:
            for t in tasks:
                t.cancel()
    assert await asyncio.to_thread(sidecar.serve.wait_exit) == 0, sidecar.serve.stderr
    holds, records = await asyncio.to_thread(_redis_holds_and_records, redis_server.url, key_prefix, account)
    assert sorted(holds) == sorted(acked)
    assert not set(failed) & records
    assert set(failed.values()) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, failed
    assert len(acked) + len(failed) == 30


# --------------------------------------------------------------------------- 4. embedded Redis


_EMBEDDED_RE = re.compile(r"started an embedded redis-server \S+ \(.*?\) on redis://127\.0\.0\.1:(\d+)/0")


def test_embedded_redis_persists_across_restarts(short_dir: str) -> None:
    data_dir = os.path.join(short_dir, "data")
    extra = ["--data-dir", data_dir]
    account = "acct-embedded"

    with running_sidecar(short_dir, redis_url=None, key_prefix=None, extra=extra) as sc:
        log = sc.serve.stderr
        assert "development only" in log, log
        match = _EMBEDDED_RE.search(log)
        assert match, log
        port = int(match.group(1))
        assert _port_answers(port)
        out = _ok(cli("grant", "--account", account, "--credits", "10", "--purchase-id", "pay-e",
                      "--target", sc.admin_target))
        assert "credits available 10" in out, out
        assert sc.serve.terminate() == 0, sc.serve.stderr
    # run() stops its redis-server before the process exits: nothing answers on its port.
    assert not _port_answers(port), f"embedded redis-server still answers on {port}"
    assert (Path(data_dir) / "appendonlydir").is_dir() or (Path(data_dir) / "appendonly.aof").is_file()

    with running_sidecar(short_dir, redis_url=None, key_prefix=None, extra=extra) as sc:
        assert "development only" in sc.serve.stderr
        out = _ok(cli("balance", "--account", account, "--target", sc.target))
        assert "credits available 10, held 0" in out, out
        assert re.search(r"^pay-e +10 +10 +purchase ", out, re.MULTILINE), out
        match2 = _EMBEDDED_RE.search(sc.serve.stderr)
        assert match2, sc.serve.stderr
        assert sc.serve.terminate() == 0, sc.serve.stderr
    assert not _port_answers(int(match2.group(1)))


# --------------------------------------------------------------------------- 5. help


def test_help_texts() -> None:
    r = cli("serve", "--help", env={"COLUMNS": "100"})
    out = _ok(r)
    names = [env_name(f.name) for f in dataclasses.fields(Settings)]
    assert len(names) >= 10
    missing = [n for n in names if n not in out]
    assert not missing, f"serve --help lacks {missing}:\n{out}"
    for f in dataclasses.fields(Settings):
        assert "--" + f.name.replace("_", "-") in out

    out = _ok(cli("--help"))
    for verb in ("reserve", "commit", "release", "extend", "balance", "grant", "set-account", "serve"):
        assert re.search(rf"^\s+{re.escape(verb)}\s+\S", out, re.MULTILINE), f"{verb} not listed:\n{out}"


# --------------------------------------------------------------------------- 6. settings from the environment


def test_settings_from_environment(short_dir: str, redis_server: RedisServerProcess, key_prefix: str) -> None:
    sock = os.path.join(short_dir, "env.sock")
    env = _clean_env({"QUOTA_LISTEN": f"unix:{sock}", "QUOTA_REDIS_URL": redis_server.url,
                      "QUOTA_KEY_PREFIX": key_prefix, "QUOTA_SWEEP_INTERVAL_SECONDS": "0"})
    serve = ServeProcess([], env, short_dir)
    try:
        serve.wait_ready(f"unix:{sock}")
        assert f"serving QuotaService on unix:{sock} (plans" in serve.stderr, serve.stderr
        assert "embedded" not in serve.stderr  # QUOTA_REDIS_URL was used
        out = _ok(cli("reserve", "--account", "acct-env", "--product", "sora", "--duration", "10",
                      "--resolution", "720p", "--id", "e1", "--target", f"unix:{sock}"))
        assert out.startswith("ALLOWED  reservation e1"), out
        # QUOTA_KEY_PREFIX was used: the hold is under this test's prefix.
        client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            assert client.zrange(key(key_prefix, "acct-env", "holds"), 0, -1) == ["e1"]
        finally:
            client.close()
        assert serve.terminate() == 0, serve.stderr
    finally:
        serve.kill()

    serve = ServeProcess([], _clean_env({"QUOTA_REDIS_TIMEOUT_MS": "abc"}), short_dir)
    try:
        assert serve.wait_exit() == 2
        assert "QUOTA_REDIS_TIMEOUT_MS" in serve.stderr and "'abc'" in serve.stderr, serve.stderr
        assert "Traceback" not in serve.stderr
    finally:
        serve.kill()


# --------------------------------------------------------------------------- 7. plans files


@pytest.mark.newest_redis_only
def test_invalid_plans_file(short_dir: str, redis_server: RedisServerProcess, key_prefix: str) -> None:
    doc = yaml.safe_load(DEFAULT_PLANS.read_text())
    doc["plans"]["pro"]["sora"]["daily_free"] = -1
    bad = os.path.join(short_dir, "bad.yaml")
    Path(bad).write_text(yaml.safe_dump(doc))
    sock = os.path.join(short_dir, "q.sock")

    serve = ServeProcess(["--plans", bad, "--listen", f"unix:{sock}", "--redis-url", redis_server.url,
                          "--key-prefix", key_prefix, "--sweep-interval-seconds", "0"], _clean_env(), short_dir)
    try:
        assert serve.wait_exit() == 2, serve.stderr
        assert "invalid plans file" in serve.stderr and "plans.pro.sora.daily_free" in serve.stderr, serve.stderr
        assert "Traceback" not in serve.stderr
        assert not os.path.exists(sock)
    finally:
        serve.kill()

    r = cli("check-plans", bad)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("invalid:") and "plans.pro.sora.daily_free" in r.stderr, r.stderr

    out = _ok(cli("check-plans", str(DEFAULT_PLANS)))
    assert out.startswith("ok: plans version 2026-11-01"), out
    assert "plans free, plus, pro" in out and "pack_10" in out, out


# --------------------------------------------------------------------------- 8. set-account


def test_set_account_bad_time_zone(sidecar: Sidecar) -> None:
    r = cli("set-account", "--account", "acct-tz", "--tz", "Not/AZone", "--target", sidecar.admin_target)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: INVALID_ARGUMENT:"), r.stderr
    assert "time_zone" in r.stderr, r.stderr
    # Nothing changed.
    out = _ok(cli("balance", "--account", "acct-tz", "--target", sidecar.target))
    assert "plan free  time zone UTC" in out, out
    out = _ok(cli("set-account", "--account", "acct-tz", "--tz", "Europe/Paris", "--target", sidecar.admin_target))
    assert out.strip() == "ACCOUNT  plan free, time zone Europe/Paris, monthly cap none", out


@pytest.mark.newest_redis_only
def test_unreachable_redis_at_start_is_a_clear_error(short_dir: str, redis_binary: str) -> None:
    # A port that surely has no Redis: one of our own servers, stopped.
    gone = RedisServerProcess(redis_binary, os.path.join(short_dir, "gone"))
    gone.start()
    gone.stop()
    sock = os.path.join(short_dir, "q.sock")
    serve = ServeProcess(["--listen", f"unix:{sock}", "--redis-url", gone.url, "--redis-timeout-ms", "200",
                          "--sweep-interval-seconds", "0"], _clean_env(), short_dir)
    try:
        assert serve.wait_exit(timeout=30) == 1, serve.stderr
        assert "cannot start: redis unreachable" in serve.stderr and "Traceback" not in serve.stderr, serve.stderr
    finally:
        serve.kill()


def test_json_output_prints_zero_fields(sidecar: Sidecar) -> None:
    doc = json.loads(_ok(cli("balance", "--account", "nobody", "--json", "--target", sidecar.target)))
    assert (doc["credit_balance"], doc["credits_held"], doc["plan"], doc["lots"]) == (0, 0, "free", [])


async def test_audit_verb_exits_1_with_a_report_on_corruption(engine, redis_server: RedisServerProcess,
                                                              key_prefix: str, redis_client) -> None:
    from quota_sidecar.domain.model import JobParams

    await engine.grant("acct-audit", 10, "p1")
    for i in range(31):
        await engine.check_and_reserve("acct-audit", "sora", f"r{i}", JobParams(duration_seconds=10, resolution="720p"))
    args = ["audit", "--redis-url", redis_server.url, "--key-prefix", key_prefix]
    clean = await asyncio.to_thread(cli, *args, "--all")
    assert clean.returncode == 0, (clean.stdout, clean.stderr)
    await redis_client.hincrby(key(key_prefix, "acct-audit", "lotrem"), "p1", 5)  # credits from nowhere
    bad = await asyncio.to_thread(cli, *args, "--account", "acct-audit")
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert "acct-audit" in bad.stdout + bad.stderr and "conservation" in bad.stdout + bad.stderr
