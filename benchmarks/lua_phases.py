"""Where a script's instructions go: callgrind counts of the script cut short after each phase.

    .venv/bin/python benchmarks/lua_phases.py [--calls 100] [--redis-server PATH]

benchmarks/lua_cost.py counts a whole reserve, commit or release script call; this splits the count
of the EVALSHA form (storage/scripts.py), which the store sends on Redis 6.2 and which this forces.
For each phase boundary below it registers a copy of the real script (as the store assembles it,
storage/scripts.py) with ``do return '{}' end`` inserted before that line, makes the engine's
decisions through it against a redis-server under callgrind, and prints the instructions per call
cut there and the difference to the previous cut: what that phase costs. The last row is the
whole script. The engine cannot read a cut script's reply; the error is expected and ignored
(Redis did the work either way). Same accounts and state as lua_cost.py: 20 accounts with
credits, the free path (allowance left) and the credits path (allowance used up).

Cuts are matched as exact lines of the scripts; a line that moved or changed makes this fail
loudly (rename the marker) rather than measure something else.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lua_cost  # noqa: E402  (benchmarks/)

from quota_sidecar.domain.errors import QuotaError  # noqa: E402
from quota_sidecar.storage.redis_server import find_redis_server  # noqa: E402
from quota_sidecar.storage.scripts import load_script_source  # noqa: E402

# (phase that ends at the cut, the line the cut goes before)
PHASES = {
    "reserve": [
        ("EVALSHA, prelude header and closures", "  local rid           = next_arg()"),
        ("arguments read", "  local existing = load_record(rid)"),
        ("record and account read", "  local row = find_row(rows_at, 6, plan)"),
        ("plan row, windows, limits decoded", "  local debt = tonumber(acct[8] or '0')"),
        ("lazy expiry and debt repayment", "  local usage = metered and cost_credits or nil"),
        ("limit states", "  local lots, balance = live_lots()"),
        ("live lots, in-flight count", "  local function report_limits(taken)"),
        ("entitlement, cameos, debt, caps", "  local rec = {s = 'held', p = product, fp = fingerprint, c = 0, l = {}, "
                                            "fw = {}, m = '', pv = plans_version,"),
        ("free unit or credits taken", "  decision.allowed = 1"),
        ("reply encoded", "  rec.d = answer"),
        ("record, holds, in-flight written", "  local free = rec.f == 'free'"),
    ],
    "commit": [
        ("EVALSHA, prelude header and closures", "local rid   = next_arg()"),
        ("arguments read", "local rec = load_record(rid)"),
        ("record read, price row", "settle_if_due(rid, rec)"),
        ("checks", "sweep()\nlocal over = nil"),
        ("lazy expiry, overage drawn", "local extra = fees > 0 and {'fees', fees, 'roy', rec.cm} or {}"),
        ("hold charged, record resolved, outbox", "result.usage = rec.fu  -- included usage charged to the windows "
                                                  "(nil for any other hold)"),
    ],
    "release": [
        ("EVALSHA, prelude header and closures", "local rid = next_arg()"),
        ("record read", "local result = {funding = rec.f, refunded = rec.c,"),
        ("lazy expiry", "  local moved, deltas = refund_hold(rec)\n  resolve(rid, rec, 'released')"),
        ("hold given back", "  resolve(rid, rec, 'released')"),
        ("record resolved", "  ledger('release', deltas, hold_fields(rid, rec, moved))"),
        ("outbox entry", "local _, balance = live_lots()\nresult.balance = balance"),
    ],
}


def variants(name: str) -> list[tuple[str, str]]:
    source = load_script_source(name)
    out = []
    for phase, line in PHASES[name]:
        at = source.find("\n" + line)
        assert at != -1 and source.count("\n" + line) == 1, f"{name}: cut line not found once: {line!r}"
        out.append((phase, source[:at + 1] + "do return '{}' end\n" + source[at + 1:]))
    out.append(("the rest (whole script)", source))
    return out


async def _use(store: Any, name: str, source: str) -> None:
    # Only the scripts in use stay in Redis' Lua heap: every cut loaded would make each garbage
    # collection walk a bigger heap, a cost that grows from one cut to the next.
    await store._client.script_flush()
    store._set_script_mode(False)  # the EVALSHA form, whatever the server's version
    store._sources[name] = source
    store._shas[name] = await store._client.script_load(source)


async def _phase(server: lua_cost.CallgrindRedis, name: str, source: str, calls: int, credits: bool) -> float:
    engine, store = await lua_cost._engine(server.url)
    try:
        accounts = await lua_cost._prepare_accounts(engine, credits)
        held = [(accounts[i % len(accounts)], uuid.uuid4().hex) for i in range(calls)]
        if name != "reserve":
            for account, rid in held:
                await engine.check_and_reserve(account, "sora", rid, lua_cost.JOB)
        await _use(store, name, source)
        server.zero()
        for account, rid in held:
            try:
                if name == "reserve":
                    await engine.check_and_reserve(account, "sora", rid, lua_cost.JOB)
                else:
                    await getattr(engine, name)(account, rid)
            except (QuotaError, KeyError, TypeError, ValueError):
                pass  # a cut script's '{}' is no reply the engine can read
        return server.instructions() / calls
    finally:
        await store.close()


async def main(ns: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="qs-lua-phases-") as tmp:
        server = lua_cost.CallgrindRedis(find_redis_server(ns.redis_server), Path(tmp))
        try:
            for name in ("reserve", "commit", "release"):
                for credits in (False, True):
                    print(f"{name}, {'credits' if credits else 'free'} path: instructions per call, cut after")
                    before = 0.0
                    for phase, source in variants(name):
                        total = await _phase(server, name, source, ns.calls, credits)
                        print(f"  {phase:40s} {total / 1000:8.1f} k  {(total - before) / 1000:+8.1f} k", flush=True)
                        before = total
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--redis-server", default=None, metavar="PATH")
    asyncio.run(main(parser.parse_args()))
