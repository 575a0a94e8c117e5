"""``quota-sidecar loadtest``: drive a running sidecar's worker API and measure it, like ghz.

    quota-sidecar loadtest --target 127.0.0.1:50051 --concurrency 32 --duration 30
    quota-sidecar loadtest --rate 2000 --duration 60 --zipf 1.1 --plot latency.html

Each *decision* is one CheckAndReserve (or one item of a CheckAndReserveBatch) for an
account, a job size and a follow-up drawn from seeded distributions; an allowed
reservation is then resolved as the mix drew it: ``commit``, ``release``, ``extend``
(ExtendReservation, then Commit) or ``abandon`` (nothing: the hold expires by its TTL).

- Closed loop (``concurrency``): N callers, each with one job (reserve + follow-up)
  in flight. Latency is measured from each call's actual send, so a slow sidecar also
  slows the callers and hides its own queueing (coordinated omission): use it to find
  the throughput, and the open loop to measure latency at a given load.
- Open loop (``rate`` > 0): decision i is scheduled at t0 + i/R (batches of K at
  t0 + j*K/R) whatever happened to earlier ones, and the reserve latency is measured
  from that intended time (``latency_ms``; from the actual send: ``service_latency_ms``),
  so a stall counts against every call it delayed. At most ``max_inflight`` jobs are
  in flight; a slot that finds them all busy is not sent and counts as ``dropped``.

Calls that start during the warm-up are made but not recorded. The draws are seeded:
the same config sends the same sequence of (account, job, follow-up); reservation ids
are ``<run_id>-<n>`` with a fresh uuid4 hex run id, so runs never replay each other.
Accounts are ``<prefix>-<i>`` for i in 0..accounts-1; with a Zipf exponent S > 0
account i is drawn with weight 1/(i+1)^S, so ``<prefix>-0`` is the hottest.

JSON report (``--json``, ``LoadReport.to_json()``); a stable shape, latencies in ms:

    {
      "run_id": str,               # every reservation id of the run starts with it
      "mode": "closed" | "open",
      "config": {...},             # the LoadConfig, without credentials
      "elapsed_seconds": float,    # end of warm-up to the last completion
      "decisions": int,            # reserve decisions made (batch items count one each)
      "rpcs": int,                 # CheckAndReserve or CheckAndReserveBatch calls
      "decisions_per_second": float, "rpcs_per_second": float,
      "allowed": int, "denied": int, "errors": int,   # allowed + denied + errors == decisions
      "dropped": int,              # open loop: scheduled decisions never sent
      "degraded": int,             # allowed without Redis (a product's fail-open policy)
      "latency_ms": {"count": int, "min", "p50", "p90", "p99", "p99.9", "max", "mean": float},
      "service_latency_ms": {same} | null,            # open loop only: from the actual send
      "by_status": {"OK": int, "UNAVAILABLE": int, ...},   # per reserve RPC; sums to rpcs
      "item_errors": {"CODE": int, ...},              # batch items that failed (ItemError.code)
      "by_denial": {"PURCHASE_REQUIRED": int, ...},   # sums to denied
      "by_funding": {"free": int, "credits": int},    # sums to allowed
      "followups": {KIND: {"rpcs": int, "items": int, "errors": int, "by_status": {...},
                           "item_errors": {...}, "latency_ms": {same}}},
                   # KIND: commit, release, extend; batch mode: commit_batch, release_batch, extend
      "error_examples": {"CODE": str},                # the first message seen per failing code
      "timeline": [{"second": int, "decisions": int, "rpcs": int, "errors": int,
                    "p50_ms": float, "p99_ms": float}, ...],   # by completion second after warm-up
      "accounts_touched": int,
      "grants": {"accounts": int, "credits_per_account": int, "replayed": int} | null,
      "unexpected_errors": int,    # errors + follow-up errors: the CLI exits 1 when > 0
      "audit": {"ok": bool, "accounts": int, "violations": [{"account_id", "check", "detail"}]}
                                   # CLI with --audit only
    }

Every status other than OK is unexpected: a denial is an OK response with allowed=false.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import random
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import grpc
from hdrh.histogram import HdrHistogram

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc

OUTCOMES = ("commit", "release", "abandon", "extend")
DEFAULT_MIX: Mapping[str, float] = {"commit": 0.8, "release": 0.1, "abandon": 0.05, "extend": 0.05}
# The sidecar's default --max-batch-items (the proto's "at most --max-batch-items (default 100)").
DEFAULT_MAX_BATCH_ITEMS = 100
# The largest --max-batch-items a sidecar accepts.
MAX_BATCH_ITEMS_LIMIT = 10_000
MAX_TTL_SECONDS = 86_400
MAX_GRANT_CREDITS = 1_000_000_000
# The proto's id alphabet and length; account and purchase ids we make must fit it.
_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}")
# Histograms: 1 us to 1 h at 3 significant digits (open-loop latencies include queueing, hence the hour).
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 3_600_000_000
HIST_DIGITS = 3
# Concurrent GrantCredits calls while funding the accounts.
_GRANT_CONCURRENCY = 64
_FUNDING = {pb.FUNDING_FREE_QUOTA: "free", pb.FUNDING_CREDITS: "credits"}


class LoadConfigError(ValueError):
    """A LoadConfig that cannot run; the message names the field."""


class LoadTestError(RuntimeError):
    """The run could not start or go on (target unreachable, a grant refused)."""


# -- jobs, mix and config ---------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """One job size of the mix; empty/zero fields are left unset in JobParams."""

    duration_seconds: float = 0.0  # sora-like products
    resolution: str = ""           # sora-like products, e.g. 720p
    model: str = ""                # "" = the product's default model
    units: int = 0                 # task products; 0 means 1
    input_tokens: int = 0          # metered products (codex): the usage estimate
    output_tokens: int = 0
    weight: float = 1.0            # relative frequency in the mix

    def params(self) -> pb.JobParams:
        return pb.JobParams(duration_seconds=self.duration_seconds, resolution=self.resolution,
                            model=self.model, units=self.units, input_tokens=self.input_tokens,
                            output_tokens=self.output_tokens)


# Built-in job mixes by product kind (the plans file's `kind`), all within the default free plan.
BUILTIN_JOBS: Mapping[str, tuple[JobSpec, ...]] = {
    "video": tuple(JobSpec(duration_seconds=d, resolution=r) for d in (5.0, 10.0, 15.0) for r in ("480p", "720p")),
    "task": tuple(JobSpec(units=u) for u in range(1, 6)),
    # codex-mini estimates of 1 to 5 credits (10k..50k input, 2k..10k output tokens per step).
    "metered": tuple(JobSpec(model="codex-mini", input_tokens=10_000 * n, output_tokens=2_000 * n)
                     for n in (1, 2, 4, 8, 10)),
}
# The default plans' products; another product needs --job (key=value or a kind name).
PRODUCT_KINDS: Mapping[str, str] = {"sora": "video", "codex": "metered"}


@dataclass(frozen=True)
class LoadConfig:
    target: str                           # worker API: host:port or unix:/path
    admin_target: str = ""                # QuotaAdmin address; needed when credits_per_account > 0
    admin_token: str = ""                 # bearer token for the admin calls; "" = none
    admin_credentials: Any = None         # grpc.ChannelCredentials for a TLS admin target; None = plaintext
    admin_tls_server_name: str = ""       # name the admin certificate must carry (unix: targets)
    concurrency: int = 16                 # closed loop: callers, each with one job in flight
    rate: float = 0.0                     # > 0: open loop at this many decisions per second
    max_inflight: int = 10000             # open loop: jobs in flight at most; a full slot is dropped
    duration_seconds: float = 10.0        # measured time after the warm-up (unused when requests > 0)
    requests: int = 0                     # > 0: stop after this many measured decisions instead
    warmup_seconds: float = 1.0           # calls started in this first period are not recorded
    accounts: int = 1000                  # distinct accounts <prefix>-0 .. <prefix>-(N-1)
    account_prefix: str = "lt"            # account ids are <prefix>-<i>
    zipf_exponent: float = 0.0            # 0 = uniform; S > 0: account i has weight 1/(i+1)^S
    product: str = "sora"                 # the product every job asks for
    jobs: tuple[JobSpec, ...] = ()        # job parameter sets; () = the built-in mix for the product
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))  # follow-up weights
    ttl_seconds: int = 0                  # hold lifetime; 0 = the product's default
    batch_size: int = 0                   # > 0: CheckAndReserveBatch/CommitBatch/ReleaseBatch of this many
    max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS  # the sidecar's --max-batch-items; batch_size may not pass it
    credits_per_account: int = 0          # > 0: GrantCredits this many to every account first (idempotent)
    seed: int = 0                         # seeds the account, job and follow-up draws
    timeout_seconds: float = 5.0          # deadline of every RPC
    channels: int = 1                     # gRPC channels (HTTP/2 connections) the calls are spread over

    @property
    def open_loop(self) -> bool:
        return self.rate > 0


def parse_mix(text: str) -> dict[str, float]:
    """``commit=0.8,release=0.1,...`` -> weights; outcomes not named get 0."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise LoadConfigError(f"mix: {part!r} is not outcome=weight (outcomes: {', '.join(OUTCOMES)})")
        mix[name.strip()] = _float(f"mix {name.strip()}", value)
    return mix


def parse_job(text: str) -> tuple[JobSpec, ...]:
    """A kind name (``video``, ``task``: that built-in mix) or ``duration=10,resolution=720p,weight=2``."""
    if text.strip() in BUILTIN_JOBS:
        return BUILTIN_JOBS[text.strip()]
    values: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("duration", "resolution", "model", "units", "input_tokens", "output_tokens",
                                  "weight"):
            raise LoadConfigError(f"job {text!r}: expected key=value with keys duration, resolution, model, "
                                  f"units, input_tokens, output_tokens, weight, or a built-in mix: "
                                  f"{', '.join(BUILTIN_JOBS)}")
        if key in ("units", "input_tokens", "output_tokens"):
            values[key] = _int(f"job {key}", value)
        elif key in ("duration", "weight"):
            values["duration_seconds" if key == "duration" else "weight"] = _float(f"job {key}", value)
        else:
            values[key] = value.strip()
    if not values:
        raise LoadConfigError("job: empty job specification")
    return (JobSpec(**values),)


def _float(what: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise LoadConfigError(f"{what}: {text.strip()!r} is not a number") from None


def _int(what: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LoadConfigError(f"{what}: {text.strip()!r} is not an integer") from None


def resolve_jobs(config: LoadConfig) -> tuple[JobSpec, ...]:
    if config.jobs:
        return tuple(config.jobs)
    kind = PRODUCT_KINDS.get(config.product)
    if kind is None:
        raise LoadConfigError(f"jobs: no built-in job mix for product {config.product!r}; give job parameter "
                              f"sets (--job duration=10,resolution=720p) or a kind ({', '.join(BUILTIN_JOBS)})")
    return BUILTIN_JOBS[kind]


def account_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index}"


def purchase_id(account: str, credits: int) -> str:
    """The grant's idempotency key: a re-run with the same credits replays instead of granting again."""
    return f"loadtest-{credits}-{account}"


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def _check_numbers(c: LoadConfig) -> list[str]:
    problems = []
    checks = [
        (c.concurrency >= 1, f"concurrency must be >= 1, got {c.concurrency}"),
        (_finite(c.rate) and c.rate >= 0, f"rate must be >= 0 (0 = closed loop), got {c.rate}"),
        (c.max_inflight >= 1, f"max_inflight must be >= 1, got {c.max_inflight}"),
        (c.requests >= 0, f"requests must be >= 0, got {c.requests}"),
        (c.requests > 0 or (_finite(c.duration_seconds) and c.duration_seconds > 0),
         f"duration_seconds must be > 0, got {c.duration_seconds}"),
        (_finite(c.warmup_seconds) and c.warmup_seconds >= 0, f"warmup_seconds must be >= 0, got {c.warmup_seconds}"),
        (c.accounts >= 1, f"accounts must be >= 1, got {c.accounts}"),
        (_finite(c.zipf_exponent) and c.zipf_exponent >= 0, f"zipf_exponent must be >= 0, got {c.zipf_exponent}"),
        (0 <= c.ttl_seconds <= MAX_TTL_SECONDS, f"ttl_seconds must be 0 to {MAX_TTL_SECONDS}, got {c.ttl_seconds}"),
        (1 <= c.max_batch_items <= MAX_BATCH_ITEMS_LIMIT,
         f"max_batch_items must be 1 to {MAX_BATCH_ITEMS_LIMIT}, got {c.max_batch_items}"),
        (0 <= c.batch_size <= c.max_batch_items, f"batch_size must be 0 to the sidecar's max batch items "
                                                 f"({c.max_batch_items}), got {c.batch_size}"),
        (0 <= c.credits_per_account <= MAX_GRANT_CREDITS,
         f"credits_per_account must be 0 to {MAX_GRANT_CREDITS}, got {c.credits_per_account}"),
        (_finite(c.timeout_seconds) and c.timeout_seconds > 0, f"timeout_seconds must be > 0, got {c.timeout_seconds}"),
        (c.channels >= 1, f"channels must be >= 1, got {c.channels}"),
    ]
    problems += [text for ok, text in checks if not ok]
    return problems


def _check_names(c: LoadConfig) -> list[str]:
    problems = []
    if not c.target.strip():
        problems.append("target is empty")
    longest = account_id(c.account_prefix, max(c.accounts - 1, 0))
    if not c.account_prefix or not _ID.fullmatch(purchase_id(longest, MAX_GRANT_CREDITS)):
        problems.append(f"account_prefix {c.account_prefix!r}: the ids made from it (<prefix>-<i>, and "
                        "loadtest-<credits>-<account> for grants) must be 1-128 characters of [A-Za-z0-9._:@+=/-]")
    if not _NAME.fullmatch(c.product):
        problems.append(f"product {c.product!r} is not a product name ([a-z][a-z0-9_.-]*)")
    if c.credits_per_account > 0 and not c.admin_target:
        problems.append("credits_per_account needs admin_target (the sidecar's --admin-listen address)")
    return problems


def _check_mix_and_jobs(c: LoadConfig) -> list[str]:
    problems = []
    unknown = sorted(set(c.mix) - set(OUTCOMES))
    if unknown:
        problems.append(f"mix: unknown outcome(s) {', '.join(unknown)} (known: {', '.join(OUTCOMES)})")
    if any(not _finite(w) or w < 0 for w in c.mix.values()):
        problems.append("mix: weights must be finite and >= 0")
    elif not unknown and sum(c.mix.values()) <= 0:
        problems.append("mix: empty (give at least one outcome a weight > 0)")
    try:
        jobs = resolve_jobs(c)
    except LoadConfigError as exc:
        return problems + [str(exc)]
    if any(not _finite(j.weight) or j.weight < 0 for j in jobs) or sum(j.weight for j in jobs) <= 0:
        problems.append("jobs: weights must be >= 0 and at least one > 0")
    if any(not _finite(j.duration_seconds) or j.duration_seconds < 0 or j.units < 0 for j in jobs):
        problems.append("jobs: duration and units must be >= 0")
    return problems


def validate(config: LoadConfig) -> None:
    """Raises LoadConfigError naming every problem of the config."""
    problems = _check_numbers(config) + _check_names(config) + _check_mix_and_jobs(config)
    if problems:
        raise LoadConfigError("; ".join(problems))


# -- seeded draws ------------------------------------------------------------------------


def cumulative(weights: Sequence[float]) -> list[float]:
    """Normalised running sums; the last is exactly 1.0 so a draw in [0, 1) always lands."""
    total = float(sum(weights))
    running, out = 0.0, []
    for w in weights:
        running += w
        out.append(running / total)
    out[-1] = 1.0
    return out


def zipf_cdf(n: int, exponent: float) -> list[float]:
    """CDF over ranks 0..n-1 with weight 1/(rank+1)^exponent (exponent 0: uniform)."""
    return cumulative([1.0 / (k ** exponent) for k in range(1, n + 1)])


def pick(cdf: Sequence[float], u: float) -> int:
    """The index a uniform u in [0, 1) falls on; zero-weight entries are never picked."""
    return min(bisect.bisect_right(cdf, u), len(cdf) - 1)


class Pick(NamedTuple):
    account: str
    job: int       # index into the resolved jobs
    outcome: str   # one of OUTCOMES


class Sampler:
    """The run's seeded sequence of (account, job, follow-up) picks."""

    def __init__(self, config: LoadConfig) -> None:
        self._rng = random.Random(config.seed)
        self._prefix = config.account_prefix
        self._accounts = zipf_cdf(config.accounts, config.zipf_exponent)
        self._jobs = cumulative([j.weight for j in resolve_jobs(config)])
        self._outcomes = cumulative([config.mix.get(o, 0.0) for o in OUTCOMES])

    def next(self) -> Pick:
        r = self._rng.random
        return Pick(account_id(self._prefix, pick(self._accounts, r())), pick(self._jobs, r()),
                    OUTCOMES[pick(self._outcomes, r())])


# -- time: the open loop's schedule and coordinated-omission correction ----------------------


def schedule_time(t0: float, slot: int, interval: float) -> float:
    """When slot i is meant to be sent: t0 + i * interval, however late earlier slots ran."""
    return t0 + slot * interval


def latency_us(start: float, done: float) -> int:
    """Latency in microseconds from start (the intended send time in an open loop) to completion."""
    return max(HIST_LOWEST_US, min(HIST_HIGHEST_US, round((done - start) * 1_000_000)))


def corrected_latencies_us(intended: Sequence[float], completed: Sequence[float]) -> list[int]:
    """Open-loop latencies: each from its intended send time, not from when a stalled sender got to it."""
    return [latency_us(i, c) for i, c in zip(intended, completed, strict=True)]


# -- statistics ------------------------------------------------------------------------------


def new_histogram() -> HdrHistogram:
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)


def _ms(us: float) -> float:
    return round(us / 1000.0, 3)


def latency_summary(hist: HdrHistogram) -> dict[str, float]:
    """count, min, p50, p90, p99, p99.9, max and mean in milliseconds (zeros when empty)."""
    count = hist.get_total_count()
    if count == 0:
        return {"count": 0, "min": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0, "mean": 0.0}
    out: dict[str, float] = {"count": count, "min": _ms(hist.get_min_value())}
    for name, p in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9)):
        out[name] = _ms(hist.get_value_at_percentile(p))
    out["max"] = _ms(hist.get_max_value())
    out["mean"] = _ms(hist.get_mean_value())
    return out


@dataclass(frozen=True)
class TimelineBucket:
    second: int        # whole seconds since the end of the warm-up, by completion time
    decisions: int
    rpcs: int
    errors: int
    p50_ms: float
    p99_ms: float


class Timeline:
    """Per-second buckets of completed reserve calls; completions arrive in time order, so only
    the current second's histogram is kept."""

    def __init__(self, origin: float) -> None:
        self._origin = origin
        self._second = 0
        self._hist = new_histogram()
        self._counts = [0, 0, 0]  # decisions, rpcs, errors of the current second
        self.buckets: list[TimelineBucket] = []

    def record(self, done: float, decisions: int, errors: int, lat_us: int) -> None:
        second = max(0, int(done - self._origin))
        while second > self._second:
            self._flush()
        self._hist.record_value(lat_us)
        self._counts[0] += decisions
        self._counts[1] += 1
        self._counts[2] += errors

    def _flush(self) -> None:
        h = self._hist
        p50, p99 = (_ms(h.get_value_at_percentile(50)), _ms(h.get_value_at_percentile(99))) \
            if h.get_total_count() else (0.0, 0.0)
        decisions, rpcs, errors = self._counts
        self.buckets.append(TimelineBucket(self._second, decisions, rpcs, errors, p50_ms=p50, p99_ms=p99))
        h.reset()
        self._counts = [0, 0, 0]
        self._second += 1

    def finish(self) -> list[TimelineBucket]:
        if self._counts[1]:
            self._flush()
        return self.buckets


class Outcome(NamedTuple):
    kind: str          # allowed, denied or error (a batch item's ItemError)
    detail: str        # funding (free/credits), denial reason, or the item's error code
    degraded: bool = False


def classify(r: pb.CheckAndReserveResponse) -> Outcome:
    if r.allowed:
        return Outcome("allowed", _FUNDING.get(r.funding, "unspecified"), r.degraded)
    return Outcome("denied", pb.DenialReason.Name(r.denial.reason).removeprefix("DENIAL_REASON_"))


def classify_batch(result: pb.BatchReserveResult) -> Outcome:
    if result.WhichOneof("outcome") == "response":
        return classify(result.response)
    return Outcome("error", result.error.code or "UNKNOWN")


class _CallStats:
    """One follow-up kind: calls, items, statuses and latency."""

    def __init__(self) -> None:
        self.rpcs = self.items = self.errors = 0
        self.by_status: Counter[str] = Counter()
        self.item_errors: Counter[str] = Counter()
        self.hist = new_histogram()

    def record(self, code: str, items: int, item_errors: Sequence[str], lat_us: int) -> None:
        self.rpcs += 1
        self.items += items
        self.by_status[code] += 1
        self.item_errors.update(item_errors)
        self.errors += items if code != "OK" else len(item_errors)
        self.hist.record_value(lat_us)

    def to_json(self) -> dict[str, Any]:
        return {"rpcs": self.rpcs, "items": self.items, "errors": self.errors, "by_status": dict(self.by_status),
                "item_errors": dict(self.item_errors), "latency_ms": latency_summary(self.hist)}


class _Stats:
    """Everything recorded about the measured calls of a run."""

    def __init__(self, origin: float, followup_kinds: Sequence[str]) -> None:
        self.reserve = new_histogram()
        self.service = new_histogram()
        self.timeline = Timeline(origin)
        self.by_status: Counter[str] = Counter()
        self.item_errors: Counter[str] = Counter()
        self.by_denial: Counter[str] = Counter()
        self.by_funding: Counter[str] = Counter()
        self.decisions = self.rpcs = self.allowed = self.denied = self.errors = self.dropped = self.degraded = 0
        self.followups = {kind: _CallStats() for kind in followup_kinds}

    def record_reserve(self, code: str, items: int, outcomes: Sequence[Outcome], intended: float | None,
                       sent: float, done: float) -> None:
        """intended: the open loop's intended send time; None in a closed loop (measured from the send)."""
        self.rpcs += 1
        self.decisions += items
        self.by_status[code] += 1
        failed = items if code != "OK" else 0
        for o in outcomes:
            if o.kind == "allowed":
                self.allowed += 1
                self.by_funding[o.detail] += 1
                self.degraded += o.degraded
            elif o.kind == "denied":
                self.denied += 1
                self.by_denial[o.detail] += 1
            else:
                failed += 1
                self.item_errors[o.detail] += 1
        self.errors += failed
        lat = latency_us(sent if intended is None else intended, done)
        self.reserve.record_value(lat)
        if intended is not None:  # in a closed loop it would be the same histogram again
            self.service.record_value(latency_us(sent, done))
        self.timeline.record(done, items, failed, lat)


# -- the report --------------------------------------------------------------------------------


@dataclass
class LoadReport:
    run_id: str
    mode: str                                # "closed" or "open"
    config: LoadConfig
    elapsed_seconds: float
    decisions: int
    rpcs: int
    allowed: int
    denied: int
    errors: int
    dropped: int
    degraded: int
    latency_ms: dict[str, float]             # reserve RPC; open loop: from the intended send time
    service_latency_ms: dict[str, float] | None  # open loop: from the actual send time
    by_status: dict[str, int]
    item_errors: dict[str, int]
    by_denial: dict[str, int]
    by_funding: dict[str, int]
    followups: dict[str, dict[str, Any]]
    error_examples: dict[str, str]           # status or item error code -> the first message seen
    accounts_touched: tuple[str, ...]
    grants: dict[str, int] | None
    histogram: HdrHistogram                  # reserve latencies, as latency_ms
    service_histogram: HdrHistogram          # open loop: from the actual send (empty in a closed loop)
    timeline: tuple[TimelineBucket, ...]

    @property
    def decisions_per_second(self) -> float:
        return self.decisions / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def rpcs_per_second(self) -> float:
        return self.rpcs / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def unexpected_errors(self) -> int:
        """Failed decisions and follow-ups: every status but OK is unexpected (a denial is an OK response)."""
        return self.errors + sum(f["errors"] for f in self.followups.values())

    def granted_accounts(self) -> tuple[str, ...]:
        """The accounts this run wrote to: the ones it reserved for, and every one it granted credits to."""
        if not self.grants:
            return self.accounts_touched
        every = {account_id(self.config.account_prefix, i) for i in range(self.config.accounts)}
        return tuple(sorted(every | set(self.accounts_touched)))

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "mode": self.mode, "config": config_json(self.config),
            "elapsed_seconds": round(self.elapsed_seconds, 6), "decisions": self.decisions, "rpcs": self.rpcs,
            "decisions_per_second": round(self.decisions_per_second, 3),
            "rpcs_per_second": round(self.rpcs_per_second, 3),
            "allowed": self.allowed, "denied": self.denied, "errors": self.errors, "dropped": self.dropped,
            "degraded": self.degraded, "latency_ms": self.latency_ms, "service_latency_ms": self.service_latency_ms,
            "by_status": self.by_status, "item_errors": self.item_errors, "by_denial": self.by_denial,
            "by_funding": self.by_funding, "followups": self.followups, "error_examples": self.error_examples,
            "timeline": [asdict(b) for b in self.timeline], "accounts_touched": len(self.accounts_touched),
            "grants": self.grants, "unexpected_errors": self.unexpected_errors,
        }

    def text(self) -> str:
        """The report as `quota-sidecar loadtest` prints it."""
        return format_text(self)


def config_json(config: LoadConfig) -> dict[str, Any]:
    """The config as JSON, without credentials."""
    # Not asdict(config): it would deep-copy the grpc credentials object.
    secret = ("admin_token", "admin_credentials")
    out = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in secret}
    out["mix"] = dict(config.mix)
    out["jobs"] = [asdict(j) for j in resolve_jobs(config)]
    return out


# -- the run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressSnapshot:
    elapsed_seconds: float   # since the start, warm-up included
    warming_up: bool
    decisions: int           # measured decisions completed
    rate: float              # decisions completed per second over the last interval (warm-up included)
    p99_ms: float            # reserve p99 of the measured calls so far
    errors: int
    in_flight: int
    dropped: int


def format_progress(s: ProgressSnapshot) -> str:
    phase = "warm-up " if s.warming_up else ""
    return (f"[{s.elapsed_seconds:7.1f}s] {phase}decisions {s.decisions}  rate {s.rate:,.0f}/s  "
            f"p99 {s.p99_ms:.3f} ms  errors {s.errors}  in flight {s.in_flight}"
            + (f"  dropped {s.dropped}" if s.dropped else ""))


class _Draw(NamedTuple):
    pick: Pick
    reservation_id: str
    measured: bool


def _details(exc: grpc.RpcError) -> str:
    return str(exc.details()) if hasattr(exc, "details") else str(exc)


def _code(exc: grpc.RpcError) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


class _Run:
    """One load run over open channels: issues the draws, makes the calls, records them."""

    def __init__(self, config: LoadConfig, stubs: Sequence[pb_grpc.QuotaServiceStub]) -> None:
        self.c = config
        self.stubs = stubs
        self.params = [j.params() for j in resolve_jobs(config)]  # built once, copied into each request
        self.sampler = Sampler(config)
        self.run_id = uuid.uuid4().hex
        self.start = time.perf_counter()
        self.measure_start = self.start + config.warmup_seconds
        self.end = math.inf if config.requests else self.measure_start + config.duration_seconds
        kinds = ("commit_batch", "release_batch", "extend") if config.batch_size else ("commit", "release", "extend")
        self.stats = _Stats(self.measure_start, kinds)
        self.issued = 0            # draws made, for reservation ids
        self.measured_issued = 0   # measured decisions issued (requests stop condition)
        self.completed = 0         # decisions completed, warm-up included (progress rate)
        self.in_flight = 0
        self.touched: set[str] = set()
        self.error_examples: dict[str, str] = {}  # status or item error code -> its first message
        self.stop = asyncio.Event()

    def take(self, at: float) -> list[_Draw] | None:
        """The next job's draws (a batch's worth in batch mode), or None when the run is over.
        ``at`` is the send time (closed loop) or the intended one (open loop)."""
        if self.stop.is_set():
            return None
        measured = at >= self.measure_start
        size = self.c.batch_size or 1
        if measured:
            if self.c.requests:
                size = min(size, self.c.requests - self.measured_issued)
                if size <= 0:
                    return None
            elif at >= self.end:
                return None
            self.measured_issued += size
        draws = []
        for _ in range(size):
            draws.append(_Draw(self.sampler.next(), f"{self.run_id}-{self.issued}", measured))
            self.issued += 1
        return draws

    def _request(self, d: _Draw) -> pb.CheckAndReserveRequest:
        return pb.CheckAndReserveRequest(account_id=d.pick.account, product=self.c.product,
                                         reservation_id=d.reservation_id, params=self.params[d.pick.job],
                                         ttl_seconds=self.c.ttl_seconds)

    async def _call(self, method: Any, request: Any) -> tuple[str, Any, float, float]:
        """(status name, response or None, sent, done) of one RPC."""
        sent = time.perf_counter()
        try:
            response = await method(request, timeout=self.c.timeout_seconds)
            code = "OK"
        except grpc.RpcError as exc:
            response, code = None, _code(exc)
            self.error_examples.setdefault(code, _details(exc))
        return code, response, sent, time.perf_counter()

    def _item_errors(self, results: Sequence[Any]) -> list[str]:
        """The codes of a batch response's failed items (remembering one message per code)."""
        codes = []
        for r in results:
            if r.WhichOneof("outcome") == "error":
                codes.append(r.error.code or "UNKNOWN")
                self.error_examples.setdefault(codes[-1], f"{r.error.reason}: {r.error.message}")
        return codes

    async def job(self, stub: pb_grpc.QuotaServiceStub, draws: list[_Draw], intended: float | None) -> None:
        """Reserve, then the follow-ups of the allowed draws; intended=None: measured from the actual send."""
        self.in_flight += 1
        try:
            for d in draws:
                self.touched.add(d.pick.account)
            if self.c.batch_size:
                request = pb.CheckAndReserveBatchRequest(items=[self._request(d) for d in draws])
                code, resp, sent, done = await self._call(stub.CheckAndReserveBatch, request)
                outcomes = [classify_batch(r) for r in resp.results] if resp is not None else []
                self._item_errors(resp.results if resp is not None else ())
            else:
                code, resp, sent, done = await self._call(stub.CheckAndReserve, self._request(draws[0]))
                outcomes = [classify(resp)] if resp is not None else []
            self.completed += len(draws)
            if draws[0].measured:
                self.stats.record_reserve(code, len(draws), outcomes, intended, sent, done)
            allowed = [d for d, o in zip(draws, outcomes) if o.kind == "allowed"]
            if self.c.batch_size:
                await self._follow_batch(stub, allowed)
            else:
                for d in allowed:
                    await self._follow(stub, d)
        finally:
            self.in_flight -= 1

    def _record(self, measured: bool, kind: str, code: str, items: int, item_errors: Sequence[str], sent: float,
                done: float) -> None:
        if measured:
            self.stats.followups[kind].record(code, items, item_errors, latency_us(sent, done))

    async def _follow(self, stub: pb_grpc.QuotaServiceStub, d: _Draw) -> None:
        ids: dict[str, Any] = {"account_id": d.pick.account, "reservation_id": d.reservation_id}
        outcome = d.pick.outcome
        if outcome == "extend":
            code, _, sent, done = await self._call(stub.ExtendReservation, pb.ExtendReservationRequest(**ids))
            self._record(d.measured, "extend", code, 1, (), sent, done)
            if code != "OK":
                return
        if outcome in ("commit", "extend"):
            code, _, sent, done = await self._call(stub.Commit, pb.CommitRequest(**ids))
            self._record(d.measured, "commit", code, 1, (), sent, done)
        elif outcome == "release":
            code, _, sent, done = await self._call(stub.Release, pb.ReleaseRequest(**ids))
            self._record(d.measured, "release", code, 1, (), sent, done)

    async def _follow_batch(self, stub: pb_grpc.QuotaServiceStub, allowed: list[_Draw]) -> None:
        """Extends one by one (there is no batch extend), then one CommitBatch and one ReleaseBatch."""
        extended = [d for d in allowed if d.pick.outcome == "extend"]
        ok = await asyncio.gather(*(self._extend(stub, d) for d in extended))
        commits = [d for d in allowed if d.pick.outcome == "commit"] + [d for d, good in zip(extended, ok) if good]
        releases = [d for d in allowed if d.pick.outcome == "release"]
        calls = []
        if commits:
            calls.append(self._batch(stub.CommitBatch, pb.CommitBatchRequest, pb.CommitRequest, "commit_batch",
                                     commits))
        if releases:
            calls.append(self._batch(stub.ReleaseBatch, pb.ReleaseBatchRequest, pb.ReleaseRequest, "release_batch",
                                     releases))
        await asyncio.gather(*calls)

    async def _extend(self, stub: pb_grpc.QuotaServiceStub, d: _Draw) -> bool:
        request = pb.ExtendReservationRequest(account_id=d.pick.account, reservation_id=d.reservation_id)
        code, _, sent, done = await self._call(stub.ExtendReservation, request)
        self._record(d.measured, "extend", code, 1, (), sent, done)
        return code == "OK"

    async def _batch(self, method: Any, batch_type: Any, item_type: Any, kind: str, draws: list[_Draw]) -> None:
        items = [item_type(account_id=d.pick.account, reservation_id=d.reservation_id) for d in draws]
        code, resp, sent, done = await self._call(method, batch_type(items=items))
        errors = self._item_errors(resp.results) if resp is not None else []
        self._record(draws[0].measured, kind, code, len(draws), errors, sent, done)

    async def closed_loop(self) -> None:
        async def caller(stub: pb_grpc.QuotaServiceStub) -> None:
            while (draws := self.take(time.perf_counter())) is not None:
                await self.job(stub, draws, None)

        await asyncio.gather(*(caller(self.stubs[i % len(self.stubs)]) for i in range(self.c.concurrency)))

    async def open_loop(self) -> None:
        interval = (self.c.batch_size or 1) / self.c.rate
        tasks: set[asyncio.Task[None]] = set()
        slot = 0
        while (draws := self.take(intended := schedule_time(self.start, slot, interval))) is not None:
            delay = intended - time.perf_counter()
            # Behind schedule: send at once, but still yield so the calls in flight make progress.
            await asyncio.sleep(max(delay, 0.0))
            if len(tasks) >= self.c.max_inflight:
                self.stats.dropped += len(draws) if draws[0].measured else 0
            else:
                task = asyncio.create_task(self.job(self.stubs[slot % len(self.stubs)], draws, intended))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            slot += 1
        await asyncio.gather(*tasks)

    def snapshot(self, last: tuple[float, int]) -> ProgressSnapshot:
        now = time.perf_counter()
        rate = (self.completed - last[1]) / max(now - last[0], 1e-9)
        p99 = _ms(self.stats.reserve.get_value_at_percentile(99)) if self.stats.reserve.get_total_count() else 0.0
        return ProgressSnapshot(now - self.start, now < self.measure_start, self.stats.decisions, rate, p99,
                                self.stats.errors, self.in_flight, self.stats.dropped)

    async def report_progress(self, progress: Callable[[ProgressSnapshot], None], every: float) -> None:
        last = (self.start, 0)
        while True:
            await asyncio.sleep(every)
            progress(self.snapshot(last))
            last = (time.perf_counter(), self.completed)

    def report(self, done: float, grants: dict[str, int] | None) -> LoadReport:
        s = self.stats
        return LoadReport(
            run_id=self.run_id, mode="open" if self.c.open_loop else "closed", config=self.c,
            elapsed_seconds=max(done - self.measure_start, 0.0), decisions=s.decisions, rpcs=s.rpcs,
            allowed=s.allowed, denied=s.denied, errors=s.errors, dropped=s.dropped, degraded=s.degraded,
            latency_ms=latency_summary(s.reserve),
            service_latency_ms=latency_summary(s.service) if self.c.open_loop else None,
            by_status=dict(s.by_status), item_errors=dict(s.item_errors), by_denial=dict(s.by_denial),
            by_funding=dict(s.by_funding), followups={k: v.to_json() for k, v in s.followups.items()},
            error_examples=dict(self.error_examples), accounts_touched=tuple(sorted(self.touched)), grants=grants,
            histogram=s.reserve,
            service_histogram=s.service, timeline=tuple(s.timeline.finish()))


# -- channels and grants ---------------------------------------------------------------------


def _channel_options(config: LoadConfig) -> list[tuple[str, Any]]:
    # Channels with equal arguments share one connection (the global subchannel pool) unless told not to.
    return [("grpc.use_local_subchannel_pool", 1)] if config.channels > 1 else []


async def _ready(channel: grpc.aio.Channel, target: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
    except asyncio.TimeoutError:
        raise LoadTestError(f"cannot connect to {target} within {timeout:g} s") from None


def _admin_channel(config: LoadConfig) -> grpc.aio.Channel:
    if config.admin_credentials is None:
        return grpc.aio.insecure_channel(config.admin_target)
    options = [("grpc.ssl_target_name_override", config.admin_tls_server_name)] if config.admin_tls_server_name \
        else []
    return grpc.aio.secure_channel(config.admin_target, config.admin_credentials, options=options)


async def grant_credits(config: LoadConfig) -> dict[str, int]:
    """GrantCredits credits_per_account to every account, idempotently (purchase_id from the account)."""
    metadata = (("authorization", f"Bearer {config.admin_token}"),) if config.admin_token else None
    limit = asyncio.Semaphore(_GRANT_CONCURRENCY)
    async with _admin_channel(config) as channel:
        await _ready(channel, config.admin_target, config.timeout_seconds)
        admin = pb_grpc.QuotaAdminStub(channel)

        async def grant(account: str) -> bool:
            request = pb.GrantCreditsRequest(account_id=account, credits=config.credits_per_account,
                                             purchase_id=purchase_id(account, config.credits_per_account),
                                             reason="quota-sidecar loadtest")
            async with limit:
                try:
                    response = await admin.GrantCredits(request, timeout=config.timeout_seconds, metadata=metadata)
                except grpc.RpcError as exc:
                    failure = f"{_code(exc)}: {_details(exc)}"
                    raise LoadTestError(f"GrantCredits for {account} failed: {failure}") from None
            return response.replayed

        replayed = await asyncio.gather(*(grant(account_id(config.account_prefix, i)) for i in range(config.accounts)))
    return {"accounts": config.accounts, "credits_per_account": config.credits_per_account,
            "replayed": sum(replayed)}


async def run_load(config: LoadConfig, progress: Callable[[ProgressSnapshot], None] | None = None, *,
                   stop: asyncio.Event | None = None, progress_interval_seconds: float = 1.0) -> LoadReport:
    """Runs the load described by config against its target and reports. ``progress`` is called about
    every progress_interval_seconds; setting ``stop`` ends the run early (what was sent completes)."""
    validate(config)
    grants = await grant_credits(config) if config.credits_per_account else None
    channels = [grpc.aio.insecure_channel(config.target, options=_channel_options(config))
                for _ in range(config.channels)]
    try:
        await asyncio.gather(*(_ready(ch, config.target, config.timeout_seconds) for ch in channels))
        run = _Run(config, [pb_grpc.QuotaServiceStub(ch) for ch in channels])
        if stop is not None:
            run.stop = stop
        ticker = asyncio.create_task(run.report_progress(progress, progress_interval_seconds)) if progress else None
        try:
            await (run.open_loop() if config.open_loop else run.closed_loop())
        finally:
            if ticker is not None:
                ticker.cancel()
        return run.report(time.perf_counter(), grants)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))


# -- audit -----------------------------------------------------------------------------------


async def audit_accounts(redis_url: str, accounts: Sequence[str], *, key_prefix: str = "qs", key_buckets: int = 256,
                         redis_mode: str = "auto") -> list[Any]:
    """The conservation audit (quota_sidecar.domain.audit) of these accounts; a list of AccountAudit."""
    from quota_sidecar.domain.audit import audit_account
    from quota_sidecar.storage.store import RedisStore

    store = RedisStore.from_url(redis_url, redis_mode=redis_mode, key_prefix=key_prefix, key_buckets=key_buckets)
    try:
        return [await audit_account(store, account) for account in accounts]
    finally:
        await store.close()


def audit_json(audits: Sequence[Any]) -> dict[str, Any]:
    violations = [{"account_id": v.account_id, "check": v.check, "detail": v.detail}
                  for a in audits for v in a.violations]
    return {"ok": not violations, "accounts": len(audits), "violations": violations}


def audit_text(audits: Sequence[Any]) -> str:
    """format_report's summary line, then only the accounts with violations."""
    from quota_sidecar.domain.audit import format_report

    bad = [a for a in audits if a.violations]
    lines = [format_report(audits).splitlines()[0]]
    lines += format_report(bad).splitlines()[1:]
    return "\n".join(lines)


# -- the human report ----------------------------------------------------------------------


def _counts(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def _lat(s: Mapping[str, float]) -> str:
    return (f"p50 {s['p50']:.3f}  p90 {s['p90']:.3f}  p99 {s['p99']:.3f}  p99.9 {s['p99.9']:.3f}  "
            f"max {s['max']:.3f}  mean {s['mean']:.3f} ms")


def _header(r: LoadReport) -> list[str]:
    c = r.config
    how = f"open loop at {c.rate:g} decisions/s (max {c.max_inflight} in flight)" if c.open_loop \
        else f"closed loop, {c.concurrency} caller(s)"
    stop = f"{c.requests} decisions" if c.requests else f"{c.duration_seconds:g} s"
    rpc = f"CheckAndReserveBatch x{c.batch_size}" if c.batch_size else "CheckAndReserve"
    accounts = f"zipf {c.zipf_exponent:g}" if c.zipf_exponent else "uniform"
    return [f"quota-sidecar loadtest: {how} against {c.target} ({c.channels} channel(s)), {rpc}",
            f"  run {stop} after {c.warmup_seconds:g} s warm-up; {c.accounts} account(s) {accounts}, "
            f"product {c.product}, seed {c.seed}, run id {r.run_id}"]


def format_text(r: LoadReport) -> str:
    """A short report for people."""
    lines = _header(r)
    lines.append(f"  decisions  {r.decisions} in {r.elapsed_seconds:.2f} s: {r.decisions_per_second:,.1f}/s; "
                 f"{r.rpcs} RPCs: {r.rpcs_per_second:,.1f}/s" + (f"; dropped {r.dropped}" if r.dropped else ""))
    lines.append(f"  outcomes   allowed {r.allowed} ({_counts(r.by_funding)}), denied {r.denied} "
                 f"({_counts(r.by_denial)}), errors {r.errors}" + (f", degraded {r.degraded}" if r.degraded else ""))
    label = "latency (from intended send)" if r.service_latency_ms else "latency"
    lines.append(f"  {label}  {_lat(r.latency_ms)}")
    if r.service_latency_ms:
        lines.append(f"  service time (from actual send)  {_lat(r.service_latency_ms)}")
    lines.append(f"  status     {_counts(r.by_status)}" + (f"; item errors {_counts(r.item_errors)}"
                                                          if r.item_errors else ""))
    for kind, f in r.followups.items():
        if f["rpcs"]:
            errs = f"; errors {f['errors']} ({_counts({**f['by_status'], **f['item_errors']})})" if f["errors"] else ""
            lines.append(f"  {kind:<14} {f['rpcs']} RPCs, {f['items']} item(s)  {_lat(f['latency_ms'])}{errs}")
    lines += [f"  error      {code}: {text}" for code, text in sorted(r.error_examples.items())]
    lines.append(f"  accounts touched {len(r.accounts_touched)}" + (
        f"; credits granted to {r.grants['accounts']} ({r.grants['replayed']} already had them)" if r.grants else ""))
    return "\n".join(lines)


# -- the CLI verb ----------------------------------------------------------------------------


def config_from_args(args: Any) -> LoadConfig:
    """A LoadConfig from the ``loadtest`` flags; LoadConfigError / ValueError on bad values."""
    import os

    from quota_sidecar.tools.common import DEFAULT_ADMIN_TARGET, DEFAULT_TARGET, admin_token, channel_credentials

    jobs = tuple(j for text in (args.job or ()) for j in parse_job(text))
    admin_target = args.admin_target or os.environ.get("QUOTA_ADMIN_TARGET", "")
    if args.credits_per_account and not admin_target:
        admin_target = DEFAULT_ADMIN_TARGET
    return LoadConfig(
        target=args.target or os.environ.get("QUOTA_TARGET") or DEFAULT_TARGET, admin_target=admin_target,
        admin_token=(admin_token(args) or "") if admin_target else "",
        admin_credentials=channel_credentials(args) if admin_target else None,
        admin_tls_server_name=args.tls_server_name or "", concurrency=args.concurrency, rate=args.rate,
        max_inflight=args.max_inflight,
        duration_seconds=args.duration if args.duration is not None else LoadConfig.duration_seconds,
        requests=args.requests, warmup_seconds=args.warmup, accounts=args.accounts,
        account_prefix=args.account_prefix, zipf_exponent=args.zipf, product=args.product, jobs=jobs,
        mix=parse_mix(args.mix), ttl_seconds=args.ttl, batch_size=args.batch, max_batch_items=args.max_batch_items,
        credits_per_account=args.credits_per_account, seed=args.seed, timeout_seconds=args.timeout,
        channels=args.channels)


def _usage_error(text: str) -> int:
    print(f"quota-sidecar loadtest: error: {text}", file=sys.stderr)
    return 2


async def _run_cli(config: LoadConfig, args: Any, redis: Any) -> tuple[LoadReport, list[Any] | None, str]:
    """(report, audits or None, why the audit could not run or ""); ``redis``: cli.RedisOptions."""
    import signal

    from quota_sidecar.domain.errors import QuotaError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:  # Ctrl-C ends the run early and still reports (main thread only).
        loop.add_signal_handler(signal.SIGINT, stop.set)
    except (RuntimeError, ValueError, NotImplementedError):
        pass
    try:
        progress = None if args.quiet else (lambda s: print(format_progress(s), file=sys.stderr, flush=True))
        report = await run_load(config, progress, stop=stop)
    finally:
        try:
            loop.remove_signal_handler(signal.SIGINT)
        except (RuntimeError, ValueError, NotImplementedError):
            pass
    audits = None
    if args.audit:
        try:
            audits = await audit_accounts(redis.url, report.granted_accounts(), key_prefix=redis.key_prefix,
                                          key_buckets=redis.key_buckets, redis_mode=redis.mode)
        except QuotaError as exc:  # e.g. Redis unreachable: the run's report is still worth printing
            return report, None, exc.message
    return report, audits, ""


def cli_main(args: Any) -> int:
    """``quota-sidecar loadtest``: 0 on success; 1 on unexpected RPC errors (unless --allow-errors), an
    audit violation or an audit that could not run, or when the run could not start; 2 on bad flags."""
    from quota_sidecar.server.data_dir import NoRedisUrl
    from quota_sidecar.server.logs import mask_credentials
    from quota_sidecar.tools.common import redis_options

    try:
        config = config_from_args(args)
        validate(config)
        redis = redis_options(args, need_url=args.audit)
        if args.plot:
            from quota_sidecar.tools.loadtest_plot import check_plot_path

            check_plot_path(args.plot)
    except NoRedisUrl as exc:
        return _usage_error(f"--audit needs --redis-url (the Redis the sidecar uses): {exc}")
    except ValueError as exc:  # LoadConfigError, and the admin credential helpers' errors
        return _usage_error(str(exc))
    if args.audit and redis.source:
        print(f"quota-sidecar loadtest: --audit uses Redis {mask_credentials(redis.url)} (from {redis.source})",
              file=sys.stderr)
    try:
        report, audits, audit_error = asyncio.run(_run_cli(config, args, redis))
    except LoadTestError as exc:
        print(f"quota-sidecar loadtest: {exc}", file=sys.stderr)
        return 1
    if args.plot:
        from quota_sidecar.tools.loadtest_plot import write_plot

        write_plot(report, args.plot)
    if args.json:
        doc = report.to_json()
        if audits is not None:
            doc["audit"] = audit_json(audits)
        # Not cli.print_json: its default writer is the sys.stdout of import time.
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(format_text(report))
        if audits is not None:
            print(audit_text(audits))
    if audit_error:
        print(f"quota-sidecar loadtest: cannot run the --audit: {mask_credentials(audit_error)}", file=sys.stderr)
        return 1
    failed = report.unexpected_errors > 0 and not args.allow_errors
    return 1 if failed or (audits is not None and any(a.violations for a in audits)) else 0
