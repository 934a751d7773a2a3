-- Retries with an idempotency key: the second argument of bps.bulk_transfer, the Idempotency-Key header over HTTP.

SELECT bps.create_bank_account('ACME Corp', 'FR10474608000002006107XXXXX', 'OIVUSCLQXXX', 7777777);

-- The first call runs the request. response.headers holds what HTTP adds to the answer; it lasts one
-- transaction, so it is read in the same statement.
SELECT r.status, r.body ->> 'bulk_transfer_id' AS bulk_transfer_id, current_setting('response.headers') AS headers
  FROM bps.bulk_transfer('{"organization_iban": "FR10474608000002006107XXXXX", "organization_bic": "OIVUSCLQXXX",
    "credit_transfers": [{"amount": "700", "counterparty_name": "Bugs Bunny", "counterparty_bic": "RNJZNTMC",
                          "counterparty_iban": "FR0010009380540930414023042", "description": "Carrots"}]}',
    'payroll-2026-11') AS r;

-- A retry with the same key and payload gets the stored answer again, marked Idempotent-Replayed, and pays nothing.
SELECT r.status, r.body ->> 'bulk_transfer_id' AS bulk_transfer_id, current_setting('response.headers') AS headers
  FROM bps.bulk_transfer('{"organization_iban": "FR10474608000002006107XXXXX", "organization_bic": "OIVUSCLQXXX",
    "credit_transfers": [{"amount": "700", "counterparty_name": "Bugs Bunny", "counterparty_bic": "RNJZNTMC",
                          "counterparty_iban": "FR0010009380540930414023042", "description": "Carrots"}]}',
    'payroll-2026-11') AS r;

-- The same key with another payload is refused.
SELECT status, body ->> 'code' AS code, body ->> 'detail' AS detail
  FROM bps.bulk_transfer('{"organization_iban": "FR10474608000002006107XXXXX", "organization_bic": "OIVUSCLQXXX",
    "credit_transfers": [{"amount": "800", "counterparty_name": "Bugs Bunny", "counterparty_bic": "RNJZNTMC",
                          "counterparty_iban": "FR0010009380540930414023042", "description": "Carrots"}]}',
    'payroll-2026-11');

-- One bulk transfer, one debit.
SELECT id, transfer_count, total_cents, idempotency_key, status FROM bps.bulk_transfer_summaries;
SELECT balance_cents FROM bps.bank_accounts;
