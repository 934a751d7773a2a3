-- Bank accounts: opening one and crediting it, each balance change journalled in bps.account_entries.

-- Opens an account and journals its opening balance as version 1; returns the new account's id.
CREATE OR REPLACE FUNCTION bps.create_bank_account(organization_name text, iban text, bic text,
                                                   balance_cents bigint, currency text DEFAULT 'EUR',
                                                   counterparty_check text DEFAULT 'basic')
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    account_id bigint;
BEGIN
    INSERT INTO bps.bank_accounts (organization_name, iban, bic, balance_cents, currency, counterparty_check)
    VALUES (bps.trim_space(organization_name), bps.normalize_iban(iban), bps.normalize_bic(bic), balance_cents,
            upper(bps.trim_space(currency)), counterparty_check)
    RETURNING id INTO account_id;

    INSERT INTO bps.account_entries (bank_account_id, account_version, kind, amount_cents,
                                     previous_balance_cents, balance_cents)
    VALUES (account_id, 1, 'opening', create_bank_account.balance_cents, 0, create_bank_account.balance_cents);
    RETURN account_id;
END
$$;

-- Adds money to an account (a top-up), journalled; returns the new balance.
CREATE OR REPLACE FUNCTION bps.credit_bank_account(bank_account_id bigint, amount_cents bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    balance_after bigint;
    version_after bigint;
BEGIN
    IF amount_cents IS NULL OR amount_cents <= 0 THEN
        RAISE EXCEPTION 'a credit must be a positive number of cents, not %', amount_cents
            USING ERRCODE = 'check_violation';
    END IF;
    UPDATE bps.bank_accounts AS a
       SET balance_cents = a.balance_cents + credit_bank_account.amount_cents, version = a.version + 1
     WHERE a.id = credit_bank_account.bank_account_id
    RETURNING a.balance_cents, a.version INTO balance_after, version_after;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no bank account with id %', bank_account_id USING ERRCODE = 'no_data_found';
    END IF;

    INSERT INTO bps.account_entries (bank_account_id, account_version, kind, amount_cents,
                                     previous_balance_cents, balance_cents)
    VALUES (credit_bank_account.bank_account_id, version_after, 'credit', credit_bank_account.amount_cents,
            balance_after - credit_bank_account.amount_cents, balance_after);
    RETURN balance_after;
END
$$;
