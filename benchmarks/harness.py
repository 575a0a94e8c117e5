"""Processes of a benchmark run: the sidecar, the no-op server, load clients; /proc readings.

Every child is registered in ``Processes`` and stopped by ``stop_all`` (SIGTERM,
then SIGKILL after a bound), which run.py calls in a ``finally``. Children get
their own session (a Ctrl-C reaches run.py only, which then stops them in
order) and, on Linux, a parent-death signal so none outlives a killed run.
Every wait is a bounded poll.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.05
STOP_TIMEOUT_SECONDS = 15.0
# Beyond its own duration and warm-up, what a load client gets to start, connect and report.
CLIENT_SLACK_SECONDS = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child_setup() -> None:
    # A SIGKILLed benchmark must not leave servers behind (Linux only; best effort elsewhere).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def clean_env() -> dict[str, str]:
    """This environment without QUOTA_* variables (they would change what serve does)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Processes:
    """Every child process of the run, stopped newest first by stop_all()."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, argv: Sequence[str], *, stdout: Any = None,
              env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
        """Starts ``argv``; stderr (and stdout unless given) go to a log file (no pipe can fill up).
        ``env``: variables set on top of clean_env()."""
        log = self.workdir / f"{name}-{len(self.children)}.log"
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=stdout or log_file,
                                    stderr=log_file, env={**clean_env(), **(env or {})}, cwd=self.workdir,
                                    start_new_session=True, preexec_fn=_child_setup)
        self.children.append((name, proc))
        return proc, log

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)

    def stop_all(self) -> None:
        for _, proc in reversed(self.children):
            self.stop(proc)


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def wait_serving(target: str, proc: subprocess.Popen[bytes], log: Path,
                 timeout: float = READY_TIMEOUT_SECONDS) -> None:
    """Until the gRPC health service at ``target`` answers SERVING (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            with grpc.insecure_channel(target) as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"{target} not SERVING within {timeout:.0f} s:\n{log_tail(log)}")


# ----------------------------------------------------------------------------- /proc


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    pids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return pids


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the processes (utime and stime of /proc/<pid>/stat)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
        except OSError:
            continue
    return total / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time every core of the machine spent on anything but idle (/proc/stat), seconds."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # user nice system idle iowait irq softirq; steal (the hypervisor's) and guest (already in user) left out.
    return (sum(values[:7]) - idle) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- sidecar


@dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    admin_port: int
    workers: int
    redis_url: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def server_pids(self) -> list[int]:
        """The processes that serve calls: the process itself, or the supervisor's workers."""
        return [self.proc.pid] if self.workers == 1 else child_pids(self.proc.pid)


def start_sidecar(procs: Processes, redis_url: str, *, workers: int = 1, admin: bool = True,
                  source: str = "") -> Sidecar:
    """``source``: a checkout of another version of the project to run instead (its PYTHONPATH)."""
    port, admin_port = free_port(), free_port() if admin else 0
    argv = [sys.executable, "-m", "quota_sidecar", "serve", "--redis-url", redis_url,
            "--listen", f"127.0.0.1:{port}", "--workers", str(workers), "--shutdown-grace-seconds", "2",
            "--degraded-journal", str(procs.workdir / f"journal-{port}.jsonl"), "--log-level", "WARNING"]
    if admin:
        # Loopback admin without a token is allowed (the sidecar logs a warning); nothing else can reach it.
        argv += ["--admin-listen", f"127.0.0.1:{admin_port}"]
    proc, log = procs.spawn(f"sidecar-w{workers}", argv, env={"PYTHONPATH": source} if source else None)
    sidecar = Sidecar(proc, log, port, admin_port, workers, redis_url)
    wait_serving(sidecar.target, proc, log)
    if workers > 1:
        _wait_for(lambda: len(sidecar.server_pids()) == workers, f"{workers} sidecar workers", proc, log)
    return sidecar


def _wait_for(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {what}:\n{log_tail(log)}")
        time.sleep(POLL_SECONDS)


def grant_credits(admin_target: str, accounts: Sequence[str], credits: int, *, tag: str) -> None:
    """One lot of ``credits`` per account (GrantCredits, all in flight at once on one channel)."""
    with grpc.insecure_channel(admin_target) as channel:
        stub = pb_grpc.QuotaAdminStub(channel)
        futures = [stub.GrantCredits.future(pb.GrantCreditsRequest(
            account_id=a, credits=credits, purchase_id=f"bench-{tag}-{a}", reason="benchmark"), timeout=60)
            for a in accounts]
        for f in futures:
            f.result()


def _job() -> pb.JobParams:
    return pb.JobParams(duration_seconds=10, resolution="720p")


def _reserve(stub: pb_grpc.QuotaServiceStub, account: str) -> pb.CheckAndReserveResponse:
    response = stub.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id=account, product="sora", reservation_id=uuid.uuid4().hex, params=_job()), timeout=10)
    if not response.allowed:
        raise RuntimeError(f"capture: reservation for {account} not allowed: {response}")
    return response


def capture_responses(target: str, account: str, path: Path) -> dict[str, int]:
    """One real response of every QuotaService method (an allowed one), saved for the no-op server.

    Returns each response's serialized size. Batch entries are ONE item result (the no-op
    server repeats it per request item)."""
    out: dict[str, bytes] = {}
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.QuotaServiceStub(channel)
        r = _reserve(stub, account)
        out["CheckAndReserve"] = r.SerializeToString()
        out["ExtendReservation"] = stub.ExtendReservation(pb.ExtendReservationRequest(
            account_id=account, reservation_id=r.reservation_id, ttl_seconds=600), timeout=10).SerializeToString()
        out["Commit"] = stub.Commit(pb.CommitRequest(account_id=account, reservation_id=r.reservation_id),
                                    timeout=10).SerializeToString()
        r2 = _reserve(stub, account)
        out["Release"] = stub.Release(pb.ReleaseRequest(account_id=account, reservation_id=r2.reservation_id),
                                      timeout=10).SerializeToString()
        out["GetBalance"] = stub.GetBalance(pb.GetBalanceRequest(account_id=account), timeout=10).SerializeToString()
        batch = stub.CheckAndReserveBatch(pb.CheckAndReserveBatchRequest(items=[pb.CheckAndReserveRequest(
            account_id=account, product="sora", reservation_id=uuid.uuid4().hex, params=_job())]), timeout=10)
        out["CheckAndReserveBatch"] = batch.results[0].SerializeToString()
        rid = batch.results[0].response.reservation_id
        out["CommitBatch"] = stub.CommitBatch(pb.CommitBatchRequest(items=[pb.CommitRequest(
            account_id=account, reservation_id=rid)]), timeout=10).results[0].SerializeToString()
        out["ReleaseBatch"] = stub.ReleaseBatch(pb.ReleaseBatchRequest(items=[pb.ReleaseRequest(
            account_id=account, reservation_id=_reserve(stub, account).reservation_id)]),
            timeout=10).results[0].SerializeToString()
    path.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in out.items()}))
    return {k: len(v) for k, v in out.items()}


def start_noop(procs: Processes, responses: Path, *, redis_ping: str = "") -> tuple[subprocess.Popen[bytes], int]:
    """benchmarks/noop_server.py on a free loopback port; returns it and its port (read from its stdout).
    ``redis_ping``: a Redis URL each CheckAndReserve PINGs first (noop_server.py --redis-ping)."""
    port_file = procs.workdir / f"noop-port-{len(procs.children)}.txt"
    extra = ["--redis-ping", redis_ping] if redis_ping else []
    with open(port_file, "wb") as out:
        proc, log = procs.spawn("noop", [sys.executable, str(HERE / "noop_server.py"), "--listen", "127.0.0.1:0",
                                         "--responses", str(responses), *extra], stdout=out)
    port = 0

    def announced() -> bool:
        nonlocal port
        text = port_file.read_text()
        if text.startswith("PORT "):
            port = int(text.split()[1])
        return port != 0

    _wait_for(announced, "port from the no-op server", proc, log)
    wait_serving(f"127.0.0.1:{port}", proc, log)
    return proc, port


# ----------------------------------------------------------------------------- load clients


def loadtest_command() -> list[str]:
    """The load-test tool: ``python -m quota_sidecar loadtest`` (quota_sidecar/loadtest.py)."""
    return [sys.executable, "-m", "quota_sidecar", "loadtest"]


def run_clients(procs: Processes, argv_tail: Sequence[str], *, processes: int, budget_seconds: float
                ) -> tuple[list[dict[str, Any]], float]:
    """``processes`` load-client processes at once; their JSON reports and their total CPU seconds.

    Client CPU is what RUSAGE_CHILDREN gains while only these children are reaped."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = []
    for i in range(processes):
        out_path = procs.workdir / f"load-{len(procs.children)}-{i}.json"
        with open(out_path, "wb") as out:
            proc, log = procs.spawn("load", [*loadtest_command(), *argv_tail], stdout=out)
        started.append((proc, log, out_path))
    deadline = time.monotonic() + budget_seconds + CLIENT_SLACK_SECONDS
    reports = []
    for proc, log, out_path in started:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            procs.stop(proc)
            raise RuntimeError(f"load client {proc.args} did not finish in time:\n{log_tail(log)}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"load client {proc.args} exited with {proc.returncode}:\n{log_tail(log)}")
        reports.append(_parse_report(out_path, log))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return reports, cpu


def _parse_report(out_path: Path, log: Path) -> dict[str, Any]:
    text = out_path.read_text().strip()
    try:
        # The JSON report is the whole output, or its last line when the tool printed more before it.
        return json.loads(text) if text.startswith("{") and text.endswith("}") else json.loads(text.splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise RuntimeError(f"load client printed no JSON report: {text[-500:]!r}\n{log_tail(log)}") from None


class CpuSampler:
    """Samples CPU time of groups of processes every ``interval`` seconds on a thread (bounded).

    ``busiest(name)`` is the highest average number of cores the group used over any
    ``window`` seconds: the load's steady state, without its start-up and warm-up."""

    def __init__(self, groups: dict[str, Sequence[int]], interval: float = 0.2, max_seconds: float = 600.0) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items()}
        self._interval = interval
        self._max_samples = int(max_seconds / interval)
        self._samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while len(self._samples) < self._max_samples:
            self._samples.append((time.monotonic(), {n: cpu_seconds(p) for n, p in self._groups.items()}))
            if self._stop.wait(self._interval):
                break
        self._samples.append((time.monotonic(), {n: cpu_seconds(p) for n, p in self._groups.items()}))

    def busiest(self, name: str, window: float = 1.0) -> float:
        best = 0.0
        s = self._samples
        j = 0
        for i in range(len(s)):
            # The latest start that still spans the window (samples may be sparse under load).
            while j + 1 < i and s[i][0] - s[j + 1][0] >= window:
                j += 1
            span = s[i][0] - s[j][0]
            if span >= window * 0.8:
                best = max(best, (s[i][1][name] - s[j][1][name]) / span)
        return best

    def total(self, name: str) -> float:
        return self._samples[-1][1][name] - self._samples[0][1][name] if self._samples else 0.0
