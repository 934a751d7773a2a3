-- API keys: made and revoked in SQL by the database owner. Only a hash of a key is stored.

SELECT bps.create_bank_account('ACME Corp', 'FR10474608000002006107XXXXX', 'OIVUSCLQXXX', 7777777);

-- A key for account 1 with both scopes and no expiry. The key is shown only now: keep it in a psql variable.
SELECT bps.create_api_key(ARRAY[1], 'payroll robot') AS api_key \gset
\echo :api_key

-- A read-only key that expires in 90 days.
SELECT bps.create_api_key(ARRAY[1], 'reporting', ARRAY['transfers:read'], now() + interval '90 days') IS NOT NULL
    AS created;

-- The keys, without their secret.
SELECT id, label, hint, bank_account_ids, scopes, expires_at IS NOT NULL AS expires, state FROM bps.api_keys;

-- The service's entry point checks the key, then calls bps.bulk_transfer limited to the key's accounts.
SELECT status, body ->> 'bulk_transfer_id' AS bulk_transfer_id FROM bps_api.bulk_transfer(:'api_key', '{
  "organization_iban": "FR10474608000002006107XXXXX", "organization_bic": "OIVUSCLQXXX",
  "credit_transfers": [{"amount": "19.99", "counterparty_name": "Daffy Duck", "counterparty_bic": "DDFCNLAM",
                        "counterparty_iban": "NL24ABNA5055036109", "description": "2020-10-01/DuckCoin"}]}');

-- Revoke by the key's text (or by its id: bps.revoke_api_key(1)); true when it was live. It stops working at once.
SELECT bps.revoke_api_key(:'api_key');
SELECT status, body ->> 'code' AS code FROM bps_api.bulk_transfer(:'api_key', '{}');
SELECT id, label, state FROM bps.api_keys ORDER BY id;
