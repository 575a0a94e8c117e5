"""The key layout: one cluster slot per account, no collisions between accounts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from quota_sidecar.storage.keys import (
    KEY_SUFFIXES,
    account_key,
    account_keys,
    events_key,
    key_bucket,
    outbox_key,
)

ACCOUNT = st.text(alphabet="abcXYZ019._:@+=/-", min_size=1, max_size=40)


@given(ACCOUNT)
def test_every_key_of_an_account_is_in_one_slot(account: str) -> None:
    keys = account_keys("qs", 256, account)
    # the account's own keys with its bucket's outbox as KEYS[9], then the bucket's events stream:
    # one slot for all
    bucket = key_bucket(account, 256)
    assert len(keys) == len(KEY_SUFFIXES) + 2
    assert keys[8] == f"qs:{{b{bucket}}}:outbox" == outbox_key("qs", bucket)
    assert keys[-1] == f"qs:{{b{bucket}}}:events"
    assert [k.rsplit(":", 1)[1] for k in keys[:8] + keys[9:-1]] == list(KEY_SUFFIXES)
    assert len({key_slot(k.encode()) for k in keys}) == 1


def parse_account_key(key: str, prefix: str, buckets: int) -> tuple[str, str]:
    """(account, suffix) read back from ``<prefix>:{b<bucket>}:<account>:<suffix>``, by the
    documented layout alone: the suffix is what follows the last ':' (suffixes have none)."""
    head = f"{prefix}:{{b"
    assert key.startswith(head), key
    tag_end = key.index("}:", len(head))
    account, suffix = key[tag_end + 2:].rsplit(":", 1)
    assert int(key[len(head):tag_end]) == key_bucket(account, buckets), key
    return account, suffix


def test_suffixes_have_no_separator() -> None:
    # What makes the layout readable back (and so collision-free) whatever ':' an account holds.
    assert all(":" not in suffix and suffix for suffix in KEY_SUFFIXES)
    assert len(set(KEY_SUFFIXES)) == len(KEY_SUFFIXES)


@given(ACCOUNT, st.sampled_from(KEY_SUFFIXES))
def test_a_key_reads_back_as_exactly_its_account_and_suffix(account: str, suffix: str) -> None:
    # A key that reads back to one (account, suffix) cannot be another pair's key: no two accounts
    # or suffixes ever share a key, for every input drawn (not only when two draws happen to collide).
    assert parse_account_key(account_key("qs", 256, account, suffix), "qs", 256) == (account, suffix)


def test_accounts_built_to_collide_do_not() -> None:
    """Accounts made of other accounts, separators and suffix names: every (account, suffix) gets
    its own key, and none is a bucket's events stream or outbox."""
    base = ["a", ":", "a:", ":a", "a::b", "acct", "events", "outbox", "b0", "{b0}", "qs"]
    accounts = base + [f"{a}:{s}" for a in base for s in KEY_SUFFIXES] + [f"{s}:{a}" for a in base for s in KEY_SUFFIXES]
    owner: dict[str, tuple[str, str]] = {}
    for account in accounts:
        for suffix in KEY_SUFFIXES:
            key = account_key("qs", 256, account, suffix)
            assert owner.setdefault(key, (account, suffix)) == (account, suffix), key
    assert len(owner) == len(set(accounts)) * len(KEY_SUFFIXES)
    assert not {events_key("qs", bucket) for bucket in range(256)} & set(owner)
    assert not {outbox_key("qs", bucket) for bucket in range(256)} & set(owner)


def test_buckets_are_stable_and_spread() -> None:
    # CRC-32 (zlib/IEEE) so any language can place an account: crc32(b"alice") = 663665735.
    assert (key_bucket("alice", 256), key_bucket("alice", 1024)) == (663665735 % 256, 663665735 % 1024)
    assert len({key_bucket(f"user-{i}", 256) for i in range(5000)}) == 256
