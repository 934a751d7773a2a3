-- Duplicates without a key (409), and Idempotency-Key replays.
BEGIN;
SELECT plan(37);

CREATE FUNCTION pg_temp.req(iban text, amount text, description text) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('organization_name', 'Idem Org', 'organization_iban', iban,
        'organization_bic', 'IDEMFRPPXXX', 'credit_transfers', jsonb_build_array(jsonb_build_object(
            'amount', amount, 'counterparty_name', 'Bip Bip', 'counterparty_iban', 'EE383680981021245685',
            'counterparty_bic', 'CRLYFRPPTOU', 'description', description)))
$$;
\ir helpers.psql
-- One call with the response headers it set (the HTTP layer reads them in the same statement).
CREATE FUNCTION pg_temp.call(payload jsonb, key text DEFAULT NULL)
RETURNS TABLE (status integer, body jsonb, replayed text, location text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('response.headers', '{}', true);  -- a fresh statement, as over HTTP
    RETURN QUERY
    SELECT r.status, r.body, current_setting('response.headers', true)::jsonb ->> 'Idempotent-Replayed',
           current_setting('response.headers', true)::jsonb ->> 'Location'
      FROM bps.bulk_transfer(payload, key) AS r;
END
$$;

SELECT bps.create_bank_account('Idem Org', 'FR7630000000000000000000001', 'IDEMFRPPXXX', 10000) AS acct \gset
SELECT bps.create_bank_account('Idem Org', 'FR7630000000000000000000002', 'IDEMFRPPXXX', 10000) AS other \gset

------------------------------------------------------------------------------------------------------------
-- Without a key: the same payload accepted once, then 409 naming the original.
CREATE TEMP TABLE original AS SELECT * FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000001', '7', 'rent'));
SELECT is((SELECT status FROM original), 201, 'the first request is accepted');
SELECT pg_temp.written(:acct) AS after_original \gset

CREATE TEMP TABLE duplicate AS SELECT * FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000001', '7', 'rent'));
SELECT is((SELECT status FROM duplicate), 409, 'the same payload again gets 409');
SELECT is((SELECT body ->> 'code' FROM duplicate), 'duplicate_request', '... with code duplicate_request');
SELECT is((SELECT body ->> 'bulk_transfer_id' FROM duplicate), (SELECT body ->> 'bulk_transfer_id' FROM original),
          '... naming the original bulk_transfer_id');
SELECT ok((SELECT body ?& ARRAY['type', 'title', 'status', 'detail'] FROM duplicate), '... as a problem document');
SELECT is(pg_temp.written(:acct), :'after_original'::bigint[], 'a duplicate writes nothing and debits nothing');

SELECT results_eq(
    format($$SELECT status, body ->> 'bulk_transfer_id' FROM bps.bulk_transfer(%L::jsonb)$$,
           '{ "credit_transfers" : [ { "description": "rent", "counterparty_bic": "CRLYFRPPTOU", "amount": "7",
               "counterparty_iban": "EE383680981021245685", "counterparty_name": "Bip Bip" } ],
              "organization_bic": "IDEMFRPPXXX", "organization_iban": "FR7630000000000000000000001",
              "organization_name": "Idem Org" }'),
    format($$VALUES (409, %L)$$, (SELECT body ->> 'bulk_transfer_id' FROM original)),
    'key order and whitespace do not make a payload different');
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000001', '7.01', 'rent'))$$,
    $$VALUES (201)$$,
    'a payload differing in one amount is a new request');
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000002', '7', 'rent'))$$,
    $$VALUES (201)$$,
    'the same transfers debiting another account are not a duplicate');

-- A request denied for funds is not remembered: after a top-up it goes through.
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000001', '500', 'big'))$$,
    $$VALUES (422, 'insufficient_funds')$$,
    'a request over the balance is denied');
SELECT bps.credit_bank_account(:acct, 50000) AS credited \gset
SELECT results_eq(
    $$SELECT status, (body ->> 'total_cents')::bigint
        FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000001', '500', 'big'))$$,
    $$VALUES (201, 50000::bigint)$$,
    '... and the same payload is accepted after a top-up, not taken for a duplicate');

-- The dedup window is configurable: with a window of 0 the same payload is a new request.
UPDATE bps.settings SET dedup_window = interval '0';
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000001', '7', 'rent'))$$,
    $$VALUES (201)$$,
    'outside the dedup window the same payload is accepted again');
UPDATE bps.settings SET dedup_window = interval '24 hours';

------------------------------------------------------------------------------------------------------------
-- With a key: the first outcome is stored and replayed with Idempotent-Replayed, changing nothing.
CREATE TEMP TABLE keyed AS SELECT * FROM pg_temp.call(pg_temp.req('FR7630000000000000000000002', '12.5', 'keyed'), 'key-1');
SELECT is((SELECT status FROM keyed), 201, 'a first request with a key is accepted');
SELECT is((SELECT replayed FROM keyed), NULL, '... and is not marked as replayed');
SELECT pg_temp.written(:other) AS after_keyed \gset

CREATE TEMP TABLE replay AS SELECT * FROM pg_temp.call(pg_temp.req('FR7630000000000000000000002', '12.5', 'keyed'), 'key-1');
SELECT is((SELECT status FROM replay), 201, 'a retry with the same key and payload gets the stored status');
SELECT is((SELECT body FROM replay), (SELECT body FROM keyed), '... and the stored body');
SELECT is((SELECT replayed FROM replay), 'true', '... with Idempotent-Replayed: true');
SELECT is((SELECT location FROM replay), (SELECT location FROM keyed), '... and the same Location');
SELECT is(pg_temp.written(:other), :'after_keyed'::bigint[], '... and changes nothing');
SELECT results_eq(
    $$SELECT status, body, replayed FROM pg_temp.call(pg_temp.req('FR7630000000000000000000002', '12.5', 'keyed'), 'key-1')$$,
    $$SELECT status, body, 'true' FROM keyed$$,
    'a third retry replays it again');

SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000002', '12.6', 'keyed'), 'key-1')$$,
    $$VALUES (422, 'idempotency_key_reused')$$,
    'the same key with a different payload gets 422 idempotency_key_reused');
SELECT is(pg_temp.written(:other), :'after_keyed'::bigint[], '... and changes nothing');

SELECT results_eq(
    $$SELECT status, body ->> 'code', body ->> 'bulk_transfer_id'
        FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000002', '12.5', 'keyed'))$$,
    $$SELECT 409, 'duplicate_request', body ->> 'bulk_transfer_id' FROM keyed$$,
    'without a key, a payload already accepted with a key is a duplicate of it');
SELECT results_eq(
    $$SELECT status, replayed FROM pg_temp.call(pg_temp.req('FR7630000000000000000000002', '12.5', 'keyed'), 'key-2')$$,
    $$VALUES (201, NULL::text)$$,
    'with a key, payload dedup does not apply: a new key executes the same payload again');
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000002', '9', 'unkeyed first'))$$,
    $$VALUES (201)$$,
    'a payload sent without a key is accepted');
SELECT results_eq(
    $$SELECT status, replayed FROM pg_temp.call(pg_temp.req('FR7630000000000000000000002', '9', 'unkeyed first'), 'key-3')$$,
    $$VALUES (201, NULL::text)$$,
    '... and the same payload with a key is executed, not a 409');
SELECT results_eq(
    $$SELECT status, replayed FROM pg_temp.call(pg_temp.req('FR7630000000000000000000001', '12.5', 'keyed'), 'key-1')$$,
    $$VALUES (201, NULL::text)$$,
    'a key is scoped to its account: another account''s key-1 is a new request');

-- A 422 business rejection is stored and replayed too, even once the money is there.
SELECT pg_temp.written(:other) AS before_poor \gset
CREATE TEMP TABLE poor AS SELECT * FROM pg_temp.call(pg_temp.req('FR7630000000000000000000002', '900', 'poor'), 'key-poor');
SELECT is((SELECT status FROM poor), 422, 'a keyed request over the balance gets 422');
SELECT is((SELECT body ->> 'code' FROM poor), 'insufficient_funds', '... insufficient_funds');
SELECT bps.credit_bank_account(:other, 100000) AS credited \gset
SELECT results_eq(
    $$SELECT status, body, replayed FROM pg_temp.call(pg_temp.req('FR7630000000000000000000002', '900', 'poor'), 'key-poor')$$,
    $$SELECT status, body, 'true' FROM poor$$,
    'its retry replays the stored 422 even after a top-up');
SELECT is(pg_temp.written(:other),
          (SELECT ARRAY[b[1] + 100000, b[2], b[3], b[4] + 1] FROM (SELECT :'before_poor'::bigint[] AS b) AS x),
          '... and only the top-up changed the account (balance and one journal entry)');

-- Validation failures are not stored: the client fixes the request and reuses the key.
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000002', '1,5', 'fixme'), 'key-fix')$$,
    $$VALUES (422, 'validation_failed')$$,
    'an invalid keyed request gets 422 validation_failed');
SELECT results_eq(
    $$SELECT status, replayed FROM pg_temp.call(pg_temp.req('FR7630000000000000000000002', '1.5', 'fixme'), 'key-fix')$$,
    $$VALUES (201, NULL::text)$$,
    '... and the corrected request with the same key is executed');

-- Key length: 1 to 255 characters.
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000002', '1', 'long key'), repeat('k', 255))$$,
    $$VALUES (201)$$,
    'a key of 255 characters is accepted');
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000002', '1', 'too long key'), repeat('k', 256))$$,
    $$VALUES (422, 'validation_failed')$$,
    'a key of 256 characters gets 422 validation_failed');
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req('FR7630000000000000000000002', '1', 'empty key'), '')$$,
    $$VALUES (422, 'validation_failed')$$,
    'an empty key gets 422 validation_failed');

SELECT is((SELECT bool_and(consistent) FROM bps.account_audit WHERE bank_account_id IN (:acct, :other)), true,
          'the journal stays consistent');

SELECT * FROM finish();
ROLLBACK;
