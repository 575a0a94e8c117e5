"""`quota-sidecar audit`: the conservation audit (quota_sidecar.domain.audit) over accounts read from Redis."""

from __future__ import annotations

import sys

from quota_sidecar.domain.audit import audit_account, audit_all, format_report
from quota_sidecar.storage.store import RedisStore


async def audit_main(redis_url: str, *, account: str | None, all_accounts: bool, key_prefix: str,
                     key_buckets: int, redis_mode: str = "auto") -> int:
    """Prints the report; 0 when clean, 1 on any violation. Exactly one of account / all_accounts."""
    if bool(account) == all_accounts:
        raise ValueError("audit takes exactly one of --account ID or --all")
    store = RedisStore.from_url(redis_url, redis_mode=redis_mode, key_prefix=key_prefix, key_buckets=key_buckets)
    try:
        audits = [await audit_account(store, account)] if account else await audit_all(store)
    finally:
        await store.close()
    print(format_report(audits), file=sys.stdout)
    return 1 if any(a.violations for a in audits) else 0
