-- bps.bulk_transfer called as a DBA would: every outcome of docs/api.md, status and body.
BEGIN;
SELECT plan(51);

-- One valid transfer with placeholder counterparty fields, and a request debiting an account by IBAN and BIC.
CREATE FUNCTION pg_temp.xfer(amount text, description text DEFAULT 'Wonderland') RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('amount', amount, 'counterparty_name', 'Bip Bip',
                              'counterparty_iban', 'EE383680981021245685', 'counterparty_bic', 'CRLYFRPPTOU',
                              'description', description)
$$;
CREATE FUNCTION pg_temp.req(iban text, transfers jsonb, bic text DEFAULT 'TAPBFRPPXXX') RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('organization_name', 'Tap Org', 'organization_iban', iban,
                              'organization_bic', bic, 'credit_transfers', transfers)
$$;
\ir helpers.psql

SELECT bps.create_bank_account('Tap Org', 'FR7620000000000000000000001', 'TAPBFRPPXXX', 10000) AS acct \gset

-- 201: the whole request recorded, the balance debited by exactly the total.
CREATE TEMP TABLE accepted AS
SELECT * FROM bps.bulk_transfer(pg_temp.req('FR7620000000000000000000001',
    jsonb_build_array(pg_temp.xfer('14.5', 'first'), pg_temp.xfer('0.29', 'second'))));
SELECT is((SELECT status FROM accepted), 201, 'a valid request is accepted with 201');
SELECT is((SELECT (body ->> 'total_cents')::bigint FROM accepted), 1479::bigint, 'total_cents is the sum in cents');
SELECT is((SELECT (body ->> 'transfer_count')::int FROM accepted), 2, 'transfer_count counts the transfers');
SELECT ok((SELECT body ? 'bulk_transfer_id' FROM accepted), 'the body names the bulk transfer');
SELECT is((SELECT balance_cents FROM bps.bank_accounts WHERE id = :acct), 8521::bigint,
          'the balance is debited by the total');
SELECT results_eq(
    $$SELECT b.bank_account_id, b.transfer_count, b.total_cents
        FROM bps.bulk_transfers AS b JOIN accepted AS a ON b.id = (a.body ->> 'bulk_transfer_id')::bigint$$,
    format('VALUES (%s::bigint, 2, 1479::bigint)', :acct),
    'the bulk transfer is recorded for the debited account');
SELECT results_eq(
    $$SELECT t.bank_account_id, t.counterparty_name, t.counterparty_iban, t.counterparty_bic, t.amount_cents,
             t.amount_currency::text, t.description, t.status
        FROM bps.transfers AS t JOIN accepted AS a ON t.bulk_transfer_id = (a.body ->> 'bulk_transfer_id')::bigint
       ORDER BY t.id$$,
    format($$VALUES (%1$s::bigint, 'Bip Bip', 'EE383680981021245685', 'CRLYFRPPTOU', 1450::bigint, 'EUR', 'first', 'pending'),
                    (%1$s::bigint, 'Bip Bip', 'EE383680981021245685', 'CRLYFRPPTOU', 29::bigint, 'EUR', 'second', 'pending')$$,
           :acct),
    'every transfer is recorded, pending, in cents of the account currency');
SELECT is(current_setting('response.headers', true)::jsonb ->> 'Location',
          '/bulk_transfers/' || (SELECT body ->> 'bulk_transfer_id' FROM accepted),
          'the Location header names the new bulk transfer');
SELECT is((SELECT consistent FROM bps.account_audit WHERE bank_account_id = :acct), true,
          'the journal explains the new balance');

-- 422 insufficient_funds: one cent too much, nothing written.
SELECT pg_temp.written(:acct) AS before_short \gset
CREATE TEMP TABLE short AS
SELECT * FROM bps.bulk_transfer(pg_temp.req('FR7620000000000000000000001',
    jsonb_build_array(pg_temp.xfer('85', 'a'), pg_temp.xfer('0.22', 'b'))));
SELECT is((SELECT status FROM short), 422, 'a request over the balance gets 422');
SELECT is((SELECT body ->> 'code' FROM short), 'insufficient_funds', '... with code insufficient_funds');
SELECT results_eq(
    $$SELECT (body ->> 'balance_cents')::bigint, (body ->> 'required_cents')::bigint,
             (body ->> 'shortfall_cents')::bigint FROM short$$,
    $$VALUES (8521::bigint, 8522::bigint, 1::bigint)$$,
    '... naming the balance, the required total and the shortfall');
SELECT is(pg_temp.written(:acct), :'before_short'::bigint[],
          'a denied request changes neither the balance, the bulk transfers, the transfers nor the journal');

-- Spending exactly the balance is allowed.
SELECT results_eq(
    $$SELECT status, (body ->> 'total_cents')::bigint FROM bps.bulk_transfer(pg_temp.req(
          'FR7620000000000000000000001', jsonb_build_array(pg_temp.xfer('85.21', 'all of it'))))$$,
    $$VALUES (201, 8521::bigint)$$,
    'a request of exactly the balance is accepted');
SELECT is((SELECT balance_cents FROM bps.bank_accounts WHERE id = :acct), 0::bigint, 'the balance is then 0');
SELECT results_eq(
    $$SELECT status, body ->> 'code', (body ->> 'shortfall_cents')::bigint FROM bps.bulk_transfer(pg_temp.req(
          'FR7620000000000000000000001', jsonb_build_array(pg_temp.xfer('0.01', 'one more cent'))))$$,
    $$VALUES (422, 'insufficient_funds', 1::bigint)$$,
    'an empty account refuses even one cent');

-- 404 account_not_found: the account is found by IBAN and BIC together.
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req(
          'FR7620000000000000000000999', jsonb_build_array(pg_temp.xfer('1'))))$$,
    $$VALUES (404, 'account_not_found')$$,
    'an unknown IBAN gets 404 account_not_found');
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req(
          'FR7620000000000000000000001', jsonb_build_array(pg_temp.xfer('1')), 'OTHRFRPPXXX'))$$,
    $$VALUES (404, 'account_not_found')$$,
    'a known IBAN with another BIC gets 404 account_not_found');

-- 400 invalid_json: only a JSON object is a request.
SELECT results_eq(
    $$SELECT p.payload, r.status, r.body ->> 'code'
        FROM (VALUES ('[]'), ('[{}]'), ('"text"'), ('42'), ('true'), ('null')) AS p(payload)
       CROSS JOIN LATERAL bps.bulk_transfer(p.payload::jsonb) AS r ORDER BY 1$$,
    $$VALUES ('"text"', 400, 'invalid_json'), ('42', 400, 'invalid_json'), ('[]', 400, 'invalid_json'),
             ('[{}]', 400, 'invalid_json'), ('null', 400, 'invalid_json'), ('true', 400, 'invalid_json')$$,
    'a payload that is not a JSON object gets 400 invalid_json');
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(NULL)$$,
    $$VALUES (400, 'invalid_json')$$,
    'a NULL payload gets 400 invalid_json');

-- 413 payload_too_large: at most max_transfers_per_request transfers (default 10000).
SELECT bps.create_bank_account('Tap Org', 'FR7620000000000000000000002', 'TAPBFRPPXXX', 10000) AS big \gset
SELECT pg_temp.written(:big) AS before_big \gset
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req('FR7620000000000000000000002',
          (SELECT jsonb_agg(pg_temp.xfer('0.01', 'n' || i)) FROM generate_series(1, 10001) AS i)))$$,
    $$VALUES (413, 'payload_too_large')$$,
    '10001 transfers get 413 payload_too_large');
SELECT is(pg_temp.written(:big), :'before_big'::bigint[], '... and nothing is written');
SELECT results_eq(
    $$SELECT status, (body ->> 'transfer_count')::int, (body ->> 'total_cents')::bigint
        FROM bps.bulk_transfer(pg_temp.req('FR7620000000000000000000002',
             (SELECT jsonb_agg(pg_temp.xfer('0.01', 'n' || i)) FROM generate_series(1, 10000) AS i)))$$,
    $$VALUES (201, 10000, 10000::bigint)$$,
    '10000 transfers, the default maximum, are accepted');
SELECT is((SELECT count(*) FROM bps.transfers WHERE bank_account_id = :big), 10000::bigint,
          '... all 10000 recorded');
UPDATE bps.settings SET max_transfers_per_request = 3;
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req('FR7620000000000000000000001',
          jsonb_build_array(pg_temp.xfer('1', 'a'), pg_temp.xfer('1', 'b'), pg_temp.xfer('1', 'c'),
                            pg_temp.xfer('1', 'd'))))$$,
    $$VALUES (413, 'payload_too_large')$$,
    'the maximum is configurable: 4 transfers over a maximum of 3 get 413');
SELECT bps.credit_bank_account(:acct, 300) AS credited \gset
SELECT results_eq(
    $$SELECT status, (body ->> 'transfer_count')::int FROM bps.bulk_transfer(pg_temp.req('FR7620000000000000000000001',
          jsonb_build_array(pg_temp.xfer('1', 'a'), pg_temp.xfer('1', 'b'), pg_temp.xfer('1', 'c'))))$$,
    $$VALUES (201, 3)$$,
    '... and 3 transfers, the maximum, are accepted');
UPDATE bps.settings SET max_transfers_per_request = 10000;

-- 422 validation_failed: every problem, each with its JSON pointer; nothing written.
SELECT bps.credit_bank_account(:acct, 100000) AS credited \gset
SELECT pg_temp.written(:acct) AS before_invalid \gset
CREATE TEMP TABLE invalid AS
SELECT * FROM bps.bulk_transfer(jsonb_build_object(
    'organization_name', 'Tap Org', 'organization_iban', 'FR7620000000000000000000001',
    'organization_bic', 'TAPBFRPPXXX', 'extra', 1,
    'credit_transfers', jsonb_build_array(
        pg_temp.xfer('1,5') - 'description',
        pg_temp.xfer('2') || jsonb_build_object('amount', 5, 'counterparty_name', repeat('n', 71), 'amout', '5'),
        pg_temp.xfer('3') || jsonb_build_object('currency', 'USD', 'counterparty_iban', '',
                                                'description', repeat('d', 141)),
        pg_temp.xfer('4') || jsonb_build_object('counterparty_bic', 'CRLYFRPPTOUX', 'client_reference', repeat('r', 36)),
        '"not an object"'::jsonb,
        pg_temp.xfer('5'))));
SELECT is((SELECT status FROM invalid), 422, 'an invalid request gets 422');
SELECT is((SELECT body ->> 'code' FROM invalid), 'validation_failed', '... with code validation_failed');
SELECT set_eq(
    $$SELECT e ->> 'pointer' FROM invalid, jsonb_array_elements(body -> 'errors') AS e$$,
    $$VALUES ('/extra'), ('/credit_transfers/0/amount'), ('/credit_transfers/0/description'),
             ('/credit_transfers/1/amount'), ('/credit_transfers/1/counterparty_name'), ('/credit_transfers/1/amout'),
             ('/credit_transfers/2/currency'), ('/credit_transfers/2/counterparty_iban'),
             ('/credit_transfers/2/description'), ('/credit_transfers/3/counterparty_bic'),
             ('/credit_transfers/3/client_reference'), ('/credit_transfers/4')$$,
    '... listing every problem with its pointer, not only the first');
SELECT ok((SELECT bool_and(e ? 'code' AND e ? 'detail' AND e ->> 'detail' <> '')
             FROM invalid, jsonb_array_elements(body -> 'errors') AS e),
          '... each with a code and a detail');
SELECT ok((SELECT e ->> 'detail' ILIKE '%string%' FROM invalid, jsonb_array_elements(body -> 'errors') AS e
            WHERE e ->> 'pointer' = '/credit_transfers/1/amount'),
          'an amount sent as a JSON number is told to be sent as a string');
SELECT is(pg_temp.written(:acct), :'before_invalid'::bigint[], 'an invalid request writes nothing');

SELECT results_eq(
    $$SELECT e ->> 'pointer' FROM bps.bulk_transfer('{"credit_transfers": []}') AS r,
             jsonb_array_elements(r.body -> 'errors') AS e ORDER BY 1$$,
    $$VALUES ('/credit_transfers'), ('/organization_bic'), ('/organization_iban')$$,
    'missing top-level fields and an empty credit_transfers are each reported');
SELECT results_eq(
    $$SELECT r.status, e ->> 'pointer' FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001', '{"amount": "1"}')) AS r,
             jsonb_array_elements(r.body -> 'errors') AS e$$,
    $$VALUES (422, '/credit_transfers')$$,
    'credit_transfers that is not an array gets 422 on /credit_transfers');
SELECT results_eq(
    $$SELECT r.status, r.body ->> 'code', r.body -> 'errors' -> 0 ->> 'pointer' FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001', jsonb_build_array(pg_temp.xfer('1')))
          || '{"organization_name": "Someone Else"}') AS r$$,
    $$VALUES (422, 'validation_failed', '/organization_name')$$,
    'an organization_name that does not match the account gets 422');
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001', jsonb_build_array(pg_temp.xfer('1', 'name case')))
          || '{"organization_name": "  TAP org "}')$$,
    $$VALUES (201)$$,
    'organization_name matches case-insensitively and trimmed');
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001', jsonb_build_array(pg_temp.xfer('1', 'no name')))
          - 'organization_name')$$,
    $$VALUES (201)$$,
    'organization_name is optional');
SELECT results_eq(
    $$SELECT status, body -> 'errors' -> 0 ->> 'pointer' FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001',
                      jsonb_build_array(pg_temp.xfer('1', 'usd') || '{"currency": "USD"}')))$$,
    $$VALUES (422, '/credit_transfers/0/currency')$$,
    'a transfer in another currency than the account''s gets 422');
SELECT results_eq(
    $$SELECT status, (body ->> 'total_cents')::bigint FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001',
                      jsonb_build_array(pg_temp.xfer('13.22', 'eur') || '{"currency": "EUR"}')))$$,
    $$VALUES (201, 1322::bigint)$$,
    'a transfer naming the account''s currency is accepted');
SELECT results_eq(
    $$SELECT status, body -> 'transfers' -> 0 ->> 'client_reference' FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001',
                      jsonb_build_array(pg_temp.xfer('1', 'ref') || '{"client_reference": "INV-42"}')))$$,
    $$VALUES (201, 'INV-42')$$,
    'client_reference is echoed back per transfer');
SELECT results_eq(
    $$SELECT status, body -> 'errors' -> 0 ->> 'pointer' FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001', jsonb_build_array(pg_temp.xfer('1', '   '))))$$,
    $$VALUES (422, '/credit_transfers/0/description')$$,
    'a blank description gets 422');
SELECT results_eq(
    $$SELECT status, body -> 'errors' -> 0 ->> 'pointer' FROM bps.bulk_transfer(
          pg_temp.req('FR7620000000000000000000001',
                      jsonb_build_array(pg_temp.xfer('1', 'typed') || '{"counterparty_name": 7}')))$$,
    $$VALUES (422, '/credit_transfers/0/counterparty_name')$$,
    'a counterparty_name that is not a string gets 422');
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(pg_temp.req('FR7620000000000000000000001',
          jsonb_build_array(pg_temp.xfer('1', repeat('d', 140)) || jsonb_build_object(
              'counterparty_name', repeat('n', 70), 'counterparty_iban', repeat('I', 34),
              'counterparty_bic', repeat('B', 11), 'client_reference', repeat('r', 35)))))$$,
    $$VALUES (201)$$,
    'fields at their maximum lengths are accepted');

-- Strict counterparty checking: ISO 13616 IBAN and ISO 9362 BIC.
SELECT bps.create_bank_account('Tap Org', 'FR7620000000000000000000003', 'TAPBFRPPXXX', 10000, 'EUR', 'strict')
    AS strict_acct \gset
SELECT results_eq(
    $$SELECT status, body -> 'errors' -> 0 ->> 'pointer' FROM bps.bulk_transfer(pg_temp.req(
          'FR7620000000000000000000003',
          jsonb_build_array(pg_temp.xfer('1', 'bad iban') || '{"counterparty_iban": "DE89370400440532013001"}')))$$,
    $$VALUES (422, '/credit_transfers/0/counterparty_iban')$$,
    'a strict account rejects an IBAN with wrong check digits');
SELECT results_eq(
    $$SELECT status, body -> 'errors' -> 0 ->> 'pointer' FROM bps.bulk_transfer(pg_temp.req(
          'FR7620000000000000000000003',
          jsonb_build_array(pg_temp.xfer('1', 'bad bic') || '{"counterparty_iban": "DE89370400440532013000",
                                                             "counterparty_bic": "1234"}')))$$,
    $$VALUES (422, '/credit_transfers/0/counterparty_bic')$$,
    'a strict account rejects a malformed BIC');
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(pg_temp.req(
          'FR7620000000000000000000003',
          jsonb_build_array(pg_temp.xfer('1', 'good') || '{"counterparty_iban": "DE89370400440532013000",
                                                          "counterparty_bic": "COBADEFFXXX"}')))$$,
    $$VALUES (201)$$,
    'a strict account accepts a valid IBAN and BIC');
SELECT results_eq(
    $$SELECT status FROM bps.bulk_transfer(pg_temp.req(
          'FR7620000000000000000000001',
          jsonb_build_array(pg_temp.xfer('1', 'placeholder') || '{"counterparty_iban": "DE89370400440532013001"}')))$$,
    $$VALUES (201)$$,
    'a basic account accepts a placeholder IBAN');

-- Every error is an RFC 9457 problem document with a machine-readable code.
CREATE TEMP TABLE problems AS
SELECT r.status, r.body FROM bps.bulk_transfer('[]') AS r
UNION ALL SELECT r.status, r.body FROM bps.bulk_transfer('{}') AS r
UNION ALL SELECT r.status, r.body FROM bps.bulk_transfer(
    pg_temp.req('FR7620000000000000000000999', jsonb_build_array(pg_temp.xfer('1')))) AS r
UNION ALL SELECT r.status, r.body FROM bps.bulk_transfer(
    pg_temp.req('FR7620000000000000000000003', jsonb_build_array(pg_temp.xfer('1000', 'too much')
        || '{"counterparty_iban": "DE89370400440532013000", "counterparty_bic": "COBADEFFXXX"}'))) AS r;
SELECT results_eq('SELECT status FROM problems', 'VALUES (400), (422), (404), (422)',
                  'the error cases give 400, 422, 404 and 422');
SELECT ok((SELECT bool_and(body ?& ARRAY['type', 'title', 'status', 'detail', 'code']
                           AND (body ->> 'status')::int = status) FROM problems),
          'each error body has type, title, status (equal to the status), detail and code');

-- A crafted body cannot spend what it does not have: one transfer per maximum amount, far over the balance.
SELECT results_eq(
    $$SELECT status, body ->> 'code' FROM bps.bulk_transfer(pg_temp.req('FR7620000000000000000000001',
          (SELECT jsonb_agg(pg_temp.xfer('999999999.99', 'max ' || i)) FROM generate_series(1, 100) AS i)))$$,
    $$VALUES (422, 'insufficient_funds')$$,
    '100 transfers of the maximum amount are totalled without overflow and denied');

-- Every change above left a journal that explains the balances.
SELECT is((SELECT bool_and(consistent) FROM bps.account_audit WHERE bank_account_id IN (:acct, :big, :strict_acct)),
          true, 'the journal stays consistent for every account used');

SELECT * FROM finish();
ROLLBACK;
