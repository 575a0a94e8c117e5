"""The benchmark harness runs end to end, and what it proves about Redis traffic holds.

``benchmarks/run.py --quick`` starts its own redis-server, sidecars, no-op server and load
clients (all on 127.0.0.1) and writes its figures as JSON. Speeds depend on the machine and
are never asserted here. What is: every scenario produced numbers from loads that made no
failed call (a figure from a load full of errors would be meaningless), the table it prints
and writes is consistent (every figure there, each "met" computed from its value, ratio and
target), and the design's correctness property: one top-level Redis command and one round
trip per unary decision, one round trip (one pipeline, one script call per item) per batch RPC
(store.reserve_many), never more than one round trip per decision with many callers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_SECONDS = 240  # a quick run takes ~30 s; the bound only stops a hung run
SCENARIOS = ("a_unary", "b_single", "c_batch", "d_redis_per_decision", "e_raw_redis", "f_processes", "g_rss")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The JSON figures and the printed report of one quick run."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def results(run: tuple[dict[str, Any], str]) -> dict[str, Any]:
    return run[0]


def _load_reports(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every load run's report (scenarios a, b, c both sides; f both server counts), by name."""
    s = results["scenarios"]
    loads = {f"{key} {side}": s[key][side] for key in ("a_unary", "b_single", "c_batch") for side in ("noop", "sidecar")}
    loads.update({f"f_processes {k}": s["f_processes"][k] for k in ("workers_1", "workers_2")})
    return loads


def test_every_scenario_reports_numbers(results: dict[str, Any]) -> None:
    assert set(SCENARIOS) <= set(results["scenarios"])
    for key in ("a_unary", "b_single", "c_batch"):
        for side in ("noop", "sidecar"):
            report = results["scenarios"][key][side]
            assert _number(report["decisions_per_second"]) and report["decisions_per_second"] > 0
            assert all(_number(report["latency_ms"][q]) for q in ("p50", "p99"))
    assert all(_number(run["calls_per_second"]) and run["calls"] > 0
               for run in results["scenarios"]["e_raw_redis"]["runs"].values())
    f = results["scenarios"]["f_processes"]
    assert f["workers_1"]["rpcs_per_second"] > 0 and f["workers_2"]["rpcs_per_second"] > 0
    assert results["scenarios"]["g_rss"]["workers_1_mb"] > 0
    table = results["table"]
    assert {row["scenario"].split()[0] for row in table} == set("abcdefg")
    assert all(_number(row["value"]) for row in table)
    assert results["machine"]["cpu_model"] and results["machine"]["redis_server"]["version"]


def test_every_load_ran_without_a_failed_call(results: dict[str, Any]) -> None:
    for name, report in _load_reports(results).items():
        # by_status, decisions, rpcs and by_funding are summed over a scenario's client processes;
        # the other fields of a merged report are one process's (benchmarks/run.py merge_reports).
        assert report["rpcs"] > 0 and report["by_status"] == {"OK": report["rpcs"]}, (name, report["by_status"])
        assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"], name
        if "processes" not in report:
            assert report["errors"] == 0 == report["unexpected_errors"], name
            assert report["latency_ms"]["count"] == report["rpcs"], name
        if "noop" not in name:
            # Every benchmark account was funded first: every decision allowed, each funded once.
            assert sum(report["by_funding"].values()) == report["decisions"] > 0, name
            assert "processes" in report or report["allowed"] == report["decisions"], name
    batch = results["scenarios"]["c_batch"]["sidecar"]
    assert batch["decisions"] == batch["rpcs"] * results["config"]["batch_items"]
    for depth, run in results["scenarios"]["e_raw_redis"]["runs"].items():
        assert run["errors"] == 0 and run["calls"] > 0, depth


def test_the_table_is_consistent_with_the_figures_and_printed(run: tuple[dict[str, Any], str]) -> None:
    results, printed = run
    table = results["table"]
    assert table
    for row in table:
        where = f"{row['scenario']}: {row['figure']}"
        assert _number(row["value"]) and row["value"] >= 0, where
        if row["unit"] == "ratio":  # a ratio row carries its ratio to its reference
            assert _number(row["ratio"]) and row["ratio"] > 0, where
        if not row["target"]:
            assert row["met"] is None, where
            continue
        op, bound = row["target"].split()
        compared = row["ratio"] if row["unit"] == "ratio" else row["value"]
        expected = {">=": compared >= float(bound), "<=": compared <= float(bound), "==": compared == float(bound)}[op]
        assert row["met"] is expected, where
        # What "met" says of the design's exact figures is what the rest of this file proves.
        if op == "==":
            assert row["met"] is True, where
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["scenario", "figure", "value"])
    body = lines[header + 2:header + 2 + len(table)]  # after the header's rule
    for row, line in zip(table, body):
        assert line.startswith(row["scenario"]) and row["figure"] in line, (row, line)
        if row["met"] is not None:
            assert line.rstrip().endswith("yes" if row["met"] else "NO"), line


def test_one_redis_command_and_one_round_trip_per_unary_decision(results: dict[str, Any]) -> None:
    d = results["scenarios"]["d_redis_per_decision"]
    monitor = d["monitor_unary"]
    assert monitor["decisions"] > 0
    # Only the reserve script, once per decision: nothing read first, no SCRIPT EXISTS, no MULTI.
    verb = results["script_verb"]
    redis_major = int(results["machine"]["redis_server"]["version"].split(".")[0])
    assert verb == ("FCALL" if redis_major >= 7 else "EVALSHA")
    assert monitor["commands"]["decision_path"] == {f"{verb} reserve": monitor["decisions"]}
    assert monitor["commands_per_decision"] == 1
    assert monitor["commandstats_script_calls"] == monitor["decisions"]
    trips = d["round_trips_unary"]
    assert trips["round_trips"] == trips["decisions"] > 0
    assert trips["round_trips_per_decision"] == 1
    # Many callers: the decisions of one event-loop tick share a round trip, never need more.
    many = d["round_trips_unary_many_callers"]
    assert many["decisions"] > 0 and 0 < many["round_trips"] <= many["decisions"]
    assert many["script_calls_per_round_trip_max"] >= 1


def test_one_round_trip_per_batch_rpc(results: dict[str, Any]) -> None:
    d = results["scenarios"]["d_redis_per_decision"]
    items = results["config"]["batch_items"]
    monitor = d["monitor_batch"]
    assert monitor["rpcs"] > 0 and monitor["decisions"] == monitor["rpcs"] * items
    # One script call (FCALL, or EVALSHA on Redis 6.2) per item, all of them in one pipelined round trip per RPC.
    assert monitor["commands"]["decision_path"] == {f"{results['script_verb']} reserve": monitor["decisions"]}
    assert monitor["commands_per_rpc"] == items
    trips = d["round_trips_batch"]
    assert trips["round_trips"] == trips["rpcs"] > 0
    assert trips["round_trips_per_rpc"] == 1
    assert trips["script_calls_per_round_trip_max"] == items
