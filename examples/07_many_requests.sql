-- Many requests in one call: bps.bulk_transfers answers each as if they had come one after the other, in
-- one transaction. It is what the HTTP service sends when requests arrive while its calls are busy.

SELECT bps.create_bank_account('Wonka Ltd', 'DE89370400440532013000', 'COBADEFFXXX', 100000);

-- Four requests on an account holding 1,000.00 EUR: 600 fits; 500 no longer does (and takes nothing); the
-- 600 request again is a duplicate of the first; 300 fits in what is left.
-- (A 409 names the bulk transfer it repeats; a 422 the balance it was refused on.)
SELECT r.status, r.body ->> 'code' AS code, r.body ->> 'bulk_transfer_id' AS bulk_transfer_id,
       r.body ->> 'balance_cents' AS balance_cents, r.headers
  FROM bps.bulk_transfers(ARRAY[
    '{"organization_iban": "DE89370400440532013000", "organization_bic": "COBADEFFXXX", "credit_transfers": [
       {"amount": "600", "counterparty_name": "Charlie", "counterparty_bic": "AGRIFRPP",
        "counterparty_iban": "FR7630006000011234567890189", "description": "Wonka bars"}]}',
    '{"organization_iban": "DE89370400440532013000", "organization_bic": "COBADEFFXXX", "credit_transfers": [
       {"amount": "500", "counterparty_name": "Veruca", "counterparty_bic": "AGRIFRPP",
        "counterparty_iban": "FR7630006000011234567890189", "description": "A squirrel"}]}',
    '{"organization_iban": "DE89370400440532013000", "organization_bic": "COBADEFFXXX", "credit_transfers": [
       {"amount": "600", "counterparty_name": "Charlie", "counterparty_bic": "AGRIFRPP",
        "counterparty_iban": "FR7630006000011234567890189", "description": "Wonka bars"}]}',
    '{"organization_iban": "DE89370400440532013000", "organization_bic": "COBADEFFXXX", "credit_transfers": [
       {"amount": "300", "counterparty_name": "Augustus", "counterparty_bic": "AGRIFRPP",
        "counterparty_iban": "FR7630006000011234567890189", "description": "Fudge"}]}']::jsonb[]) AS r;

-- One debit per request in the journal, each with the balance before and after it.
SELECT account_version, kind, amount_cents, previous_balance_cents, balance_cents, bulk_transfer_id
  FROM bps.account_entries ORDER BY account_version;
