"""What a newcomer following the README meets (issue 15, part 5): exit statuses, pipes, the
development sidecar's Redis found by the tools, one serve per data folder, runnable examples,
times in the account's zone, the denial text, JSON numbers and the load-test plot's last second.

The CLI and the examples run as subprocesses; the sidecar is either the in-process one of
quota_fixtures (on the session's real Redis) or a real ``serve`` process (test_serve_cli's helpers).
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping
from zoneinfo import ZoneInfo

import pytest
import redis
from quota_fixtures import Sidecar
from test_serve_cli import ServeProcess, _clean_env, running_sidecar, short_dir  # noqa: F401 (fixture)

from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.model import JobParams
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.tools.loadtest import LoadConfig, TimelineBucket, run_load
from quota_sidecar.tools.loadtest_plot import steps

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT = 60.0
V15 = JobParams(duration_seconds=15, resolution="720p")  # 2 credits


def run_cli(*args: str, env: Mapping[str, str] | None = None, cwd: str | None = None,
            stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """``python -m quota_sidecar ARGS`` without the test's QUOTA_* variables; bounded."""
    return subprocess.run([sys.executable, "-m", "quota_sidecar", *args], stdin=subprocess.DEVNULL, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=TIMEOUT, env=_clean_env(env), cwd=cwd,
                          check=False)


async def acli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    # In a thread: the in-process sidecar serves on this test's event loop.
    return await asyncio.to_thread(run_cli, *args, **kw)


async def use_free_allowance(engine: QuotaEngine, account: str) -> None:
    for i in range(30):  # the free plan's daily sora allowance; holds count as used
        assert (await engine.check_and_reserve(account, "sora", f"free-{i}", V15)).outcome.allowed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- 1. a denial has its own exit status ----------------------------------------------------------------


async def test_denied_reserve_exits_3_so_and_chains_stop(sidecar: Sidecar) -> None:
    target = f"127.0.0.1:{sidecar.port}"
    allowed = await acli("reserve", "--account", "nc-1", "--product", "sora", "--duration", "10",
                         "--resolution", "720p", "--target", target)
    assert allowed.returncode == 0 and allowed.stdout.startswith("ALLOWED"), allowed
    # The free plan allows 15 s at most: NOT_ENTITLED, nothing held.
    cmd = (f"{sys.executable} -m quota_sidecar reserve --account nc-1 --product sora --duration 20 "
           f"--resolution 720p --target {target} && echo RENDERING")
    chain = await asyncio.to_thread(subprocess.run, ["sh", "-c", cmd], capture_output=True, text=True,
                                    timeout=TIMEOUT, env=_clean_env(), check=False)
    assert chain.returncode == 3, chain
    assert chain.stdout.startswith("DENIED   NOT_ENTITLED") and "RENDERING" not in chain.stdout, chain.stdout
    as_json = await acli("reserve", "--account", "nc-1", "--product", "sora", "--duration", "20",
                         "--resolution", "720p", "--target", target, "--json")
    assert as_json.returncode == 3 and json.loads(as_json.stdout)["allowed"] is False

    reserve_help = " ".join(run_cli("reserve", "--help").stdout.split())
    assert "3 DENIED" in reserve_help and "&& render" in reserve_help, reserve_help
    top_help = run_cli("--help").stdout
    assert "exit status:" in top_help and "3    reserve: DENIED" in top_help, top_help


# -- 2. a reader that stops early -----------------------------------------------------------------------


def _into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs the CLI with stdout a pipe nobody reads any more, as `| head` leaves it."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return run_cli(*args, stdout=write_end)
    finally:
        os.close(write_end)


async def test_closed_stdout_ends_quietly_with_141(sidecar: Sidecar) -> None:
    for i in range(5):
        await sidecar.engine.grant("nc-2", 10, f"p{i}")
    for args in (("ledger", "--account", "nc-2", "--target", f"127.0.0.1:{sidecar.admin_port}"),
                 ("balance", "--account", "nc-2", "--target", f"127.0.0.1:{sidecar.port}")):
        r = await asyncio.to_thread(_into_closed_pipe, *args)
        assert (r.returncode, r.stderr) == (141, ""), (args, r.returncode, r.stderr)
    # Through a real `head`: the pipeline succeeds and shows the first line only.
    cmd = (f"{sys.executable} -m quota_sidecar ledger --account nc-2 --target 127.0.0.1:{sidecar.admin_port} "
           "| head -1")
    r = await asyncio.to_thread(subprocess.run, ["sh", "-c", cmd], capture_output=True, text=True,
                                timeout=TIMEOUT, env=_clean_env(), check=False)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 and "Traceback" not in r.stderr, r


# -- 3. audit: QUOTA_* like serve, and "cannot run" apart from "violations" -------------------------------


async def test_audit_reads_quota_env_and_says_when_it_cannot_run(
        engine: QuotaEngine, redis_server: RedisServerProcess, key_prefix: str) -> None:
    await engine.grant("nc-3", 10, "p1")
    env = {"QUOTA_REDIS_URL": redis_server.url, "QUOTA_KEY_PREFIX": key_prefix}
    r = await acli("audit", "--all", env=env)
    assert r.returncode == 0, r
    assert r.stdout.startswith("quota-sidecar audit: 1 account(s), 0 with violations") and "nc-3" in r.stdout, r
    assert f"using Redis {redis_server.url} (from QUOTA_REDIS_URL)" in r.stderr, r.stderr

    dead = f"redis://127.0.0.1:{free_port()}/0"
    r = await acli("audit", "--all", env={"QUOTA_REDIS_URL": dead})
    assert r.returncode == 2, r
    assert r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("quota-sidecar audit: cannot run: redis unreachable"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 2, r.stderr  # the "using" line and the error

    r = await acli("audit", "--all", env={"QUOTA_KEY_BUCKETS": "many", "QUOTA_REDIS_URL": redis_server.url})
    assert r.returncode == 2 and "QUOTA_KEY_BUCKETS" in r.stderr and "Traceback" not in r.stderr, r


# -- 4 and 5. the development sidecar's Redis, found; one serve per data folder -----------------------------


def _load(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"newcomer_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tools_find_the_development_redis_without_a_port_from_the_log(
        short_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    data_dir = os.path.join(short_dir, ".quota-sidecar")  # the default, seen from short_dir
    url_file = Path(data_dir) / "redis.url"
    with running_sidecar(short_dir, redis_url=None, key_prefix=None, extra=["--data-dir", data_dir]) as sc:
        url = url_file.read_text().strip()
        assert url.startswith("redis://127.0.0.1:") and url in sc.serve.stderr, sc.serve.stderr
        assert redis.Redis.from_url(url).ping()
        assert run_cli("grant", "--account", "nc-4", "--credits", "5", "--purchase-id", "p",
                       "--target", sc.admin_target).returncode == 0

        r = run_cli("audit", "--all", cwd=short_dir)
        assert r.returncode == 0 and "account nc-4:" in r.stdout, r
        assert f"using Redis {url} (from ./.quota-sidecar/redis.url" in r.stderr, r.stderr
        r = run_cli("loadtest", "--target", sc.target, "--requests", "20", "--warmup", "0", "--accounts", "2",
                    "--account-prefix", "nc-lt", "--audit", "--quiet", cwd=short_dir)
        assert r.returncode == 0 and "quota-sidecar audit: 2 account(s), 0 with violations" in r.stdout, r
        monkeypatch.chdir(short_dir)
        assert _load("events_consumer").find_redis_url(None) == url
        assert sc.serve.terminate() == 0, sc.serve.stderr

    assert not url_file.exists()  # withdrawn with the Redis it named
    r = run_cli("audit", "--all", cwd=short_dir)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r
    assert "no Redis URL: give --redis-url or set QUOTA_REDIS_URL" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_second_serve_on_the_same_data_folder_is_refused_before_it_starts_anything(
        short_dir: str) -> None:  # noqa: F811
    data_dir = os.path.join(short_dir, "data")
    with running_sidecar(short_dir, redis_url=None, key_prefix=None, extra=["--data-dir", data_dir]) as sc:
        match = re.search(r"on (redis://127\.0\.0\.1:\d+/0)", sc.serve.stderr)
        assert match, sc.serve.stderr
        url = match.group(1)
        # On a --listen of its own, so only the data folder is shared.
        other = ServeProcess(["--listen", f"unix:{short_dir}/other.sock", "--data-dir", data_dir],
                             _clean_env(), short_dir)
        try:
            assert other.wait_exit() == 2, other.stderr
        finally:
            other.kill()
        assert (f"another quota-sidecar serve uses data folder {data_dir} (pid {sc.serve.proc.pid}); stop it or "
                "give this one --data-dir and --listen of its own") in other.stderr, other.stderr
        assert "embedded redis-server" not in other.stderr and "Traceback" not in other.stderr, other.stderr
        assert not os.path.exists(f"{short_dir}/other.sock")
        assert redis.Redis.from_url(url).ping()  # the first one's Redis is untouched
        assert sc.serve.terminate() == 0, sc.serve.stderr


# -- 6. the examples run as shown, on the public client --------------------------------------------------


def test_examples_are_executable_scripts_on_the_public_client() -> None:
    for path in sorted(EXAMPLES.glob("*.py")):
        assert path.read_text().startswith("#!/usr/bin/env python3\n"), path
        assert os.access(path, os.X_OK), path
        staged = subprocess.run(["git", "ls-files", "-s", str(path)], cwd=ROOT, capture_output=True, text=True,
                                timeout=TIMEOUT, check=False).stdout
        assert not staged or staged.startswith("100755 "), (path, staged)  # executable in git too
        modules = {alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
                   for alias in node.names}
        modules |= {node.module or "" for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom)}
        ours = {m for m in modules if m.startswith("quota_sidecar")}
        assert ours <= {"quota_sidecar.client"}, (path, ours)


async def test_video_worker_shows_the_smaller_actual_size_billed(sidecar: Sidecar) -> None:
    await use_free_allowance(sidecar.engine, "nc-6")
    await sidecar.engine.grant("nc-6", 10, "p1")
    env = {**_clean_env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = await asyncio.to_thread(subprocess.run, [str(EXAMPLES / "video_worker.py"), "--target",
                                                 f"127.0.0.1:{sidecar.port}", "--account", "nc-6", "--jobs", "2"],
                                capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT, check=False)
    assert r.returncode == 0, r
    assert "job 0: committed: 2 credit(s), 0 free unit(s)" in r.stdout, r.stdout
    assert ("job 1: committed: 1 credit(s), 0 free unit(s); shorter than asked: held 2 for 15 s, charged 1 for "
            "the 8 s produced, 1 given back") in r.stdout, r.stdout
    assert (await sidecar.engine.balance("nc-6")).credit_balance == 7


# -- 7. ledger times in the account's zone ---------------------------------------------------------------


async def test_ledger_prints_times_in_the_accounts_zone(sidecar: Sidecar) -> None:
    admin = f"127.0.0.1:{sidecar.admin_port}"
    assert (await acli("set-account", "--account", "nc-7", "--tz", "Europe/Paris", "--target", admin)).returncode == 0
    assert (await acli("grant", "--account", "nc-7", "--credits", "3", "--purchase-id", "p", "--target",
                       admin)).returncode == 0
    doc = json.loads((await acli("ledger", "--account", "nc-7", "--json", "--target", admin)).stdout)
    at = datetime.fromisoformat(doc["entries"][-1]["at"].replace("Z", "+00:00"))
    paris = at.astimezone(ZoneInfo("Europe/Paris")).strftime("%Y-%m-%d %H:%M:%S %Z")
    text = (await acli("ledger", "--account", "nc-7", "--target", admin)).stdout
    assert paris in text and "UTC" not in text, (paris, text)
    utc = (await acli("ledger", "--account", "nc-7", "--tz", "UTC", "--target", admin)).stdout
    assert at.strftime("%Y-%m-%d %H:%M:%S UTC") in utc, utc
    bad = await acli("ledger", "--account", "nc-7", "--tz", "Mars/Base", "--target", admin)
    assert bad.returncode == 2 and "not an IANA time zone" in bad.stderr, bad


# -- 8. the denial says cost, balance and shortfall once each ---------------------------------------------


async def test_denial_text_names_cost_available_and_shortfall(sidecar: Sidecar) -> None:
    await use_free_allowance(sidecar.engine, "nc-8")
    r = await acli("reserve", "--account", "nc-8", "--product", "sora", "--duration", "15", "--resolution", "720p",
                   "--target", f"127.0.0.1:{sidecar.port}")
    assert r.returncode == 3, r
    assert ("DENIED   PURCHASE_REQUIRED: daily free sora allowance used (30/30 generations); this job costs "
            "2 credits; 0 available, 2 more credits needed") in r.stdout, r.stdout


# -- 9. --json numbers are numbers --------------------------------------------------------------------------


async def test_json_prints_64_bit_integers_as_numbers(sidecar: Sidecar) -> None:
    await sidecar.engine.grant("nc-9", 10, "p1")
    doc = json.loads((await acli("balance", "--account", "nc-9", "--json",
                                 "--target", f"127.0.0.1:{sidecar.port}")).stdout)
    assert (doc["credit_balance"], doc["credits_held"]) == (10, 0)
    assert (doc["lots"][0]["credits_left"], doc["lots"][0]["credits_granted"]) == (10, 10)
    assert isinstance(doc["lots"][0]["expires_at"], str)  # timestamps stay RFC 3339 strings
    sora = next(a for a in doc["allowances"] if a["product"] == "sora")
    assert (sora["free_used"], sora["free_limit"]) == (0, 30)
    assert "64-bit integers as JSON numbers" in " ".join(run_cli("balance", "--help").stdout.split())


# -- 10. the load-test plot's last, partial second -----------------------------------------------------------


def _bucket(second: int, decisions: int) -> TimelineBucket:
    return TimelineBucket(second, decisions, decisions, 0, 1.0, 2.0)


def test_plot_scales_the_last_partial_second_to_its_length() -> None:
    report = SimpleNamespace(timeline=(_bucket(0, 1000), _bucket(1, 1000), _bucket(2, 250)), elapsed_seconds=2.25)
    rate, p99 = steps(report)
    assert rate[-2:] == [(2.0, pytest.approx(1000.0)), (2.25, pytest.approx(1000.0))]
    assert p99[-1] == (2.25, 2.0)
    # A last fragment too short for its rate to mean anything is left out...
    short = SimpleNamespace(timeline=(_bucket(0, 1000), _bucket(1, 30)), elapsed_seconds=1.02)
    assert steps(short)[0] == [(0.0, 1000.0), (1.0, 1000.0)]
    # ... unless it is the whole run.
    alone = SimpleNamespace(timeline=(_bucket(0, 50),), elapsed_seconds=0.05)
    assert steps(alone)[0] == [(0.0, pytest.approx(1000.0)), (0.05, pytest.approx(1000.0))]


async def test_plot_of_a_real_run_ends_at_its_elapsed_time(sidecar: Sidecar) -> None:
    report = await run_load(LoadConfig(target=f"127.0.0.1:{sidecar.port}", duration_seconds=1.4, warmup_seconds=0.0,
                                       concurrency=4, accounts=20, account_prefix="nc-10", mix={"release": 1}))
    rate, _ = steps(report)
    last = report.timeline[-1]
    assert report.elapsed_seconds - last.second < 1.0  # the run ended mid-second
    assert rate[-1][0] == pytest.approx(report.elapsed_seconds)
    assert rate[-1][1] == pytest.approx(last.decisions / (report.elapsed_seconds - last.second))
