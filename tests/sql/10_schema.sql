-- The schema objects docs/sql.md promises a DBA, and the constraints that guard the money.
BEGIN;
SELECT plan(42);

SELECT has_schema('bps');

-- bps.bank_accounts
SELECT has_table('bps', 'bank_accounts', 'bps.bank_accounts exists');
SELECT has_column('bps', 'bank_accounts', 'id', 'bank_accounts.id');
SELECT has_column('bps', 'bank_accounts', 'organization_name', 'bank_accounts.organization_name');
SELECT has_column('bps', 'bank_accounts', 'iban', 'bank_accounts.iban');
SELECT has_column('bps', 'bank_accounts', 'bic', 'bank_accounts.bic');
SELECT has_column('bps', 'bank_accounts', 'balance_cents', 'bank_accounts.balance_cents');
SELECT has_column('bps', 'bank_accounts', 'currency', 'bank_accounts.currency');
SELECT col_type_is('bps', 'bank_accounts', 'balance_cents', 'bigint', 'balances are bigint cents');
SELECT col_not_null('bps', 'bank_accounts', 'balance_cents', 'a balance is never NULL');
SELECT col_is_pk('bps', 'bank_accounts', 'id', 'bank_accounts.id is the primary key');
SELECT col_is_unique('bps', 'bank_accounts', 'iban', 'an IBAN names one account');

-- bps.transfers
SELECT has_table('bps', 'transfers', 'bps.transfers exists');
SELECT has_column('bps', 'transfers', 'id', 'transfers.id');
SELECT has_column('bps', 'transfers', 'bank_account_id', 'transfers.bank_account_id');
SELECT has_column('bps', 'transfers', 'bulk_transfer_id', 'transfers.bulk_transfer_id');
SELECT has_column('bps', 'transfers', 'counterparty_name', 'transfers.counterparty_name');
SELECT has_column('bps', 'transfers', 'counterparty_iban', 'transfers.counterparty_iban');
SELECT has_column('bps', 'transfers', 'counterparty_bic', 'transfers.counterparty_bic');
SELECT has_column('bps', 'transfers', 'amount_cents', 'transfers.amount_cents');
SELECT has_column('bps', 'transfers', 'amount_currency', 'transfers.amount_currency');
SELECT has_column('bps', 'transfers', 'description', 'transfers.description');
SELECT has_column('bps', 'transfers', 'status', 'transfers.status');
SELECT col_type_is('bps', 'transfers', 'amount_cents', 'bigint', 'amounts are bigint cents');
SELECT col_type_is('bps', 'transfers', 'bank_account_id', 'bigint', 'transfers.bank_account_id is bigint');
SELECT col_not_null('bps', 'transfers', 'amount_cents', 'an amount is never NULL');
SELECT col_default_is('bps', 'transfers', 'status', 'pending', 'a transfer starts pending');
-- The link to the bulk transfer is checked per statement (sql/06_integrity.sql), not by a per-row foreign key.
SELECT trigger_is('bps', 'transfers', 'transfers_belong_to_their_bulk_transfer',
                  'bps', 'transfers_check_bulk_transfers',
                  'a transfer belongs to a bulk transfer of the same account');

-- The API functions and the read views.
SELECT has_function('bps', 'bulk_transfer', ARRAY['jsonb', 'text'], 'bps.bulk_transfer(jsonb, text)');
SELECT has_function('bps', 'create_bank_account', ARRAY['text', 'text', 'text', 'bigint', 'text', 'text'],
                    'bps.create_bank_account(name, iban, bic, balance_cents, currency, counterparty_check)');
SELECT has_function('bps', 'credit_bank_account', ARRAY['bigint', 'bigint'], 'bps.credit_bank_account');
SELECT function_lang_is('bps', 'bulk_transfer', ARRAY['jsonb', 'text'], 'plpgsql',
                        'bps.bulk_transfer is one PL/pgSQL function');
SELECT has_view('bps', 'account_audit', 'bps.account_audit exists');
SELECT has_view('bps', 'bulk_transfer_summaries', 'bps.bulk_transfer_summaries exists');

-- create_bank_account with its defaults: EUR, journalled opening balance.
SELECT bps.create_bank_account('Schema Test Org', 'FR7610000000000000000000010', 'SCHMFRPP', 500) AS account_id \gset
SELECT results_eq(
    $$SELECT organization_name, iban, bic, balance_cents, currency::text FROM bps.bank_accounts WHERE id = $$ || :account_id,
    $$VALUES ('Schema Test Org', 'FR7610000000000000000000010', 'SCHMFRPPXXX', 500::bigint, 'EUR')$$,
    'create_bank_account stores the account, EUR by default, an 8-character BIC completed with XXX');
SELECT ok((SELECT consistent FROM bps.account_audit WHERE bank_account_id = :account_id),
          'a new account''s journal is consistent');

-- Constraints doing real work.
SELECT throws_ok(
    $$SELECT bps.create_bank_account('Other Org', 'FR7610000000000000000000010', 'OTHRFRPPXXX', 1)$$,
    '23505', NULL, 'a duplicate IBAN is rejected');
SELECT throws_ok(
    $$SELECT bps.create_bank_account('Negative Org', 'FR7610000000000000000000011', 'SCHMFRPPXXX', -1)$$,
    '23514', NULL, 'a negative opening balance is rejected');
SELECT throws_ok(
    $$UPDATE bps.bank_accounts SET balance_cents = -1 WHERE id = $$ || :account_id,
    '23514', NULL, 'a balance never goes negative');
SELECT throws_ok(
    $$SELECT bps.credit_bank_account($$ || :account_id || $$, 0)$$,
    '23514', NULL, 'a credit of 0 is rejected');

INSERT INTO bps.bulk_transfers (bank_account_id, payload_hash, transfer_count, total_cents, currency, pending_count)
VALUES (:account_id, sha256('schema test'), 1, 100, 'EUR', 1)
RETURNING id AS bulk_id \gset
SELECT throws_ok(
    format($$INSERT INTO bps.transfers (id, bank_account_id, bulk_transfer_id, position, counterparty_name,
                                        counterparty_iban, counterparty_bic, amount_cents, amount_currency, description)
             VALUES (bps.transfer_id(%s, 0), %s, %s, 0, 'Bip Bip', 'EE383680981021245685', 'CRLYFRPPTOU', 0, 'EUR', 'Wonderland')$$,
           :bulk_id, :account_id, :bulk_id),
    '23514', NULL, 'a transfer of 0 cents is rejected');
SELECT throws_ok(
    format($$INSERT INTO bps.transfers (id, bank_account_id, bulk_transfer_id, position, counterparty_name,
                                        counterparty_iban, counterparty_bic, amount_cents, amount_currency, description)
             VALUES (bps.transfer_id(%s, 0), %s, %s, 0, 'Bip Bip', 'EE383680981021245685', 'CRLYFRPPTOU', 100, 'EUR', 'Wonderland')$$,
           :bulk_id + 1000000, :account_id, :bulk_id + 1000000),
    '23503', NULL, 'a transfer of a bulk transfer that does not exist is rejected');

SELECT * FROM finish();
ROLLBACK;
