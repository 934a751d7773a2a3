-- All or nothing: an invalid request lists every problem, a request short of money writes nothing, and a
-- top-up lets the same request through.

-- 'strict' checks counterparty IBANs (ISO 13616 mod 97) and BICs (ISO 9362); the default 'basic' does not.
SELECT bps.create_bank_account('Wonka Ltd', 'DE89 3704 0044 0532 0130 00', 'COBADEFF', 100000, 'EUR', 'strict');

-- Stored upper case without spaces; an 8-character BIC gets the head-office branch XXX.
SELECT id, organization_name, iban, bic, balance_cents, counterparty_check FROM bps.bank_accounts;

-- Every problem of the request, each with its JSON pointer; nothing is written.
SELECT status, jsonb_pretty(body) AS body FROM bps.bulk_transfer('{
  "organization_iban": "DE89370400440532013000", "organization_bic": "COBADEFFXXX",
  "credit_transfers": [
    {"amount": 12.5, "counterparty_name": "Charlie", "counterparty_iban": "FR7630006000011234567890180",
     "counterparty_bic": "AGRIFRPP", "description": "Golden ticket"},
    {"amount": "1,5", "counterparty_name": "", "counterparty_iban": "FR7630006000011234567890189",
     "counterparty_bic": "AGRIFRPP", "descripton": "Chocolate"}]}');

-- 1,200.00 EUR from an account that holds 1,000.00: denied whole.
SELECT status, jsonb_pretty(body) AS body FROM bps.bulk_transfer('{
  "organization_iban": "DE89370400440532013000", "organization_bic": "COBADEFFXXX",
  "credit_transfers": [{"amount": "1200", "counterparty_name": "Charlie", "counterparty_bic": "AGRIFRPP",
                        "counterparty_iban": "FR7630006000011234567890189", "description": "Golden ticket"}]}');

-- A denied request is not remembered: top the account up (this returns the new balance), then send it again.
SELECT bps.credit_bank_account(1, 50000);

SELECT status, body ->> 'bulk_transfer_id' AS bulk_transfer_id, body ->> 'balance_cents' AS balance_cents
  FROM bps.bulk_transfer('{
  "organization_iban": "DE89370400440532013000", "organization_bic": "COBADEFFXXX",
  "credit_transfers": [{"amount": "1200", "counterparty_name": "Charlie", "counterparty_bic": "AGRIFRPP",
                        "counterparty_iban": "FR7630006000011234567890189", "description": "Golden ticket"}]}');

-- The journal: every balance change with the balance before and after, one entry per account version.
SELECT account_version, kind, amount_cents, previous_balance_cents, balance_cents, bulk_transfer_id
  FROM bps.account_entries WHERE bank_account_id = 1 ORDER BY account_version;

-- Each balance beside what its journal says: consistent must be true.
SELECT * FROM bps.account_audit;
