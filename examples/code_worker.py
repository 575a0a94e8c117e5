#!/usr/bin/env python3
"""A simulated code worker: async jobs with the async client; a failing task releases its hold.

    examples/code_worker.py --target 127.0.0.1:50051 --account bob --tasks 3

Each task is one codex job, metered: it reserves on an estimate of its tokens and commits the
tokens it really used (the packaged plans include some codex usage per 5 hours and per week,
spent before credits). Task 2 fails on purpose, to show that a failure releases the hold (the
included usage or the credits go back) instead of charging.
"""

from __future__ import annotations

import argparse
import asyncio

from quota_sidecar.client import Denied, QuotaClient


class TaskFailed(Exception):
    pass


async def run_task(client: QuotaClient, account: str, i: int) -> None:
    # The estimate: 50k input and 10k output tokens of codex-mini, 2.07 credits: 3 held.
    params = {"model": "codex-mini", "input_tokens": 50_000, "output_tokens": 10_000}
    try:
        async with client.job(account, "codex", params) as job:
            print(f"task {i}: reserved {job.reservation_id} funded by {job.funding}")
            await asyncio.sleep(0.01)  # simulated work
            if i == 2:
                raise TaskFailed("tests did not pass")
            # What the task really used: 1.65 credits, charged 2.
            job.actual = {"model": "codex-mini", "input_tokens": 40_000, "output_tokens": 8_000}
        print(f"task {i}: committed ({job.commit_result})")
    except TaskFailed as exc:
        print(f"task {i}: failed ({exc}); hold released: {job.release_result}")
    except Denied as d:
        print(f"task {i}: denied {d.reason}: {d.denial_message}")


async def main_async(args: argparse.Namespace) -> int:
    async with QuotaClient(args.target) as client:
        await asyncio.gather(*(run_task(client, args.account, i) for i in range(args.tasks)))
        balance = await client.balance(args.account)
        used, limit = balance.free.get("codex", (0, 0))
        print(f"codex included usage used: {used}/{limit} credits; holds left: {len(balance.holds)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--account", default="code-demo")
    ap.add_argument("--tasks", type=int, default=3)
    return asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
