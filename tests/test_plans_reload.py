"""Hot reload of the plans file: PlansSource, its watcher, the metrics, and `serve` end to end.

Change detection is driven explicitly (``PlansSource.poll()`` is one watcher
step), or waited for with bounded polls; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from quota_fixtures import Sidecar
from test_serve_cli import DEFAULT_PLANS, running_sidecar, short_dir  # noqa: F401 - short_dir is a fixture

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.domain.errors import ConfigError, PlansError
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.metrics import Metrics, MetricsHTTPServer
from quota_sidecar.server.plans_source import PlansSource
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess

pytestmark = pytest.mark.all_redis_versions

DEFAULT_VERSION = "2026-11-01"
WAIT_SECONDS = 10.0
V10 = pb.JobParams(duration_seconds=10, resolution="720p")


# --------------------------------------------------------------------------- helpers


def plans_text(version: str = DEFAULT_VERSION, *, free_sora: int = 30, pro_sora: int = 100) -> str:
    doc = yaml.safe_load(DEFAULT_PLANS.read_text())
    doc["version"] = version
    doc["plans"]["free"]["sora"]["daily_free"] = free_sora
    doc["plans"]["pro"]["sora"]["daily_free"] = pro_sora
    return yaml.safe_dump(doc, sort_keys=False)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Recorder:
    """on_change that remembers the versions it was given."""

    def __init__(self) -> None:
        self.versions: list[str] = []

    def __call__(self, plans: Plans) -> None:
        self.versions.append(plans.version)


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def reloads(metrics: Metrics, result: str) -> float | None:
    return sample(metrics, "quota_plans_reloads_total", {"result": result})


def source_for(path: Path | None, metrics: Metrics | None = None) -> tuple[PlansSource, Recorder]:
    recorder = Recorder()
    source = PlansSource(str(path) if path else None, recorder, metrics=metrics)
    source.load_initial()
    return source, recorder


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- PlansSource


async def test_valid_change_is_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(plans_text())
    metrics = Metrics()
    source, recorder = source_for(path, metrics)
    assert source.version == DEFAULT_VERSION and recorder.versions == []
    assert sample(metrics, "quota_plans_info", {"version": DEFAULT_VERSION}) == 1

    write_atomically(path, plans_text("v2", free_sora=20))
    result = await source.reload("SIGHUP")

    assert (result.status, result.previous_version, result.version) == ("ok", DEFAULT_VERSION, "v2")
    assert recorder.versions == ["v2"]
    assert source.plans.free_limit("free", "sora") == 20
    assert (source.reloads_ok, source.reloads_failed, source.last_error) == (1, 0, None)
    assert reloads(metrics, "ok") == 1 and reloads(metrics, "error") == 0
    assert sample(metrics, "quota_plans_info", {"version": "v2"}) == 1
    assert sample(metrics, "quota_plans_info", {"version": DEFAULT_VERSION}) is None  # the old series is gone
    assert sample(metrics, "quota_plans_last_reload_timestamp_seconds") == pytest.approx(time.time(), abs=60)

    # The same file again (a second SIGHUP): nothing new to apply.
    assert (await source.reload("SIGHUP")).status == "unchanged"
    assert recorder.versions == ["v2"]


async def test_changed_content_under_the_same_version_is_refused(tmp_path: Path) -> None:
    # Reservations are priced and committed by version: new prices need a new version.
    path = tmp_path / "plans.yaml"
    path.write_text(plans_text())
    metrics = Metrics()
    source, recorder = source_for(path, metrics)
    write_atomically(path, plans_text(free_sora=20))
    result = await source.reload("SIGHUP")
    assert (result.status, recorder.versions) == ("error", [])
    assert "version" in (source.last_error or "") and source.plans.free_limit("free", "sora") == 30
    assert sample(metrics, "quota_plans_last_reload_error") == 1


async def test_unchanged_content_is_not_applied(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(plans_text())
    metrics = Metrics()
    source, recorder = source_for(path, metrics)

    assert await source.poll() is None  # nothing changed since the initial load
    # A touch and an identical rewrite change the file's identity, not its content.
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    assert (await source.poll()).status == "unchanged"
    write_atomically(path, path.read_text())
    assert (await source.poll()).status == "unchanged"
    assert (await source.reload("SIGHUP")).status == "unchanged"

    assert recorder.versions == []
    assert source.reloads_unchanged == 3 and source.reloads_ok == 0
    assert reloads(metrics, "unchanged") == 3 and reloads(metrics, "ok") == 0


@pytest.mark.parametrize("bad_text, field", [
    ("version: [unclosed\n", "invalid YAML"),
    (plans_text("v-bad", pro_sora=-1), "plans.pro.sora.daily_free"),
], ids=["yaml", "schema"])
async def test_invalid_file_is_refused_until_fixed(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   bad_text: str, field: str) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(plans_text())
    metrics = Metrics()
    source, recorder = source_for(path, metrics)

    write_atomically(path, bad_text)
    with caplog.at_level(logging.WARNING, logger="quota_sidecar.domain.plans"):
        result = await source.poll()

    assert result is not None and result.status == "error" and field in (result.error or "")
    assert recorder.versions == [] and source.version == DEFAULT_VERSION  # the last good plans stay
    assert source.last_error == result.error and source.reloads_failed == 1
    assert sample(metrics, "quota_plans_last_reload_error") == 1
    assert reloads(metrics, "error") == 1
    assert sample(metrics, "quota_plans_info", {"version": DEFAULT_VERSION}) == 1
    assert any(r.levelno == logging.WARNING and field in r.getMessage() and DEFAULT_VERSION in r.getMessage()
               for r in caplog.records), caplog.text
    # The watcher reports a bad file once, not at every poll; a SIGHUP asks again.
    assert await source.poll() is None
    assert (await source.reload("SIGHUP")).status == "error" and reloads(metrics, "error") == 2

    write_atomically(path, plans_text("v3", free_sora=25))
    result = await source.poll()

    assert result is not None and (result.status, result.version) == ("ok", "v3")
    assert recorder.versions == ["v3"] and source.last_error is None
    assert sample(metrics, "quota_plans_last_reload_error") == 0
    assert reloads(metrics, "ok") == 1 and reloads(metrics, "error") == 2


async def test_reverting_a_bad_file_to_the_good_one_clears_the_error(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    good = plans_text()
    path.write_text(good)
    metrics = Metrics()
    source, recorder = source_for(path, metrics)

    path.unlink()
    assert (await source.poll()).status == "error"
    assert "cannot read" in (source.last_error or "") and sample(metrics, "quota_plans_last_reload_error") == 1
    assert await source.poll() is None  # still missing: reported once

    path.write_text(good)
    assert (await source.poll()).status == "unchanged"
    assert source.last_error is None and sample(metrics, "quota_plans_last_reload_error") == 0
    assert recorder.versions == []


async def test_packaged_plans_have_nothing_to_reload(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    source, recorder = source_for(None, metrics)
    with caplog.at_level(logging.INFO, logger="quota_sidecar.domain.plans"):
        result = await source.reload("SIGHUP")
    assert (result.status, result.version) == ("no_file", DEFAULT_VERSION)
    assert "no plans file" in caplog.text
    assert await source.poll() is None
    # Without a file, watch() has nothing to do and returns at once.
    await asyncio.wait_for(source.watch(0.1, asyncio.Event()), timeout=WAIT_SECONDS)
    assert recorder.versions == [] and reloads(metrics, "ok") == 0 and reloads(metrics, "unchanged") == 0


def test_initial_load_of_an_invalid_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "plans.yaml"
    path.write_text(plans_text(pro_sora=-1))
    with pytest.raises(PlansError) as info:
        PlansSource(str(path), Recorder()).load_initial()
    assert info.value.field == "plans.pro.sora.daily_free"


# --------------------------------------------------------------------------- Kubernetes ConfigMap layout


def configmap_version(directory: Path, stamp: str, text: str) -> None:
    """A new timestamped folder, as the kubelet writes it before swapping ..data."""
    (directory / stamp).mkdir()
    (directory / stamp / "plans.yaml").write_text(text)


def swap_data_link(directory: Path, stamp: str) -> None:
    """Points ..data at ``stamp`` atomically: a new link renamed over the old one."""
    os.symlink(stamp, directory / "..data_tmp")
    os.replace(directory / "..data_tmp", directory / "..data")


async def test_configmap_symlink_swap_is_detected(tmp_path: Path) -> None:
    configmap_version(tmp_path, "..2026_11_21_a", plans_text())
    os.symlink("..2026_11_21_a", tmp_path / "..data")
    os.symlink("..data/plans.yaml", tmp_path / "plans.yaml")
    metrics = Metrics()
    source, recorder = source_for(tmp_path / "plans.yaml", metrics)
    assert await source.poll() is None

    # One explicit watcher step sees the swap.
    configmap_version(tmp_path, "..2026_11_21_b", plans_text("cm-b", free_sora=20))
    swap_data_link(tmp_path, "..2026_11_21_b")
    result = await source.poll()
    assert result is not None and (result.status, result.version) == ("ok", "cm-b")
    assert recorder.versions == ["cm-b"]

    # And the running watcher sees the next one.
    stop = asyncio.Event()
    watcher = asyncio.create_task(source.watch(0.1, stop))
    try:
        configmap_version(tmp_path, "..2026_11_21_c", plans_text("cm-c", free_sora=25))
        swap_data_link(tmp_path, "..2026_11_21_c")
        await wait_for(lambda: recorder.versions == ["cm-b", "cm-c"], "the watcher to apply cm-c")
    finally:
        stop.set()
        await asyncio.wait_for(watcher, timeout=WAIT_SECONDS)
    assert sample(metrics, "quota_plans_info", {"version": "cm-c"}) == 1
    assert source.plans.free_limit("free", "sora") == 25


# --------------------------------------------------------------------------- reload under load


async def test_reloads_during_a_storm_fail_no_call_and_never_overspend(sidecar: Sidecar, tmp_path: Path) -> None:
    """300 concurrent reservations of one free account while the plans flip 20 times between 30 and 20 free."""
    path = tmp_path / "plans.yaml"
    versions = [plans_text(), plans_text("storm-20", free_sora=20)]
    path.write_text(versions[0])
    done_at_switch: list[int] = []
    calls: list[asyncio.Task[pb.CheckAndReserveResponse]] = []

    def on_change(plans: Plans) -> None:
        done_at_switch.append(sum(c.done() for c in calls))
        sidecar.engine.set_plans(plans)

    source = PlansSource(str(path), on_change)
    source.load_initial()

    async def reserve(i: int) -> pb.CheckAndReserveResponse:
        return await sidecar.quota.CheckAndReserve(pb.CheckAndReserveRequest(
            account_id="storm", product="sora", reservation_id=f"r{i}", params=V10), timeout=30)

    calls.extend(asyncio.create_task(reserve(i)) for i in range(300))
    for i in range(20):
        # Spread the switches over the storm rather than bunching them before the first answers.
        await wait_for(lambda: sum(c.done() for c in calls) >= i * 12, f"{i * 12} answers")
        write_atomically(path, versions[(i + 1) % 2])
        assert (await source.reload("test")).status == "ok"
    results = await asyncio.gather(*calls)  # a failed call raises here

    assert len(results) == 300
    allowed = sum(r.allowed for r in results)
    assert 20 <= allowed <= 30, allowed
    # Each allowed call took its own free unit: no unit counted twice, none skipped.
    assert sorted(r.free_used for r in results if r.allowed) == list(range(1, allowed + 1))
    assert {r.denial.reason for r in results if not r.allowed} == {pb.DENIAL_REASON_PURCHASE_REQUIRED}
    assert len(done_at_switch) == 20
    assert done_at_switch[0] < 300, "the first switch should land while calls are in flight"
    assert set(sidecar.engine.plans_versions()) >= {DEFAULT_VERSION, "storm-20"}


# --------------------------------------------------------------------------- metrics endpoint and settings


async def test_metrics_http_server_serves_the_registry_and_stops() -> None:
    metrics = Metrics()
    metrics.plans_loaded("v-http", 1.0)
    server = MetricsHTTPServer(metrics, "127.0.0.1:0")
    try:
        families = await asyncio.to_thread(fetch_metrics, server.port)
        assert families["quota_plans_info"] == {(("version", "v-http"),): 1.0}
        assert families["quota_plans_last_reload_error"] == {(): 0.0}
    finally:
        await asyncio.wait_for(server.aclose(), timeout=WAIT_SECONDS)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


@pytest.mark.parametrize("changes, field", [
    ({"metrics_listen": "9464"}, "metrics_listen"),
    ({"metrics_listen": "::1:9464"}, "metrics_listen"),
    ({"metrics_listen": "127.0.0.1:65536"}, "metrics_listen"),
    ({"plans_reload_interval_seconds": -1.0}, "plans_reload_interval_seconds"),
    ({"plans_reload_interval_seconds": 0.01}, "plans_reload_interval_seconds"),
    ({"plans_reload_interval_seconds": float("nan")}, "plans_reload_interval_seconds"),
])
def test_new_settings_are_validated(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**changes)  # type: ignore[arg-type]
    assert info.value.field == field


def test_new_settings_accept_good_values() -> None:
    assert Settings(metrics_listen="[::1]:9464", plans_reload_interval_seconds=0).metrics_listen == "[::1]:9464"
    assert Settings().plans_reload_interval_seconds == 5 and Settings().metrics_listen == ""
    env = {"QUOTA_PLANS_RELOAD_INTERVAL_SECONDS": "0.5", "QUOTA_METRICS_LISTEN": "127.0.0.1:9464"}
    from_env = Settings.from_sources({}, env)
    assert (from_env.plans_reload_interval_seconds, from_env.metrics_listen) == (0.5, "127.0.0.1:9464")


# --------------------------------------------------------------------------- serve, end to end


def fetch_metrics(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The endpoint's samples: {name: {sorted labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def free_port() -> int:
    # Another process may take it before serve binds it; a rare, loud failure, accepted.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_metrics(port: int, check: Callable[[dict], bool], what: str, proc_stderr: Callable[[], str]) -> dict:
    deadline = time.monotonic() + WAIT_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fetch_metrics(port)
            if check(last):
                return last
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    pytest.fail(f"metrics never showed {what} within {WAIT_SECONDS} s (last: {last}):\n{proc_stderr()}")


def sora_free_limit(target: str, account: str) -> int:
    with grpc.insecure_channel(target) as channel:
        balance = pb_grpc.QuotaServiceStub(channel).GetBalance(pb.GetBalanceRequest(account_id=account), timeout=10)
    return next(a.free_limit for a in balance.allowances if a.product == "sora")


def info_version(families: dict) -> set[str]:
    return {dict(labels)["version"] for labels in families.get("quota_plans_info", {})}


@pytest.mark.slow
def test_serve_reloads_on_sighup_and_keeps_the_last_good_plans(
        short_dir: str, redis_server: RedisServerProcess, key_prefix: str) -> None:  # noqa: F811
    path = Path(short_dir) / "plans.yaml"
    path.write_text(plans_text())
    port = free_port()
    extra = ["--plans", str(path), "--metrics-listen", f"127.0.0.1:{port}", "--plans-reload-interval-seconds", "0"]
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix, extra=extra) as sc:
        stderr = lambda: sc.serve.stderr  # noqa: E731
        families = wait_metrics(port, lambda f: info_version(f) == {DEFAULT_VERSION}, "the initial version", stderr)
        assert families["quota_plans_last_reload_error"] == {(): 0.0}
        assert sora_free_limit(sc.target, "acct-hup") == 30

        write_atomically(path, plans_text("hup-2", free_sora=20))
        sc.serve.proc.send_signal(signal.SIGHUP)
        wait_metrics(port, lambda f: info_version(f) == {"hup-2"}, "version hup-2", stderr)
        assert sora_free_limit(sc.target, "acct-hup") == 20
        assert f"version {DEFAULT_VERSION} -> hup-2" in sc.serve.stderr

        write_atomically(path, plans_text("hup-bad", pro_sora=-1))
        sc.serve.proc.send_signal(signal.SIGHUP)
        families = wait_metrics(port, lambda f: f["quota_plans_last_reload_error"] == {(): 1.0}, "the error", stderr)
        assert info_version(families) == {"hup-2"}
        assert families["quota_plans_reloads_total"][(("result", "error"),)] == 1.0
        assert families["quota_plans_reloads_total"][(("result", "ok"),)] == 1.0
        assert sora_free_limit(sc.target, "acct-hup") == 20  # still serving, with the last good plans
        assert "plans.pro.sora.daily_free" in sc.serve.stderr

        assert sc.serve.terminate() == 0, sc.serve.stderr
    # The metrics endpoint went away with the process.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


@pytest.mark.slow
def test_serve_watches_a_configmap_volume(short_dir: str, redis_server: RedisServerProcess,
                                          key_prefix: str) -> None:  # noqa: F811
    volume = Path(short_dir) / "cm"
    volume.mkdir()
    configmap_version(volume, "..2026_11_21_a", plans_text())
    os.symlink("..2026_11_21_a", volume / "..data")
    os.symlink("..data/plans.yaml", volume / "plans.yaml")
    port = free_port()
    extra = ["--plans", str(volume / "plans.yaml"), "--metrics-listen", f"127.0.0.1:{port}",
             "--plans-reload-interval-seconds", "0.1"]
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix, extra=extra) as sc:
        stderr = lambda: sc.serve.stderr  # noqa: E731
        wait_metrics(port, lambda f: info_version(f) == {DEFAULT_VERSION}, "the initial version", stderr)

        configmap_version(volume, "..2026_11_21_b", plans_text("cm-2", free_sora=20))
        swap_data_link(volume, "..2026_11_21_b")
        wait_metrics(port, lambda f: info_version(f) == {"cm-2"}, "version cm-2", stderr)
        assert sora_free_limit(sc.target, "acct-cm") == 20
        assert sc.serve.terminate() == 0, sc.serve.stderr
