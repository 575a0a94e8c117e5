"""A simulated video worker: reserves before each render, commits after, using the sync client.

    python examples/video_worker.py --target 127.0.0.1:50051 --account alice --jobs 3

The "render" is a short sleep; the second job pretends it came out shorter than asked
(it is billed for what was produced); a job the sidecar denies prints the purchase prompt.
"""

from __future__ import annotations

import argparse
import time

from quota_sidecar.client import Denied, SyncQuotaClient


def render(seconds: float) -> None:
    time.sleep(min(seconds, 0.05))  # simulated work, kept short for demos and tests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--account", default="video-demo")
    ap.add_argument("--jobs", type=int, default=3)
    args = ap.parse_args(argv)
    with SyncQuotaClient(args.target) as client:
        for i in range(args.jobs):
            params = {"duration_seconds": 10, "resolution": "720p"}
            try:
                with client.job(args.account, "sora", params) as job:
                    print(f"job {i}: reserved {job.reservation_id} funded by {job.funding} "
                          f"(free {job.free_used}/{job.free_limit}, credits held {job.credits_held})")
                    render(params["duration_seconds"])
                    if i == 1:
                        job.actual = {"duration_seconds": 6, "resolution": "720p"}
                result = job.commit_result
                assert result is not None
                print(f"job {i}: committed: {result.credits_charged} credit(s), {result.free_charged} free unit(s)")
            except Denied as d:
                offers = ", ".join(f"{o.quantity} x {o.pack_id} for {o.total_minor_units / 100:.2f} {o.currency}"
                                   for o in d.offers)
                print(f"job {i}: denied {d.reason}: {d.denial_message}; offers: {offers or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
