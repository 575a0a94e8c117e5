-- One row per job (docs/books.md#jobs): what it cost and from where, derived from the hold entry and the
-- entries that resolved it (commit, release or expire) and refunded it. Never written on its own.
-- A reservation id names one job per account: the resolution and refund are the first such entries
-- after the hold.
CREATE VIEW quota_jobs AS
SELECT h.account_id,
       h.reservation_id,
       h.product,
       h.occurred_at AS held_at,
       r.occurred_at AS resolved_at,
       CASE WHEN f.occurred_at IS NOT NULL THEN 'refunded'
            WHEN r.kind = 'commit' THEN 'committed'
            WHEN r.kind = 'release' THEN 'released'
            WHEN r.kind = 'expire' THEN 'expired'
            ELSE 'held' END AS state,
       h.funding,
       -- Credits the commit charged (cameo fees included); a refund does not change it: see credits_refunded.
       CASE WHEN r.kind = 'commit' THEN r.credits ELSE 0 END AS credits_charged,
       -- Free units the job used in the end: 1 for a free job committed, 0 once released, expired or refunded.
       (h.free_units_delta + coalesce(r.free_units_delta, 0) + coalesce(f.free_units_delta, 0))::bigint
           AS free_units,
       -- "<lot>:<credits>,...": the lots charged (committed) or held (otherwise).
       CASE WHEN r.kind = 'commit' THEN coalesce(r.details ->> 'lots', '')
            ELSE coalesce(h.details ->> 'lots', '') END AS lots,
       -- Of credits_charged: what the cameos' owners are owed (quota_royalties) and the cameo fees.
       CASE WHEN r.kind = 'commit' THEN coalesce((
           SELECT sum(split_part(part, '|', 3)::bigint)
           FROM unnest(string_to_array(r.details ->> 'roy', ',')) AS part WHERE part <> ''), 0)
            ELSE 0 END::bigint AS royalty_credits,
       CASE WHEN r.kind = 'commit' THEN coalesce((r.details ->> 'fees')::bigint, 0) ELSE 0 END AS fees,
       -- A metered job's cost past its hold's cap, written off rather than charged.
       CASE WHEN r.kind = 'commit' THEN coalesce((r.details ->> 'wo')::bigint, 0) ELSE 0 END AS written_off,
       h.plans_version,
       f.occurred_at AS refunded_at,
       coalesce(f.credits, 0) AS credits_refunded,
       h.seq AS hold_seq
FROM quota_ledger_entries h
LEFT JOIN LATERAL (
    SELECT e.kind, e.occurred_at, e.credits, e.free_units_delta, e.details, e.seq
    FROM quota_ledger_entries e
    WHERE e.account_id = h.account_id AND e.reservation_id = h.reservation_id AND e.seq > h.seq
      AND e.kind IN ('commit', 'release', 'expire')
    ORDER BY e.seq LIMIT 1
) r ON true
LEFT JOIN LATERAL (
    SELECT e.occurred_at, e.credits, e.free_units_delta
    FROM quota_ledger_entries e
    WHERE e.account_id = h.account_id AND e.reservation_id = h.reservation_id AND e.seq > h.seq
      AND e.kind = 'refund'
    ORDER BY e.seq LIMIT 1
) f ON true
WHERE h.kind = 'hold';

-- A job's entries by account and reservation.
CREATE INDEX quota_ledger_entries_job_idx ON quota_ledger_entries (account_id, reservation_id, seq)
    WHERE reservation_id <> '';

COMMENT ON VIEW quota_jobs IS 'quota-sidecar books: one row per job, what it cost and from where (docs/books.md)';
