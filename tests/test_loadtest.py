"""quota-sidecar loadtest: against the real sidecar fixture, bounded by request counts; no timing asserted."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as aioredis
from quota_fixtures import Sidecar, key

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.tools import cli
from quota_sidecar.tools.loadtest import (
    BUILTIN_JOBS,
    JobSpec,
    LoadConfig,
    LoadConfigError,
    Sampler,
    Timeline,
    corrected_latencies_us,
    cumulative,
    parse_job,
    parse_mix,
    pick,
    purchase_id,
    run_load,
    schedule_time,
    validate,
    zipf_cdf,
)
from quota_sidecar.tools.loadtest_plot import check_plot_path, nice_ticks, nines, render_html, write_plot

pytestmark = pytest.mark.all_redis_versions

FREE_SORA_PER_DAY = 30  # the default plans' free plan
TOP_KEYS = {"run_id", "mode", "config", "elapsed_seconds", "decisions", "rpcs", "decisions_per_second",
            "rpcs_per_second", "allowed", "denied", "errors", "dropped", "degraded", "latency_ms",
            "service_latency_ms", "by_status", "item_errors", "by_denial", "by_funding", "followups",
            "error_examples", "timeline", "accounts_touched", "grants", "unexpected_errors"}
LATENCY_KEYS = {"count", "min", "p50", "p90", "p99", "p99.9", "max", "mean"}


def config(sidecar: Sidecar, **kw: Any) -> LoadConfig:
    base: dict[str, Any] = dict(target=f"127.0.0.1:{sidecar.port}", requests=300, warmup_seconds=0.0,
                                concurrency=8, accounts=5, account_prefix="acct", seed=7)
    base.update(kw)
    return LoadConfig(**base)


def expected_per_account(cfg: LoadConfig) -> Counter[str]:
    """The decisions each account gets: the seeded draw sequence, replayed."""
    sampler = Sampler(cfg)
    return Counter(sampler.next().account for _ in range(cfg.requests))


async def balances(sidecar: Sidecar, accounts: Any) -> dict[str, pb.GetBalanceResponse]:
    return {a: await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id=a), timeout=10) for a in accounts}


def assert_consistent(report: Any) -> None:
    """The counters add up, whatever the run."""
    assert sum(report.by_status.values()) == report.rpcs
    assert report.allowed + report.denied + report.errors == report.decisions
    assert sum(report.by_funding.values()) == report.allowed
    assert sum(report.by_denial.values()) == report.denied
    assert report.histogram.get_total_count() == report.rpcs
    assert sum(b.rpcs for b in report.timeline) == report.rpcs
    assert sum(b.decisions for b in report.timeline) == report.decisions


# -- closed loop --------------------------------------------------------------------------------


async def test_closed_loop_counts_exactly_and_commits_every_allowed_decision(sidecar: Sidecar) -> None:
    cfg = config(sidecar, mix={"commit": 1.0})
    report = await run_load(cfg)
    assert_consistent(report)
    per_account = expected_per_account(cfg)
    # 5 accounts x 30 free videos a day and no credits: the first 30 of each account are allowed.
    allowed = sum(min(n, FREE_SORA_PER_DAY) for n in per_account.values())
    assert (report.decisions, report.rpcs, report.by_status) == (300, 300, {"OK": 300})
    assert (report.allowed, report.by_funding) == (allowed, {"free": allowed})
    assert report.by_denial == {"PURCHASE_REQUIRED": 300 - allowed} and report.denied == 300 - allowed
    assert report.followups["commit"]["rpcs"] == allowed and report.followups["commit"]["by_status"] == {"OK": allowed}
    assert report.followups["release"]["rpcs"] == report.followups["extend"]["rpcs"] == 0
    assert report.unexpected_errors == 0 and report.dropped == 0 and report.mode == "closed"
    assert set(report.accounts_touched) == set(per_account)
    for account, balance in (await balances(sidecar, per_account)).items():
        assert not balance.holds, account
        sora = next(a for a in balance.allowances if a.product == "sora")
        assert sora.free_used == min(per_account[account], FREE_SORA_PER_DAY)

    doc = json.loads(json.dumps(report.to_json()))
    assert set(doc) == TOP_KEYS
    assert set(doc["latency_ms"]) == LATENCY_KEYS and doc["service_latency_ms"] is None
    assert set(doc["followups"]) == {"commit", "release", "extend"}
    assert set(doc["followups"]["commit"]) == {"rpcs", "items", "errors", "by_status", "item_errors", "latency_ms"}
    assert doc["accounts_touched"] == len(per_account) and doc["grants"] is None
    assert doc["config"]["mix"] == {"commit": 1.0} and len(doc["config"]["jobs"]) == len(BUILTIN_JOBS["video"])
    assert all(set(b) == {"second", "decisions", "rpcs", "errors", "p50_ms", "p99_ms"} for b in doc["timeline"])


async def test_commit_and_release_leave_no_hold_and_extend_then_commits(sidecar: Sidecar) -> None:
    cfg = config(sidecar, accounts=20, requests=240, mix={"commit": 1, "release": 1, "extend": 1}, ttl_seconds=60)
    report = await run_load(cfg)
    assert_consistent(report)
    assert report.allowed == 240  # 20 accounts x 30 free: nobody runs out
    f = report.followups
    assert f["commit"]["rpcs"] + f["release"]["rpcs"] == report.allowed
    assert f["extend"]["rpcs"] <= f["commit"]["rpcs"]  # each extend is followed by its commit
    assert min(f[k]["rpcs"] for k in f) > 0
    assert report.unexpected_errors == 0
    assert all(not b.holds for b in (await balances(sidecar, report.accounts_touched)).values())


async def test_abandon_leaves_the_holds_in_flight(sidecar: Sidecar) -> None:
    report = await run_load(config(sidecar, accounts=10, requests=50, mix={"abandon": 1}))
    holds = sum(len(b.holds) for b in (await balances(sidecar, report.accounts_touched)).values())
    assert holds == report.allowed == 50
    assert all(f["rpcs"] == 0 for f in report.followups.values())


async def test_same_seed_same_sequence_and_unique_ids_per_run(sidecar: Sidecar) -> None:
    cfg = config(sidecar, requests=40, accounts=50, mix={"abandon": 1}, zipf_exponent=1.0)
    a, b = Sampler(cfg), Sampler(cfg)
    assert [a.next() for _ in range(200)] == [b.next() for _ in range(200)]
    first, second = await run_load(cfg), await run_load(cfg)
    assert first.run_id != second.run_id
    assert first.accounts_touched == second.accounts_touched
    # Fresh reservation ids: the second run decides again instead of replaying the first.
    held = sum(len(b.holds) for b in (await balances(sidecar, first.accounts_touched)).values())
    assert held == first.allowed + second.allowed == 80


async def test_warmup_calls_are_made_but_not_recorded(sidecar: Sidecar) -> None:
    report = await run_load(config(sidecar, requests=30, accounts=30, mix={"abandon": 1}, warmup_seconds=0.2,
                                   concurrency=2))
    assert report.decisions == 30
    holds = sum(len(b.holds) for b in (await balances(sidecar, report.accounts_touched)).values())
    assert holds > 30  # the warm-up's reservations were made too


# -- open loop ----------------------------------------------------------------------------------


async def test_open_loop_runs_and_reports(sidecar: Sidecar) -> None:
    report = await run_load(config(sidecar, rate=2000.0, requests=200, accounts=10, mix={"release": 1}))
    assert_consistent(report)
    assert report.mode == "open" and report.decisions + report.dropped == 200
    assert report.service_latency_ms is not None and report.service_histogram.get_total_count() == report.rpcs
    assert report.followups["release"]["rpcs"] == report.allowed
    assert report.to_json()["service_latency_ms"]["count"] == report.rpcs


async def test_open_loop_drops_what_exceeds_max_inflight(sidecar: Sidecar) -> None:
    # One job in flight at most and 200 scheduled at once (rate so high every slot is already due).
    report = await run_load(config(sidecar, rate=1e9, requests=200, max_inflight=1, accounts=10))
    assert_consistent(report)
    assert report.decisions + report.dropped == 200 and report.dropped > 0 and report.decisions >= 1


def test_open_loop_latency_is_measured_from_the_intended_send_time() -> None:
    # 10 calls meant every 10 ms from t=0; the sender stalled until t=1.0 s, then each took 1 ms.
    intended = [schedule_time(0.0, i, 0.010) for i in range(10)]
    assert intended[3] == pytest.approx(0.030)
    sent = [1.0 + i * 0.0001 for i in range(10)]
    done = [s + 0.001 for s in sent]
    corrected = corrected_latencies_us(intended, done)
    assert corrected == [round((d - i) * 1e6) for i, d in zip(intended, done)]
    assert corrected[0] == 1_001_000 and corrected[9] == round((done[9] - 0.09) * 1e6)
    # Measured from the actual send, the stall would vanish: 1 ms each.
    assert corrected_latencies_us(sent, done) == [1000] * 10
    with pytest.raises(ValueError):
        corrected_latencies_us(intended, done[:3])


def test_timeline_buckets_by_completion_second() -> None:
    t = Timeline(origin=100.0)
    t.record(100.2, 1, 0, 1000)
    t.record(100.9, 2, 1, 3000)
    t.record(103.1, 1, 0, 5000)  # seconds 1 and 2 had nothing
    buckets = t.finish()
    assert [(b.second, b.decisions, b.rpcs, b.errors) for b in buckets] == [(0, 3, 2, 1), (1, 0, 0, 0), (2, 0, 0, 0),
                                                                           (3, 1, 1, 0)]
    assert buckets[0].p99_ms == pytest.approx(3.0, rel=1e-3) and buckets[3].p50_ms == pytest.approx(5.0, rel=1e-3)


# -- batch --------------------------------------------------------------------------------------


async def test_batch_mode_counts_items_as_decisions(sidecar: Sidecar) -> None:
    cfg = config(sidecar, batch_size=10, requests=200, concurrency=4, accounts=20, mix={"commit": 3, "release": 1})
    report = await run_load(cfg)
    assert_consistent(report)
    assert (report.rpcs, report.decisions) == (20, 200) and report.by_status == {"OK": 20}
    f = report.followups
    assert set(f) == {"commit_batch", "release_batch", "extend"}
    assert f["commit_batch"]["items"] + f["release_batch"]["items"] == report.allowed == 200
    assert f["commit_batch"]["rpcs"] <= 20 and report.unexpected_errors == 0
    assert all(not b.holds for b in (await balances(sidecar, report.accounts_touched)).values())


async def test_batch_last_call_is_partial_so_requests_stay_exact(sidecar: Sidecar) -> None:
    report = await run_load(config(sidecar, batch_size=7, requests=30, accounts=20, mix={"release": 1}))
    assert (report.rpcs, report.decisions) == (5, 30)


# -- draws --------------------------------------------------------------------------------------


def test_zipf_sampler_is_deterministic_and_skewed() -> None:
    cdf = zipf_cdf(100, 1.2)
    assert cdf == zipf_cdf(100, 1.2) and cdf[-1] == 1.0 and cdf == sorted(cdf)
    import random

    def counts(seed: int) -> Counter[int]:
        rng = random.Random(seed)
        return Counter(pick(cdf, rng.random()) for _ in range(20_000))

    c = counts(1)
    assert c == counts(1) and c != counts(2)
    assert c[0] > c[1] > c[4] > c[20] > c[99]
    assert c[0] / 20_000 == pytest.approx(1 / sum(1 / k ** 1.2 for k in range(1, 101)), rel=0.05)


def test_zipf_exponent_zero_is_uniform() -> None:
    cdf = zipf_cdf(10, 0.0)
    assert cdf == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert [pick(cdf, u) for u in (0.0, 0.0999, 0.1, 0.55, 0.9999999)] == [0, 0, 1, 5, 9]
    sampler = Sampler(LoadConfig(target="x", accounts=10, seed=3))
    c = Counter(sampler.next().account for _ in range(10_000))
    assert set(c) == {f"lt-{i}" for i in range(10)} and all(800 < n < 1200 for n in c.values())


def test_zero_weights_are_never_picked() -> None:
    cdf = cumulative([0.0, 1.0, 0.0, 1.0])
    assert {pick(cdf, i / 1000) for i in range(1000)} == {1, 3}
    cfg = LoadConfig(target="x", mix={"commit": 1.0, "release": 0.0})
    sampler = Sampler(cfg)
    assert {sampler.next().outcome for _ in range(500)} == {"commit"}


# -- config ---------------------------------------------------------------------------------------


def test_parse_mix_and_jobs() -> None:
    assert parse_mix("commit=0.8, release=0.2") == {"commit": 0.8, "release": 0.2}
    assert parse_job("duration=10,resolution=720p,weight=2") == (JobSpec(10.0, "720p", weight=2.0),)
    assert parse_job("units=3,model=codex-mini") == (JobSpec(model="codex-mini", units=3),)
    assert parse_job("task") == BUILTIN_JOBS["task"]
    for bad in ("commit", "commit=x"):
        with pytest.raises(LoadConfigError):
            parse_mix(bad)
    for bad in ("size=3", "units=1.5", ""):
        with pytest.raises(LoadConfigError):
            parse_job(bad)


@pytest.mark.parametrize("kw, words", [
    ({"rate": -1.0}, "rate"),
    ({"mix": {}}, "mix: empty"),
    ({"mix": {"commit": 1, "refund": 1}}, "refund"),
    ({"mix": {"commit": -1}}, "mix"),
    ({"batch_size": 101}, "batch_size"),
    ({"batch_size": 200, "max_batch_items": 500}, None),
    ({"concurrency": 0}, "concurrency"),
    ({"duration_seconds": 0.0}, "duration"),
    ({"accounts": 0}, "accounts"),
    ({"account_prefix": "bad prefix"}, "account_prefix"),
    ({"product": "video-gen"}, "no built-in job mix"),
    ({"product": "video-gen", "jobs": BUILTIN_JOBS["video"]}, None),
    ({"ttl_seconds": 90_000}, "ttl_seconds"),
    ({"credits_per_account": 5}, "admin_target"),
    ({"zipf_exponent": float("nan")}, "zipf"),
    ({"timeout_seconds": 0.0}, "timeout"),
])
def test_validate(kw: dict[str, Any], words: str | None) -> None:
    cfg = LoadConfig(target="127.0.0.1:1", **kw)
    if words is None:
        validate(cfg)
        return
    with pytest.raises(LoadConfigError, match=re.escape(words)):
        validate(cfg)


# -- credits ----------------------------------------------------------------------------------------


async def test_credits_are_granted_once_across_runs(sidecar: Sidecar) -> None:
    cfg = config(sidecar, admin_target=f"127.0.0.1:{sidecar.admin_port}", credits_per_account=7, accounts=3,
                 requests=30, mix={"release": 1})
    first = await run_load(cfg)
    second = await run_load(cfg)
    assert first.grants == {"accounts": 3, "credits_per_account": 7, "replayed": 0}
    assert second.grants == {"accounts": 3, "credits_per_account": 7, "replayed": 3}
    for i in range(3):
        account = await sidecar.admin.GetAccount(pb.GetAccountRequest(account_id=f"acct-{i}"), timeout=10)
        assert account.totals.granted == 7 and account.balance.credit_balance == 7
        assert [lot.lot_id for lot in account.all_lots] == [purchase_id(f"acct-{i}", 7)]


async def test_granted_credits_fund_jobs_beyond_the_free_allowance(sidecar: Sidecar) -> None:
    cfg = config(sidecar, admin_target=f"127.0.0.1:{sidecar.admin_port}", credits_per_account=100, accounts=1,
                 requests=60, mix={"commit": 1}, jobs=(JobSpec(10.0, "720p"),))  # 1 credit each
    report = await run_load(cfg)
    assert report.by_funding == {"free": 30, "credits": 30} and report.denied == 0


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.newest_redis_only
async def test_failed_calls_are_counted_by_status(sidecar: Sidecar) -> None:
    # A product the sidecar does not know: every call is INVALID_ARGUMENT.
    report = await run_load(config(sidecar, product="nosuch", jobs=BUILTIN_JOBS["video"], requests=20))
    assert_consistent(report)
    assert report.by_status == {"INVALID_ARGUMENT": 20} and report.errors == report.unexpected_errors == 20
    assert "INVALID_ARGUMENT" in report.error_examples


# -- plot ---------------------------------------------------------------------------------------------


async def test_plot_is_self_contained_html_with_svg(sidecar: Sidecar, tmp_path: Any) -> None:
    report = await run_load(config(sidecar, rate=1000.0, requests=100, accounts=10, mix={"release": 1}))
    path = tmp_path / "latency.html"
    write_plot(report, str(path))
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 3 and "<polyline" in text
    assert "Latency by percentile" in text and "99.99%" in text and "Throughput" in text
    assert not re.search(r"https?://", text), "the page must not load anything"
    assert "<script" not in text and "<link" not in text and "@import" not in text and "url(" not in text
    assert render_html(report) == text


def test_plot_axes() -> None:
    assert [round(nines(p), 6) for p in (0.0, 90.0, 99.0, 99.9, 99.99)] == [0, 1, 2, 3, 4]
    assert nice_ticks(37.0) == [0, 10, 20, 30, 40]
    assert nice_ticks(0.0) == [0.0, 1.0]


def test_png_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(ValueError, match="matplotlib"):
        check_plot_path(str(tmp_path / "p.png"))
    check_plot_path(str(tmp_path / "p.html"))
    with pytest.raises(ValueError, match="does not exist"):
        check_plot_path(str(tmp_path / "nowhere" / "p.html"))


# -- CLI ----------------------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    return cli.main(["loadtest", *argv])


async def test_cli_end_to_end_json_and_plot(sidecar: Sidecar, tmp_path: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "p.html"
    args = ["--target", f"127.0.0.1:{sidecar.port}", "--requests", "200", "--warmup", "0", "--accounts", "5",
            "--account-prefix", "cli", "--concurrency", "4", "--mix", "commit=1", "--seed", "11"]
    # In a thread: the CLI runs its own event loop while the fixture's server runs in this one.
    assert await asyncio.to_thread(run_cli, *args, "--plot", str(plot), "--json", "--quiet") == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert set(doc) == TOP_KEYS
    assert doc["decisions"] == 200 and doc["allowed"] + doc["denied"] == 200 and doc["by_status"] == {"OK": 200}
    assert doc["followups"]["commit"]["rpcs"] == doc["allowed"] and err == ""
    assert "<svg" in plot.read_text(encoding="utf-8")

    # The text report (live progress, if the run lasts a second, goes to stderr).
    assert await asyncio.to_thread(run_cli, *args, "--batch", "10") == 0
    out, _ = capsys.readouterr()
    assert "decisions  200 in" in out and "20 RPCs" in out and "CheckAndReserveBatch x10" in out


@pytest.mark.newest_redis_only
async def test_cli_exit_1_on_errors_unless_allowed(sidecar: Sidecar, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--target", f"127.0.0.1:{sidecar.port}", "--requests", "10", "--warmup", "0", "--product", "nosuch",
            "--job", "video", "--quiet"]
    assert await asyncio.to_thread(run_cli, *args) == 1
    out, _ = capsys.readouterr()
    assert "INVALID_ARGUMENT 10" in out
    assert await asyncio.to_thread(run_cli, *args, "--allow-errors") == 0


def test_cli_unreachable_target_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--target", "unix:/nonexistent/q.sock", "--requests", "5", "--timeout", "0.3", "--quiet") == 1
    assert "cannot connect to unix:/nonexistent/q.sock" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--rate", "-5"], "rate must be >= 0"),
    (["--mix", "commit=1,bogus=1"], "unknown outcome(s) bogus"),
    (["--mix", "commit"], "not outcome=weight"),
    (["--batch", "500"], "batch_size must be 0 to the sidecar's max batch items (100)"),
    (["--job", "size=3"], "expected key=value"),
    (["--product", "other"], "no built-in job mix for product 'other'"),
    (["--audit"], "--audit needs --redis-url"),
    (["--ttl", "-1"], "ttl_seconds"),
])
def test_cli_bad_values_exit_2(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--target", "127.0.0.1:1", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("quota-sidecar loadtest: error: ") and words in err, err


@pytest.mark.parametrize("argv, words", [
    (["--duration", "5", "--requests", "10"], "not allowed with argument"),
    (["--concurrency", "4", "--rate", "10"], "not allowed with argument"),
    (["--requests", "ten"], "invalid int value"),
])
def test_cli_bad_flags_exit_2(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_cli(*argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_cli_png_without_matplotlib_exits_2_before_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    # The target does not exist: the flag is refused before any connection is tried.
    assert run_cli("--target", "127.0.0.1:1", "--plot", str(tmp_path / "p.png")) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_cli_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_cli("--help")
    out = capsys.readouterr().out
    for flag in ("--concurrency", "--rate", "--max-inflight", "--duration", "--requests", "--warmup", "--accounts",
                 "--account-prefix", "--zipf", "--seed", "--product", "--job", "--mix", "--ttl", "--batch",
                 "--channels", "--timeout", "--admin-target", "--credits-per-account", "--token-file", "--audit",
                 "--redis-url", "--key-prefix", "--key-buckets", "--plot", "--json", "--quiet", "--allow-errors"):
        assert flag in out, flag


# -- audit ----------------------------------------------------------------------------------------------


async def test_audit_passes_then_fails_after_corruption(sidecar: Sidecar, redis_server: RedisServerProcess,
                                                        redis_client: aioredis.Redis, key_prefix: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--target", f"127.0.0.1:{sidecar.port}", "--admin-target", f"127.0.0.1:{sidecar.admin_port}",
            "--credits-per-account", "20", "--accounts", "4", "--account-prefix", "aud", "--requests", "200",
            "--warmup", "0", "--audit", "--redis-url", redis_server.url, "--key-prefix", key_prefix, "--quiet"]
    assert await asyncio.to_thread(run_cli, *args) == 0
    out, _ = capsys.readouterr()
    assert "quota-sidecar audit: 4 account(s), 0 with violations" in out, out

    # Credits from nowhere in one lot: conservation no longer holds.
    await redis_client.hincrby(key(key_prefix, "aud-2", "lotrem"), purchase_id("aud-2", 20), 5)
    assert await asyncio.to_thread(run_cli, *args, "--json", "--requests", "20") == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["audit"]["ok"] is False and doc["unexpected_errors"] == 0
    assert {(v["account_id"], v["check"]) for v in doc["audit"]["violations"]} >= {("aud-2", "conservation")}
