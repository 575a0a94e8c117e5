-- Account debt (docs/books.md#debt): a metered job's usage past its hold under `overage: draw` is drawn
-- from the account's lots, and what they cannot cover is owed (the outbox's `dd`, debt delta), paid first
-- by the next credits in (`debt_repay` entries). Available credits now follow
--     granted + refunded - spent - expired - revoked - held + debt
-- so the views' credits_available_delta adds debt_delta. Views are replaced with the same columns in
-- the same order, new ones at the end (a public contract: columns are only ever added).
ALTER TABLE quota_ledger_entries ADD COLUMN debt_delta bigint NOT NULL DEFAULT 0;
ALTER TABLE quota_ledger_conflicts ADD COLUMN debt_delta bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE VIEW quota_ledger AS
SELECT entry_id,
       account_id,
       seq,
       occurred_at,
       kind,
       product,
       reservation_id,
       purchase_id,
       funding,
       credits,
       granted_delta + refunded_delta - spent_delta - expired_delta - revoked_delta - held_delta + debt_delta
           AS credits_available_delta,
       held_delta AS credits_held_delta,
       free_units_delta,
       granted_delta AS credits_granted_delta,
       refunded_delta AS credits_refunded_delta,
       spent_delta AS credits_spent_delta,
       expired_delta AS credits_expired_delta,
       revoked_delta AS credits_revoked_delta,
       plans_version,
       reason,
       details,
       shipped_at,
       source,
       price_minor_units,
       currency,
       pack_id,
       expires_at,
       debt_delta
FROM quota_ledger_entries;

CREATE OR REPLACE VIEW quota_jobs AS
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
       h.seq AS hold_seq,
       -- overage: draw: of credits_charged, the credits drawn from the lots past the hold and the debt opened.
       CASE WHEN r.kind = 'commit' THEN coalesce((r.details ->> 'drawn')::bigint, 0) ELSE 0 END AS credits_drawn,
       CASE WHEN r.kind = 'commit' THEN r.debt_delta ELSE 0 END AS debt_opened
FROM quota_ledger_entries h
LEFT JOIN LATERAL (
    SELECT e.kind, e.occurred_at, e.credits, e.free_units_delta, e.details, e.seq, e.debt_delta
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
