-- The read side: views a DBA queries, and the function behind GET /bulk_transfers/{id}.

-- Each bulk transfer with its status derived from its transfers (they are executed one by one later).
CREATE OR REPLACE VIEW bps.bulk_transfer_summaries AS
SELECT b.id, b.bank_account_id, b.idempotency_key, b.transfer_count, b.total_cents, b.currency, b.created_at,
       s.pending_count, s.executed_count, s.failed_count,
       CASE
           WHEN s.pending_count > 0 THEN 'pending'
           WHEN s.failed_count = 0 THEN 'executed'
           WHEN s.executed_count = 0 THEN 'failed'
           ELSE 'partially_executed'
       END AS status
  FROM bps.bulk_transfers AS b
 CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE t.status = 'pending') AS pending_count,
               count(*) FILTER (WHERE t.status = 'executed') AS executed_count,
               count(*) FILTER (WHERE t.status = 'failed') AS failed_count
          FROM bps.transfers_of(b.id) AS t) AS s;

-- Each account's balance beside what its journal says: a row with consistent = false is a defect.
CREATE OR REPLACE VIEW bps.account_audit AS
SELECT a.id AS bank_account_id, a.balance_cents, a.version,
       j.entries, j.journal_sum_cents, j.last_balance_cents, j.last_version,
       (a.balance_cents = j.journal_sum_cents AND a.balance_cents = j.last_balance_cents
        AND a.version = j.last_version AND j.entries = a.version) AS consistent
  FROM bps.bank_accounts AS a
 CROSS JOIN LATERAL (
        SELECT count(*) AS entries,
               coalesce(sum(e.amount_cents), 0) AS journal_sum_cents,
               (array_agg(e.balance_cents ORDER BY e.account_version DESC))[1] AS last_balance_cents,
               max(e.account_version) AS last_version
          FROM bps.account_entries AS e
         WHERE e.bank_account_id = a.id) AS j;

-- One bulk transfer and its transfers, as GET /bulk_transfers/{id} shows it: (200, body) or (404, problem).
-- bank_account_ids are the accounts the caller may read (an API key's); NULL: any (the owner's call).
CREATE OR REPLACE FUNCTION bps.get_bulk_transfer(bulk_transfer_id bigint, bank_account_ids bigint[],
                                                 OUT status integer, OUT body jsonb)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(found.status, 404),
           coalesce(found.body, bps.problem(404, 'bulk_transfer_not_found',
                                            format('There is no bulk transfer %s.', bulk_transfer_id)))
      FROM (SELECT 1) AS one
      LEFT JOIN (
        SELECT 200 AS status, jsonb_build_object(
                   'bulk_transfer_id', b.id,
                   'bank_account_id', b.bank_account_id,
                   'status', b.status,
                   'transfer_count', b.transfer_count,
                   'total_cents', b.total_cents,
                   'total_amount', bps.format_cents(b.total_cents),
                   'currency', b.currency,
                   'created_at', b.created_at,
                   'pending_count', b.pending_count,
                   'executed_count', b.executed_count,
                   'failed_count', b.failed_count,
                   'transfers', (
                       SELECT jsonb_agg(jsonb_build_object(
                                  'id', t.id, 'position', t.position, 'status', t.status,
                                  'amount', bps.format_cents(t.amount_cents), 'amount_cents', t.amount_cents,
                                  'currency', t.amount_currency, 'counterparty_name', t.counterparty_name,
                                  'counterparty_iban', t.counterparty_iban, 'counterparty_bic', t.counterparty_bic,
                                  'description', t.description, 'client_reference', t.client_reference)
                              ORDER BY t.position)
                         FROM bps.transfers_of(b.id) AS t)) AS body
          FROM bps.bulk_transfer_summaries AS b
         WHERE b.id = get_bulk_transfer.bulk_transfer_id
           AND (get_bulk_transfer.bank_account_ids IS NULL OR b.bank_account_id = ANY (get_bulk_transfer.bank_account_ids))
      ) AS found ON true
$$;

-- The owner's call: any account.
CREATE OR REPLACE FUNCTION bps.get_bulk_transfer(bulk_transfer_id bigint, OUT status integer, OUT body jsonb)
LANGUAGE sql STABLE AS $$
    SELECT g.status, g.body FROM bps.get_bulk_transfer(bulk_transfer_id, NULL) AS g
$$;
