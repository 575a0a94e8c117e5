#!/usr/bin/env python3
"""Read quota-sidecar usage events with a Redis consumer group.

Usage events (free allowance warnings, purchase required, credits low, lot
expiring, budget reached, auto top-up requested) are appended by the same
Lua scripts that make the decisions, to one stream per key bucket:
``<prefix>:{b<n>}:events`` for n in 0..key_buckets-1. A notification or
upsell service reads every bucket's stream with one consumer group; each
event is delivered to one consumer of the group and acknowledged after it
is handled, so a crash re-delivers what was not acknowledged.

    examples/events_consumer.py --redis-url redis://127.0.0.1:6379/0

Without --redis-url it uses $QUOTA_REDIS_URL, else the development sidecar's Redis: a
`quota-sidecar serve` without --redis-url keeps its URL in ./.quota-sidecar/redis.url while it runs.
--key-prefix and --key-buckets default to $QUOTA_KEY_PREFIX and $QUOTA_KEY_BUCKETS, as the sidecar's.

On Redis Cluster each stream lives in its bucket's slot: read them one
stream per call (as here), or group the streams by node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

Handler = Callable[[str, dict[str, str]], Awaitable[None]]


def stream_names(key_prefix: str, key_buckets: int) -> list[str]:
    return [f"{key_prefix}:{{b{n}}}:events" for n in range(key_buckets)]


async def ensure_group(client: aioredis.Redis, streams: list[str], group: str) -> None:
    for stream in streams:
        try:
            # "0": a new group starts with everything still in the stream.
            await client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


async def consume_once(client: aioredis.Redis, streams: list[str], group: str, consumer: str,
                       handle: Handler, *, count: int = 100) -> int:
    """One pass over every stream: handle and acknowledge what is new. Returns events handled."""
    handled = 0
    for stream in streams:
        replies = await client.xreadgroup(group, consumer, {stream: ">"}, count=count)
        for _, entries in replies:
            for entry_id, fields in entries:
                await handle(entry_id, fields)
                await client.xack(stream, group, entry_id)
                handled += 1
    return handled


async def consume(redis_url: str, *, key_prefix: str = "qs", key_buckets: int = 256, group: str = "notifier",
                  consumer: str = "notifier-1", handle: Handler, idle_rounds: int | None = None,
                  idle_sleep_seconds: float = 0.5) -> int:
    """Consume until ``idle_rounds`` passes in a row found nothing (None: forever)."""
    client = aioredis.from_url(redis_url, decode_responses=True)
    streams = stream_names(key_prefix, key_buckets)
    total, idle = 0, 0
    try:
        await ensure_group(client, streams, group)
        while idle_rounds is None or idle < idle_rounds:
            handled = await consume_once(client, streams, group, consumer, handle)
            total += handled
            idle = 0 if handled else idle + 1
            if not handled:
                await asyncio.sleep(idle_sleep_seconds)
    finally:
        await client.aclose()
    return total


async def print_event(entry_id: str, fields: dict[str, str]) -> None:
    if fields.get("type") == "purchase_required":
        offers = json.loads(fields.get("offers", "[]"))
        best = offers[0] if offers else None
        offer = f"; offer {best['quantity']} x {best['pack_id']}" if best else ""
        print(f"{entry_id} {fields['account']}: purchase required for {fields.get('product')}, "
              f"{fields.get('credits_short')} credit(s) short{offer}")
    else:
        print(f"{entry_id} {fields['account']}: {fields['type']} {json.dumps(fields, sort_keys=True)}")


DEV_REDIS_URL_FILE = Path(".quota-sidecar") / "redis.url"  # kept by a development `quota-sidecar serve`


def find_redis_url(flag: str | None) -> str | None:
    """--redis-url, else $QUOTA_REDIS_URL, else the development sidecar's (said on stderr); None if none."""
    if flag or os.environ.get("QUOTA_REDIS_URL"):
        return flag or os.environ["QUOTA_REDIS_URL"]
    try:
        url = DEV_REDIS_URL_FILE.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    print(f"using the development sidecar's Redis {url} (from ./{DEV_REDIS_URL_FILE})", file=sys.stderr)
    return url or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=None, help="default: $QUOTA_REDIS_URL, else ./.quota-sidecar/redis.url")
    parser.add_argument("--key-prefix", default=os.environ.get("QUOTA_KEY_PREFIX") or "qs")
    parser.add_argument("--key-buckets", type=int, default=int(os.environ.get("QUOTA_KEY_BUCKETS") or 256))
    parser.add_argument("--group", default="notifier")
    parser.add_argument("--consumer", default="notifier-1")
    args = parser.parse_args()
    redis_url = find_redis_url(args.redis_url)
    if redis_url is None:
        parser.error(f"no Redis: give --redis-url or set QUOTA_REDIS_URL, or run this where a development "
                     f"`quota-sidecar serve` is running (./{DEV_REDIS_URL_FILE} not found)")
    asyncio.run(consume(redis_url, key_prefix=args.key_prefix, key_buckets=args.key_buckets,
                        group=args.group, consumer=args.consumer, handle=print_event))


if __name__ == "__main__":
    main()
