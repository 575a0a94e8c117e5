#!/usr/bin/env python3
"""A simulated code worker: async jobs with the async client; a failing task releases its hold.

    examples/code_worker.py --target 127.0.0.1:50051 --account bob --tasks 3

Each task is one codex job of a few units. Task 2 fails on purpose, to show that a failure
releases the hold (the free unit or the credits go back) instead of charging.
"""

from __future__ import annotations

import argparse
import asyncio

from quota_sidecar.client import Denied, QuotaClient


class TaskFailed(Exception):
    pass


async def run_task(client: QuotaClient, account: str, i: int) -> None:
    params = {"model": "codex-mini", "units": 2}
    try:
        async with client.job(account, "codex", params) as job:
            print(f"task {i}: reserved {job.reservation_id} funded by {job.funding}")
            await asyncio.sleep(0.01)  # simulated work
            if i == 2:
                raise TaskFailed("tests did not pass")
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
        print(f"codex free allowance used today: {used}/{limit}; holds left: {len(balance.holds)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--account", default="code-demo")
    ap.add_argument("--tasks", type=int, default=3)
    return asyncio.run(main_async(ap.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
