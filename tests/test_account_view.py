"""Issue 17, part 4: the account's own view of its money (credits expiring in the next 30 days)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from quota_fixtures import T0_MS, Sidecar
from test_metered import metered_document, usage

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.books.pg import PgBooks
from quota_sidecar.client import QuotaClient
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.model import Funding, JobParams
from quota_sidecar.domain.shipping import Shipper, ShipperOptions
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.storage.store import RedisStore
from quota_sidecar.tools import cli

DAY_MS = 86_400_000
V10 = JobParams(duration_seconds=10, resolution="720p")


async def grant_lots(engine: QuotaEngine, clock: ManualClock) -> None:
    """Lots at T0 + 2, 10 and 33 days and 1 ms past 33 days, then 3 days on: one expired, two inside the
    30 days (one at its very end), one just outside; plus a lot inside the window spent to nothing."""
    await engine.grant("a", 4, "lapsed", T0_MS + 2 * DAY_MS)
    await engine.grant("a", 5, "soon", T0_MS + 10 * DAY_MS)
    await engine.grant("a", 7, "edge", T0_MS + 33 * DAY_MS)
    await engine.grant("a", 9, "later", T0_MS + 33 * DAY_MS + 1)
    clock.advance(days=3)
    await engine.grant("a", 1, "spent", T0_MS + 5 * DAY_MS)
    for i in range(100):  # the free allowance, then credits: "spent" expires first, so it goes first
        d = await engine.check_and_reserve("a", "sora", f"r{i}", V10)
        if d.outcome.funding is not None and d.outcome.funding.value == "credits":
            break
    assert d.outcome.cost_credits == 1


async def test_balance_lists_the_credits_expiring_in_the_next_30_days(engine: QuotaEngine,
                                                                      clock: ManualClock) -> None:
    await grant_lots(engine, clock)
    b = await engine.balance("a")
    assert b.credit_balance == 5 + 7 + 9
    assert [(lot.lot_id, lot.credits_left, lot.expires_ms) for lot in b.expiring_lots] == [
        ("soon", 5, T0_MS + 10 * DAY_MS), ("edge", 7, T0_MS + 33 * DAY_MS)]
    assert b.credits_expiring == 12
    clock.advance(days=8)  # "soon" has expired, "later" has come inside the 30 days
    assert [(lot.lot_id, lot.credits_left) for lot in (await engine.balance("a")).expiring_lots] == [
        ("edge", 7), ("later", 9)]


async def test_balance_on_the_wire_in_the_client_and_in_the_cli(sidecar: Sidecar, clock: ManualClock,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    await grant_lots(sidecar.engine, clock)
    r = await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id="a"))
    assert r.credits_expiring_30d == 12
    assert [(lot.lot_id, lot.credits_left, lot.expires_at.ToMilliseconds()) for lot in r.expiring_lots] == [
        ("soon", 5, T0_MS + 10 * DAY_MS), ("edge", 7, T0_MS + 33 * DAY_MS)]
    async with QuotaClient(f"127.0.0.1:{sidecar.port}") as client:
        cb = await client.balance("a")
    assert cb.credits_expiring_30d == 12 and [lot.lot_id for lot in cb.expiring_lots] == ["soon", "edge"]

    target = ["--target", f"127.0.0.1:{sidecar.port}"]
    status = await asyncio.to_thread(cli.main, ["balance", "--account", "a", *target])
    out = capsys.readouterr().out
    assert status == 0, out
    assert ("credits expiring in the next 30 days: 12\n"
            "  5 in lot soon, expires 2026-12-01 12:00:00 UTC\n"
            "  7 in lot edge, expires 2026-12-24 12:00:00 UTC\n") in out, out
    # --json writes through the sys.stdout of import time, which capsys does not see: a child process.
    child = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "quota_sidecar", "balance", "--account",
                                                     "a", *target, "--json"],
                                    capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 0, child
    doc = json.loads(child.stdout)
    assert doc["credits_expiring_30d"] == 12
    assert [(lot["lot_id"], lot["credits_left"]) for lot in doc["expiring_lots"]] == [("soon", 5), ("edge", 7)]


async def test_no_lot_expiring_prints_nothing(sidecar: Sidecar, capsys: pytest.CaptureFixture[str]) -> None:
    await sidecar.engine.grant("b", 3, "far", T0_MS + 90 * DAY_MS)
    r = await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id="b"))
    assert (r.credits_expiring_30d, list(r.expiring_lots)) == (0, [])
    status = await asyncio.to_thread(cli.main, ["balance", "--account", "b", "--target", f"127.0.0.1:{sidecar.port}"])
    out = capsys.readouterr().out
    assert status == 0 and "expiring" not in out, out


# -- the books' quota_jobs: one line per job ------------------------------------------------------


@pytest.fixture
def capped_engine(store: RedisStore, clock: ManualClock) -> QuotaEngine:
    """The default plans plus the metered codex-usage, overage "cap" (see test_metered)."""
    return QuotaEngine(parse_plans(metered_document(overage="cap")), store, clock)


async def test_quota_jobs_one_row_per_job(capped_engine: QuotaEngine, store: RedisStore, clock: ManualClock,
                                          books: PgBooks, books_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    engine = capped_engine
    await engine.set_cameo("cam-a", "owner-1", 3, True)
    await engine.set_account("acct", plan="pro")
    assert (await engine.check_and_reserve("acct", "sora", "free-1", V10)).outcome.funding is Funding.FREE_QUOTA
    await engine.commit("acct", "free-1")
    await engine.check_and_reserve("acct", "sora", "free-rel", V10)
    await engine.release("acct", "free-rel")
    await engine.grant("acct", 100, "p1")
    for i in range(100):  # the rest of the free allowance
        d = await engine.check_and_reserve("acct", "sora", f"f{i}", V10)
        if d.outcome.funding is Funding.CREDITS:
            await engine.release("acct", f"f{i}")
            break
        await engine.release("acct", f"f{i}")
        await engine.check_and_reserve("acct", "sora", f"u{i}", V10)  # a free unit used, kept open
    paid = JobParams(duration_seconds=15, resolution="1080p")
    for rid in ("paid", "released", "expired", "refunded"):
        assert (await engine.check_and_reserve("acct", "sora", rid, paid, ttl_seconds=60)).outcome.funding \
            is Funding.CREDITS
    await engine.commit("acct", "paid")
    await engine.release("acct", "released")
    await engine.commit("acct", "refunded")
    await engine.refund_job("acct", "refunded", "render failed")
    cameo = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a",))
    await engine.check_and_reserve("acct", "sora", "cameo", cameo, ttl_seconds=3600)
    await engine.commit("acct", "cameo")
    await engine.check_and_reserve("acct", "codex-usage", "metered", usage("mini", o=100_000), ttl_seconds=3600)
    await engine.commit("acct", "metered", usage("mini", o=200_000))  # 23: 12 charged, 11 written off
    await engine.check_and_reserve("acct", "sora", "open", V10, ttl_seconds=3600)
    clock.advance(seconds=120)
    await engine.balance("acct")  # sweeps "expired"
    await Shipper(store, books, ManualClock(T0_MS), owner="t", options=ShipperOptions()).drain()

    jobs = {j.reservation_id: j for j in await books.jobs("acct")}
    row = {rid: (j.state, j.funding, j.credits_charged, j.free_units, j.royalty_credits, j.fees, j.written_off,
                 j.credits_refunded) for rid, j in jobs.items()
           if rid in ("free-1", "free-rel", "paid", "released", "expired", "refunded", "cameo", "metered", "open")}
    cost = jobs["paid"].credits_charged
    assert cost > 0
    assert row == {
        "free-1": ("committed", "free", 0, 1, 0, 0, 0, 0),
        "free-rel": ("released", "free", 0, 0, 0, 0, 0, 0),
        "paid": ("committed", "credits", cost, 0, 0, 0, 0, 0),
        "released": ("released", "credits", 0, 0, 0, 0, 0, 0),
        "expired": ("expired", "credits", 0, 0, 0, 0, 0, 0),
        "refunded": ("refunded", "credits", cost, 0, 0, 0, 0, cost),
        "cameo": ("committed", "credits", 1 + 3, 0, 3, 3, 0, 0),
        "metered": ("committed", "credits", 12, 0, 0, 0, 11, 0),
        "open": ("held", "credits", 0, 0, 0, 0, 0, 0),
    }
    assert jobs["paid"].lots == f"p1:{cost}" and jobs["cameo"].lots == "p1:4"
    assert jobs["open"].lots == "p1:1" and jobs["open"].resolved_ms is None
    assert jobs["paid"].resolved_ms is not None and jobs["paid"].held_ms <= jobs["paid"].resolved_ms
    assert jobs["metered"].product == "codex-usage" and jobs["paid"].plans_version == "2026-11-01"
    assert await books.jobs("acct", limit=1) == [list(jobs.values())[-1]]

    status = await asyncio.to_thread(cli.main, ["books", "jobs", "--account", "acct", "--books-url", books_url])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "\ncameo  sora  committed  4 credit(s) from p1:4, royalty 3, fees 3  held " in out, out
    assert "\nmetered  codex-usage  committed  12 credit(s) from p1:12, written off 11  held " in out, out
    assert out.startswith("free-1  sora  committed  free (1 unit)  held 2026-11-21T12:00:00"), out
    child = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "quota_sidecar", "books", "jobs",
                                                     "--account", "acct", "--books-url", books_url, "--json"],
                                    capture_output=True, text=True, timeout=60, check=False)
    assert child.returncode == 0, child
    by_id = {j["reservation_id"]: j for j in json.loads(child.stdout)["jobs"]}
    assert (by_id["metered"]["written_off"], by_id["refunded"]["state"]) == (11, "refunded")


# -- ListLedger: what each job cost and where it came from ----------------------------------------


async def test_ledger_lines_say_lots_royalties_and_returns(sidecar: Sidecar, clock: ManualClock,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    engine = sidecar.engine
    await engine.set_cameo("cam-a", "owner-1", 3, True)
    for i in range(100):  # the free allowance first: the job below must be paid with credits
        d = await engine.check_and_reserve("acct", "sora", f"free-{i}", V10)
        if d.outcome.funding is not Funding.FREE_QUOTA:
            assert not d.outcome.allowed
            break
        await engine.commit("acct", f"free-{i}")
    await engine.grant("acct", 2, "soon", T0_MS + 10 * DAY_MS)
    await engine.grant("acct", 10, "later", T0_MS + 90 * DAY_MS)
    job = JobParams(duration_seconds=15, resolution="720p", cameo_ids=("cam-a",))  # 2 + a fee of 3
    assert (await engine.check_and_reserve("acct", "sora", "job", job)).outcome.credits_held == 5
    await engine.commit("acct", "job", JobParams(duration_seconds=5, resolution="720p"))  # 1 + 3
    await engine.refund_job("acct", "job", "render failed")

    r = await sidecar.admin.ListLedger(pb.ListLedgerRequest(account_id="acct", page_size=1000))
    hold, commit, refund = (e for e in r.entries if e.reservation_id == "job")
    portions = lambda e: [(p.lot_id, p.credits) for p in e.lots]  # noqa: E731
    shares = lambda e: [(x.cameo_id, x.owner_account_id, x.credits) for x in e.royalties]  # noqa: E731
    # Held soonest-expiring first; the unused credit went back to the lot that expires last.
    assert (hold.type, hold.credits, hold.cost_credits, hold.fees_credits) == ("hold", 5, 2, 3)
    assert portions(hold) == [("soon", 2), ("later", 3)] and shares(hold) == [("cam-a", "owner-1", 3)]
    assert (commit.type, commit.credits, commit.credits_returned, commit.fees_credits) == ("commit", 4, 1, 3)
    assert portions(commit) == [("soon", 2), ("later", 2)] and shares(commit) == [("cam-a", "owner-1", 3)]
    assert commit.cost_credits == 0 and commit.credits_written_off == 0
    assert (refund.type, refund.credits, portions(refund)) == ("refund", 4, [("soon", 2), ("later", 2)])
    assert shares(refund) == [("cam-a", "owner-1", -3)]
    free = [e for e in r.entries if e.reservation_id == "free-0"]
    assert [(e.type, list(e.lots), list(e.royalties), e.free_units_delta) for e in free] == [
        ("hold", [], [], 1), ("commit", [], [], 0)]

    status = await asyncio.to_thread(cli.main, ["ledger", "--account", "acct", "--page-size", "1000",
                                                "--target", f"127.0.0.1:{sidecar.admin_port}"])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = [line for line in out.splitlines() if " job " in line]
    assert len(lines) == 3, out
    assert lines[0].endswith("(lots soon 2, later 3; royalty cam-a to owner-1 3)"), lines
    assert lines[1].endswith("(lots soon 2, later 2; royalty cam-a to owner-1 3; returned 1)"), lines
    assert lines[2].endswith("(lots soon 2, later 2; royalty cam-a to owner-1 -3)"), lines


async def test_a_codex_task_on_included_usage_then_past_its_credits(sidecar: Sidecar,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The README's codex steps on the wire and in the CLI: included usage, then a task whose usage
    passes its hold and the credits (overage draw) leaving a debt that the next purchase pays."""
    engine, admin = sidecar.engine, f"127.0.0.1:{sidecar.admin_port}"
    await engine.grant("alice", 9, "order-1001")
    estimate = pb.JobParams(input_tokens=80_000, output_tokens=5_000)  # 5 + 1.875 credits: 7
    r = await sidecar.quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id="alice", product="codex", reservation_id="task-1", params=estimate))
    assert (r.funding, r.allowance_unit, r.job_cost_credits, r.free_used) == (pb.FUNDING_FREE_QUOTA, "credits", 7, 7)
    c = await sidecar.quota.Commit(pb.CommitRequest(account_id="alice", reservation_id="task-1",
                                                    params=pb.JobParams(input_tokens=96_000, output_tokens=8_000)))
    assert (c.included_usage_credits, c.free_charged, c.credits_charged) == (9, 1, 0)
    q = await sidecar.quota.Quote(pb.QuoteRequest(account_id="alice", product="codex", params=estimate))
    assert (q.funding, q.allowance_unit, q.credits_held) == (pb.FUNDING_CREDITS, "credits", 7)  # 9 + 7 > 10
    await sidecar.quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id="alice", product="codex", reservation_id="task-2", params=estimate))
    c = await sidecar.quota.Commit(pb.CommitRequest(account_id="alice", reservation_id="task-2",
                                                    params=pb.JobParams(input_tokens=120_000, output_tokens=14_000)))
    assert (c.credits_charged, c.credits_drawn, c.debt_credits, c.included_usage_credits) == (13, 2, 4, 0)
    sora = await sidecar.quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id="alice", product="sora", reservation_id="job-1",
        params=pb.JobParams(duration_seconds=10, resolution="720p")))
    assert (sora.allowed, sora.allowance_unit, sora.denial.debt_credits) == (False, "generation", 4)
    g = await sidecar.admin.GrantCredits(pb.GrantCreditsRequest(account_id="alice", pack_id="pack_10",
                                                                purchase_id="order-1002"))
    assert (g.debt_paid_credits, g.credit_balance) == (4, 6)

    r2 = await sidecar.admin.ListLedger(pb.ListLedgerRequest(account_id="alice", page_size=1000))
    line = {(e.type, e.reservation_id or e.purchase_id): e for e in r2.entries}
    assert [line["hold", "task-1"].usage_credits, line["commit", "task-1"].usage_credits] == [7, 9]
    assert line["commit", "task-1"].free_units_delta == 2
    drawn = line["commit", "task-2"]
    assert (drawn.credits, drawn.credits_drawn, drawn.debt_delta, drawn.usage_credits) == (13, 2, 4, 0)
    assert [(p.lot_id, p.credits) for p in drawn.drawn_lots] == [("order-1001", 2)]
    assert line["debt_repay", "order-1002"].debt_delta == -4

    target = ["--target", f"127.0.0.1:{sidecar.port}"]
    assert await asyncio.to_thread(cli.main, ["quote", "--account", "bob", "--product", "codex", "--input-tokens",
                                              "80000", "--output-tokens", "5000", *target]) == 0
    status = await asyncio.to_thread(cli.main, ["ledger", "--account", "alice", "--target", admin])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "  funded by included usage: 7 credit(s) of usage would be held until " in out, out
    assert "  included usage: five_hour (last 5 h) 7/10 credits, resets 2026-11-21 17:00:00 UTC; weekly (per week) " \
           "7/40 credits, resets 2026-11-23 00:00:00 UTC\n" in out, out
    assert " commit     task-1                   9 credit(s) usage  available 9, held 0\n" in out, out
    assert "13 credit(s)       available 0, held 0  (lots order-1001 7; drawn 2 from lots order-1001 2; owed +4)" \
        in out, out
    assert "  (lots order-1002 4; owed -4)" in out, out


async def test_client_library_reports_included_usage_draw_and_debt(sidecar: Sidecar) -> None:
    async with QuotaClient(f"127.0.0.1:{sidecar.port}") as client:
        q = await client.quote("dee", "codex", {"input_tokens": 80_000, "output_tokens": 5_000})
        assert (q.allowed, q.funding, q.allowance_unit, q.job_cost_credits) == (True, "free", "credits", 7)
        r = await client.reserve("dee", "codex", {"input_tokens": 80_000, "output_tokens": 5_000},
                                 reservation_id="t1")
        assert (r.funding, r.allowance_unit, r.free_used, r.free_limit) == ("free", "credits", 7, 10)
        c = await client.commit("dee", "t1", {"input_tokens": 96_000, "output_tokens": 8_000})
        assert (c.included_usage_credits, c.credits_charged) == (9, 0)
        await sidecar.engine.grant("dee", 2, "p1")
        await sidecar.engine.grant("dee", 1, "p2")
        r = await client.reserve("dee", "codex", {"input_tokens": 32_000}, reservation_id="t2")  # 2: 9 + 2 > 10
        assert (r.funding, r.credits_held, r.credit_balance) == ("credits", 2, 1)
        c = await client.commit("dee", "t2", {"input_tokens": 96_000})  # 6: 2 held, 1 drawn, 3 owed
        assert (c.credits_charged, c.credits_drawn, c.debt_credits, c.included_usage_credits) == (6, 1, 3, 0)
        b = await client.balance("dee")
    codex = next(a for a in b.allowances if a.product == "codex")
    sora = next(a for a in b.allowances if a.product == "sora")
    assert (codex.unit, sora.unit) == ("credits", "generation")
    five_hour, weekly = codex.windows
    assert (five_hour.limit_id, five_hour.kind, five_hour.rolling_hours, five_hour.used, five_hour.limit,
            five_hour.left) == ("five_hour", "rolling", 5, 9, 10, 1)
    assert (weekly.kind, weekly.used, weekly.left) == ("week", 9, 31)
    assert five_hour.resets_at is not None and five_hour.resets_at.timestamp() * 1000 == T0_MS + 5 * 3_600_000
    assert b.debt_credits == c.debt_credits and b.credit_balance == 0
