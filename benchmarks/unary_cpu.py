"""The unary path's server CPU per RPC, sidecar beside the no-op server, in rounds that alternate.

    .venv/bin/python benchmarks/unary_cpu.py                     # 5 rounds, ~1.5 minutes on 2 cores
    .venv/bin/python benchmarks/unary_cpu.py --rounds 3 --requests 4000 --py-spy profile.txt

Starts what benchmarks/run.py starts for its scenarios a and b (a redis-server with AOF
everysec, the sidecar with ``serve --workers 1``, the no-op server answering the sidecar's
captured responses) and runs, per round and per side, the same load clients: a fixed number of
CheckAndReserve RPCs from 32 callers on one channel, then from one caller. The figures are
medians over the rounds: RPC/s (and the ratio sidecar / no-op of the same round), p50 and p99
of the one caller, and the server process' CPU per RPC (user + system from /proc, over the
32-caller run) -- the figure that stays put when other processes share the machine, which
makes the RPC/s ratio move from run to run.

``--py-spy FILE``: one more 32-caller run against each side under ``py-spy record`` (from
the interpreter's venv; not a project dependency): the sidecar's top functions by own time
and by inclusive time written to FILE, the no-op server's to FILE with ``.noop`` before the
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="server CPU per unary RPC, sidecar vs no-op (see the docstring)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=4000, help="RPCs per 32-caller run (a quarter for one caller)")
    p.add_argument("--py-spy", default="", metavar="FILE", help="also profile the sidecar with py-spy into FILE")
    args = p.parse_args(argv)
    cfg = Config(duration=0, warmup=0, raw_seconds=0, accounts=200)
    workdir = Path(tempfile.mkdtemp(prefix="qs-unary-"))
    procs = harness.Processes(workdir)
    redis = RedisServerProcess(find_redis_server(""), workdir / "redis", appendonly=True, appendfsync="everysec")
    try:
        redis.start()
        sidecar = harness.start_sidecar(procs, redis.url)
        harness.grant_credits(f"127.0.0.1:{sidecar.admin_port}", [*accounts(cfg.accounts), "bench-capture"],
                              1_000_000, tag="setup")
        responses = workdir / "responses.json"
        harness.capture_responses(sidecar.target, "bench-capture", responses)
        noop, port = harness.start_noop(procs, responses)
        sides = {"noop": (f"127.0.0.1:{port}", noop.pid), "sidecar": (sidecar.target, sidecar.proc.pid)}
        # Warm-up: caches, connections, the scripts loaded.
        for target, pid in sides.values():
            one_load(procs, target, pid, cfg, concurrency=32, requests=1000)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"c32": [], "c1": []} for s in sides}
        for n in range(args.rounds):
            for side, (target, pid) in sides.items():
                results[side]["c32"].append(one_load(procs, target, pid, cfg, concurrency=32,
                                                     requests=args.requests))
                results[side]["c1"].append(one_load(procs, target, pid, cfg, concurrency=1,
                                                    requests=args.requests // 4))
            ratio = results["sidecar"]["c32"][-1]["rpcs_per_second"] / results["noop"]["c32"][-1]["rpcs_per_second"]
            print(f"round {n + 1}: " + ", ".join(
                f"{side} {results[side]['c32'][-1]['rpcs_per_second']:,.0f} RPC/s "
                f"{results[side]['c32'][-1]['server_cpu_us_per_rpc']:.0f} us CPU/RPC" for side in sides)
                + f", ratio {ratio:.3f}", flush=True)
        ratios = [s["rpcs_per_second"] / n["rpcs_per_second"]
                  for s, n in zip(results["sidecar"]["c32"], results["noop"]["c32"])]
        print(f"\nmedians over {args.rounds} rounds ({ACCOUNT_PREFIX}-* accounts: {cfg.accounts}):")
        print(f"  ratio sidecar / no-op RPC/s (c=32): {statistics.median(ratios):.3f} "
              f"(per round: {', '.join(f'{r:.3f}' for r in ratios)})")
        for side in sides:
            c32, c1 = results[side]["c32"], results[side]["c1"]
            print(f"  {side:7}: {_median(c32, lambda r: r['rpcs_per_second']):,.0f} RPC/s (c=32), "
                  f"{_median(c32, lambda r: r['server_cpu_us_per_rpc']):.0f} us server CPU/RPC; one caller p50 "
                  f"{_median(c1, lambda r: r['latency_ms']['p50']):.3f} ms, p99 "
                  f"{_median(c1, lambda r: r['latency_ms']['p99']):.3f} ms")
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
