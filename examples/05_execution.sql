-- From pending to executed, by hand: what an executor does, one SQL call per step.

SELECT bps.create_bank_account('ACME Corp', 'FR10474608000002006107XXXXX', 'OIVUSCLQXXX', 7777777);

-- Two bulk transfers: 1 of two transfers, 2 of one.
SELECT status, body ->> 'bulk_transfer_id' AS bulk_transfer_id FROM bps.bulk_transfer('{
  "organization_iban": "FR10474608000002006107XXXXX", "organization_bic": "OIVUSCLQXXX",
  "credit_transfers": [
    {"amount": "14.50", "counterparty_name": "Road Runner", "counterparty_iban": "FR7630006000011234567890189",
     "counterparty_bic": "AGRIFRPP", "description": "Wonderland/4411"},
    {"amount": "700", "counterparty_name": "d", "counterparty_iban": "f", "counterparty_bic": "e",
     "description": "g"}]}');
SELECT status, body ->> 'bulk_transfer_id' AS bulk_transfer_id FROM bps.bulk_transfer('{
  "organization_iban": "FR10474608000002006107XXXXX", "organization_bic": "OIVUSCLQXXX",
  "credit_transfers": [{"amount": "61238", "counterparty_name": "Wile E Coyote", "counterparty_bic": "ZDRPLBQI",
                        "counterparty_iban": "DE9935420810036209081725212", "description": "Invoice/12"}]}');

-- Cancel bulk transfer 2 while it is pending: its transfer is cancelled and refunded at once.
SELECT status, body ->> 'status' AS bulk_status, body ->> 'cancelled_count' AS cancelled
  FROM bps.cancel_bulk_transfer(2);

-- Claim up to 100 due transfers for 30 seconds: they are processing, in run 1 under attempt 1.
SELECT run_id, attempt, recovering, transfer_id, amount_cents, counterparty_iban
  FROM bps.claim_transfers('dba', 100, '30 seconds');

-- The rail executed the first and refused the second (AC01: "f" is no IBAN). Settling the run under its attempt
-- records both, and refunds the failed one in the same transaction. Returns how many transfers changed.
SELECT bps.settle_transfers(ARRAY[1], ARRAY[1], ARRAY[100000, 100001], ARRAY['executed', 'failed'],
                            ARRAY[NULL, 'AC01']);

-- Each transfer's final status, and each bulk transfer's, derived from its transfers.
SELECT id, bulk_transfer_id, status, failure_reason, amount_cents FROM bps.transfers ORDER BY id;
SELECT id, status, transfer_count, pending_count, executed_count, failed_count, cancelled_count
  FROM bps.bulk_transfer_summaries ORDER BY id;

-- The journal: the debits, the cancelled transfer's refund and the failed transfer's.
SELECT account_version, kind, amount_cents, balance_cents, bulk_transfer_id, transfer_id
  FROM bps.account_entries ORDER BY account_version;
SELECT bank_account_id, balance_cents, consistent FROM bps.account_audit;
