"""The unary path's server CPU per RPC, sidecar beside the no-op server, in rounds that alternate.

    .venv/bin/python benchmarks/unary_cpu.py                     # 5 rounds, ~1.5 minutes on 2 cores
    .venv/bin/python benchmarks/unary_cpu.py --rounds 3 --requests 4000 --py-spy profile.txt

Starts what benchmarks/run.py starts for its scenarios a and b (a redis-server with AOF
everysec, the sidecar with ``serve --workers 1``, the no-op server answering the sidecar's
captured responses), a second no-op server whose CheckAndReserve first awaits one Redis PING on
the sidecar's multiplexed connection class (``noop+ping``: the floor of any server that asks
Redis once per call) and runs, per round and per side, the same load clients: a fixed number of
CheckAndReserve RPCs from 32 callers on one channel, then from one caller. The figures are
medians over the rounds: RPC/s (and the ratio sidecar / no-op of the same round), p50 and p99
of the one caller, and the server process' CPU per RPC (user + system from /proc, over the
32-caller run) -- the figure that stays put when other processes share the machine, which
makes the RPC/s ratio move from run to run.

``--baseline DIR``: a fourth side, the sidecar of another checkout of the project (``git archive
<commit> | tar -x -C DIR``) on the same Redis: before and after in one run.

``--py-spy FILE``: one more 32-caller run against each side under ``py-spy record`` (from
the interpreter's venv; not a project dependency): the sidecar's top functions by own time
and by inclusive time written to FILE, the other sides' to FILE with the side's name before the
suffix, and the raw py-spy output (flame-graph input) beside each.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from run import ACCOUNT_PREFIX, Config, accounts, client_args  # noqa: E402

from quota_sidecar.storage.redis_server import RedisServerProcess, find_redis_server  # noqa: E402


def one_load(procs: harness.Processes, target: str, pid: int, cfg: Config, *, concurrency: int,
             requests: int) -> dict[str, Any]:
    before = harness.cpu_seconds([pid])
    reports, _ = harness.run_clients(procs, client_args(target, cfg, concurrency=concurrency, requests=requests),
                                     processes=1, budget_seconds=120)
    report = reports[0]
    report["server_cpu_us_per_rpc"] = (harness.cpu_seconds([pid]) - before) * 1e6 / max(1, report["rpcs"])
    return report


def _median(rows: list[dict[str, Any]], get: Any) -> float:
    return statistics.median(get(r) for r in rows)


def profile(procs: harness.Processes, target: str, pid: int, cfg: Config, requests: int, out: Path) -> None:
    """A py-spy record of the sidecar during one 32-caller run: own time per function, top 40."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found next to the interpreter nor on PATH")
    raw = out.with_suffix(".raw.txt")
    recorder = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "1000",
                                 "--nonblocking", "--output", str(raw)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # py-spy attaches
        one_load(procs, target, pid, cfg, concurrency=32, requests=requests)
    finally:
        recorder.send_signal(2)
        recorder.wait(timeout=30)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        # Functions, not lines: "name (file:line)" -> "name (file)".
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    text = [f"{total} samples\n\nown time\n"]
    text += [f"{100 * n / total:5.1f}%  {frame}\n" for frame, n in own.most_common(40)]
    text += ["\ninclusive time\n"] + [f"{100 * n / total:5.1f}%  {frame}\n" for frame, n in inclusive.most_common(60)]
    out.write_text("".join(text))
    print(f"profile ({total} samples): {out}; flame-graph input: {raw}")


Sides = dict[str, tuple[str, int]]  # side -> (target, server pid)
Results = dict[str, dict[str, list[dict[str, Any]]]]  # side -> "c32" / "c1" -> one report per round


def start_sides(procs: harness.Processes, redis: RedisServerProcess, cfg: Config, baseline: str) -> Sides:
    """The sidecar (credits granted), the no-op servers answering its captured responses, and the
    baseline sidecar when asked."""
    sidecar = harness.start_sidecar(procs, redis.url)
    harness.grant_credits(f"127.0.0.1:{sidecar.admin_port}", [*accounts(cfg.accounts), "bench-capture"],
                          1_000_000, tag="setup")
    responses = procs.workdir / "responses.json"
    harness.capture_responses(sidecar.target, "bench-capture", responses)
    noop, port = harness.start_noop(procs, responses)
    pinger, ping_port = harness.start_noop(procs, responses, redis_ping=redis.url)
    sides = {"noop": (f"127.0.0.1:{port}", noop.pid), "noop+ping": (f"127.0.0.1:{ping_port}", pinger.pid),
             "sidecar": (sidecar.target, sidecar.proc.pid)}
    if baseline:
        before = harness.start_sidecar(procs, redis.url, admin=False, source=str(Path(baseline).resolve()))
        sides["baseline"] = (before.target, before.proc.pid)
    return sides


def run_rounds(procs: harness.Processes, sides: Sides, cfg: Config, rounds: int, requests: int) -> Results:
    for target, pid in sides.values():  # warm-up: caches, connections, the scripts loaded
        one_load(procs, target, pid, cfg, concurrency=32, requests=1000)
    results: Results = {s: {"c32": [], "c1": []} for s in sides}
    for n in range(rounds):
        for side, (target, pid) in sides.items():
            results[side]["c32"].append(one_load(procs, target, pid, cfg, concurrency=32, requests=requests))
            results[side]["c1"].append(one_load(procs, target, pid, cfg, concurrency=1, requests=requests // 4))
        print(f"round {n + 1}: " + ", ".join(
            f"{side} {results[side]['c32'][-1]['rpcs_per_second']:,.0f} RPC/s "
            f"{results[side]['c32'][-1]['server_cpu_us_per_rpc']:.0f} us CPU/RPC" for side in sides), flush=True)
    return results


def summarize(results: Results, rounds: int) -> None:
    print(f"\nmedians over {rounds} rounds ({len(results)} sides, {ACCOUNT_PREFIX}-* accounts, 32 callers "
          "for RPC/s and CPU, one caller for latency); ratio = RPC/s / the no-op server's RPC/s of the same round")
    noop = results["noop"]["c32"]
    for side, runs in results.items():
        c32, c1 = runs["c32"], runs["c1"]
        ratios = [r["rpcs_per_second"] / n["rpcs_per_second"] for r, n in zip(c32, noop)]
        print(f"  {side:9}: {_median(c32, lambda r: r['rpcs_per_second']):,.0f} RPC/s, ratio "
              f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.2f}' for r in ratios)}), "
              f"{_median(c32, lambda r: r['server_cpu_us_per_rpc']):.0f} us server CPU/RPC; p50 "
              f"{_median(c1, lambda r: r['latency_ms']['p50']):.3f} ms, p99 "
              f"{_median(c1, lambda r: r['latency_ms']['p99']):.3f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="server CPU per unary RPC, sidecar vs no-op (see the docstring)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=4000, help="RPCs per 32-caller run (a quarter for one caller)")
    p.add_argument("--py-spy", default="", metavar="FILE", help="also profile each side with py-spy (FILE...)")
    p.add_argument("--baseline", default="", metavar="DIR",
                   help="also run the sidecar of this checkout (e.g. from git archive), side by side")
    args = p.parse_args(argv)
    cfg = Config(duration=0, warmup=0, raw_seconds=0, accounts=200)
    workdir = Path(tempfile.mkdtemp(prefix="qs-unary-"))
    procs = harness.Processes(workdir)
    redis = RedisServerProcess(find_redis_server(""), workdir / "redis", appendonly=True, appendfsync="everysec")
    try:
        redis.start()
        sides = start_sides(procs, redis, cfg, args.baseline)
        summarize(run_rounds(procs, sides, cfg, args.rounds, args.requests), args.rounds)
        if args.py_spy:
            out = Path(args.py_spy)
            for side, (target, pid) in sides.items():
                profile(procs, target, pid, cfg, 2 * args.requests,
                        out if side == "sidecar" else out.with_name(f"{out.stem}.{side}{out.suffix}"))
        return 0
    finally:
        procs.stop_all()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
