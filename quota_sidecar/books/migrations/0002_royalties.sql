-- Royalties for cameo owners (docs/books.md): which part of each charge is a rights-holder's.
-- Derived from the ledger entries themselves, never written on its own: a commit of a job that used
-- cameos carries details.roy = "<cameo>|<owner>|<credits>,..." (what each owner is owed for this use), and a
-- refund of that job carries the same with negative credits. Release and expiry carry none: nothing
-- was charged. No cross-account movement exists in Redis; what is owed to an owner is read here.
CREATE VIEW quota_royalties AS
SELECT split_part(part, '|', 2) AS owner_account_id,
       split_part(part, '|', 1) AS cameo_id,
       e.account_id,
       e.reservation_id,
       split_part(part, '|', 3)::bigint AS credits,
       e.occurred_at,
       e.kind,
       e.entry_id
FROM quota_ledger_entries e
CROSS JOIN LATERAL unnest(string_to_array(e.details ->> 'roy', ',')) AS part
WHERE e.kind IN ('commit', 'refund') AND coalesce(e.details ->> 'roy', '') <> '';

-- The royalties of a month (books report) without scanning every entry's details.
CREATE INDEX quota_ledger_entries_royalty_idx ON quota_ledger_entries (occurred_at)
    WHERE kind IN ('commit', 'refund') AND details ? 'roy';

COMMENT ON VIEW quota_royalties IS 'quota-sidecar books: cameo royalties per use (commit) and given back (refund, negative)';
