-- The amount rules: exact conversions to cents, and every rejected spelling.
BEGIN;
SELECT plan(9);

CREATE FUNCTION pg_temp.req(amount jsonb, description text) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('organization_name', 'Amount Org', 'organization_iban', 'FR7625000000000000000000001',
        'organization_bic', 'AMNTFRPPXXX', 'credit_transfers', jsonb_build_array(jsonb_build_object(
            'amount', amount, 'counterparty_name', 'Bip Bip', 'counterparty_iban', 'EE383680981021245685',
            'counterparty_bic', 'CRLYFRPPTOU', 'description', description)))
$$;

-- Enough for several transfers of the SEPA maximum, 999999999.99.
SELECT bps.create_bank_account('Amount Org', 'FR7625000000000000000000001', 'AMNTFRPPXXX', 1000000000000)
    AS acct \gset

SELECT results_eq(
    $$SELECT a.amount, r.status, (r.body ->> 'total_cents')::bigint
        FROM (VALUES ('14.5'), ('13.2'), ('61238'), ('8024.99'), ('19.99'), ('0.29'), ('1.13'), ('700'),
                     ('0.01'), ('0.1'), ('100.00'), ('999999999.99')) AS a(amount)
       CROSS JOIN LATERAL bps.bulk_transfer(pg_temp.req(to_jsonb(a.amount), 'exact ' || a.amount)) AS r
       ORDER BY a.amount$$,
    $$VALUES ('0.01', 201, 1::bigint), ('0.1', 201, 10::bigint), ('0.29', 201, 29::bigint),
             ('1.13', 201, 113::bigint), ('100.00', 201, 10000::bigint), ('13.2', 201, 1320::bigint),
             ('14.5', 201, 1450::bigint), ('19.99', 201, 1999::bigint), ('61238', 201, 6123800::bigint),
             ('700', 201, 70000::bigint), ('8024.99', 201, 802499::bigint), ('999999999.99', 201, 99999999999::bigint)$$,
    'each contract amount converts to its exact number of cents');
SELECT is((SELECT amount_cents FROM bps.transfers WHERE bank_account_id = :acct AND description = 'exact 8024.99'),
          802499::bigint, 'the transfer row stores the same cents');
SELECT is((SELECT balance_cents FROM bps.bank_accounts WHERE id = :acct),
          1000000000000 - (1 + 10 + 29 + 113 + 10000 + 1320 + 1450 + 1999 + 6123800 + 70000 + 802499 + 99999999999),
          'the balance falls by exactly the sum of those cents');

SELECT results_eq(
    $$SELECT a.amount, r.status, r.body ->> 'code', r.body -> 'errors' -> 0 ->> 'pointer',
             jsonb_array_length(r.body -> 'errors')
        FROM (VALUES ('0'), ('0.00'), ('-5'), ('-0.5'), (''), (' 1'), ('1 '), ('1,5'), ('5.'), ('.5'), ('1e2'),
                     ('1.234'), ('NaN'), ('Infinity'), ('abc'), ('+1'), ('0x10'), ('1000000000'),
                     ('1000000000.00'), ('999999999.991'), ('99999999999999999999999')) AS a(amount)
       CROSS JOIN LATERAL bps.bulk_transfer(pg_temp.req(to_jsonb(a.amount), 'rejected ' || a.amount)) AS r
       ORDER BY a.amount$$,
    $$SELECT a.amount, 422, 'validation_failed', '/credit_transfers/0/amount', 1
        FROM (VALUES ('0'), ('0.00'), ('-5'), ('-0.5'), (''), (' 1'), ('1 '), ('1,5'), ('5.'), ('.5'), ('1e2'),
                     ('1.234'), ('NaN'), ('Infinity'), ('abc'), ('+1'), ('0x10'), ('1000000000'),
                     ('1000000000.00'), ('999999999.991'), ('99999999999999999999999')) AS a(amount)
       ORDER BY a.amount$$,
    'each malformed, non-positive or too large amount string gets 422 pointing at the amount');
SELECT results_eq(
    $$SELECT r.status, r.body -> 'errors' -> 0 ->> 'pointer'
        FROM (VALUES ('14.5'::jsonb), ('1450'), ('0'), ('-1'), ('1e2'), ('null'), ('true'), ('["1"]'), ('{"v": "1"}'))
             AS a(amount)
       CROSS JOIN LATERAL bps.bulk_transfer(pg_temp.req(a.amount, 'not a string ' || a.amount::text)) AS r$$,
    $$SELECT 422, '/credit_transfers/0/amount' FROM generate_series(1, 9)$$,
    'an amount that is a JSON number, null, boolean, array or object gets 422 pointing at the amount');
SELECT ok((SELECT r.body -> 'errors' -> 0 ->> 'detail' ILIKE '%string%'
             FROM bps.bulk_transfer(pg_temp.req('14.5'::jsonb, 'number detail')) AS r),
          'the message for a JSON number says to send a string');
SELECT results_eq(
    $$SELECT r.status, r.body -> 'errors' -> 0 ->> 'pointer', r.body -> 'errors' -> 0 ->> 'code'
        FROM bps.bulk_transfer(pg_temp.req('"1"', 'no amount') #- '{credit_transfers,0,amount}') AS r$$,
    $$VALUES (422, '/credit_transfers/0/amount', 'required')$$,
    'a missing amount gets 422 required');
SELECT is((SELECT count(*) FROM bps.transfers WHERE bank_account_id = :acct AND description NOT LIKE 'exact %'),
          0::bigint, 'no rejected amount wrote a transfer');
SELECT is((SELECT consistent FROM bps.account_audit WHERE bank_account_id = :acct), true,
          'the journal explains the balance');

SELECT * FROM finish();
ROLLBACK;
