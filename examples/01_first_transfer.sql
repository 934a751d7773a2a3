-- A first bulk transfer from psql: the demo account pays two people, and the same request again pays no one.
-- bps.bulk_transfer answers (status, body): exactly what HTTP answers for the same request.

-- The demo account, as `make run` creates it: name, IBAN, BIC, opening balance in cents. Returns its id.
SELECT bps.create_bank_account('ACME Corp', 'FR10474608000002006107XXXXX', 'OIVUSCLQXXX', 7777777);

-- Pay 14.50 and 0.29 EUR: every transfer is recorded and the balance goes down by the total, in one transaction.
-- (SELECT * FROM bps.bulk_transfer(...) gives the body on one line.)
SELECT status, jsonb_pretty(body) AS body FROM bps.bulk_transfer('{
  "organization_iban": "FR10474608000002006107XXXXX", "organization_bic": "OIVUSCLQXXX",
  "credit_transfers": [
    {"amount": "14.50", "counterparty_name": "Bip Bip", "counterparty_iban": "EE383680981021245685",
     "counterparty_bic": "CRLYFRPPTOU", "description": "Wonderland/4410", "client_reference": "inv-4410"},
    {"amount": "0.29", "counterparty_name": "Road Runner", "counterparty_iban": "FR7630006000011234567890189",
     "counterparty_bic": "AGRIFRPP", "description": "Wonderland/4411"}]}');

-- The same payload again (key order and spacing do not matter) is a duplicate: 409, nothing is paid twice.
SELECT status, jsonb_pretty(body) AS body FROM bps.bulk_transfer('{
  "organization_bic": "OIVUSCLQXXX", "organization_iban": "FR10474608000002006107XXXXX",
  "credit_transfers": [
    {"counterparty_name": "Bip Bip", "amount": "14.50", "counterparty_iban": "EE383680981021245685",
     "counterparty_bic": "CRLYFRPPTOU", "description": "Wonderland/4410", "client_reference": "inv-4410"},
    {"amount": "0.29", "counterparty_name": "Road Runner", "counterparty_iban": "FR7630006000011234567890189",
     "counterparty_bic": "AGRIFRPP", "description": "Wonderland/4411"}]}');

-- A transfer's id is its bulk transfer's id * 100000 + its position in the request.
SELECT id, position, status, amount_cents, counterparty_name, client_reference FROM bps.transfers_of(1);

-- The bulk transfer as GET /bulk_transfers/1 shows it.
SELECT status, jsonb_pretty(body) AS body FROM bps.get_bulk_transfer(1);

SELECT id, organization_name, iban, bic, balance_cents, currency FROM bps.bank_accounts;
