"""A DESIGN PROBE, not production code: instructions a lean decision path would cost in Redis.

    .venv/bin/python benchmarks/lean_probe.py [--calls 200] [--profile] [--pinned]

This measures a proposed design; nothing in quota_sidecar uses these scripts. The scripts are
in benchmarks/lean_probe/ (reserve.lua, commit.lua, release.lua): each self-contained (no shared
prelude, no cjson), one EVALSHA per operation, four KEYS under one hash tag ({b7}):

  1 the account hash: plan, tz, debt, held, bal, spent, seq, cap, due (a lower bound of the soonest
    expiry of the account's open holds and lots), lx (live lot ids, soonest expiry first);
    c|<product>|<limit>|<label> window counters; l|<lot> = "<left>|<expires_ms>|<rank>";
    r|<rid> = a positional reservation record; inflight|<product>; m|<YYYYMM> month spend
  2 the bucket's plans hash of the plans version in force: "<product>|<plan>" =
    "<entitled>|<max_concurrent>|<limit>:<d|w|r>:<free>:<hours>:<shadow>,..."
  3 the bucket's outbox stream     4 the bucket's hold-expiry zset ("<account>|<rid>" by expires_ms)

It starts its own redis-server under callgrind on 127.0.0.1 (CallgrindRedis of lua_cost.py), sets up
the state with plain commands, and prints instructions per call for: reserve (free path, credits
path, replay of a known id), commit and release of free and credits holds, and the `return 1` floor
with the reserve's KEYS and ARGV. now_ms is 0 (the scripts call TIME) unless --pinned.

--profile also measures each script with early returns at its `-- @cut NAME` markers (cumulative
cost up to that point), with its `-- @skip NAME` lines removed (what that one command costs), with a
pinned now (what TIME costs) and the reserve's outbox entry packed in one field; and prints unit
costs: what one TIME, HMGET, tonumber, string.format, concatenation, table or reply costs here.
Needs valgrind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import redis  # noqa: E402
from lua_cost import CallgrindRedis  # noqa: E402

from quota_sidecar.storage.redis_server import find_redis_server  # noqa: E402

SCRIPTS = HERE / "lean_probe"
TAG = "{b7}"
PLANS_VERSION = "2026-11-01"
PRODUCT = "sora"
ACCOUNTS = 20
RETENTION_MS = 7 * 86_400_000
TTL_MS = 900_000
COST = 1
OLD_RECORDS, OTHER_HOLDS, OUTBOX_BACKLOG = 10, 1000, 500
DAILY_FREE, WEEKLY_FREE, MAX_CONCURRENT = 30, 200, 50
# Two enforced limits (a day and a week counter): the real sora plan has one (daily_free).
PLAN_ROW = f"1|{MAX_CONCURRENT}|daily:d:{DAILY_FREE}:0:0,weekly:w:{WEEKLY_FREE}:0:0"


def k_acct(account: str) -> str:
    return f"qs:{TAG}:a:{account}"


K_PLANS = f"qs:{TAG}:plans:{PLANS_VERSION}"
K_OUTBOX = f"qs:{TAG}:outbox"
K_HOLDS = f"qs:{TAG}:holds"


def windows(now_ms: int) -> list[str]:
    """[day label, end_ms, week label, end_ms, month label, end_ms] in UTC (the sidecar's work)."""
    now = dt.datetime.fromtimestamp(now_ms / 1000, dt.timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week = day - dt.timedelta(days=day.weekday())
    month = day.replace(day=1)
    next_month = (month + dt.timedelta(days=32)).replace(day=1)

    def ms(t: dt.datetime) -> str:
        return str(int(t.timestamp() * 1000))

    return ["d" + day.strftime("%Y%m%d"), ms(day + dt.timedelta(days=1)),
            "w" + week.strftime("%Y%m%d"), ms(week + dt.timedelta(days=7)),
            month.strftime("%Y%m"), ms(next_month)]


class Probe:
    def __init__(self, server: CallgrindRedis, pinned: bool) -> None:
        self.server = server
        self.r = redis.Redis(port=server.port, decode_responses=True, socket_timeout=120)
        self.pinned = pinned
        self.now_ms = int(time.time() * 1000)
        self.win = windows(self.now_ms)
        src = {name: (SCRIPTS / f"{name}.lua").read_text() for name in ("reserve", "commit", "release")}
        self.src = src
        self.sha = {name: self.r.script_load(text) for name, text in src.items()}

    # -- state -------------------------------------------------------------------------------
    def setup(self) -> None:
        r = self.r
        r.flushall()
        r.hset(K_PLANS, mapping={f"{PRODUCT}|free": PLAN_ROW, "codex|free": "1|0|weekly:w:40:0:0"})
        day, week = self.win[0], self.win[2]
        soon = self.now_ms + 30 * 86_400_000
        later = self.now_ms + 300 * 86_400_000
        for path in ("f", "c"):
            for i in range(ACCOUNTS):
                fields = {"plan": "free", "tz": "UTC", "debt": "0", "held": "0", "spent": "0", "seq": "5",
                          "cap": "100000", "bal": "101000", "lx": "p1,b2",
                          "l|p1": f"1000|{soon}|0", "l|b2": f"100000|{later}|3",
                          "due": str(soon), f"m|{self.win[4]}": "7"}
                if path == "c":  # the day's allowance used up
                    fields[f"c|{PRODUCT}|daily|{day}"] = str(DAILY_FREE)
                    fields[f"c|{PRODUCT}|weekly|{week}"] = str(DAILY_FREE)
                # Resolved records of earlier jobs (kept for replays until pruned): a realistic hash size.
                for j in range(OLD_RECORDS):
                    fields[f"r|old{j:029d}"] = (f"c|{PRODUCT}|fp-old{j:04d}|f|0|{self.now_ms - 3_600_000}")
                r.hset(k_acct(f"{path}{i}"), mapping=fields)
        # A busy bucket: other accounts' open holds in the zset, an outbox the shipper has not trimmed yet.
        r.zadd(K_HOLDS, {f"other{j}|{uuid.uuid4().hex}": self.now_ms + TTL_MS + j for j in range(OTHER_HOLDS)})
        for j in range(OUTBOX_BACKLOG):
            r.xadd(K_OUTBOX, {"a": f"other{j}", "q": "1", "k": "hold"})

    # -- calls -------------------------------------------------------------------------------
    def now_arg(self) -> str:
        return str(int(time.time() * 1000)) if self.pinned else "0"

    def reserve_call(self, sha: str, account: str, rid: str) -> list:
        return ["EVALSHA", sha, 4, k_acct(account), K_PLANS, K_OUTBOX, K_HOLDS,
                self.now_arg(), account, rid, PRODUCT, "fp-" + rid[:8], TTL_MS, COST, "UTC", *self.win]

    def resolve_call(self, name: str, account: str, rid: str) -> list:
        return ["EVALSHA", self.sha[name], 3, k_acct(account), K_OUTBOX, K_HOLDS,
                self.now_arg(), account, rid, RETENTION_MS]

    def measure(self, calls: list[list]) -> tuple[float, list]:
        self.server.zero()
        replies = [self.r.execute_command(*c) for c in calls]
        return self.server.instructions() / len(calls), replies

    def holds(self, path: str, calls: int) -> list[tuple[str, str]]:
        return [(f"{path}{i % ACCOUNTS}", uuid.uuid4().hex) for i in range(calls)]

    def run(self, calls: int) -> dict[str, float]:
        out: dict[str, float] = {}
        self.setup()
        for path, funding in (("f", "free"), ("c", "credits")):
            held = self.holds(path, calls)
            per, replies = self.measure([self.reserve_call(self.sha["reserve"], a, rid) for a, rid in held])
            for reply in replies:
                assert reply[0] == "ok" and reply[1] == funding, reply
            out[f"reserve {funding}"] = per
            per, replies = self.measure([self.reserve_call(self.sha["reserve"], a, rid) for a, rid in held])
            for reply in replies:
                assert reply[0] == "ok" and reply[1] == funding and reply[8] == 1, reply
            out[f"reserve replay ({funding})"] = per
            per, replies = self.measure([self.resolve_call("commit", a, rid) for a, rid in held[0::2]])
            for reply in replies:
                assert reply[:2] == ["ok", funding] and reply[3] == 0, reply
            out[f"commit {funding}"] = per
            per, replies = self.measure([self.resolve_call("release", a, rid) for a, rid in held[1::2]])
            for reply in replies:
                assert reply[:2] == ["ok", funding] and reply[-1] == 0, reply
            out[f"release {funding}"] = per
        self.check_books()
        floor = self.r.script_load("return 1")
        out["floor: reserve shape"], _ = self.measure([self.reserve_call(floor, "f0", uuid.uuid4().hex)
                                                       for _ in range(calls)])
        resolve = self.resolve_call("commit", "f0", uuid.uuid4().hex)
        resolve[1] = floor
        out["floor: commit shape"], _ = self.measure([resolve] * calls)
        return out

    def check_books(self) -> None:
        """The probe's own bookkeeping adds up (so the counts are of a working design)."""
        r = self.r
        assert r.zcard(K_HOLDS) > 0 and r.xlen(K_OUTBOX) > 0
        for path in ("f", "c"):
            for i in range(ACCOUNTS):
                a = r.hgetall(k_acct(f"{path}{i}"))
                assert a[f"inflight|{PRODUCT}"] == "0", a
                assert a["held"] == "0", a
                lefts = sum(int(a[f"l|{lot}"].split("|")[0]) for lot in a["lx"].split(","))
                assert lefts == int(a["bal"]), a
                assert int(a["bal"]) + int(a["spent"]) == 101000, a

    # -- profile -----------------------------------------------------------------------------
    def variants(self, op: str) -> list[tuple[str, str]]:
        """The script of `op` with pieces cut out: (label, Lua text)."""
        src = self.src[op]
        out = []
        for name in re.findall(r"^\s*-- @cut (\w+)$", src, re.MULTILINE):
            out.append((f"return at '{name}'",
                        re.sub(rf"^(\s*)-- @cut {name}$", r"\1do return 1 end", src, flags=re.MULTILINE)))
        for name in re.findall(r"-- @skip (\w+)$", src, re.MULTILINE):
            out.append((f"without '{name}'", re.sub(rf"^.*-- @skip {name}\n", "", src, flags=re.MULTILINE)))
        if op == "reserve":  # the movement as one packed field instead of ~10 field/value pairs
            packed = "redis.call('XADD', KEYS[3], '*', 'a', acct_id, 'q', seq, 'm', table.concat(ev, '|', 7))"
            out.append(("XADD one packed field", re.sub(r"^.*-- @skip xadd$", packed, src, flags=re.MULTILINE)))
        out.append(("now pinned (no TIME)", src.replace("if now_s == '0' then", "if false then")))
        return out

    def _variant_cost(self, op: str, label: str, text: str, path: str, calls: int) -> float:
        sha = self.r.script_load(text)
        self.setup()
        held = self.holds(path, calls)
        if op == "reserve":
            call_list = [self.reserve_call(sha, a, rid) for a, rid in held]
        else:
            for a, rid in held:  # the holds to resolve, made by the full reserve (not counted)
                assert self.r.execute_command(*self.reserve_call(self.sha["reserve"], a, rid))[0] == "ok"
            call_list = [self.resolve_call(op, a, rid) for a, rid in held]
            for c in call_list:
                c[1] = sha
        if label.startswith("now pinned"):
            for c in call_list:
                c[7 if op == "reserve" else 6] = str(int(time.time() * 1000))  # ARGV[1]
        return self.measure(call_list)[0]

    def profile(self, calls: int) -> dict[str, list[tuple[str, float, float]]]:
        out = {}
        for op in ("reserve", "commit", "release"):
            out[op] = [(label, self._variant_cost(op, label, text, "f", calls),
                        self._variant_cost(op, label, text, "c", calls))
                       for label, text in [("full", self.src[op]), *self.variants(op)]]
        return out

    def unit_costs(self, calls: int) -> list[tuple[str, float]]:
        """Small scripts sent the reserve's KEYS and ARGV: what each kind of Lua/Redis work costs."""
        self.setup()
        call = self.reserve_call("", "f0", uuid.uuid4().hex)
        rows = []
        for name, src in UNIT_SCRIPTS:
            call[1] = self.r.script_load(src)
            rows.append((name, self.measure([call] * calls)[0]))
        return rows


# Each is timed whole; the report subtracts the `return 1` floor (and divides by the repeat count).
UNIT_SCRIPTS = [
    ("return 1 (floor)", "return 1"),
    ("TIME + now_ms string", "local t = redis.call('TIME') local s = t[1] .. string.sub('00000' .. t[2], -6, -4) "
                             "return 1"),
    ("HGET 1 field", "redis.call('HGET', KEYS[1], 'plan') return 1"),
    ("HMGET 12 fields", "redis.call('HMGET', KEYS[1], 'r|x', 'plan', 'tz', 'debt', 'due', 'seq', 'bal', 'held', "
                        "'cap', 'lx', 'inflight|sora', 'm|202612') return 1"),
    ("10x tonumber(13 digits)", "local x = 0 for i = 1, 10 do x = x + tonumber(ARGV[10]) end return 1"),
    ("10x string.format('%d')", "local f, x = string.format for i = 1, 10 do x = f('%d', 1765065600000 + i) end "
                                "return 1"),
    ("10x '' .. number", "local x for i = 1, 10 do x = '' .. (1765065600000 + i) end return 1"),
    ("10x a .. '|' .. b .. i", "local x for i = 1, 10 do x = ARGV[3] .. '|' .. ARGV[4] .. i end return 1"),
    ("10x new table {}", "local x for i = 1, 10 do x = {} end return 1"),
    ("return a flat 18-item reply", "return {'ok', 'free', '1765065600000', 0, '101000', 3, 30, '1765065600000', 0, "
                                    "'free', 'daily', 3, 30, '1765065600000', 'weekly', 3, 200, '1765065600000'}"),
]


def main(ns: argparse.Namespace) -> None:
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        raise SystemExit("lean_probe: valgrind is not installed (Debian: apt-get install valgrind)")
    binary = find_redis_server(None)
    with tempfile.TemporaryDirectory(prefix="qs-lean-probe-") as tmp:
        server = CallgrindRedis(binary, Path(tmp))
        try:
            probe = Probe(server, ns.pinned)
            results = probe.run(ns.calls)
            profile = probe.profile(ns.calls) if ns.profile else {}
            units = probe.unit_costs(ns.calls) if ns.profile else []
        finally:
            server.stop()
    print(f"DESIGN PROBE (not production code), redis-server {binary}, {ns.calls} calls each, "
          f"now_ms {'pinned' if ns.pinned else '0 (TIME)'}; instructions per EVALSHA:")
    for name, per_call in results.items():
        print(f"  {name:26s} {per_call / 1000:8.1f} k")
    for op, rows in profile.items():
        print(f"{op} profile (free hold, credits hold):")
        for label, free, credits in rows:
            print(f"  {label:26s} {free / 1000:8.1f} k {credits / 1000:8.1f} k")
    if units:
        floor = units[0][1]
        print("unit costs (a script sent the reserve's KEYS/ARGV, less the floor; 10x rows: per one):")
        for name, per_call in units[1:]:
            extra = (per_call - floor) / (10 if name.startswith("10x") else 1)
            print(f"  {name:28s} {extra / 1000:8.1f} k")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per measured operation")
    parser.add_argument("--profile", action="store_true", help="also profile the reserve by cutting pieces out")
    parser.add_argument("--pinned", action="store_true", help="send a pinned now_ms instead of 0 (TIME)")
    main(parser.parse_args())
