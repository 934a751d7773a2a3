-- The read side: views a DBA queries, and the functions behind the GET endpoints. Each function takes the
-- accounts the caller may read (an API key's; NULL: any, the owner's call) and answers (status, body):
-- another account's bulk transfer, transfer or account is not found, exactly as one that does not exist.

-- Each bulk transfer with its status and how many of its transfers have each status.
CREATE OR REPLACE VIEW bps.bulk_transfer_summaries AS
SELECT b.id, b.bank_account_id, b.idempotency_key, b.transfer_count, b.total_cents, b.currency, b.created_at,
       b.pending_count::bigint, b.executed_count::bigint, b.failed_count::bigint, b.status,
       b.processing_count::bigint, b.cancelled_count::bigint, b.requested_execution_date
  FROM bps.bulk_transfers AS b;

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

-- An opaque page cursor: where the next page starts, for one kind of list. bps.cursor_position reads it
-- back (NULL when it is not a cursor of that kind).
CREATE OR REPLACE FUNCTION bps.page_cursor(kind text, below bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT translate(encode(convert_to(kind || ':' || below, 'UTF8'), 'base64'), '+/=', '-_')
$$;

CREATE OR REPLACE FUNCTION bps.cursor_position(kind text, cursor text) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    decoded text;
BEGIN
    IF cursor !~ '^[A-Za-z0-9_-]{1,64}$' THEN
        RETURN NULL;
    END IF;
    decoded := convert_from(decode(rpad(translate(cursor, '-_', '+/'), (length(cursor) + 3) / 4 * 4, '='), 'base64'),
                            'UTF8');
    RETURN CASE WHEN decoded ~ ('^' || kind || ':[0-9]{1,18}$') THEN split_part(decoded, ':', 2)::bigint END;
EXCEPTION
    WHEN invalid_parameter_value OR character_not_in_repertoire OR untranslatable_character THEN
        RETURN NULL;
END
$$;

-- A bulk transfer without its transfers, as every answer about one shows it.
CREATE OR REPLACE FUNCTION bps.bulk_transfer_summary(b bps.bulk_transfers) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'bulk_transfer_id', b.id,
        'bank_account_id', b.bank_account_id,
        'status', b.status,
        'transfer_count', b.transfer_count,
        'total_cents', b.total_cents,
        'total_amount', bps.format_cents(b.total_cents),
        'currency', b.currency,
        'created_at', b.created_at,
        'requested_execution_date', b.requested_execution_date,
        'pending_count', b.pending_count,
        'processing_count', b.processing_count,
        'executed_count', b.executed_count,
        'failed_count', b.failed_count,
        'cancelled_count', b.cancelled_count)
$$;

-- A transfer as every answer about one shows it; updated_at is the time of its last status change.
CREATE OR REPLACE FUNCTION bps.transfer_summary(t bps.transfers) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', t.id, 'bulk_transfer_id', t.bulk_transfer_id, 'position', t.position, 'status', t.status,
        'failure_reason', t.failure_reason, 'updated_at', coalesce(t.status_changed_at, t.created_at),
        'amount', bps.format_cents(t.amount_cents), 'amount_cents', t.amount_cents, 'currency', t.amount_currency,
        'counterparty_name', t.counterparty_name, 'counterparty_iban', t.counterparty_iban,
        'counterparty_bic', t.counterparty_bic, 'description', t.description,
        'client_reference', t.client_reference)
$$;

-- One bulk transfer and all its transfers, as GET /bulk_transfers/{id} shows it.
CREATE OR REPLACE FUNCTION bps.get_bulk_transfer(bulk_transfer_id bigint, bank_account_ids bigint[],
                                                 OUT status integer, OUT body jsonb)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(found.status, 404),
           coalesce(found.body, bps.problem(404, 'bulk_transfer_not_found',
                                            format('There is no bulk transfer %s.', bulk_transfer_id)))
      FROM (SELECT 1) AS one
      LEFT JOIN (
        SELECT 200 AS status,
               bps.bulk_transfer_summary(b) || jsonb_build_object('transfers', (
                   SELECT jsonb_agg(bps.transfer_summary(t) - 'bulk_transfer_id' ORDER BY t.position)
                     FROM bps.transfers_of(b.id) AS t)) AS body
          FROM bps.bulk_transfers AS b
         WHERE b.id = get_bulk_transfer.bulk_transfer_id
           AND (get_bulk_transfer.bank_account_ids IS NULL OR b.bank_account_id = ANY (get_bulk_transfer.bank_account_ids))
      ) AS found ON true
$$;

-- The owner's call: any account.
CREATE OR REPLACE FUNCTION bps.get_bulk_transfer(bulk_transfer_id bigint, OUT status integer, OUT body jsonb)
LANGUAGE sql STABLE AS $$
    SELECT g.status, g.body FROM bps.get_bulk_transfer(bulk_transfer_id, NULL) AS g
$$;

-- Bulk transfers of the given accounts, newest first: at most page_size of them with ids below `before`
-- (NULL: from the newest), only those with `status` when it is given, and the cursor of the next page
-- (absent on the last). Each account is read backwards along its own index, so a page costs page_size rows
-- per account, however long the history.
CREATE OR REPLACE FUNCTION bps.list_bulk_transfers(bank_account_ids bigint[], page_size integer, before bigint,
                                                   status text)
RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH page AS (
        SELECT p.id, p.summary, row_number() OVER (ORDER BY p.id DESC) AS n
          FROM unnest(bank_account_ids) AS a(id)
         CROSS JOIN LATERAL (
                SELECT b.id, bps.bulk_transfer_summary(b) AS summary
                  FROM bps.bulk_transfers AS b
                 WHERE b.bank_account_id = a.id AND b.id < coalesce(before, 9223372036854775807)
                   AND (list_bulk_transfers.status IS NULL OR b.status = list_bulk_transfers.status)
                 ORDER BY b.id DESC
                 LIMIT page_size + 1) AS p
    )
    SELECT jsonb_build_object('bulk_transfers',
                              coalesce(jsonb_agg(p.summary ORDER BY p.n) FILTER (WHERE p.n <= page_size), '[]'))
        || CASE WHEN count(*) > page_size
                THEN jsonb_build_object('next_cursor',
                                        bps.page_cursor('bulk_transfers', min(p.id) FILTER (WHERE p.n <= page_size)))
                ELSE '{}' END
      FROM page AS p
$$;

-- One transfer, as GET /transfers/{id} shows it.
CREATE OR REPLACE FUNCTION bps.get_transfer(transfer_id bigint, bank_account_ids bigint[],
                                            OUT status integer, OUT body jsonb)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(found.status, 404),
           coalesce(found.body, bps.problem(404, 'transfer_not_found', format('There is no transfer %s.', transfer_id)))
      FROM (SELECT 1) AS one
      LEFT JOIN (
        SELECT 200 AS status, bps.transfer_summary(t) || jsonb_build_object('bank_account_id', t.bank_account_id) AS body
          FROM bps.transfers AS t
         WHERE t.id = get_transfer.transfer_id
           AND (get_transfer.bank_account_ids IS NULL OR t.bank_account_id = ANY (get_transfer.bank_account_ids))
      ) AS found ON true
$$;

-- An account as GET /accounts shows it.
CREATE OR REPLACE FUNCTION bps.account_summary(a bps.bank_accounts) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'id', a.id, 'organization_name', a.organization_name, 'iban', a.iban, 'bic', a.bic, 'currency', a.currency,
        'balance_cents', a.balance_cents, 'balance', bps.format_cents(a.balance_cents),
        'counterparty_check', a.counterparty_check, 'created_at', a.created_at)
$$;

-- The given accounts, each with its balance.
CREATE OR REPLACE FUNCTION bps.list_accounts(bank_account_ids bigint[]) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('accounts', coalesce(jsonb_agg(bps.account_summary(a) ORDER BY a.id), '[]'))
      FROM bps.bank_accounts AS a
     WHERE a.id = ANY (bank_account_ids)
$$;

-- An account's journal, newest first: debits, refunds, credits (and its opening), each with the balance
-- before and after; at most page_size entries below version `before` (NULL: from the newest), and the next
-- page's cursor. (404) for an account outside bank_account_ids (NULL: any).
CREATE OR REPLACE FUNCTION bps.list_account_entries(bank_account_id bigint, bank_account_ids bigint[],
                                                    page_size integer, before bigint,
                                                    OUT status integer, OUT body jsonb)
LANGUAGE sql STABLE AS $$
    WITH account AS (
        SELECT a.id FROM bps.bank_accounts AS a
         WHERE a.id = list_account_entries.bank_account_id
           AND (list_account_entries.bank_account_ids IS NULL OR a.id = ANY (list_account_entries.bank_account_ids))
    ), page AS (
        SELECT e.account_version, row_number() OVER (ORDER BY e.account_version DESC) AS n,
               jsonb_build_object(
                   'version', e.account_version, 'kind', e.kind, 'amount_cents', e.amount_cents,
                   'amount', bps.format_cents(e.amount_cents), 'previous_balance_cents', e.previous_balance_cents,
                   'balance_cents', e.balance_cents, 'bulk_transfer_id', e.bulk_transfer_id,
                   'transfer_id', e.transfer_id, 'created_at', e.created_at) AS entry
          FROM account AS a
         CROSS JOIN LATERAL (
                SELECT * FROM bps.account_entries AS e
                 WHERE e.bank_account_id = a.id AND e.account_version < coalesce(before, 9223372036854775807)
                 ORDER BY e.account_version DESC
                 LIMIT page_size + 1) AS e
    )
    SELECT CASE WHEN EXISTS (SELECT FROM account) THEN 200 ELSE 404 END,
           CASE WHEN EXISTS (SELECT FROM account)
                THEN jsonb_build_object('bank_account_id', bank_account_id, 'entries',
                         coalesce((SELECT jsonb_agg(p.entry ORDER BY p.n) FROM page AS p WHERE p.n <= page_size), '[]'))
                     || coalesce((SELECT jsonb_build_object('next_cursor', bps.page_cursor('account_entries', p.account_version))
                                    FROM page AS p
                                   WHERE p.n = page_size AND EXISTS (SELECT FROM page AS q WHERE q.n > page_size)), '{}')
                ELSE bps.problem(404, 'account_not_found', format('There is no bank account %s.', bank_account_id)) END
$$;
