"""Overage draw and account debt (issue 17, part 2): a metered job's usage past its hold is drawn
from the account's live lots (soonest expiry first), then owed as debt up to the plan's
max_debt_credits, the rest written off; the next credits in pay the debt first, and while any is
open every new job is denied PURCHASE_REQUIRED with the debt in the shortfall."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from quota_fixtures import T0_MS, Sidecar
from test_metered import metered_document, usage

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.client import QuotaClient
from quota_sidecar.domain.audit import audit_all, format_report
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import PlansError
from quota_sidecar.domain.model import DenialReason, JobParams
from quota_sidecar.domain.shipping import Shipper, ShipperOptions
from quota_sidecar.server.plans_file import parse_plans
from quota_sidecar.storage.store import RedisStore
from quota_sidecar.tools import cli

DAY_MS = 86_400_000
# mini: 113 credits per 1M output tokens. 100k -> 11.3 -> 12 held; 200k -> 23; 700k -> 79.1 -> 80.
HOLD = usage("mini", o=100_000)


def draw_document(**product: Any) -> dict[str, Any]:
    document = metered_document(overage="draw", **product)
    document["plans"]["pro"]["codex-usage"]["max_debt_credits"] = 50  # free and plus: 0 (the default)
    return document


@pytest.fixture
def engine(store: RedisStore, clock: ManualClock) -> QuotaEngine:
    """The default plans plus codex-usage under overage draw (the sidecar fixture serves it)."""
    return QuotaEngine(parse_plans(draw_document()), store, clock)


async def assert_audit_clean(engine: QuotaEngine, books: Any = None) -> None:
    audits = await audit_all(engine.store, books=books)
    assert all(a.ok for a in audits), format_report(audits)


async def last_entry(engine: QuotaEngine, kind: str) -> Any:
    entries, _ = await engine.ledger("acct")
    return [e for e in entries if e.type == kind][-1]


# --- plans file ---------------------------------------------------------------------------------


def test_max_debt_credits_is_validated_with_its_path() -> None:
    plans = parse_plans(draw_document())
    assert plans.product("codex-usage").overage == "draw"
    assert plans.rules("pro", "codex-usage").max_debt_credits == 50
    assert plans.rules("free", "codex-usage").max_debt_credits == 0
    for bad in (-1, "5", 1.5, 1_000_000_001, True):
        document = draw_document()
        document["plans"]["pro"]["codex-usage"]["max_debt_credits"] = bad
        with pytest.raises(PlansError, match=r"plans\.pro\.codex-usage\.max_debt_credits"):
            parse_plans(document)
    document = draw_document()
    document["plans"]["pro"]["sora"]["max_debt_credits"] = 5  # not a metered product
    with pytest.raises(PlansError, match=r"plans\.pro\.sora\.max_debt_credits"):
        parse_plans(document)
    document = draw_document()
    document["plans"]["pro"]["codex-usage"]["max_debt_credits"] = 1_000_000_000
    assert parse_plans(document).rules("pro", "codex-usage").max_debt_credits == 10**9


# --- draw ------------------------------------------------------------------------------------------


async def test_draw_within_the_lots_takes_the_soonest_expiring_first(engine: QuotaEngine, clock: ManualClock) -> None:
    await engine.set_account("acct", plan="pro")
    now = clock.local_now_ms()
    await engine.grant("acct", 100, "late")  # 12 months
    await engine.grant("acct", 5, "mid", expires_ms=now + 10 * DAY_MS)
    await engine.grant("acct", 15, "soon", expires_ms=now + 5 * DAY_MS)
    d = await engine.check_and_reserve("acct", "codex-usage", "r1", HOLD)
    assert d.outcome.credits_held == 12  # all from "soon": 3 left there
    c = await engine.commit("acct", "r1", usage("mini", o=200_000))  # 23: 11 past the hold
    assert (c.credits_charged, c.credits_drawn, c.debt_credits, c.written_off) == (23, 11, 0, 0)
    assert (c.credits_refunded, c.credit_balance) == (0, 97)
    entry = await last_entry(engine, "commit")
    assert entry.fields["drawn_lots"] == "soon:3,mid:5,late:3" and entry.fields["lots"] == "soon:12"
    assert (entry.deltas.spent, entry.deltas.held, entry.deltas.debt, entry.deltas.available) == (23, -12, 0, -11)
    lots = {lot.lot_id: lot.credits_left for lot in (await engine.balance("acct")).lots}
    assert lots == {"late": 97}
    account = await engine.account("acct")
    assert account.month_spend_credits == 23  # the drawn credits count in the month's spend
    await assert_audit_clean(engine)


async def test_draw_past_the_lots_opens_debt_up_to_the_bound(engine: QuotaEngine) -> None:
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 14, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "r1", HOLD)  # 12 held, 2 left
    c = await engine.commit("acct", "r1", usage("mini", o=700_000))  # 80: 68 past the hold
    # 2 drawn, 50 owed (pro's bound), 16 written off.
    assert (c.credits_charged, c.credits_drawn, c.debt_credits, c.written_off, c.credit_balance) == (64, 2, 50, 16, 0)
    # A retry replays the outcome: no second draw, no more debt.
    again = await engine.commit("acct", "r1", usage("mini", o=700_000))
    assert again.replayed and (again.credits_charged, again.credits_drawn, again.debt_credits,
                               again.written_off) == (64, 2, 50, 16)
    entry = await last_entry(engine, "commit")
    assert (entry.fields["drawn"], entry.fields["debt"], entry.fields["wo"]) == ("2", "50", "16")
    assert (entry.deltas.spent, entry.deltas.held, entry.deltas.debt, entry.deltas.available) == (64, -12, 50, -2)
    balance = await engine.balance("acct")
    assert (balance.credit_balance, balance.debt_credits) == (0, 50)
    await assert_audit_clean(engine)


async def test_a_commit_never_raises_the_debt_past_the_bound(engine: QuotaEngine) -> None:
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 24, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "r1", HOLD)
    await engine.check_and_reserve("acct", "codex-usage", "r2", HOLD)  # both held before any debt
    first = await engine.commit("acct", "r1", usage("mini", o=500_000))  # 57: 45 past, owed
    assert (first.credits_drawn, first.debt_credits, first.written_off) == (0, 45, 0)
    second = await engine.commit("acct", "r2", usage("mini", o=500_000))  # 45 past: 5 more owed, 40 off
    assert (second.credits_charged, second.debt_credits, second.written_off) == (17, 5, 40)
    assert (await engine.balance("acct")).debt_credits == 50
    await assert_audit_clean(engine)


async def test_no_debt_allowed_writes_off_past_the_lots(engine: QuotaEngine) -> None:
    await engine.grant("acct", 20, "p1")  # the free plan: max_debt_credits 0
    await engine.check_and_reserve("acct", "codex-usage", "r1", HOLD)
    c = await engine.commit("acct", "r1", usage("mini", o=700_000))  # 80: 8 drawn, 60 written off
    assert (c.credits_charged, c.credits_drawn, c.debt_credits, c.written_off) == (20, 8, 0, 60)
    assert "debt" not in (await last_entry(engine, "commit")).fields or \
        (await last_entry(engine, "commit")).fields["debt"] == "0"
    assert (await engine.balance("acct")).debt_credits == 0
    d = await engine.check_and_reserve("acct", "codex-usage", "r2", JobParams())
    assert d.outcome.denial is DenialReason.PURCHASE_REQUIRED and d.outcome.debt_credits == 0
    await assert_audit_clean(engine)


async def test_below_the_hold_draw_refunds_as_usual(engine: QuotaEngine) -> None:
    await engine.grant("acct", 20, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "r1", HOLD)
    c = await engine.commit("acct", "r1", usage("mini", o=50_000))  # 5.65 -> 6
    assert (c.credits_charged, c.credits_refunded, c.credits_drawn, c.debt_credits) == (6, 6, 0, 0)
    await assert_audit_clean(engine)


# --- debt: denials and payment ------------------------------------------------------------------------


async def open_debt(engine: QuotaEngine, credits: int = 14) -> None:
    """pro, `credits` granted, one job drawn past them: 50 owed."""
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", credits, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "r1", HOLD)
    await engine.commit("acct", "r1", usage("mini", o=700_000))


async def test_open_debt_denies_every_new_job_in_reserve_and_quote(engine: QuotaEngine) -> None:
    await open_debt(engine)
    for rid, product, job, cost in (("n1", "codex-usage", HOLD, 12),
                                    ("n2", "sora", JobParams(duration_seconds=5, resolution="480p"), 0)):
        quoted = await engine.quote("acct", product, rid, job)
        decided = await engine.check_and_reserve("acct", product, rid, job)
        for d in (quoted, decided):
            assert not d.outcome.allowed and d.outcome.denial is DenialReason.PURCHASE_REQUIRED, rid
            assert d.outcome.debt_credits == 50 and d.outcome.credits_short == 50 + cost, rid
            assert d.offers and "owes 50" in d.denial_message
    await assert_audit_clean(engine)


async def test_a_grant_pays_the_debt_first(engine: QuotaEngine) -> None:
    await open_debt(engine)
    partial = await engine.grant("acct", 30, "p2")
    assert (partial.debt_paid_credits, partial.credit_balance) == (30, 0)
    repay = await last_entry(engine, "debt_repay")
    assert (repay.fields["pid"], repay.fields["credits"], repay.fields["lots"]) == ("p2", "30", "p2:30")
    assert (repay.deltas.debt, repay.deltas.available) == (-30, -30)
    assert (await engine.balance("acct")).debt_credits == 20
    d = await engine.check_and_reserve("acct", "codex-usage", "n1", HOLD)
    assert d.outcome.denial is DenialReason.PURCHASE_REQUIRED and d.outcome.credits_short == 32
    whole = await engine.grant("acct", 100, "p3")
    assert (whole.debt_paid_credits, whole.credit_balance) == (20, 80)
    assert (await engine.grant("acct", 100, "p3")).debt_paid_credits == 20  # a replay says it again
    assert (await engine.balance("acct")).debt_credits == 0
    d = await engine.check_and_reserve("acct", "codex-usage", "n1", HOLD)
    assert d.outcome.allowed and d.outcome.credits_held == 12
    await assert_audit_clean(engine)


async def test_credits_a_release_returns_pay_the_debt_at_the_next_reserve(engine: QuotaEngine) -> None:
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 30, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "a", HOLD)
    await engine.check_and_reserve("acct", "codex-usage", "b", HOLD)  # 6 left
    c = await engine.commit("acct", "a", usage("mini", o=700_000))  # 68 past: 6 drawn, 50 owed
    assert (c.credits_drawn, c.debt_credits, c.written_off) == (6, 50, 12)
    await engine.release("acct", "b")  # 12 back to p1: the commit of b is unaffected by the debt
    balance = await engine.balance("acct")
    assert (balance.credit_balance, balance.debt_credits) == (12, 50)
    q = await engine.quote("acct", "codex-usage", "n1", HOLD)  # settles like reserve would
    assert q.outcome.credits_short == 38 + 12 and q.outcome.debt_credits == 38
    repay = await last_entry(engine, "debt_repay")
    assert (repay.fields["credits"], repay.fields.get("pid")) == ("12", None)
    balance = await engine.balance("acct")
    assert (balance.credit_balance, balance.debt_credits) == (0, 38)
    await assert_audit_clean(engine)


async def test_existing_holds_still_commit_and_release_while_debt_is_open(engine: QuotaEngine) -> None:
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 30, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "a", HOLD)
    await engine.check_and_reserve("acct", "codex-usage", "b", HOLD)
    await engine.commit("acct", "a", usage("mini", o=700_000))
    replay = await engine.check_and_reserve("acct", "codex-usage", "b", HOLD)
    assert replay.outcome.allowed and replay.outcome.replayed
    c = await engine.commit("acct", "b", usage("mini", o=50_000))
    assert (c.credits_charged, c.credits_refunded) == (6, 6)
    await assert_audit_clean(engine)


async def test_a_refund_cancels_the_open_debt_of_its_job(engine: QuotaEngine) -> None:
    await open_debt(engine)
    await engine.grant("acct", 20, "p2")  # pays 20 of the 50
    r = await engine.refund_job("acct", "r1")
    # 12 held + 2 drawn back to p1, the 30 still owed cancelled; the 20 already repaid stay spent.
    assert r.credits_refunded == 44
    balance = await engine.balance("acct")
    assert (balance.debt_credits, balance.credit_balance) == (0, 14)
    refund = await last_entry(engine, "refund")
    assert refund.fields["debt_cancelled"] == "30" and refund.deltas.debt == -30
    await assert_audit_clean(engine)


# --- the books -------------------------------------------------------------------------------------


async def test_debt_movements_reach_the_books(engine: QuotaEngine, store: RedisStore, books) -> None:
    await open_debt(engine)
    await engine.grant("acct", 30, "p2")  # 30 repaid, 20 still owed
    await Shipper(store, books, ManualClock(T0_MS), owner="t", options=ShipperOptions()).drain()
    shipped = await books.account_entries("acct")
    commit = [e for e in shipped if e.type == "commit"][-1]
    assert (commit.deltas.debt, commit.fields["drawn"], commit.fields["debt"]) == (50, "2", "50")
    repay = [e for e in shipped if e.type == "debt_repay"][-1]
    assert repay.deltas.debt == -30 and repay.fields["pid"] == "p2"
    engine.books = books
    page, _ = await engine.ledger("acct")
    assert page[-1].totals_after.debt == 20 and page[-1].totals_after.available == 0
    month = time.strftime("%Y-%m", time.gmtime(T0_MS / 1000))
    report = await books.report(month)
    assert (report.debt_opened, report.debt_repaid, report.closing.debt) == (50, 30, 20)
    assert report.balanced
    jobs = await books.jobs("acct")
    assert (jobs[-1].credits_drawn, jobs[-1].debt_opened, jobs[-1].written_off) == (2, 50, 16)
    await assert_audit_clean(engine, books)


def test_the_audit_finds_a_debt_changed_outside_the_scripts() -> None:
    from quota_sidecar.domain.audit import audit_state
    state: dict[str, Any] = {"acct": {"debt": "-3"}, "outbox": [], "seq": 0}
    checks = {v.check for v in audit_state("acct", state).violations}
    assert {"debt_negative", "conservation", "ledger_debt"} <= checks


# --- gRPC, client, CLI -----------------------------------------------------------------------------


async def test_debt_through_grpc_client_and_cli(sidecar: Sidecar, capsys: pytest.CaptureFixture[str]) -> None:
    await open_debt(sidecar.engine)
    balance = await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id="acct"))
    assert balance.debt_credits == 50
    r = await sidecar.quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id="acct", product="codex-usage", reservation_id="g1", params=pb.JobParams(model="mini")))
    assert not r.allowed and (r.denial.debt_credits, r.denial.credits_short) == (50, 55)
    entries = await sidecar.admin.ListLedger(pb.ListLedgerRequest(account_id="acct"))
    assert [e.debt_delta for e in entries.entries if e.type == "commit"] == [50]
    target = f"127.0.0.1:{sidecar.port}"
    async with QuotaClient(target) as client:
        assert (await client.balance("acct")).debt_credits == 50
        quote = await client.quote("acct", "codex-usage", {"model": "mini"})
        assert quote.denial is not None and quote.denial.debt_credits == 50
    status = await asyncio.to_thread(cli.main, ["balance", "--account", "acct", "--target", target])
    out = capsys.readouterr().out
    assert status == 0 and "owed 50" in out, out
    grant = await sidecar.admin.GrantCredits(pb.GrantCreditsRequest(account_id="acct", credits=60, purchase_id="p9"))
    assert (grant.debt_paid_credits, grant.credit_balance) == (50, 10)
    await assert_audit_clean(sidecar.engine)


async def test_commit_response_reports_the_draw(sidecar: Sidecar) -> None:
    await sidecar.engine.set_account("acct", plan="pro")
    await sidecar.engine.grant("acct", 14, "p1")
    await sidecar.engine.check_and_reserve("acct", "codex-usage", "c1", HOLD)
    c = await sidecar.quota.Commit(pb.CommitRequest(account_id="acct", reservation_id="c1",
                                                    params=pb.JobParams(model="mini", output_tokens=700_000)))
    assert (c.credits_charged, c.credits_drawn, c.debt_credits, c.credits_written_off) == (64, 2, 50, 16)


async def test_an_all_or_nothing_batch_repays_for_real_and_is_refused_while_debt_is_open(
        engine: QuotaEngine) -> None:
    from quota_sidecar.domain.engine import ReserveItem
    await engine.set_account("acct", plan="pro")
    await engine.grant("acct", 30, "p1")
    await engine.check_and_reserve("acct", "codex-usage", "a", HOLD)
    await engine.check_and_reserve("acct", "codex-usage", "b", HOLD)
    await engine.commit("acct", "a", usage("mini", o=700_000))  # 6 drawn, 50 owed
    await engine.release("acct", "b")  # 12 back to the lots
    results = await engine.check_and_reserve_all([ReserveItem("acct", "codex-usage", f"n{i}", HOLD)
                                                 for i in range(2)])
    assert all(not r.outcome.allowed and r.outcome.debt_credits == 38 for r in results)  # type: ignore[union-attr]
    balance = await engine.balance("acct")
    assert (balance.credit_balance, balance.debt_credits) == (0, 38)  # the repayment stands
    await assert_audit_clean(engine)
