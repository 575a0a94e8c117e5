"""The key layout (docs/redis-layout.md): every key of an account under the hash tag of its bucket, so each
script touches one Redis Cluster slot; KEYS[] in the order _prelude.lua names them."""

from __future__ import annotations

import functools
import zlib

from quota_sidecar.storage import mux as redis_mux

# An account's own keys, in the KEYS[] order of _prelude.lua. Two keys of the bucket, shared by its
# accounts, complete KEYS[]: the outbox (KEYS[9], between "resdone" and "notes") and the events stream
# (last).
KEY_SUFFIXES = ("acct", "free", "lots", "lotrem", "lotexp", "holds", "res", "resdone", "notes", "spend", "rolling",
                "inflight")
_OUTBOX_AT = 8  # its index in KEYS[] (0-based)


DEFAULT_KEY_BUCKETS = 256


def key_bucket(account_id: str, buckets: int) -> int:
    """The account's bucket: a stable hash, the same in every sidecar and language (CRC-32)."""
    return zlib.crc32(account_id.encode()) % buckets


def bucket_tag(key_prefix: str, bucket: int) -> str:
    return f"{key_prefix}:{{b{bucket}}}"


def account_key(key_prefix: str, buckets: int, account_id: str, suffix: str) -> str:
    """``<prefix>:{b<bucket>}:<account>:<suffix>``.

    The hash tag is the account's bucket, not the account: every key of an
    account is still in one Redis Cluster slot, and a script can also write
    what its whole bucket shares (the outbox the shipper reads and the events
    stream consumers read, bucket by bucket). Suffixes have no ':' so names
    never collide.
    """
    return f"{bucket_tag(key_prefix, key_bucket(account_id, buckets))}:{account_id}:{suffix}"


def events_key(key_prefix: str, bucket: int) -> str:
    """The bucket's usage-events stream; ``<prefix>:{b<bucket>}:events``."""
    return f"{bucket_tag(key_prefix, bucket)}:events"


def outbox_key(key_prefix: str, bucket: int) -> str:
    """The bucket's outbox (every movement of its accounts until the shipper trims it);
    ``<prefix>:{b<bucket>}:outbox``."""
    return f"{bucket_tag(key_prefix, bucket)}:outbox"


def account_keys(key_prefix: str, buckets: int, account_id: str) -> list[str]:
    return list(script_keys(key_prefix, buckets, account_id))


class ScriptKeys(tuple[str, ...]):
    """An account's KEYS[], with their encoding for the multiplexed connection."""

    packed: redis_mux.Packed


@functools.lru_cache(maxsize=65_536)
def script_keys(key_prefix: str, buckets: int, account_id: str) -> ScriptKeys:
    """KEYS[] of every script of an account (cached for the accounts in recent use)."""
    bucket = key_bucket(account_id, buckets)
    keys = [account_key(key_prefix, buckets, account_id, suffix) for suffix in KEY_SUFFIXES]
    keys.insert(_OUTBOX_AT, outbox_key(key_prefix, bucket))
    keys.append(events_key(key_prefix, bucket))
    script_keys = ScriptKeys(keys)
    script_keys.packed = redis_mux.Packed(keys)
    return script_keys
