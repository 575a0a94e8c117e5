"""Instructions per reserve, commit and release script call, counted by callgrind: a Redis cost that ignores noise.

    .venv/bin/python benchmarks/lua_cost.py [--calls 200] [--redis-server PATH] [--before DIR]

Timings on a shared 2-core VM move by tens of percent between runs; instruction
counts do not. This runs a redis-server (persistence off) under
``valgrind --tool=callgrind`` on a free 127.0.0.1 port in a temporary folder,
makes decisions through the real engine and store, and reads the instructions
Redis executed per call (``callgrind_control -z`` before, ``-d`` after), for:

  free      decisions funded by the daily free allowance
  credits   decisions funded by credits (the allowance already used up)
  baseline  a script that only returns 1, called as the store calls (FCALL of a registered function
            on Redis 7, EVALSHA on 6.2) with the same KEYS and ARGV
  commit / release   half of each scenario's holds committed (whole), the other half released

--before DIR measures the code of another checkout (its quota_sidecar package, a git worktree of
main, say) the same way in the same run, and prints both columns side by side.

Needs valgrind (Debian: apt-get install valgrind). Counts include Redis' own
work per command (reading the request, the reply), not the client's. Roughly
4-6k instructions are a microsecond on the machines of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# --code DIR (what --before runs): that checkout's package instead of this one's.
_CODE = sys.argv[sys.argv.index("--code") + 1] if "--code" in sys.argv else str(Path(__file__).resolve().parents[1])
sys.path.insert(0, _CODE)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402
import redis_probes  # noqa: E402  (benchmarks/)

from quota_sidecar.domain.engine import QuotaEngine  # noqa: E402
from quota_sidecar.domain.model import JobParams  # noqa: E402
from quota_sidecar.server.plans_file import load_plans  # noqa: E402
from quota_sidecar.storage.redis_server import find_redis_server  # noqa: E402
from quota_sidecar.storage.store import RedisStore  # noqa: E402

JOB = JobParams(duration_seconds=10, resolution="720p")
ACCOUNTS = 20
START_TIMEOUT_SECONDS = 60.0


class CallgrindRedis:
    """A redis-server under callgrind, with counters that can be zeroed and read."""

    def __init__(self, binary: str, workdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.workdir = workdir
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.out.%p", binary,
             "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._wait_ready()
        # Redis' timer work (serverCron, incremental rehashing of dicts a set-up grew) runs by wall-clock
        # time, which callgrind stretches ~50x: it would land in whichever calls run then, as noise.
        control = redis.Redis(port=self.port)
        control.config_set("hz", 1)
        control.config_set("activerehashing", "no")
        control.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_timeout=5).ping()
                return
            except redis.RedisError:
                time.sleep(0.2)
        raise RuntimeError("redis-server under callgrind did not answer in time")

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.proc.pid)], check=True, capture_output=True)

    def instructions(self) -> int:
        """Instructions since the last zero()."""
        subprocess.run(["callgrind_control", "-d", str(self.proc.pid)], check=True, capture_output=True)
        newest = max(glob.glob(f"{self.workdir}/cg.out.*"), key=os.path.getmtime)
        match = re.search(r"^(?:summary|totals): (\d+)", Path(newest).read_text(), re.MULTILINE)
        assert match, f"no totals in {newest}"
        return int(match.group(1))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _engine(url: str) -> tuple[QuotaEngine, RedisStore]:
    store = RedisStore.from_url(url, key_prefix="cost", timeout_seconds=60)
    await store._client.flushall()
    return QuotaEngine(load_plans(), store), store


async def _prepare_accounts(engine: QuotaEngine, credits_path: bool) -> list[str]:
    accounts = [f"acct{i}" for i in range(ACCOUNTS)]
    for account in accounts:
        await engine.grant(account, 1_000_000, "buy-" + account)
        # The first decision of the day also prunes old windows: outside the count.
        for _ in range(30 if credits_path else 1):
            rid = uuid.uuid4().hex
            await engine.check_and_reserve(account, "sora", rid, JOB)
            await engine.commit(account, rid)
    return accounts


async def _decisions(server: CallgrindRedis, calls: int, credits_path: bool) -> dict[str, float]:
    """Instructions per reserve, then per commit (the even holds) and per release (the odd ones)."""
    engine, store = await _engine(server.url)
    try:
        accounts = await _prepare_accounts(engine, credits_path)
        held = [(accounts[i % ACCOUNTS], uuid.uuid4().hex) for i in range(calls)]
        server.zero()
        for account, rid in held:
            decision = await engine.check_and_reserve(account, "sora", rid, JOB)
            funding = decision.outcome.funding
            assert decision.outcome.allowed and funding is not None
            assert funding.value == ("credits" if credits_path else "free"), funding
        out = {"reserve": server.instructions() / calls}
        server.zero()
        for account, rid in held[0::2]:
            await engine.commit(account, rid)
        out["commit"] = server.instructions() / len(held[0::2])
        server.zero()
        for account, rid in held[1::2]:
            await engine.release(account, rid)
        out["release"] = server.instructions() / len(held[1::2])
        return out
    finally:
        await store.close()


def _baseline(server: CallgrindRedis, calls: int) -> float:
    """'return 1' sent the KEYS and ARGV of a real decision, with the store's verb."""
    call = redis_probes.capture_reserve_call(server.url, "acct0")  # FCALL|EVALSHA ref numkeys KEYS... ARGV...
    client = redis.Redis(port=server.port)
    try:
        call[1] = redis_probes.load_return_1(client, call[0])
        server.zero()
        for _ in range(calls):
            client.execute_command(*call)
        return server.instructions() / calls
    finally:
        client.close()


async def measure(calls: int, binary: str) -> dict[str, float]:
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("lua_cost: valgrind is not installed (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="qs-lua-cost-") as tmp:
        server = CallgrindRedis(binary, Path(tmp))
        try:
            free = await _decisions(server, calls, credits_path=False)
            credits = await _decisions(server, calls, credits_path=True)
            baseline = await asyncio.to_thread(_baseline, server, calls)
        finally:
            server.stop()
    return {"free": free["reserve"], "credits": credits["reserve"], "baseline": baseline,
            "commit free": free["commit"], "commit credits": credits["commit"],
            "release free": free["release"], "release credits": credits["release"]}


def _measure_elsewhere(code: str, calls: int, binary: str) -> dict[str, float]:
    """This script run on another checkout's package (a fresh interpreter: one package per process)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--code", code, "--calls", str(calls), "--redis-server", binary,
                        "--json-out", out.name], check=True, env={**os.environ, "PYTHONPATH": code})
        return dict(json.loads(Path(out.name).read_text()))


def main(ns: argparse.Namespace) -> None:
    binary = find_redis_server(ns.redis_server)
    before = _measure_elsewhere(ns.before, ns.calls, binary) if ns.before else None
    after = asyncio.run(measure(ns.calls, binary))
    if ns.json_out:
        Path(ns.json_out).write_text(json.dumps(after))
        return
    print(f"redis-server {binary}, {ns.calls} calls each, instructions per script call (reserve: free, credits):")
    if before is None:
        for name, per_call in after.items():
            print(f"  {name:16s} {per_call / 1000:8.1f} k")
        return
    print(f"  {'':16s} {'before':>9s} {'after':>9s}   (before: {ns.before}; after: {_CODE})")
    for name, per_call in after.items():
        print(f"  {name:16s} {before[name] / 1000:8.1f}k {per_call / 1000:8.1f}k")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="decisions per scenario (bounded)")
    parser.add_argument("--redis-server", default="", help="redis-server binary (default: the newest found)")
    parser.add_argument("--before", default="", metavar="DIR",
                        help="also measure the checkout at DIR (e.g. a worktree of main), side by side")
    parser.add_argument("--code", default="", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default="", metavar="FILE", help=argparse.SUPPRESS)
    main(parser.parse_args())
