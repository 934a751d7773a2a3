-- API keys from psql, as a DBA makes and ends them: the key's shape, the view, revocation, scopes, and the
-- key's accounts as the only ones the service's entry point may touch.
BEGIN;
SELECT plan(17);

SELECT bps.create_bank_account('Key Org', 'FR7630000000000000000000101', 'KEYSFRPPXXX', 10000) AS acct \gset
SELECT bps.create_bank_account('Key Org', 'FR7630000000000000000000102', 'KEYSFRPPXXX', 10000) AS other \gset
SELECT bps.create_api_key(ARRAY[:acct::bigint], 'payroll') AS key \gset
SELECT bps.create_api_key(ARRAY[:acct::bigint], 'reader', ARRAY['transfers:read']) AS reader \gset
SELECT id AS key_id FROM bps.api_keys WHERE label = 'payroll' ORDER BY id DESC LIMIT 1 \gset

SELECT matches(:'key'::text, '^bps_[0-9A-Za-z]{38}$', 'a key is bps_ and 38 base62 characters');
SELECT is(right(:'key', 6), bps.api_key_checksum(left(:'key', 36)), 'its last 6 characters check the rest');
SELECT is((SELECT count(*) FROM bps.api_credentials WHERE key_hash = sha256(convert_to(:'key', 'UTF8'))), 1::bigint,
          'only its sha256 is stored');
SELECT is((SELECT bank_account_ids FROM bps.api_keys WHERE id = :key_id), ARRAY[:acct::bigint], 'the view lists its accounts');
SELECT is((SELECT scopes FROM bps.api_keys WHERE id = :key_id), ARRAY['transfers:read', 'transfers:write'],
          '... and its scopes (both by default)');
SELECT is((SELECT state FROM bps.api_keys WHERE id = :key_id), 'live', '... and that it works');
SELECT hasnt_column('bps', 'api_keys', 'key_hash', 'the view shows no hash');

CREATE FUNCTION pg_temp.req(iban text) RETURNS jsonb
LANGUAGE sql AS $$
    SELECT jsonb_build_object('organization_iban', iban, 'organization_bic', 'KEYSFRPPXXX',
        'credit_transfers', jsonb_build_array(jsonb_build_object('amount', '1.00', 'counterparty_name', 'Bip Bip',
            'counterparty_iban', 'EE383680981021245685', 'counterparty_bic', 'CRLYFRPPTOU',
            'description', 'keys ' || iban)))
$$;

SELECT is((SELECT status FROM bps_api.bulk_transfer(:'key', pg_temp.req('FR7630000000000000000000101'))), 201,
          'the key pays from its account');
SELECT is((SELECT body ->> 'bank_account_id' FROM bps_api.get_bulk_transfer(:'key',
              (SELECT max(id)::text FROM bps.bulk_transfers WHERE bank_account_id = :acct))), :'acct'::text,
          '... and reads what it paid');
SELECT is((SELECT api_key_id FROM bps.bulk_transfers WHERE bank_account_id = :acct ORDER BY id DESC LIMIT 1),
          :key_id::bigint, 'the bulk transfer names the key that made it');
SELECT is((SELECT status FROM bps_api.bulk_transfer(:'key', pg_temp.req('FR7630000000000000000000102'))), 404,
          'another account of the same bank is not found');
SELECT is((SELECT status FROM bps_api.bulk_transfer(:'reader', pg_temp.req('FR7630000000000000000000101'))), 403,
          'a read-only key may not pay');
SELECT is((SELECT status FROM bps_api.bulk_transfer(NULL, pg_temp.req('FR7630000000000000000000101'))), 401,
          'no key: 401');

SELECT is(bps.revoke_api_key(:'key'), true, 'revoking a live key says true');
SELECT is(bps.revoke_api_key(:'key'), false, '... and false the second time');
SELECT is((SELECT status FROM bps_api.bulk_transfer(:'key', pg_temp.req('FR7630000000000000000000101'))), 401,
          'a revoked key is refused at once');
SELECT is((SELECT state FROM bps.api_keys WHERE id = :key_id), 'revoked', 'the view says so');

SELECT * FROM finish();
ROLLBACK;
