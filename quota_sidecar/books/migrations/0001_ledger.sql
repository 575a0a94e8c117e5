-- The books: every movement of credits and free units, copied exactly once from Redis' outbox.
-- A public contract (docs/books.md): finance and support query the views quota_ledger and
-- quota_purchases; columns are only ever added, never renamed or dropped.

-- One row per movement. entry_id is the outbox entry's id ("b<bucket>:<stream id>"): shipping the
-- same entry twice stores it once. (account_id, seq) is the account's own sequence number: a second
-- entry under the same number (Redis lost acknowledged writes and reused it) goes to
-- quota_ledger_conflicts instead.
CREATE TABLE quota_ledger_entries (
    entry_id          text        PRIMARY KEY,
    account_id        text        NOT NULL,
    seq               bigint      NOT NULL,
    occurred_at       timestamptz NOT NULL,
    kind              text        NOT NULL,
    product           text        NOT NULL DEFAULT '',
    reservation_id    text        NOT NULL DEFAULT '',
    purchase_id       text        NOT NULL DEFAULT '',
    funding           text        NOT NULL DEFAULT '',
    credits           bigint      NOT NULL DEFAULT 0,
    granted_delta     bigint      NOT NULL DEFAULT 0,
    refunded_delta    bigint      NOT NULL DEFAULT 0,
    spent_delta       bigint      NOT NULL DEFAULT 0,
    expired_delta     bigint      NOT NULL DEFAULT 0,
    revoked_delta     bigint      NOT NULL DEFAULT 0,
    held_delta        bigint      NOT NULL DEFAULT 0,
    free_units_delta  bigint      NOT NULL DEFAULT 0,
    plans_version     text        NOT NULL DEFAULT '',
    source            text        NOT NULL DEFAULT '',
    price_minor_units bigint      NULL,
    currency          text        NOT NULL DEFAULT '',
    pack_id           text        NOT NULL DEFAULT '',
    expires_at        timestamptz NULL,
    reason            text        NOT NULL DEFAULT '',
    details           jsonb       NOT NULL DEFAULT '{}',
    shipped_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT quota_ledger_entries_account_seq_key UNIQUE (account_id, seq)
);

-- Month reports and "what happened between" questions.
CREATE INDEX quota_ledger_entries_occurred_at_idx ON quota_ledger_entries (occurred_at);
-- quota_purchases by purchase id (the billing system's reconciliation) ...
CREATE INDEX quota_ledger_entries_grant_purchase_idx ON quota_ledger_entries (purchase_id) WHERE kind = 'grant';
-- ... and what of each purchase expired or was revoked (partial: a few rows per purchase).
CREATE INDEX quota_ledger_entries_lot_purchase_idx ON quota_ledger_entries (account_id, purchase_id)
    WHERE kind IN ('lot_expire', 'revoke');

-- Entries whose (account_id, seq) the books already hold under another entry_id. Never dropped
-- silently: the audit reports every row, an operator decides.
CREATE TABLE quota_ledger_conflicts (LIKE quota_ledger_entries INCLUDING DEFAULTS);
ALTER TABLE quota_ledger_conflicts ADD PRIMARY KEY (entry_id);
ALTER TABLE quota_ledger_conflicts ADD COLUMN detected_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX quota_ledger_conflicts_account_seq_idx ON quota_ledger_conflicts (account_id, seq);

CREATE VIEW quota_ledger AS
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
       granted_delta + refunded_delta - spent_delta - expired_delta - revoked_delta - held_delta
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
       expires_at
FROM quota_ledger_entries;

-- One row per grant. credits_expired / credits_revoked: what lot_expire and revoke entries took from
-- this purchase's lot. Credits of the lot that were held when it expired or was revoked reach the
-- account's expired/revoked totals when that hold resolves (commit, release, refund: to_expired,
-- to_revoked), not this view.
CREATE VIEW quota_purchases AS
SELECT g.purchase_id,
       g.account_id,
       g.credits,
       g.source,
       g.price_minor_units,
       g.currency,
       g.pack_id,
       g.occurred_at AS granted_at,
       g.expires_at,
       coalesce(taken.expired, 0)::bigint AS credits_expired,
       coalesce(taken.revoked, 0)::bigint AS credits_revoked,
       g.reason,
       g.entry_id
FROM quota_ledger_entries g
LEFT JOIN LATERAL (
    SELECT sum(m.expired_delta) FILTER (WHERE m.kind = 'lot_expire') AS expired,
           sum(m.revoked_delta) FILTER (WHERE m.kind = 'revoke') AS revoked
    FROM quota_ledger_entries m
    WHERE m.account_id = g.account_id AND m.purchase_id = g.purchase_id AND m.kind IN ('lot_expire', 'revoke')
) taken ON true
WHERE g.kind = 'grant';

COMMENT ON TABLE quota_ledger_entries IS 'quota-sidecar books: one row per movement of credits or free units (docs/books.md); query the views';
COMMENT ON TABLE quota_ledger_conflicts IS 'quota-sidecar books: entries whose (account_id, seq) the books hold under another entry_id';
COMMENT ON VIEW quota_ledger IS 'quota-sidecar books: every movement, with signed deltas (docs/books.md)';
COMMENT ON VIEW quota_purchases IS 'quota-sidecar books: every grant (purchase), for finance and billing reconciliation';
