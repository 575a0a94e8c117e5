"""The benchmark harness runs end to end, and what it proves about Redis traffic holds.

``benchmarks/run.py --quick`` starts its own redis-server, sidecars, no-op server and load
clients (all on 127.0.0.1) and writes its figures as JSON. Speeds depend on the machine and
are never asserted here; only that every scenario produced numbers, and the design's
correctness property: one top-level Redis command and one round trip per unary decision,
one round trip (one pipeline, one EVALSHA per item) per batch RPC (store.reserve_many).
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
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_every_scenario_reports_numbers(results: dict[str, Any]) -> None:
    assert set(SCENARIOS) <= set(results["scenarios"])
    for key in ("a_unary", "b_single", "c_batch"):
        for side in ("noop", "sidecar"):
            report = results["scenarios"][key][side]
            assert _number(report["decisions_per_second"]) and report["decisions_per_second"] > 0
            assert all(_number(report["latency_ms"][q]) for q in ("p50", "p99"))
    assert all(_number(run["evalsha_per_second"]) and run["calls"] > 0
               for run in results["scenarios"]["e_raw_redis"]["runs"].values())
    f = results["scenarios"]["f_processes"]
    assert f["workers_1"]["rpcs_per_second"] > 0 and f["workers_2"]["rpcs_per_second"] > 0
    assert results["scenarios"]["g_rss"]["workers_1_mb"] > 0
    table = results["table"]
    assert {row["scenario"].split()[0] for row in table} == set("abcdefg")
    assert all(_number(row["value"]) for row in table)
    assert results["machine"]["cpu_model"] and results["machine"]["redis_server"]["version"]


def test_one_redis_command_and_one_round_trip_per_unary_decision(results: dict[str, Any]) -> None:
    d = results["scenarios"]["d_redis_per_decision"]
    monitor = d["monitor_unary"]
    assert monitor["decisions"] > 0
    # Only the reserve script, once per decision: nothing read first, no SCRIPT EXISTS, no MULTI.
    assert monitor["commands"]["decision_path"] == {"EVALSHA reserve": monitor["decisions"]}
    assert monitor["commands_per_decision"] == 1
    assert monitor["commandstats_evalsha_calls"] == monitor["decisions"]
    trips = d["round_trips_unary"]
    assert trips["round_trips"] == trips["decisions"] > 0
    assert trips["round_trips_per_decision"] == 1


def test_one_round_trip_per_batch_rpc(results: dict[str, Any]) -> None:
    d = results["scenarios"]["d_redis_per_decision"]
    items = results["config"]["batch_items"]
    monitor = d["monitor_batch"]
    assert monitor["rpcs"] > 0 and monitor["decisions"] == monitor["rpcs"] * items
    # One EVALSHA per item, all of them in one pipelined round trip per RPC.
    assert monitor["commands"]["decision_path"] == {"EVALSHA reserve": monitor["decisions"]}
    assert monitor["commands_per_rpc"] == items
    trips = d["round_trips_batch"]
    assert trips["round_trips"] == trips["rpcs"] > 0
    assert trips["round_trips_per_rpc"] == 1
    assert trips["evalsha_per_round_trip_max"] == items
