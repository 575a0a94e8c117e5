"""The key layout: one cluster slot per account, no collisions between accounts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from quota_sidecar.storage.store import KEY_SUFFIXES, account_key, account_keys, key_bucket

ACCOUNT = st.text(alphabet="abcXYZ019._:@+=/-", min_size=1, max_size=40)


@given(ACCOUNT)
def test_every_key_of_an_account_is_in_one_slot(account: str) -> None:
    keys = account_keys("qs", 256, account)
    # the account's own keys, then its bucket's events stream: one slot for all
    assert len(keys) == len(KEY_SUFFIXES) + 1
    assert keys[-1] == f"qs:{{b{key_bucket(account, 256)}}}:events"
    assert len({key_slot(k.encode()) for k in keys}) == 1


@given(ACCOUNT, ACCOUNT, st.sampled_from(KEY_SUFFIXES), st.sampled_from(KEY_SUFFIXES))
def test_different_accounts_or_suffixes_never_share_a_key(a: str, b: str, sa: str, sb: str) -> None:
    if (a, sa) != (b, sb):
        assert account_key("qs", 256, a, sa) != account_key("qs", 256, b, sb)


def test_buckets_are_stable_and_spread() -> None:
    # CRC-32 (zlib/IEEE) so any language can place an account: crc32(b"alice") = 663665735.
    assert (key_bucket("alice", 256), key_bucket("alice", 1024)) == (663665735 % 256, 663665735 % 1024)
    assert len({key_bucket(f"user-{i}", 256) for i in range(5000)}) == 256
