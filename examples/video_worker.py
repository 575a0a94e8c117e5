#!/usr/bin/env python3
"""A simulated video worker: reserves before each render, commits after, using the sync client.

    examples/video_worker.py --target 127.0.0.1:50051 --account alice --jobs 3

Each job asks for a 15 s video at 720p (2 credits: 1 per started 10 s). The "render" is a short
sleep; the second job pretends it came out 8 s long (1 credit) and is committed at that size, so
it is billed for what was produced. That shows when the job is funded by credits (the free
allowance counts jobs, whatever their size): once alice's free videos are used up and she has
credits, the commit charges 1 credit and gives the other back. A job the sidecar denies prints
the purchase prompt.
"""

from __future__ import annotations

import argparse
import time

from quota_sidecar.client import CommitResult, Denied, Job, SyncQuotaClient

# Sizes whose prices differ (default plans: 1 credit per started 10 s at up to 720p), both allowed
# on every plan (the free plan's longest video is 15 s).
ASKED = {"duration_seconds": 15, "resolution": "720p"}  # 2 credits
PRODUCED = {"duration_seconds": 8, "resolution": "720p"}  # 1 credit


def render(seconds: float) -> None:
    time.sleep(min(seconds, 0.05))  # simulated work, kept short for demos and tests


def billed(job: Job, result: CommitResult) -> str:
    """What the commit at the produced size changed, in words."""
    if job.funding != "credits":
        return "the free allowance counts jobs, not seconds: 1 free unit whatever the length"
    return (f"held {job.credits_held} for {ASKED['duration_seconds']} s, charged {result.credits_charged} for "
            f"the {PRODUCED['duration_seconds']} s produced, {result.credits_refunded} given back")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--account", default="video-demo")
    ap.add_argument("--jobs", type=int, default=3)
    args = ap.parse_args(argv)
    with SyncQuotaClient(args.target) as client:
        for i in range(args.jobs):
            try:
                with client.job(args.account, "sora", ASKED) as job:
                    print(f"job {i}: reserved {job.reservation_id} funded by {job.funding} "
                          f"(free {job.free_used}/{job.free_limit}, credits held {job.credits_held}; "
                          f"the job costs {job.reservation.job_cost_credits} credit(s))")
                    render(ASKED["duration_seconds"])
                    if i == 1:
                        job.actual = dict(PRODUCED)  # committed at the size produced
                result = job.commit_result
                assert result is not None
                print(f"job {i}: committed: {result.credits_charged} credit(s), {result.free_charged} free unit(s)"
                      + (f"; shorter than asked: {billed(job, result)}" if i == 1 else ""))
            except Denied as d:
                offers = ", ".join(f"{o.quantity} x {o.pack_id} for {o.total_minor_units / 100:.2f} {o.currency}"
                                   for o in d.offers)
                print(f"job {i}: denied {d.reason}: {d.denial_message}; offers: {offers or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
