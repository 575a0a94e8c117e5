#!/usr/bin/env python3
"""The product's story, end to end, against a running sidecar (worker and admin addresses).

    examples/story.py --target 127.0.0.1:50051 --admin-target 127.0.0.1:50052

1. A free-plan user renders videos until the daily free allowance (30) is used up.
2. The next job is denied: the exception carries the purchase prompt (the $4 pack).
3. The billing system records the purchase: GrantCredits (admin API, bearer token from
   $QUOTA_ADMIN_TOKEN when the sidecar requires one).
4. The very next job runs at once, funded by credits.
5. Credits expire 12 months after the grant. That is simulated, because the sidecar's clock is
   Redis' clock: with --time-travel=short-lot (default) a second purchase is granted with an
   explicit expiry a few seconds ahead, standing in for a 12-month-old lot, and the script waits
   for it; with --time-travel=stdin the script pauses until whoever drives the sidecar's clock
   (the tests, with a manual clock) has moved it 12 months on and pressed Enter.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

from quota_sidecar.client import Denied, SyncAdminClient, SyncQuotaClient

VIDEO = {"duration_seconds": 10, "resolution": "720p"}


def grant(admin_target: str, account: str, credits: int, expires_at: datetime | None = None) -> str:
    """GrantCredits is the billing system's call (admin API, SyncAdminClient), not the worker's."""
    with SyncAdminClient(admin_target, token=os.environ.get("QUOTA_ADMIN_TOKEN") or None, timeout=5) as admin:
        g = admin.grant_credits(account, credits, f"buy-{uuid.uuid4().hex[:8]}", expires_at=expires_at,
                                reason="story.py demo purchase")
    expiry = f"{g.expires_at:%Y-%m-%d %H:%M} UTC" if g.expires_at else "never"
    print(f"   GrantCredits: lot {g.lot_id}, {g.credits} credits, expires {expiry}; balance {g.credit_balance}")
    return g.lot_id


def use_free_allowance(client: SyncQuotaClient, account: str) -> Denied:
    print("1. rendering with the daily free allowance")
    for i in range(1000):  # bounded: the free plan has 30 a day
        try:
            with client.job(account, "sora", VIDEO) as job:
                pass
        except Denied as denied:
            return denied
        if job.free_used in (1, job.free_limit):
            print(f"   job {i + 1}: free {job.free_used}/{job.free_limit}")
    raise RuntimeError("the free allowance never ran out")


def show_prompt(d: Denied) -> None:
    print(f"2. denied: {d.reason}; short {d.credits_short} credit(s); free resets {d.free_resets_at}")
    for o in d.offers:
        print(f"   purchase prompt: {o.quantity} x {o.pack_id} ({o.credits} credits) "
              f"for {o.total_minor_units / 100:.2f} {o.currency}")


def time_travel(mode: str, admin_target: str, account: str) -> None:
    if mode == "stdin":
        print("5. SIMULATED: waiting for the sidecar's clock to move 12 months on (press Enter)", flush=True)
        sys.stdin.readline()
        return
    print("5. SIMULATED: a lot standing in for a 12-month-old purchase, expiring in 3 s")
    grant(admin_target, account, 10, datetime.now(timezone.utc) + timedelta(seconds=3))
    time.sleep(4)  # real time: the sidecar's clock is Redis' clock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--admin-target", default="127.0.0.1:50052")
    ap.add_argument("--account", default=f"story-{uuid.uuid4().hex[:6]}")
    ap.add_argument("--time-travel", choices=["short-lot", "stdin"], default="short-lot")
    args = ap.parse_args(argv)
    with SyncQuotaClient(args.target) as client:
        denied = use_free_allowance(client, args.account)
        show_prompt(denied)
        pack = denied.offers[0]
        print(f"3. the user buys {pack.quantity} x {pack.pack_id}")
        grant(args.admin_target, args.account, pack.credits * pack.quantity)
        with client.job(args.account, "sora", VIDEO) as job:
            print(f"4. next job runs at once: {job.reservation_id} funded by {job.funding}, "
                  f"{job.credits_held} credit(s) held")
        print(f"   committed; credit balance {client.balance(args.account).credit_balance}")
        if args.time_travel == "short-lot":
            before = client.balance(args.account).credit_balance
        time_travel(args.time_travel, args.admin_target, args.account)
        after = client.balance(args.account)
        print(f"   after expiry: credit balance {after.credit_balance}; lots {[lot.lot_id for lot in after.lots]}")
        if args.time_travel == "stdin":
            try:
                with client.job(args.account, "sora", {"duration_seconds": 15, "resolution": "720p"}):
                    pass
                print("   (a new day's free allowance funded the next job)")
            except Denied as d:
                print(f"   next job: denied {d.reason}")
        else:
            assert after.credit_balance == before, "the simulated old lot expired"
    print("story complete")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
