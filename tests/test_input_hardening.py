"""Issue 14: bad input to the admin API is INVALID_ARGUMENT naming the field and changes nothing;
text the CLI prints from the server cannot drive the terminal.

Everything goes through the real gRPC servers (tests/quota_fixtures.py) against the session's real
Redis; "changes nothing" is checked by dumping every key of the test's prefix before and after.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any, Callable

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2
from quota_fixtures import T0_MS, Sidecar, key, keys_with_prefix

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.domain.model import AccountChanges, AutoTopUp, CreditSource, Stamp

pytestmark = pytest.mark.all_redis_versions

MAX = 1_000_000_000
DAY_S = 86_400
V10 = pb.JobParams(duration_seconds=10, resolution="720p")


def bad_fields(err: grpc.aio.AioRpcError) -> list[str]:
    """The fields of the google.rpc.BadRequest detail of an INVALID_ARGUMENT error."""
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    for k, value in err.trailing_metadata() or ():
        if k == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    return [v.field for v in bad.field_violations]
    raise AssertionError("no BadRequest detail")


async def snapshot(client: aioredis.Redis, prefix: str) -> dict[str, bytes]:
    return {k: await client.dump(k) for k in await keys_with_prefix(client, prefix)}


async def refused(call, field: str) -> str:
    """Awaits ``call``, which must fail INVALID_ARGUMENT naming exactly ``field``; returns the message."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert bad_fields(err.value) == [field], err.value.details()
    return err.value.details()


async def busy_account(sc: Sidecar, account: str = "a") -> None:
    """An account with a plan, an auto top-up, credits, a committed job and an override."""
    await sc.admin.SetAccount(pb.SetAccountRequest(
        account_id=account, plan="pro", auto_topup=pb.AutoTopUp(enabled=True, threshold_credits=3, pack_id="pack_10"),
        overrides=[pb.LimitOverride(product="codex", max_concurrent=2, limits=[
            pb.LimitSpec(limit_id="contract", kind=pb.LIMIT_KIND_WEEK, free=40)])]))
    await sc.admin.GrantCredits(pb.GrantCreditsRequest(account_id=account, credits=10, purchase_id="p1"))
    assert (await sc.quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id=account, product="sora", reservation_id="job", params=V10))).allowed
    await sc.quota.Commit(pb.CommitRequest(account_id=account, reservation_id="job"))


# --------------------------------------------------------------------------- item 4: auto top-up


BAD_TOPUPS = [
    # The review's case: disabled, so it used to skip validation, write, and break GetAccount.
    ("auto_topup.threshold_credits", pb.AutoTopUp(enabled=False, threshold_credits=2**63 - 1,
                                                  pack_id="no-such-pack")),
    ("auto_topup.threshold_credits", pb.AutoTopUp(enabled=False, threshold_credits=-1)),
    ("auto_topup.threshold_credits", pb.AutoTopUp(enabled=False, threshold_credits=MAX + 1, pack_id="pack_10")),
    ("auto_topup.pack_id", pb.AutoTopUp(enabled=False, threshold_credits=0, pack_id="no-such-pack")),
    ("auto_topup.threshold_credits", pb.AutoTopUp(enabled=True, threshold_credits=0, pack_id="pack_10")),
    ("auto_topup.threshold_credits", pb.AutoTopUp(enabled=True, threshold_credits=-2**63, pack_id="pack_10")),
    ("auto_topup.pack_id", pb.AutoTopUp(enabled=True, threshold_credits=5)),
    ("auto_topup.pack_id", pb.AutoTopUp(enabled=True, threshold_credits=5, pack_id="no-such-pack")),
]


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("field,topup", BAD_TOPUPS,
                         ids=[f"{f.split('.')[1]}-{i}" for i, (f, _) in enumerate(BAD_TOPUPS)])
async def test_bad_auto_topup_is_refused_whatever_enabled_says_and_writes_nothing(
        sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str, field: str, topup: pb.AutoTopUp) -> None:
    await busy_account(sidecar)
    before = await snapshot(redis_client, key_prefix)
    await refused(sidecar.admin.SetAccount(pb.SetAccountRequest(account_id="a", auto_topup=topup)), field)
    assert await snapshot(redis_client, key_prefix) == before
    account = await sidecar.admin.GetAccount(pb.GetAccountRequest(account_id="a"))
    assert (account.auto_topup.enabled, account.auto_topup.threshold_credits, account.auto_topup.pack_id) == (
        True, 3, "pack_10")


ACCEPTED_TOPUPS = [
    pb.AutoTopUp(enabled=False),  # 0 and no pack: nothing to trigger
    pb.AutoTopUp(enabled=False, threshold_credits=MAX, pack_id="pack_10"),
    pb.AutoTopUp(enabled=True, threshold_credits=1, pack_id="pack_10"),
    pb.AutoTopUp(enabled=True, threshold_credits=MAX, pack_id="pack_10"),
]


@pytest.mark.parametrize("topup", ACCEPTED_TOPUPS, ids=range(len(ACCEPTED_TOPUPS)))
async def test_every_accepted_setting_reads_back_exactly(sidecar: Sidecar, topup: pb.AutoTopUp) -> None:
    # GetAccount answered UNKNOWN because the scripts return numbers through cjson (14 significant
    # digits): 2^63-1 came back as 9223372036854800384, which protobuf refuses in an int64. The API's
    # bounds (at most 10^9 everywhere) keep every stored number exact; these are the extremes.
    request = pb.SetAccountRequest(account_id="edge", monthly_spend_cap_credits=MAX, auto_topup=topup, overrides=[
        pb.LimitOverride(product="codex", max_concurrent=MAX, limits=[
            pb.LimitSpec(limit_id="big", kind=pb.LIMIT_KIND_DAY, free=MAX)])])
    set_reply = await sidecar.admin.SetAccount(request)
    account = await sidecar.admin.GetAccount(pb.GetAccountRequest(account_id="edge"))
    for reply in (set_reply, account):
        assert reply.auto_topup == topup and reply.monthly_spend_cap_credits == MAX
        assert list(reply.overrides) == list(request.overrides)


async def test_an_account_poisoned_before_the_fix_is_repaired_by_a_valid_set_account(
        sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str) -> None:
    # What the old code wrote for the review's request; GetAccount failed on it from then on.
    await redis_client.hset(key(key_prefix, "old", "acct"),
                            mapping={"at_on": "0", "at_thr": str(2**63 - 1), "at_pack": "no-such-pack"})
    reply = await sidecar.admin.SetAccount(pb.SetAccountRequest(account_id="old", auto_topup=pb.AutoTopUp()))
    assert (reply.auto_topup.enabled, reply.auto_topup.threshold_credits) == (False, 0)
    account = await sidecar.admin.GetAccount(pb.GetAccountRequest(account_id="old"))
    assert account.auto_topup.threshold_credits == 0


# --------------------------------------------------------------------------- item 7: Timestamps


def grant_expiring(seconds: int, nanos: int = 0) -> pb.GrantCreditsRequest:
    return pb.GrantCreditsRequest(account_id="a", credits=5, purchase_id="p2",
                                  expires_at=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))


T0_S = T0_MS // 1000
BAD_EXPIRIES = [
    ("year 10000", 253_402_300_800, 0),
    ("+2^62 s", 2**62, 0),
    ("-2^62 s", -2**62, 0),
    ("before year 1", -62_135_596_801, 0),
    ("nanos -1", T0_S + DAY_S, -1),
    ("nanos 2e9", T0_S + DAY_S, 2_000_000_000),
    ("nanos 1e9", T0_S + DAY_S, 1_000_000_000),
    # In Timestamp's range but not a lot's: refused by the engine's rules, as before.
    ("year 9999", 253_402_300_799, 999_999_999),
    ("year 1", -62_135_596_800, 0),
]


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("seconds,nanos", [(s, n) for _, s, n in BAD_EXPIRIES], ids=[i for i, _, _ in BAD_EXPIRIES])
async def test_out_of_range_expires_at_is_invalid_argument_and_logs_nothing(
        sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str, caplog: pytest.LogCaptureFixture,
        seconds: int, nanos: int) -> None:
    await busy_account(sidecar)
    before = await snapshot(redis_client, key_prefix)
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    await refused(sidecar.admin.GrantCredits(grant_expiring(seconds, nanos)), "expires_at")
    loud = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelno > logging.DEBUG]
    assert loud == []
    assert await snapshot(redis_client, key_prefix) == before


async def test_an_expiry_with_nanos_still_grants(sidecar: Sidecar) -> None:
    r = await sidecar.admin.GrantCredits(grant_expiring(T0_S + DAY_S, 999_999_999))
    assert r.lot.expires_at.ToMilliseconds() == (T0_S + DAY_S) * 1000 + 999


# --------------------------------------------------------------------------- item 8: page tokens


MAX_SEQ = 2**63 - 1  # a page token is the last seq of the page before: the books' bigint


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("token", ["99999999999999999999", str(MAX_SEQ + 1), "0", "007", "1-0", "+1", "1e3"])
async def test_page_token_out_of_range_is_invalid_argument(sidecar: Sidecar, token: str) -> None:
    await sidecar.admin.GrantCredits(pb.GrantCreditsRequest(account_id="a", credits=1, purchase_id="p"))
    await refused(sidecar.admin.ListLedger(pb.ListLedgerRequest(account_id="a", page_token=token)), "page_token")


async def test_valid_page_tokens_still_page(sidecar: Sidecar) -> None:
    for i in range(3):
        await sidecar.admin.GrantCredits(pb.GrantCreditsRequest(account_id="a", credits=1, purchase_id=f"p{i}"))
    first = await sidecar.admin.ListLedger(pb.ListLedgerRequest(account_id="a", page_size=2))
    rest = await sidecar.admin.ListLedger(pb.ListLedgerRequest(account_id="a", page_size=2,
                                                               page_token=first.next_page_token))
    assert [e.purchase_id for e in (*first.entries, *rest.entries)] == ["p0", "p1", "p2"]
    assert first.next_page_token == "2" and not rest.next_page_token
    # The largest seq is a valid exclusive start: an empty page, not an error.
    last = await sidecar.admin.ListLedger(pb.ListLedgerRequest(account_id="a", page_token=str(MAX_SEQ)))
    assert (list(last.entries), last.next_page_token) == ([], "")


# --------------------------------------------------------------------------- item 11: overrides


def override(product: str, free: int) -> pb.LimitOverride:
    return pb.LimitOverride(product=product, limits=[pb.LimitSpec(limit_id="x", kind=pb.LIMIT_KIND_DAY, free=free)])


AMBIGUOUS_OVERRIDES = [
    ("overrides", "codex", pb.SetAccountRequest(account_id="a", overrides=[override("codex", 5),
                                                                           override("codex", 7)])),
    ("overrides", "codex", pb.SetAccountRequest(account_id="a", overrides=[override("codex", 5),
                                                                           override("codex", 5)])),
    ("clear_overrides", "sora", pb.SetAccountRequest(account_id="a", overrides=[override("sora", 5)],
                                                     clear_overrides=["codex", "sora"])),
    ("clear_overrides", "dalle", pb.SetAccountRequest(account_id="a", clear_overrides=["dalle"])),
    ("overrides.product", "dalle", pb.SetAccountRequest(account_id="a", overrides=[override("dalle", 5)])),
]


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("field,product,request_", AMBIGUOUS_OVERRIDES, ids=range(len(AMBIGUOUS_OVERRIDES)))
async def test_ambiguous_or_unknown_override_is_refused_naming_the_product(
        sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str, field: str, product: str,
        request_: pb.SetAccountRequest) -> None:
    await busy_account(sidecar)
    before = await snapshot(redis_client, key_prefix)
    message = await refused(sidecar.admin.SetAccount(request_), field)
    assert repr(product) in message
    assert await snapshot(redis_client, key_prefix) == before


async def test_clearing_a_product_twice_is_the_same_as_once(sidecar: Sidecar) -> None:
    await busy_account(sidecar)
    reply = await sidecar.admin.SetAccount(pb.SetAccountRequest(account_id="a", clear_overrides=["codex", "codex"]))
    assert list(reply.overrides) == []
    assert list((await sidecar.admin.GetAccount(pb.GetAccountRequest(account_id="a"))).overrides) == []


# --------------------------------------------------------------------------- item 12: reasons


NOT_PRINTABLE = {
    "C0-escape": "\x1b", "C0-tab": "\t", "C0-newline": "\n", "C0-nul": "\x00", "DEL": "\x7f",
    "C1-csi": "\x9b", "C1-nel": "\x85", "bidi-override-rlo": "\u202e", "bidi-embedding-lre": "\u202a",
    "bidi-isolate-lri": "\u2066", "bidi-mark-rlm": "\u200f", "zero-width-space": "\u200b",
    "zero-width-joiner": "\u200d", "bom": "\ufeff", "line-separator": "\u2028", "paragraph-separator": "\u2029",
    "no-break-space": "\u00a0", "ideographic-space": "\u3000", "private-use": "\ue000", "unassigned": "\u0378",
}


def reason_calls(sc: Sidecar, reason: str) -> list[Callable[[], Any]]:
    """GrantCredits, RevokeCredits and RefundJob on busy_account()'s lot and job, one by one
    (a grpc.aio call starts when it is made)."""
    return [
        lambda: sc.admin.GrantCredits(pb.GrantCreditsRequest(account_id="a", credits=1, purchase_id="p9",
                                                             reason=reason)),
        lambda: sc.admin.RevokeCredits(pb.RevokeCreditsRequest(account_id="a", purchase_id="p1", reason=reason)),
        lambda: sc.admin.RefundJob(pb.RefundJobRequest(account_id="a", reservation_id="job", reason=reason)),
    ]


@pytest.mark.newest_redis_only
@pytest.mark.parametrize("char", NOT_PRINTABLE.values(), ids=NOT_PRINTABLE.keys())
async def test_reason_with_a_character_that_is_not_printable_is_refused(
        sidecar: Sidecar, redis_client: aioredis.Redis, key_prefix: str, char: str) -> None:
    assert not char.isprintable()
    await busy_account(sidecar)
    before = await snapshot(redis_client, key_prefix)
    # Each call would grant, revoke or refund with a good reason.
    for call in reason_calls(sidecar, f"order 12{char}34"):
        message = await refused(call(), "reason")
        assert f"character 8 is U+{ord(char):04X}" in message and char not in message
    assert await snapshot(redis_client, key_prefix) == before


async def test_reason_length_bound_and_printable_text_beyond_ascii(sidecar: Sidecar) -> None:
    await busy_account(sidecar)
    for call in reason_calls(sidecar, "x" * 257):
        await refused(call(), "reason")
    fine = ("stripe pi_1 — café, 日本語 ✓ #12 " + "x" * 256)[:256]
    for call in reason_calls(sidecar, fine):
        await call()
    entries = (await sidecar.admin.ListLedger(pb.ListLedgerRequest(account_id="a"))).entries
    assert [e.reason for e in entries if e.type in ("grant", "revoke", "refund") and e.reason] == [fine] * 3


# --------------------------------------------------------------------------- item 12: CLI escaping


# Stored before the rule (written through the store, bypassing the engine's check): a CSI that
# would clear the screen, a bidi override, an isolate, a zero-width space, a C1 NEL, a line separator.
EVIL = "pay\x9b2J\u202eevil\x1b[31m\u2066red\u200b\x85\u2028end\t."
EVIL_SHOWN = "pay\\x9b2J\\u202eevil\\x1b[31m\\u2066red\\u200b\\x85\\u2028end\\t."


def test_visible_escapes_exactly_what_is_not_printable() -> None:
    from quota_sidecar.tools.cli_client import table, visible

    assert visible(EVIL) == EVIL_SHOWN
    assert visible("café — 日本語 ✓ a\\b") == "café — 日本語 ✓ a\\b"
    assert visible("\U000e0001\ud800\x00") == "\\U000e0001\\ud800\\x00"
    # Escaped before measuring: the columns stay aligned.
    assert table(["ID", "N"], [["a\x9b", 1], ["bbbbbb", 22]]) == ["ID       N", "a\\x9b    1", "bbbbbb  22"]


async def run_cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_")}
    env["PYTHONIOENCODING"] = "utf-8"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "quota_sidecar", *args, env=env,
                                                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    return proc.returncode or 0, out.decode("utf-8"), err.decode("utf-8")


def shown_as_text(output: str) -> bool:
    return all(c.isprintable() or c == "\n" for c in output)


async def test_cli_prints_stored_control_and_bidi_characters_escaped(sidecar: Sidecar) -> None:
    engine = sidecar.engine
    stamp = Stamp(now_ms=T0_MS, plans_version=engine.plans.version)
    await engine.store.grant("a", "p-old", 5, T0_MS + DAY_S * 1000, CreditSource.PURCHASE, EVIL, stamp)
    await engine.store.set_account("a", AccountChanges(auto_topup=AutoTopUp(True, 3, EVIL)),
                                   engine.plans.default_plan, stamp)
    target = ("--target", f"127.0.0.1:{sidecar.admin_port}")

    code, out, err = await run_cli("ledger", "--account", "a", *target)
    assert (code, err) == (0, "")
    assert shown_as_text(out), out
    assert f"[{EVIL_SHOWN}]" in out

    code, out, err = await run_cli("account", "--account", "a", *target)
    assert (code, err) == (0, "")
    assert shown_as_text(out), out
    assert f"auto top-up: {EVIL_SHOWN} when below 3 credits" in out

    code, out, err = await run_cli("ledger", "--account", "a", "--json", *target)
    assert code == 0 and out.isascii(), out
    assert json.loads(out)["entries"][0]["reason"] == EVIL

    # Refused now; the error printed (message and BadRequest detail) names the code point.
    code, out, err = await run_cli("grant", "--account", "a", "--credits", "1", "--purchase-id", "p-new",
                                   "--reason", "x\x9by", *target)
    assert code == 1 and out == ""
    assert shown_as_text(err) and "U+009B" in err and '"field": "reason"' in err, err
