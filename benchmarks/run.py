"""quota-sidecar benchmark: the sidecar against its floors, side by side, in ONE run.

    .venv/bin/python benchmarks/run.py                  # full run, ~1.5-3 minutes on 2 cores
    .venv/bin/python benchmarks/run.py --quick          # smoke run, ~30 s
    .venv/bin/python benchmarks/run.py --duration 10 --json results.json [--redis-server PATH] [--no-aof]

What it starts (all on 127.0.0.1; all stopped at the end, on error, Ctrl-C and SIGTERM too):
a redis-server on an ephemeral port in a temp dir (the newest found, configured as the
sidecar's embedded Redis runs: AOF on, appendfsync everysec, no RDB snapshots; ``--no-aof``
turns persistence off), the real sidecar (``python -m quota_sidecar serve --workers 1``, admin
API on loopback to grant the benchmark accounts credits), the no-op server
(benchmarks/noop_server.py: the sidecar's grpc options and event loop, canned responses
captured from the sidecar at start, so the same message sizes) and the load clients, each a
separate process (``python -m quota_sidecar loadtest``), so the client's CPU is not the server's.

Figures (the table; ratio = sidecar / no-op unless said otherwise):
  a  unary, closed loop, 32 callers, one channel: RPC/s of the no-op server and of the sidecar;
     the ratio is how much of the gRPC transport floor the sidecar keeps (target >= 0.85).
  b  one caller: p50 and p99 latency of the sidecar (targets 0.5 ms, 1.5 ms); no-op for reference.
  c  CheckAndReserveBatch, 64 items per RPC, 4 callers: decisions/s (target >= 25,000).
  d  Redis per decision. INFO commandstats usec_per_call of the store's script call (FCALL on
     Redis 7, EVALSHA on 6.2: Redis' time inside the call, script included) during a and c
     (target <= 25 us), and Redis CPU (INFO cpu) per script call.
     MONITOR over ~200 unary decisions and a few batch RPCs counts the top-level commands the
     sidecar sent (commands issued from Lua, the benchmark's own connection and the periodic
     background work left out: health PING, sweeper, cameo registry refresh): 1 per unary
     decision, 64 per 64-item batch. A counting proxy in
     front of Redis, with a second sidecar behind it, counts round trips (a round trip lasts
     while a connection has commands waiting for replies): 1 per decision for one caller, 1 per
     batch RPC, and fewer than 1 per decision with 32 callers (the store writes the scripts of
     one event-loop tick together).
  e  raw Redis: the sidecar's reserve script with real KEYS/ARGV (captured by running the engine
     in-process once), straight from redis-py at pipeline depths 1, 8, 64: the Redis floor of a
     decision; and a 'return 1' script with the same KEYS/ARGV: the cost of the call alone.
  f  processes: ``serve --workers 2`` vs ``--workers 1``, 2 client processes x 32 callers x 8
     channels each (target >= 1.6).
  g  RSS of the sidecar after load, from /proc (sum over the workers; target <= 100 MB).

Each load line also says how busy the sidecar (or no-op server), Redis and the client were
(cores) and how much CPU other processes on the machine took meanwhile: figures taken while
other processes were busy are noise, rerun on a quiet machine.

Mixes: every load uses ``--mix abandon=1 --job duration=10,resolution=720p`` (CheckAndReserve
only, never committed): one RPC and one decision per request, so RPC/s compare with the no-op
server's directly. The benchmark accounts get 1,000,000 credits each first, so every decision
is allowed: an account's first 30 of the day are funded by its free allowance, the rest by
credits (the sidecar's load lines show the split).

Exit status 0 when everything ran (targets missed or not: it is a measurement), 1 when
something failed to run (its logs are kept and named), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402  (benchmarks/ modules, found through the path above)
import redis_probes  # noqa: E402
from harness import CpuSampler, Processes  # noqa: E402

from quota_sidecar.storage.redis_server import RedisServerProcess, available_redis_servers, find_redis_server  # noqa: E402


@dataclass(frozen=True)
class Config:
    duration: float          # seconds of measured load per scenario side
    warmup: float            # seconds of load before measuring (not counted by the client)
    raw_seconds: float       # per pipeline depth of the raw EVALSHA scenario
    accounts: int            # accounts the load spreads over
    unary_concurrency: int = 32
    batch_items: int = 64
    batch_callers: int = 4
    monitor_unary: int = 200   # decisions in the MONITOR and proxy windows
    monitor_batches: int = 4   # batch RPCs in those windows
    process_clients: int = 2
    credits: int = 1_000_000   # per account: never runs out, so every decision is allowed
    aof: bool = True


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description="quota-sidecar benchmark (see the module docstring)")
    p.add_argument("--quick", action="store_true", help="short smoke run (~30 s)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per scenario side")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure to FILE")
    p.add_argument("--redis-server", default="", metavar="PATH", help="redis-server binary (default: newest)")
    p.add_argument("--no-aof", action="store_true", help="Redis without persistence (default: AOF everysec)")
    args = p.parse_args(argv)
    if args.quick:
        cfg = Config(duration=1.5, warmup=0.3, raw_seconds=0.4, accounts=200, monitor_unary=100,
                     monitor_batches=3)
    else:
        cfg = Config(duration=8.0, warmup=1.0, raw_seconds=2.0, accounts=1000)
    if args.duration is not None:
        if not 0.2 <= args.duration <= 600:
            p.error("--duration must be between 0.2 and 600 seconds")
        cfg = Config(**{**cfg.__dict__, "duration": args.duration})
    if args.no_aof:
        cfg = Config(**{**cfg.__dict__, "aof": False})
    return cfg, args


# The load-test tool's accounts are <prefix>-<i>; raw-<i> are the raw EVALSHA scenario's.
ACCOUNT_PREFIX = "bench"


def accounts(n: int, prefix: str = ACCOUNT_PREFIX) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def client_args(target: str, cfg: Config, *, concurrency: int, batch: int = 0, requests: int = 0,
                channels: int = 1) -> list[str]:
    """The load-test tool's flags: a timed closed loop, or a fixed number of decisions (no warm-up).

    One job size (10 s at 720p, 1 credit; the size the no-op server's canned responses were
    captured with) and no follow-up: one RPC per decision."""
    argv = ["--target", target, "--concurrency", str(concurrency), "--channels", str(channels),
            "--accounts", str(cfg.accounts), "--account-prefix", ACCOUNT_PREFIX,
            "--job", "duration=10,resolution=720p", "--mix", "abandon=1", "--quiet", "--json"]
    if requests:
        argv += ["--requests", str(requests), "--warmup", "0"]
    else:
        argv += ["--duration", str(cfg.duration), "--warmup", str(cfg.warmup)]
    if batch:
        argv += ["--batch", str(batch)]
    return argv


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several client processes' reports as one: counts and rates summed, latency of the worst."""
    if len(reports) == 1:
        return reports[0]
    merged = dict(max(reports, key=lambda r: r["latency_ms"]["p99"]))
    for key in ("decisions", "rpcs", "decisions_per_second", "rpcs_per_second"):
        merged[key] = sum(r[key] for r in reports)
    for key in ("by_status", "by_funding", "by_denial"):
        merged[key] = {k: sum((r.get(key) or {}).get(k, 0) for r in reports)
                       for k in sorted({k for r in reports for k in (r.get(key) or {})})}
    merged["elapsed_seconds"] = max(r["elapsed_seconds"] for r in reports)
    merged["processes"] = len(reports)
    return merged


RAW_ACCOUNTS = 200  # accounts the raw EVALSHA scenario spreads over ("raw-<i>")
# Connections per client process in scenario f: the kernel spreads connections (not calls) over
# the workers (SO_REUSEPORT), so a few per client keep the split close to even.
F_CHANNELS = 8


@dataclass
class Row:
    scenario: str
    figure: str
    value: float
    unit: str
    target: str = ""
    ratio: float | None = None
    met: bool | None = None


def _check(value: float, op: str, target: float) -> bool:
    return {">=": value >= target, "<=": value <= target, "==": value == target}[op]


class Bench:
    """One benchmark run: what it started, and the figures so far."""

    def __init__(self, cfg: Config, args: argparse.Namespace, workdir: Path) -> None:
        self.cfg, self.args, self.workdir = cfg, args, workdir
        self.procs = Processes(workdir)
        self.redis: RedisServerProcess | None = None
        self.control: redis_probes.Control | None = None
        self.verb = "EVALSHA"  # the store's script call on this Redis (setup: FCALL on Redis 7)
        self.proxy: redis_probes.RoundTripProxy | None = None
        self.sidecar: harness.Sidecar | None = None
        self.noop_target = ""
        self.noop_pid = 0
        self.results: dict[str, Any] = {"scenarios": {}}
        self.rows: list[Row] = []

    # -- plumbing ----------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def row(self, scenario: str, figure: str, value: float, unit: str, *, target: tuple[str, float] | None = None,
            reference: float | None = None) -> None:
        ratio = value / reference if reference else None
        met = None
        if target is not None:
            op, bound = target
            # A "ratio" target compares the ratio; any other compares the value.
            met = _check(ratio if unit == "ratio" and ratio is not None else value, op, bound)
        self.rows.append(Row(scenario, figure, value, unit, f"{target[0]} {target[1]:g}" if target else "",
                             ratio, met))

    def load(self, target: str, server_pids: list[int], *, processes: int = 1, **kw: Any) -> dict[str, Any]:
        """One load run (client processes at once) with CPU sampled for the server and Redis."""
        assert self.redis is not None
        budget = self.cfg.duration + self.cfg.warmup
        started, machine_before = time.monotonic(), harness.machine_busy_seconds()
        with CpuSampler({"server": server_pids, "redis": [self.redis.pid]}) as sampler:
            reports, client_cpu = harness.run_clients(self.procs, client_args(target, self.cfg, **kw),
                                                      processes=processes, budget_seconds=budget)
        elapsed = time.monotonic() - started
        report = merge_reports(reports)
        report["server_cores_busiest_1s"] = round(sampler.busiest("server"), 3)
        report["redis_cores_busiest_1s"] = round(sampler.busiest("redis"), 3)
        report["client_cores_avg"] = round(client_cpu / elapsed, 3)
        # The machine is shared: CPU used meanwhile by processes this run did not start is noise.
        ours = sampler.total("server") + sampler.total("redis") + client_cpu
        other = (harness.machine_busy_seconds() - machine_before - ours) / elapsed
        report["other_processes_cores_avg"] = round(max(0.0, other), 3)
        return report

    def with_redis_stats(self, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``run()``'s report plus what Redis counted meanwhile (commandstats reset first)."""
        assert self.control is not None
        self.control.reset_stats()
        cpu_before = self.control.cpu_seconds()
        report = run()
        stats = self.control.commandstats().get(self.verb.lower(), {})
        calls = int(stats.get("calls", 0))
        report["redis"] = {
            "script_calls": calls,
            "script_usec_per_call": float(stats.get("usec_per_call", 0.0)),
            "redis_cpu_usec_per_script_call": (self.control.cpu_seconds() - cpu_before) * 1e6 / calls if calls else 0.0,
        }
        return report

    def describe(self, name: str, report: dict[str, Any], *, funded: bool = True) -> str:
        lat = report["latency_ms"]
        return (f"{name}: {report['rpcs_per_second']:,.0f} RPC/s, {report['decisions_per_second']:,.0f} decisions/s, "
                f"p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms; cores busiest 1 s: server "
                f"{report['server_cores_busiest_1s']}, redis {report['redis_cores_busiest_1s']}, client avg "
                f"{report['client_cores_avg']}, other processes avg {report['other_processes_cores_avg']}; "
                f"statuses {report.get('by_status')}" + (f", funding {report.get('by_funding')}" if funded else ""))

    # -- set-up ------------------------------------------------------------

    def setup(self) -> None:
        binary = find_redis_server(self.args.redis_server)  # the newest unless a path is given
        self.redis = RedisServerProcess(binary, self.workdir / "redis", appendonly=self.cfg.aof,
                                        appendfsync="everysec")
        self.redis.start()
        self.control = redis_probes.Control(self.redis.url)
        self.verb = redis_probes.script_verb(self.control.client)
        self.results["script_verb"] = self.verb
        self.say(f"redis-server {'.'.join(map(str, self.redis.version))} ({binary}) on {self.redis.url}, "
                 f"{'AOF everysec' if self.cfg.aof else 'no persistence'}")
        self.sidecar = harness.start_sidecar(self.procs, self.redis.url)
        self.say(f"sidecar (serve --workers 1, pid {self.sidecar.proc.pid}) on {self.sidecar.target}")
        started = time.monotonic()
        every = accounts(self.cfg.accounts) + accounts(RAW_ACCOUNTS, "raw") + ["bench-capture"]
        harness.grant_credits(f"127.0.0.1:{self.sidecar.admin_port}", every, self.cfg.credits, tag="setup")
        self.say(f"granted {self.cfg.credits:,} credits to each of {len(every)} accounts "
                 f"in {time.monotonic() - started:.1f} s")
        responses = self.workdir / "responses.json"
        sizes = harness.capture_responses(self.sidecar.target, "bench-capture", responses)
        noop, port = harness.start_noop(self.procs, responses)
        self.noop_target, self.noop_pid = f"127.0.0.1:{port}", noop.pid
        self.results["response_bytes"] = sizes
        self.say(f"no-op server (pid {noop.pid}) on {self.noop_target}; canned response sizes (bytes): {sizes}")

    # -- scenarios ---------------------------------------------------------

    def sides(self, key: str, what: str, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The same client settings against the no-op server, then the sidecar (Redis stats for it)."""
        assert self.sidecar is not None
        noop = self.load(self.noop_target, [self.noop_pid], **kw)
        self.say(self.describe(f"{what} no-op  ", noop, funded=False))
        sidecar = self.with_redis_stats(lambda: self.load(self.sidecar.target, self.sidecar.server_pids(), **kw))
        self.say(self.describe(f"{what} sidecar", sidecar))
        self.results["scenarios"][key] = {"noop": noop, "sidecar": sidecar, "client": kw, "mix": "abandon=1"}
        return noop, sidecar

    def scenario_a(self) -> None:
        c = self.cfg.unary_concurrency
        noop, side = self.sides("a_unary", f"a unary c={c}", concurrency=c)
        self.row("a unary", f"no-op RPC/s (c={c})", noop["rpcs_per_second"], "RPC/s")
        self.row("a unary", f"sidecar RPC/s (c={c}), ratio to no-op", side["rpcs_per_second"], "ratio",
                 target=(">=", 0.85), reference=noop["rpcs_per_second"])

    def scenario_b(self) -> None:
        noop, side = self.sides("b_single", "b single caller", concurrency=1)
        for q, bound in (("p50", 0.5), ("p99", 1.5)):
            self.row("b single", f"no-op {q} latency (c=1)", noop["latency_ms"][q], "ms")
            self.row("b single", f"sidecar {q} latency (c=1)", side["latency_ms"][q], "ms", target=("<=", bound),
                     reference=noop["latency_ms"][q])

    def scenario_c(self) -> None:
        k, c = self.cfg.batch_items, self.cfg.batch_callers
        noop, side = self.sides("c_batch", f"c batch {k}x{c}", concurrency=c, batch=k)
        self.row("c batch", f"no-op decisions/s ({k} items, c={c})", noop["decisions_per_second"], "decisions/s")
        self.row("c batch", f"sidecar decisions/s ({k} items, c={c})", side["decisions_per_second"], "decisions/s",
                 target=(">=", 25_000), reference=noop["decisions_per_second"])

    def monitor_window(self, **kw: Any) -> dict[str, Any]:
        """Top-level commands the sidecar sent while a bounded load ran (MONITOR), per decision and RPC."""
        assert self.redis is not None and self.control is not None and self.sidecar is not None
        self.control.reset_stats()
        window = redis_probes.MonitorWindow("127.0.0.1", self.redis.port, self.control)
        window.start()
        try:
            report = self.load(self.sidecar.target, self.sidecar.server_pids(), **kw)
        finally:
            commands = window.stop()
        counted = redis_probes.classify(commands)
        script_calls = int(self.control.commandstats().get(self.verb.lower(), {}).get("calls", 0))
        return {"decisions": report["decisions"], "rpcs": report["rpcs"], "commands": counted,
                "commandstats_script_calls": script_calls,
                "commands_per_decision": counted["decision_path_total"] / max(1, report["decisions"]),
                "commands_per_rpc": counted["decision_path_total"] / max(1, report["rpcs"]),
                "by_status": report.get("by_status")}

    def round_trip_window(self, sidecar: harness.Sidecar, **kw: Any) -> dict[str, Any]:
        """Round trips to Redis (through the counting proxy) while a bounded load ran."""
        assert self.proxy is not None
        self.proxy.take()  # start-up and idle traffic is not this window's
        report = self.load(sidecar.target, sidecar.server_pids(), **kw)
        trips = self.proxy.take()
        decision_trips = [t for t in trips if self.verb in t]
        other = sorted({name for t in trips if self.verb not in t for name in t})
        return {"decisions": report["decisions"], "rpcs": report["rpcs"], "round_trips": len(decision_trips),
                "other_round_trips": len(trips) - len(decision_trips), "other_commands": other,
                "script_calls_per_round_trip_max": max((t[self.verb] for t in decision_trips), default=0),
                "round_trips_per_decision": len(decision_trips) / max(1, report["decisions"]),
                "round_trips_per_rpc": len(decision_trips) / max(1, report["rpcs"])}

    def scenario_d(self) -> None:
        cfg = self.cfg
        k = cfg.batch_items
        unary = self.monitor_window(concurrency=1, requests=cfg.monitor_unary)
        batch = self.monitor_window(concurrency=1, batch=k, requests=cfg.monitor_batches * k)
        self.say(f"d MONITOR: unary {unary['commands']} over {unary['decisions']} decisions; "
                 f"batch {batch['commands']} over {batch['rpcs']} RPCs")
        assert self.redis is not None
        self.proxy = redis_probes.RoundTripProxy("127.0.0.1", self.redis.port)
        self.proxy.start()
        behind = harness.start_sidecar(self.procs, f"redis://127.0.0.1:{self.proxy.port}/0", admin=False)
        try:
            unary_rt = self.round_trip_window(behind, concurrency=1, requests=cfg.monitor_unary)
            batch_rt = self.round_trip_window(behind, concurrency=1, batch=k, requests=cfg.monitor_batches * k)
            # Many callers: the store writes the scripts of one event-loop tick together (redis_mux).
            unary_rt_many = self.round_trip_window(behind, concurrency=cfg.unary_concurrency,
                                                   requests=cfg.monitor_unary * 10)
        finally:
            self.procs.stop(behind.proc)
        self.say(f"d round trips: unary {unary_rt}; batch {batch_rt}")
        sc = self.results["scenarios"]
        self.results["scenarios"]["d_redis_per_decision"] = {
            "monitor_unary": unary, "monitor_batch": batch, "round_trips_unary": unary_rt,
            "round_trips_batch": batch_rt, "round_trips_unary_many_callers": unary_rt_many,
            "script_usec_per_call_unary": sc["a_unary"]["sidecar"]["redis"]["script_usec_per_call"],
            "script_usec_per_call_batch": sc["c_batch"]["sidecar"]["redis"]["script_usec_per_call"],
            "redis_cpu_usec_per_script_call_unary":
                sc["a_unary"]["sidecar"]["redis"]["redis_cpu_usec_per_script_call"],
            "redis_cpu_usec_per_script_call_batch":
                sc["c_batch"]["sidecar"]["redis"]["redis_cpu_usec_per_script_call"]}
        self.rows_d(unary, batch, unary_rt, batch_rt)

    def rows_d(self, unary: dict[str, Any], batch: dict[str, Any], unary_rt: dict[str, Any],
               batch_rt: dict[str, Any]) -> None:
        d = self.results["scenarios"]["d_redis_per_decision"]
        k = self.cfg.batch_items
        self.row("d redis", "top-level commands per unary decision", unary["commands_per_decision"], "commands",
                 target=("==", 1))
        self.row("d redis", "round trips per unary decision (c=1)", unary_rt["round_trips_per_decision"], "trips",
                 target=("==", 1))
        self.row("d redis", f"top-level commands per batch RPC ({k} items)", batch["commands_per_rpc"], "commands",
                 target=("==", k))
        self.row("d redis", "round trips per batch RPC", batch_rt["round_trips_per_rpc"], "trips", target=("==", 1))
        many = d["round_trips_unary_many_callers"]
        self.row("d redis", f"round trips per unary decision (c={self.cfg.unary_concurrency}, coalesced)",
                 many["round_trips_per_decision"], "trips")
        for side in ("unary", "batch"):
            self.row("d redis", f"{self.verb} usec_per_call during {side} load", d[f"script_usec_per_call_{side}"],
                     "us", target=("<=", 25))
            self.row("d redis", f"Redis CPU per {self.verb} during {side} load (INFO cpu)",
                     d[f"redis_cpu_usec_per_script_call_{side}"], "us")

    def raw_run(self, template: redis_probes.ReserveTemplate, depth: int) -> dict[str, Any]:
        """One raw script-call run (FCALL or EVALSHA) with what Redis counted for it (commandstats reset first)."""
        assert self.redis is not None and self.control is not None
        self.control.reset_stats()
        cpu_before, machine_before, own_before = (self.control.cpu_seconds(), harness.machine_busy_seconds(),
                                                  time.process_time())
        run = redis_probes.raw_reserve(self.redis.url, template, accounts(RAW_ACCOUNTS, "raw"), depth=depth,
                                       seconds=self.cfg.raw_seconds)
        stats = self.control.commandstats().get(self.verb.lower(), {})
        redis_cpu = self.control.cpu_seconds() - cpu_before
        # The client is this process; anything else busy meanwhile is noise (see load()).
        other = harness.machine_busy_seconds() - machine_before - redis_cpu - (time.process_time() - own_before)
        run["other_processes_cores_avg"] = round(max(0.0, other / run["elapsed_seconds"]), 3)
        run["script_usec_per_call"] = float(stats.get("usec_per_call", 0.0))
        run["redis_cpu_usec_per_script_call"] = redis_cpu * 1e6 / max(1, run["calls"])
        # Near 1.0: Redis' one thread is the bottleneck, this is the floor; well below: the client is.
        run["redis_cores_avg"] = round(redis_cpu / run["elapsed_seconds"], 3)
        return run

    def scenario_e(self) -> None:
        """The reserve script alone, straight from redis-py, at several pipeline depths."""
        assert self.control is not None and self.redis is not None
        call = redis_probes.capture_reserve_call(self.redis.url, "raw-0")
        template = redis_probes.ReserveTemplate(call, "raw-0")
        verb = self.verb
        redis_probes.load_reserve(self.control.client, verb)
        runs = {}
        for depth in (1, 8, 64):
            run = runs[f"depth_{depth}"] = self.raw_run(template, depth)
            self.say(f"e raw {verb} depth {depth}: {run['calls_per_second']:,.0f}/s, usec_per_call "
                     f"{run['script_usec_per_call']:.1f}, "
                     f"Redis CPU/call {run['redis_cpu_usec_per_script_call']:.1f} us, "
                     f"redis cores {run['redis_cores_avg']}, other processes {run['other_processes_cores_avg']}, "
                     f"errors {run['errors']}")
            self.row("e raw redis", f"{verb} reserve/s, pipeline depth {depth}", run["calls_per_second"], "calls/s")
            self.row("e raw redis", f"{verb} usec_per_call, depth {depth}", run["script_usec_per_call"], "us",
                     target=("<=", 25))
        # The same KEYS/ARGV to a function (or script) that does nothing: what any call costs Redis,
        # before the script's logic.
        nothing = redis_probes.ReserveTemplate(call, "raw-0", ref=redis_probes.load_return_1(self.control.client, verb))
        run = runs["return_1_depth_64"] = self.raw_run(nothing, 64)
        self.say(f"e {verb} 'return 1' with the same KEYS/ARGV, depth 64: {run['calls_per_second']:,.0f}/s, "
                 f"usec_per_call {run['script_usec_per_call']:.1f}")
        self.row("e raw redis", f"{verb} usec_per_call of 'return 1', same KEYS/ARGV", run["script_usec_per_call"],
                 "us")
        self.results["scenarios"]["e_raw_redis"] = {"argv_count": len(call) - 3, "runs": runs,
                                                    "command_bytes": len(template.command("raw-0", "x" * 32))}

    def scenario_f(self) -> None:
        """1 vs 2 server processes under the same heavier load (2 client processes)."""
        assert self.sidecar is not None and self.redis is not None
        c, n = self.cfg.unary_concurrency, self.cfg.process_clients
        one = self.with_redis_stats(lambda: self.load(self.sidecar.target, self.sidecar.server_pids(),
                                                      processes=n, concurrency=c, channels=F_CHANNELS))
        self.say(self.describe(f"f --workers 1, {n} clients", one))
        rss_one = sum(harness.rss_mb(p) for p in self.sidecar.server_pids())
        two_side = harness.start_sidecar(self.procs, self.redis.url, workers=2, admin=False)
        try:
            two = self.with_redis_stats(lambda: self.load(two_side.target, two_side.server_pids(),
                                                          processes=n, concurrency=c, channels=F_CHANNELS))
            self.say(self.describe(f"f --workers 2, {n} clients", two))
            rss_workers = [harness.rss_mb(p) for p in two_side.server_pids()]
            rss_supervisor = harness.rss_mb(two_side.proc.pid)
        finally:
            self.procs.stop(two_side.proc)
        self.results["scenarios"]["f_processes"] = {"workers_1": one, "workers_2": two, "client_processes": n,
                                                    "concurrency_per_client": c, "mix": "abandon=1"}
        self.row("f processes", f"--workers 1 RPC/s ({n} clients x c={c})", one["rpcs_per_second"], "RPC/s")
        self.row("f processes", "--workers 2 RPC/s, ratio to --workers 1", two["rpcs_per_second"], "ratio",
                 target=(">=", 1.6), reference=one["rpcs_per_second"])
        self.results["scenarios"]["g_rss"] = {"workers_1_mb": rss_one, "workers_2_worker_mb": rss_workers,
                                              "workers_2_sum_mb": sum(rss_workers),
                                              "workers_2_supervisor_mb": rss_supervisor,
                                              "noop_mb": harness.rss_mb(self.noop_pid)}

    def scenario_g(self) -> None:
        g = self.results["scenarios"]["g_rss"]
        self.say(f"g RSS after load: --workers 1 {g['workers_1_mb']:.1f} MB; --workers 2 workers "
                 f"{[round(x, 1) for x in g['workers_2_worker_mb']]} MB + supervisor "
                 f"{g['workers_2_supervisor_mb']:.1f} MB; no-op server {g['noop_mb']:.1f} MB")
        self.row("g rss", "sidecar RSS after load, --workers 1", g["workers_1_mb"], "MB", target=("<=", 100))
        self.row("g rss", "sidecar RSS after load, --workers 2 (sum of workers)", g["workers_2_sum_mb"], "MB",
                 target=("<=", 100))
        self.row("g rss", "no-op server RSS after load (reference)", g["noop_mb"], "MB")

    def run_all(self) -> None:
        self.results["machine"] = machine_info()
        before, started = harness.machine_busy_seconds(), time.monotonic()
        time.sleep(0.5)  # what the machine is busy with before this run starts anything
        self.results["machine"]["busy_cores_before_start"] = round(
            (harness.machine_busy_seconds() - before) / (time.monotonic() - started), 2)
        self.results["machine"]["loadavg_before_start"] = open("/proc/loadavg").read().split()[:3]
        self.results["config"] = self.cfg.__dict__
        self.setup()
        assert self.redis is not None
        self.results["machine"]["redis_server"] = {"path": self.redis.binary,
                                                   "version": ".".join(map(str, self.redis.version)),
                                                   "persistence": "AOF everysec" if self.cfg.aof else "off"}
        for scenario in (self.scenario_a, self.scenario_b, self.scenario_c, self.scenario_d, self.scenario_e,
                         self.scenario_f, self.scenario_g):
            scenario()
        self.results["table"] = [row.__dict__ for row in self.rows]

    def close(self) -> None:
        """Stops everything this run started, newest first; never raises."""
        for stop in (self.procs.stop_all, lambda: self.proxy and self.proxy.stop(),
                     lambda: self.control and self.control.close(), lambda: self.redis and self.redis.stop()):
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                print(f"cleanup: {exc!r}", file=sys.stderr)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    import importlib.util

    from quota_sidecar.server.settings import Settings

    uvloop_installed = importlib.util.find_spec("uvloop") is not None
    # `serve --event-loop auto` (the default) runs on uvloop when it is installed; older sidecars never did.
    event_loop = getattr(Settings(), "event_loop", "asyncio")
    mem_kb = 0
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "memory_gb": round(mem_kb / 1024 / 1024, 1), "kernel": platform.release(),
            "python": platform.python_version(), "grpcio": _version("grpcio"), "protobuf": _version("protobuf"),
            "redis_py": _version("redis"), "hiredis": _version("hiredis"),
            "uvloop_installed": uvloop_installed, "sidecar_event_loop_setting": event_loop,
            "uvloop_used": uvloop_installed and event_loop in ("auto", "uvloop"),
            "redis_servers_available": [f"{'.'.join(map(str, v))} {p}" for p, v in available_redis_servers()]}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def _find(tree: Any, key: str) -> Iterator[Any]:
    """Every value of ``key`` anywhere in nested dicts and lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            else:
                yield from _find(v, key)
    elif isinstance(tree, list):
        for v in tree:
            yield from _find(v, key)


def print_table(results: dict[str, Any], rows: list[Row]) -> None:
    m = results["machine"]
    print()
    print(f"machine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), {m['memory_gb']} GB, "
          f"Linux {m['kernel']}")
    print(f"software: Python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, redis-py "
          f"{m['redis_py']}, hiredis {m['hiredis']}, redis-server {m['redis_server']['version']} "
          f"({m['redis_server']['persistence']}), uvloop {'used' if m['uvloop_used'] else 'not used'}")
    others = list(_find(results["scenarios"], "other_processes_cores_avg"))
    print(f"noise: other processes kept {m['busy_cores_before_start']} core(s) busy before the run (load average "
          f"{' '.join(m['loadavg_before_start'])}), and up to {max(others, default=0):.2f} core(s) during a load")
    print("load: separate client processes (python -m quota_sidecar loadtest), --mix abandon=1 (one "
          "CheckAndReserve RPC per decision); ratio = sidecar / no-op unless said otherwise")
    header = ("scenario", "figure", "value", "unit", "target", "ratio", "met")
    table = [header] + [(r.scenario, r.figure, _fmt(r.value), "" if r.unit == "ratio" else r.unit, r.target,
                         _fmt(r.ratio), {True: "yes", False: "NO", None: ""}[r.met]) for r in rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for n, line in enumerate(table):
        print("  ".join(str(cell).ljust(w) if i < 2 or i > 3 else str(cell).rjust(w)
                        for i, (cell, w) in enumerate(zip(line, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # a SIGTERM cleans up like Ctrl-C
    workdir = Path(tempfile.mkdtemp(prefix="qs-bench-"))
    bench = Bench(cfg, args, workdir)
    started = time.monotonic()
    status = 1
    try:
        bench.run_all()
        status = 0
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        status = 130
    except Exception as exc:  # noqa: BLE001 - report what failed to run, then clean up
        import traceback

        traceback.print_exc()
        print(f"benchmark failed: {exc}", file=sys.stderr)
    finally:
        # A second Ctrl-C must not cut the clean-up short (every stop in it is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bench.close()
    if status == 0:
        bench.results["wall_seconds"] = round(time.monotonic() - started, 1)
        print_table(bench.results, bench.rows)
        print(f"\nwall time {bench.results['wall_seconds']} s")
        if args.json:
            Path(args.json).write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
            print(f"figures written to {args.json}")
    if status == 1:
        print(f"logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
