"""Royalties for cameo owners (issue 17, part 3): a job's cameo fees, stamped on its hold and
recorded per owner at commit; release, expiry and refund give them back; the books' royalties."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from quota_fixtures import T0_MS, Sidecar

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.client import Cameo, Denied, QuotaClient, SyncAdminClient
from quota_sidecar.domain.audit import audit_all, format_report
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine, ReserveItem
from quota_sidecar.domain.errors import BatchAborted, InvalidArgument
from quota_sidecar.domain.finance import render_text, to_json
from quota_sidecar.domain.model import Decision, DenialReason, Funding, JobParams
from quota_sidecar.domain.shipping import Shipper, ShipperOptions
from quota_sidecar.tools import cli

VIDEO = JobParams(duration_seconds=10, resolution="720p")  # 1 credit


def outbox(entries: list, kind: str) -> list:
    return [e for e in entries if e.type == kind]


async def use_up_free(engine: QuotaEngine, account: str) -> None:
    for i in range(100):
        d = await engine.check_and_reserve(account, "sora", f"free-{i}", VIDEO)
        if not d.outcome.allowed:
            return
        if d.outcome.funding is not Funding.FREE_QUOTA:
            await engine.release(account, f"free-{i}")
            return
        await engine.commit(account, f"free-{i}")
    raise AssertionError("free allowance never ran out")


async def test_fee_added_and_royalty_recorded_at_commit(engine: QuotaEngine) -> None:
    await engine.set_cameo("cam-a", "owner-1", 3, True)
    await engine.set_cameo("cam-b", "owner-2", 2, True)
    await use_up_free(engine, "acct")
    await engine.grant("acct", 20, "p1")
    job = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a", "cam-b"))
    d = await engine.check_and_reserve("acct", "sora", "r1", job)
    assert d.outcome.allowed and d.outcome.funding is Funding.CREDITS
    assert d.outcome.cost_credits == 1 + 3 + 2 and d.outcome.credits_held == 6 and d.outcome.fees_credits == 5
    # A partial commit still charges the fees whole (per use, not per second).
    r = await engine.commit("acct", "r1", JobParams(duration_seconds=5, resolution="720p"))
    assert r.credits_charged == 6
    entries, _ = await engine.ledger("acct")
    commit = outbox(entries, "commit")[-1]
    assert commit.fields["roy"] == "cam-a|owner-1|3,cam-b|owner-2|2" and commit.fields["fees"] == "5"
    # Nothing was written to the owners' accounts.
    assert (await engine.ledger("owner-1"))[0] == []
    audits = await audit_all(engine.store)
    assert all(a.ok for a in audits), format_report(audits)


async def test_unknown_and_inactive_cameo_not_entitled(engine: QuotaEngine) -> None:
    await engine.grant("acct", 20, "p1")
    d = await engine.check_and_reserve("acct", "sora", "r1", JobParams(duration_seconds=10, resolution="720p",
                                                                       cameo_ids=("nobody",)))
    assert not d.outcome.allowed and d.outcome.denial is DenialReason.NOT_ENTITLED
    assert d.outcome.cameo_id == "nobody" and "nobody" in d.denial_message
    await engine.set_cameo("cam-a", "owner-1", 3, False)
    d = await engine.check_and_reserve("acct", "sora", "r2", JobParams(duration_seconds=10, resolution="720p",
                                                                       cameo_ids=("cam-a",)))
    assert d.outcome.denial is DenialReason.NOT_ENTITLED and d.outcome.cameo_id == "cam-a"
    q = await engine.quote("acct", "sora", "", JobParams(duration_seconds=10, resolution="720p",
                                                         cameo_ids=("cam-a",)))
    assert q.outcome.denial is DenialReason.NOT_ENTITLED and q.outcome.cameo_id == "cam-a"


async def test_cameo_ids_validated(engine: QuotaEngine) -> None:
    with pytest.raises(InvalidArgument):
        await engine.check_and_reserve("acct", "sora", "r1", JobParams(duration_seconds=10, resolution="720p",
                                                                       cameo_ids=tuple(f"c{i}" for i in range(9))))
    with pytest.raises(InvalidArgument):
        await engine.check_and_reserve("acct", "sora", "r1", JobParams(duration_seconds=10, resolution="720p",
                                                                       cameo_ids=("c", "c")))
    with pytest.raises(InvalidArgument):
        await engine.set_cameo("c", "owner", -1, True)


async def test_free_job_pays_fees_from_credits(engine: QuotaEngine) -> None:
    await engine.set_cameo("cam-a", "owner-1", 3, True)
    job = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a",))
    # No credits: the generation would be free, but the fee must be paid.
    d = await engine.check_and_reserve("acct", "sora", "r1", job)
    assert d.outcome.denial is DenialReason.PURCHASE_REQUIRED and d.outcome.credits_short == 3
    assert "cameo fees" in d.denial_message and d.offers
    await engine.grant("acct", 2, "p1")
    d = await engine.check_and_reserve("acct", "sora", "r1", job)
    assert d.outcome.denial is DenialReason.PURCHASE_REQUIRED and d.outcome.credits_short == 1
    await engine.grant("acct", 5, "p2")
    d = await engine.check_and_reserve("acct", "sora", "r1", job)
    assert d.outcome.allowed and d.outcome.funding is Funding.FREE_QUOTA and d.outcome.credits_held == 3
    assert d.outcome.credit_balance == 4
    r = await engine.commit("acct", "r1")
    assert r.credits_charged == 3 and r.free_charged == 1
    refund = await engine.refund_job("acct", "r1", "failed render")
    assert refund.credits_refunded == 3
    entries, _ = await engine.ledger("acct")
    assert outbox(entries, "commit")[-1].fields["roy"] == "cam-a|owner-1|3"
    assert outbox(entries, "refund")[-1].fields["roy"] == "cam-a|owner-1|-3"
    assert (await engine.balance("acct")).credit_balance == 7
    audits = await audit_all(engine.store)
    assert all(a.ok for a in audits), format_report(audits)


async def test_release_and_expiry_give_fees_back(engine: QuotaEngine, clock) -> None:  # noqa: F811
    await engine.set_cameo("cam-a", "owner-1", 3, True)
    await engine.grant("acct", 10, "p1")
    job = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a",))
    d = await engine.check_and_reserve("acct", "sora", "r1", job)
    assert d.outcome.allowed and d.outcome.credits_held == 3
    await engine.release("acct", "r1")
    assert (await engine.balance("acct")).credit_balance == 10
    d = await engine.check_and_reserve("acct", "sora", "r2", job, ttl_seconds=60)
    assert d.outcome.allowed
    clock.advance(seconds=120)
    assert (await engine.balance("acct")).credit_balance == 10
    entries, _ = await engine.ledger("acct")
    assert outbox(entries, "release")[-1].fields["fees"] == "3"
    assert "roy" not in outbox(entries, "release")[-1].fields
    audits = await audit_all(engine.store)
    assert all(a.ok for a in audits), format_report(audits)


async def test_books_report_royalties_per_owner(engine: QuotaEngine, store, books) -> None:
    await engine.set_cameo("cam-a", "owner-1", 3, True)
    await engine.set_cameo("cam-b", "owner-2", 2, True)
    await engine.grant("acct", 50, "p1")
    await engine.grant("other", 50, "p2")
    both = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a", "cam-b"))
    only_a = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a",))
    for account, rid, job in (("acct", "j1", both), ("acct", "j2", only_a), ("other", "j3", only_a),
                              ("other", "j4", only_a)):
        assert (await engine.check_and_reserve(account, "sora", rid, job)).outcome.allowed
        await engine.commit(account, rid)
    await engine.refund_job("other", "j4", "render failed")
    assert (await engine.check_and_reserve("acct", "sora", "j5", both)).outcome.allowed
    await engine.release("acct", "j5")  # released: no royalty
    await Shipper(store, books, ManualClock(T0_MS), owner="t", options=ShipperOptions()).drain()
    report = await books.report("2026-11")
    assert report.royalties_by_owner() == {"owner-1": 9, "owner-2": 2}
    by_cameo = {(r.owner_account_id, r.cameo_id): (r.uses, r.refunds, r.credits) for r in report.royalties}
    assert by_cameo == {("owner-1", "cam-a"): (4, 1, 9), ("owner-2", "cam-b"): (1, 0, 2)}
    assert report.balanced
    text = render_text(report)
    assert "Royalties owed" in text and "owner-1" in text and "cam-a" in text
    assert to_json(report)["royalties_by_owner"] == [
        {"owner_account_id": "owner-1", "credits": 9,
         "cameos": [{"cameo_id": "cam-a", "uses": 4, "refunds": 1, "credits": 9}]},
        {"owner_account_id": "owner-2", "credits": 2,
         "cameos": [{"cameo_id": "cam-b", "uses": 1, "refunds": 0, "credits": 2}]}]
    audits = await audit_all(store, books=books)
    assert all(a.ok for a in audits), format_report(audits)


async def test_grpc_client_and_cli(sidecar: Sidecar, capsys: pytest.CaptureFixture[str]) -> None:
    admin = f"127.0.0.1:{sidecar.admin_port}"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await sidecar.admin.GetCameo(pb.GetCameoRequest(cameo_id="cam-x"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await sidecar.admin.SetCameo(pb.SetCameoRequest(cameo_id="a|b", owner_account_id="o", fee_credits=1))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def admin_calls() -> tuple[Cameo, Cameo]:
        with SyncAdminClient(admin) as client:
            client.set_cameo("cam-x", "owner-9", 4)
            return client.set_cameo("cam-y", "owner-9", 1, active=False), client.get_cameo("cam-x")
    inactive, got = await asyncio.to_thread(admin_calls)
    assert (inactive.active, got.owner_account_id, got.fee_credits, got.active) == (False, "owner-9", 4, True)
    await sidecar.engine.grant("v", 10, "p1")

    async with QuotaClient(f"127.0.0.1:{sidecar.port}") as client:
        params = {"duration_seconds": 10, "resolution": "720p", "cameo_ids": ["cam-x"]}
        q = await client.quote("v", "sora", params)
        assert (q.allowed, q.funding, q.credits_held, q.cameo_fees_credits, q.job_cost_credits) == (
            True, "free", 4, 4, 5)
        r = await client.reserve("v", "sora", params)
        assert (r.funding, r.credits_held, r.cameo_fees_credits) == ("free", 4, 4)
        with pytest.raises(Denied) as denied:
            await client.reserve("v", "sora", {**params, "cameo_ids": ["cam-y"]})
        assert denied.value.reason == "NOT_ENTITLED" and "cam-y" in denied.value.denial_message

    status = await asyncio.to_thread(cli.main, ["set-cameo", "--cameo", "cam-z", "--owner", "owner-9", "--fee",
                                                     "2", "--target", admin])
    assert status == 0 and "CAMEO  cam-z: owner owner-9, fee 2 credit(s) per job, active" in capsys.readouterr().out
    status = await asyncio.to_thread(cli.main, ["cameo", "--cameo", "cam-z", "--target", admin])
    assert status == 0 and "fee 2" in capsys.readouterr().out
    status = await asyncio.to_thread(cli.main, [
        "reserve", "--account", "v", "--product", "sora", "--duration", "10", "--resolution", "720p",
        "--cameo", "cam-x", "--cameo", "cam-z", "--target", f"127.0.0.1:{sidecar.port}"])
    out = capsys.readouterr().out
    assert status == 0 and "1 free unit + 6 credit(s) of cameo fees" in out and "(cameo fees 6)" in out, out


async def test_free_job_with_fees_released_expired_and_undone_in_a_batch(engine: QuotaEngine, clock) -> None:  # noqa: F811
    await engine.set_cameo("cam-a", "owner-1", 3, True)
    await engine.grant("acct", 5, "p1")
    job = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a",))
    d = await engine.check_and_reserve("acct", "sora", "r1", job)
    assert (d.outcome.funding, d.outcome.credits_held) == (Funding.FREE_QUOTA, 3)
    released = await engine.release("acct", "r1")
    assert (released.credits_refunded, released.free_refunded, released.credit_balance) == (3, 1, 5)
    assert (await engine.check_and_reserve("acct", "sora", "r2", job, ttl_seconds=60)).outcome.allowed
    clock.advance(seconds=120)
    balance = await engine.balance("acct")
    assert balance.credit_balance == 5 and balance.credits_held == 0
    # all_or_nothing: the second item cannot pay its fees, so the first hold (unit and fees) is undone.
    out = await engine.check_and_reserve_all([ReserveItem("acct", "sora", "b1", job),
                                              ReserveItem("acct", "sora", "b2", job)])
    assert isinstance(out[0], BatchAborted)
    assert isinstance(out[1], Decision) and out[1].outcome.denial is DenialReason.PURCHASE_REQUIRED
    assert out[1].outcome.credits_short == 1
    balance = await engine.balance("acct")
    assert balance.credit_balance == 5 and balance.credits_held == 0 and balance.holds == ()
    audits = await audit_all(engine.store)
    assert all(a.ok for a in audits), format_report(audits)


async def test_audit_proves_royalties_conserved(engine: QuotaEngine, store) -> None:  # noqa: F811
    """Clean through hold, commit, refund and release; a share changed anywhere is a violation."""
    from dataclasses import replace

    from quota_sidecar.domain.audit import audit_state

    await engine.set_cameo("cam-a", "owner-1", 3, True)
    await engine.set_cameo("cam-b", "owner-2", 2, True)
    await use_up_free(engine, "acct")
    await engine.grant("acct", 50, "p1")
    job = JobParams(duration_seconds=10, resolution="720p", cameo_ids=("cam-a", "cam-b"))
    for rid in ("kept", "refunded", "released"):
        await engine.check_and_reserve("acct", "sora", rid, job)
    await engine.commit("acct", "kept")
    await engine.commit("acct", "refunded")
    await engine.refund_job("acct", "refunded", "failed")
    await engine.release("acct", "released")
    state = await store.raw_state("acct")
    assert audit_state("acct", state).ok

    def tampered(kind: str, rid: str, roy: str) -> list[str]:
        entries = [replace(e, fields={**e.fields, "roy": roy}) if (e.type, e.fields.get("rid")) == (kind, rid) else e
                   for e in state["outbox"]]
        audit = audit_state("acct", {**state, "outbox": entries})
        return [v.detail for v in audit.violations if v.check == "royalty"]

    moved = tampered("commit", "kept", "cam-a|owner-1|4,cam-b|owner-2|1")  # the right sum, the wrong owner
    assert len(moved) == 1 and "differ from those stamped on its hold" in moved[0], moved
    short = tampered("commit", "kept", "cam-a|owner-1|3")
    assert len(short) == 2 and "do not add up to 5 credit(s) of fees" in short[0], short
    kept = tampered("refund", "refunded", "cam-a|owner-1|-3")
    assert len(kept) == 2 and "do not add up to -5 credit(s)" in kept[0], kept
    paid = tampered("release", "released", "cam-a|owner-1|3,cam-b|owner-2|2")
    assert paid == [f"release {next(e.entry_id for e in state['outbox'] if e.type == 'release')} of 'released' "
                    "pays royalties: cam-a|owner-1|3,cam-b|owner-2|2"], paid
