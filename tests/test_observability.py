"""Metrics scraped over HTTP after a known sequence of calls, JSON logs without secrets, tracing.

The metrics test drives real servers (worker and admin API) over a real channel,
with Redis behind the fault proxy so one call meets an unreachable Redis, then
reads /metrics over HTTP and checks every series it touched by value.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.resources
import json
import logging
import shutil
import tempfile
import urllib.request
import uuid
from concurrent import futures
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import grpc
import pytest
import yaml
from fault_proxy import FaultProxy
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from quota_fixtures import Sidecar, utc_ms

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.app import create_admin_server, create_server, sweep_forever
from quota_sidecar.server.logs import JsonFormatter, TextFormatter, mask_credentials
from quota_sidecar.server.metrics import Metrics, MetricsHTTPServer
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.server.telemetry import Telemetry
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

T0_MS = utc_ms(2026, 11, 21, 12)
CALL_TIMEOUT_SECONDS = 10.0
SERVICE = "quota.v1.QuotaService"
ADMIN = "quota.v1.QuotaAdmin"


def two_free_sora_jobs() -> Plans:
    """The shipped plans, with two free sora jobs a day on the free plan (so a denial is three calls away)."""
    text = importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text("utf-8")
    document = copy.deepcopy(yaml.safe_load(text))
    document["plans"]["free"]["sora"]["daily_free"] = 2
    return parse_plans(document)


def _sora(account: str, rid: str) -> pb.CheckAndReserveRequest:
    return pb.CheckAndReserveRequest(account_id=account, product="sora", reservation_id=rid,
                                     params=pb.JobParams(duration_seconds=10, resolution="720p"))


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample the endpoint serves, by (name, labels), read over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CALL_TIMEOUT_SECONDS) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class Rig(Sidecar):
    """Worker and admin servers on one engine whose store reports to ``metrics`` (and a tracer)."""

    def __init__(self, store: RedisStore, engine: QuotaEngine, metrics: Metrics, tracer: Any) -> None:
        settings = Settings(listen=("127.0.0.1:0",), admin_listen=("127.0.0.1:0",))
        self.store, self.metrics = store, metrics
        self.server, port = create_server(settings, engine, metrics=metrics, tracer=tracer)
        self.admin_server, admin_port = create_admin_server(settings, engine, metrics=metrics, tracer=tracer)
        super().__init__(engine, port, admin_port)


@pytest.fixture
async def proxy(redis_server: RedisServerProcess) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def rig(proxy: FaultProxy, key_prefix: str, spans: InMemorySpanExporter) -> AsyncIterator[Rig]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test")
    metrics = Metrics()
    store = RedisStore.from_url(f"redis://127.0.0.1:{proxy.port}/0", key_prefix=key_prefix, timeout_seconds=1.0,
                                telemetry=Telemetry(metrics, tracer))
    r = Rig(store, QuotaEngine(two_free_sora_jobs(), store, ManualClock(T0_MS)), metrics, tracer)
    await r.server.start()
    await r.admin_server.start()
    try:
        yield r
    finally:
        await r.channel.close()
        await r.admin_channel.close()
        await r.server.stop(None)
        await r.admin_server.stop(None)
        await store.close()
        provider.shutdown()


async def _known_sequence(rig: Rig, proxy: FaultProxy) -> None:
    """2 free jobs, 1 denial, a grant, 1 job on credits, 1 replay, 1 bad request, 1 commit, 1 release,
    then one reserve while Redis refuses connections."""
    for rid in ("f1", "f2"):
        assert (await rig.quota.CheckAndReserve(_sora("acct", rid))).funding == pb.FUNDING_FREE_QUOTA
    denied = await rig.quota.CheckAndReserve(_sora("acct", "d1"))
    assert denied.denial.reason == pb.DENIAL_REASON_PURCHASE_REQUIRED
    await rig.admin.GrantCredits(pb.GrantCreditsRequest(account_id="acct", credits=10, purchase_id="p1"))
    assert (await rig.quota.CheckAndReserve(_sora("acct", "c1"))).funding == pb.FUNDING_CREDITS
    assert (await rig.quota.CheckAndReserve(_sora("acct", "c1"))).replayed
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.quota.CheckAndReserve(pb.CheckAndReserveRequest(account_id="acct", product="sora",
                                                                  params=pb.JobParams(duration_seconds=-1)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await rig.quota.Commit(pb.CommitRequest(account_id="acct", reservation_id="f1"))
    await rig.quota.Release(pb.ReleaseRequest(account_id="acct", reservation_id="f2"))
    await proxy.refuse()
    await proxy.cut()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await rig.quota.CheckAndReserve(_sora("acct", "u1"), timeout=CALL_TIMEOUT_SECONDS)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    await proxy.refuse(False)


async def test_metrics_after_a_known_sequence_of_calls(rig: Rig, proxy: FaultProxy,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="quota_sidecar.server.servicer"):
        await _known_sequence(rig, proxy)
    # One warning, for the server-side failure, with the ids as fields (JSON logs keep them as keys).
    (warning,) = [r for r in caplog.records if r.name == "quota_sidecar.server.servicer"]
    assert (warning.account_id, warning.reservation_id, warning.reason) == (
        "acct", "u1", "STORE_UNAVAILABLE")
    # A refused call's answer can reach the caller before the server has counted it (the status is
    # sent before the servicer's code unwinds): wait (bounded) until all 10 calls are counted.
    await _until(lambda: _rpcs_counted(rig.metrics) >= 10)
    http = MetricsHTTPServer(rig.metrics, "127.0.0.1:0")
    try:
        samples = await asyncio.to_thread(scrape, http.port)
    finally:
        await http.aclose()

    def decisions(outcome: str, funding: str, reason: str) -> float:
        return sample(samples, "quota_decisions_total", product="sora", outcome=outcome, funding=funding,
                      reason=reason)

    assert decisions("allowed", "free", "none") == 2
    assert decisions("denied", "none", "PURCHASE_REQUIRED") == 1
    assert decisions("allowed", "credits", "none") == 1  # the replay is not a second decision
    assert sample(samples, "quota_decision_replays_total", product="sora") == 1

    def rpcs(method: str, code: str, service: str = SERVICE) -> float:
        return sample(samples, "quota_rpc_duration_seconds_count", service=service, method=method, code=code)

    assert rpcs("CheckAndReserve", "OK") == 5
    assert rpcs("CheckAndReserve", "INVALID_ARGUMENT") == 1
    assert rpcs("CheckAndReserve", "UNAVAILABLE") == 1
    assert (rpcs("Commit", "OK"), rpcs("Release", "OK")) == (1, 1)
    assert rpcs("GrantCredits", "OK", ADMIN) == 1
    # Every call took some time, and the +Inf bucket counts every call.
    assert sample(samples, "quota_rpc_duration_seconds_sum", service=SERVICE, method="Commit", code="OK") > 0
    assert sample(samples, "quota_rpc_duration_seconds_bucket", service=SERVICE, method="CheckAndReserve",
                  code="OK", le="+Inf") == 5

    # One round trip per decision (the bad request never reached Redis), the failed one included.
    assert sample(samples, "quota_redis_call_duration_seconds_count", script="reserve") == 6
    assert sample(samples, "quota_redis_call_duration_seconds_count", script="grant") == 1
    assert sample(samples, "quota_redis_errors_total", script="reserve", reason="STORE_UNAVAILABLE") == 1
    assert sample(samples, "quota_redis_errors_total", script="commit", reason="STORE_UNAVAILABLE") == 0


def _rpcs_counted(metrics: Metrics) -> float:
    """Calls counted so far by quota_rpc_duration_seconds, whatever their method and code."""
    return sum(sample.value for family in metrics.registry.collect() for sample in family.samples
               if sample.name == "quota_rpc_duration_seconds_count")


async def test_sweeper_passes_and_expired_holds_are_counted(rig: Rig, key_prefix: str) -> None:
    clock = rig.engine.clock
    assert isinstance(clock, ManualClock)
    r = await rig.quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id="idle", product="sora", reservation_id="h1", ttl_seconds=60,
        params=pb.JobParams(duration_seconds=10, resolution="720p")))
    assert r.allowed
    clock.advance(seconds=61)
    await rig.store.try_lock("sweeper", "someone-else", 60_000)  # another sidecar holds the lease first
    task = asyncio.create_task(sweep_forever(rig.engine, rig.store, 0.01, rig.metrics))
    try:
        await _until(lambda: rig.metrics.registry.get_sample_value(
            "quota_sweeper_passes_total", {"result": "not_leader"}) >= 1)
        await rig.store._client.delete(f"{key_prefix}:lock:sweeper")  # the other sidecar's lease ends
        await _until(lambda: rig.metrics.registry.get_sample_value(
            "quota_sweeper_passes_total", {"result": "ok"}) >= 1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rig.metrics.registry.get_sample_value("quota_sweeper_holds_expired_total") == 1
    assert rig.metrics.registry.get_sample_value("quota_sweeper_passes_total", {"result": "error"}) == 0


async def _until(condition: Any, timeout_seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- tracing


async def test_rpc_and_redis_spans_follow_the_callers_trace(rig: Rig, proxy: FaultProxy,
                                                            spans: InMemorySpanExporter) -> None:
    trace_id = uuid.uuid4().hex
    parent = "b7ad6b7169203331"
    metadata = (("traceparent", f"00-{trace_id}-{parent}-01"),)
    await rig.quota.CheckAndReserve(_sora("traced", "t1"), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError):
        await rig.quota.Commit(pb.CommitRequest(account_id="traced", reservation_id="nope"))
    await proxy.refuse()
    await proxy.cut()
    with pytest.raises(grpc.aio.AioRpcError):
        await rig.quota.CheckAndReserve(_sora("traced", "t2"), timeout=CALL_TIMEOUT_SECONDS)
    await proxy.refuse(False)

    # The caller can have its answer before the server has ended the call's span (an error
    # status is sent before the servicer's code unwinds): wait (bounded) for the spans to end.
    def finished_by_name() -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {}
        for span in spans.get_finished_spans():
            found.setdefault(span.name, []).append(span)
        return found

    expected = {f"{SERVICE}/CheckAndReserve": 2, f"{SERVICE}/Commit": 1, "redis reserve": 2}
    await _until(lambda: all(len(finished_by_name().get(name, ())) >= n for name, n in expected.items()))
    by_name = finished_by_name()
    assert {name: len(by_name[name]) for name in expected} == expected
    reserve_rpc = by_name[f"{SERVICE}/CheckAndReserve"][0]
    assert reserve_rpc.kind == SpanKind.SERVER
    assert format(reserve_rpc.context.trace_id, "032x") == trace_id
    assert format(reserve_rpc.parent.span_id, "016x") == parent
    assert reserve_rpc.attributes["rpc.grpc.status_code"] == "OK"
    redis_span = by_name["redis reserve"][0]
    assert redis_span.kind == SpanKind.CLIENT
    # The command the store really sent: FCALL of the library on Redis 7, EVALSHA on 6.2.
    major = int((await rig.store._client.info("server"))["redis_version"].split(".")[0])
    assert redis_span.attributes["db.operation.name"] == ("FCALL" if major >= 7 else "EVALSHA")
    assert redis_span.parent.span_id == reserve_rpc.context.span_id
    # A caller's mistake is not a server error; an unreachable Redis is, on both spans.
    commit_rpc = by_name[f"{SERVICE}/Commit"][0]
    assert commit_rpc.attributes["rpc.grpc.status_code"] == "NOT_FOUND"
    assert commit_rpc.status.status_code == StatusCode.UNSET
    failed_rpc = by_name[f"{SERVICE}/CheckAndReserve"][1]
    assert failed_rpc.status.status_code == StatusCode.ERROR
    assert by_name["redis reserve"][1].status.status_code == StatusCode.ERROR
    assert by_name["redis reserve"][1].attributes["error.type"] == "STORE_UNAVAILABLE"


# --------------------------------------------------------------------------- logs


def test_url_credentials_are_masked() -> None:
    assert mask_credentials("redis://:hunter2@redis:6379/0") == "redis://***@redis:6379/0"
    assert mask_credentials("redis+sentinel://u:p@a:1,b:2/m and rediss://x@h") == (
        "redis+sentinel://***@a:1,b:2/m and rediss://***@h")
    assert mask_credentials("redis://redis:6379/0") == "redis://redis:6379/0"


def _record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("quota_sidecar.server.servicer", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_lines_carry_the_events_fields() -> None:
    line = json.loads(JsonFormatter(worker=2).format(_record(
        "failed for %s", "redis://:pw@h", account_id="a1", reservation_id="r1", url="rediss://u:pw@h")))
    assert line["level"] == "WARNING" and line["logger"] == "quota_sidecar.server.servicer"
    assert line["msg"] == "failed for redis://***@h"
    assert (line["account_id"], line["reservation_id"], line["worker"]) == ("a1", "r1", 2)
    assert line["url"] == "rediss://***@h"
    assert line["ts"].endswith("+00:00")
    assert "pw" not in TextFormatter("%(message)s").format(_record("to %s", "redis://:pw@h"))


REDIS_PASSWORD = "pw-" + uuid.uuid4().hex


@pytest.fixture
def secret_redis(redis_binary: str, tmp_path: Path) -> Iterator[RedisServerProcess]:
    server = RedisServerProcess(redis_binary, tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def serve_and_call(args: list[str], env: dict[str, str], call: Callable[[str], Any]) -> tuple[str, str]:
    """Runs ``quota-sidecar serve`` on a unix socket with ``args`` ("{dir}" is its scratch folder),
    calls ``call(folder)`` once it is SERVING, stops it with SIGTERM (asserting exit 0) and
    returns its (stdout, stderr)."""
    from test_serve_cli import ServeProcess, _clean_env

    directory = tempfile.mkdtemp(prefix="qs", dir="/tmp")  # unix socket paths must be short
    try:
        serve = ServeProcess(["--listen", f"unix:{directory}/q.sock", "--sweep-interval-seconds", "0",
                              "--key-prefix", "obs" + uuid.uuid4().hex[:6], "--degraded-journal",
                              f"{directory}/journal", *[a.replace("{dir}", directory) for a in args]],
                             _clean_env(env), directory)
        try:
            serve.wait_ready(f"unix:{directory}/q.sock")
            call(directory)
        finally:
            assert serve.terminate() == 0, serve.stderr
        return serve.stdout, serve.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _reserve_over(directory: str, account: str, rid: str) -> None:
    with grpc.insecure_channel(f"unix:{directory}/q.sock") as channel:
        assert pb_grpc.QuotaServiceStub(channel).CheckAndReserve(_sora(account, rid), timeout=10).allowed


@pytest.mark.slow
def test_serve_json_logs_have_ids_and_no_secrets(secret_redis: RedisServerProcess, tmp_path: Path) -> None:
    """A real ``serve --log-format json --log-level DEBUG``: every stderr line is JSON, the decision
    line names account and reservation, and neither the Redis password nor the admin token appears."""
    token = "tok-" + uuid.uuid4().hex
    (tmp_path / "tokens").write_text(token + "\n")

    def calls(directory: str) -> None:
        _reserve_over(directory, "json-acct", "json-r1")
        with grpc.insecure_channel(f"unix:{directory}/q.sock") as channel:
            with pytest.raises(grpc.RpcError):  # the caller's mistake: logged at DEBUG with its ids
                pb_grpc.QuotaServiceStub(channel).Commit(
                    pb.CommitRequest(account_id="json-acct", reservation_id="no-such-job"), timeout=10)
        with grpc.insecure_channel(f"unix:{directory}/a.sock") as channel:
            with pytest.raises(grpc.RpcError):  # a wrong token is logged (without the token)
                pb_grpc.QuotaAdminStub(channel).GetAccount(
                    pb.GetAccountRequest(account_id="json-acct"), timeout=10,
                    metadata=(("authorization", f"Bearer {token}-wrong"),))

    _, stderr = serve_and_call(["--admin-listen", "unix:{dir}/a.sock", "--admin-token-file", str(tmp_path / "tokens"),
                                "--redis-url", secret_redis.url, "--log-format", "json", "--log-level", "DEBUG"],
                               {}, calls)
    assert REDIS_PASSWORD not in stderr and token not in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    decisions = [x for x in lines if x.get("reservation_id") == "json-r1" and x["level"] == "DEBUG"]
    assert len(decisions) == 1, lines
    assert decisions[0]["account_id"] == "json-acct" and decisions[0]["allowed"] is True
    assert decisions[0]["funding"] == "free" and decisions[0]["logger"] == "quota_sidecar.server.servicer"
    assert any("rejected" in x["msg"] and x["level"] == "WARNING" for x in lines)
    (failed,) = [x for x in lines if x.get("reservation_id") == "no-such-job"]
    assert (failed["level"], failed["method"], failed["account_id"], failed["reason"]) == (
        "DEBUG", "Commit", "json-acct", "RESERVATION_NOT_FOUND")


@pytest.mark.slow
def test_serve_tracing_console_prints_spans(redis_server: RedisServerProcess) -> None:
    stdout, _ = serve_and_call(["--redis-url", redis_server.url, "--tracing", "console"],
                               {"OTEL_SERVICE_NAME": "sidecar-under-test"},
                               lambda directory: _reserve_over(directory, "console", "c1"))
    assert f'"name": "{SERVICE}/CheckAndReserve"' in stdout, stdout[-2000:]
    assert '"name": "redis reserve"' in stdout
    assert '"service.name": "sidecar-under-test"' in stdout


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The receiving end of OTLP/gRPC, as an OpenTelemetry collector runs it: keeps the span names."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.services: set[str] = set()

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method's name
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    self.services.add(attribute.value.string_value)
            for scope_spans in resource_spans.scope_spans:
                self.names.extend(span.name for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.slow
def test_serve_tracing_otlp_exports_to_a_collector(redis_server: RedisServerProcess) -> None:
    """``--tracing otlp`` with the standard OTEL_EXPORTER_OTLP_* variables: the spans reach a real
    OTLP/gRPC receiver on loopback, flushed at the latest when the sidecar stops."""
    collector = _Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        serve_and_call(["--redis-url", redis_server.url, "--tracing", "otlp"],
                       {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                        "OTEL_EXPORTER_OTLP_INSECURE": "true"},
                       lambda directory: _reserve_over(directory, "otlp", "o1"))
    finally:
        receiver.stop(None)
    assert f"{SERVICE}/CheckAndReserve" in collector.names and "redis reserve" in collector.names, collector.names
    assert collector.services == {"quota-sidecar"}
