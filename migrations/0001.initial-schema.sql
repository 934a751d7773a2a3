-- The BPS schema: accounts, bulk transfers, transfers, idempotency records and the account journal.
-- Functions live in sql/ and are re-applied after every migrate; a migration never holds one.

CREATE SCHEMA IF NOT EXISTS bps;

-- One row of tunables, read by bps.bulk_transfer on every call; a DBA changes them with UPDATE.
CREATE TABLE bps.settings (
    singleton                 boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    max_transfers_per_request integer NOT NULL DEFAULT 10000 CHECK (max_transfers_per_request > 0),
    dedup_window              interval NOT NULL DEFAULT interval '24 hours' CHECK (dedup_window >= interval '0'),
    idempotency_retention     interval NOT NULL DEFAULT interval '24 hours'
                              CHECK (idempotency_retention >= interval '24 hours')
);
INSERT INTO bps.settings DEFAULT VALUES;

CREATE TABLE bps.bank_accounts (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    organization_name  text NOT NULL CHECK (btrim(organization_name) <> ''),
    iban               text NOT NULL UNIQUE CHECK (iban ~ '^[A-Z0-9]{1,34}$'),
    bic                text NOT NULL CHECK (bic ~ '^[A-Z0-9]{1,11}$'),
    balance_cents      bigint NOT NULL CHECK (balance_cents >= 0),
    currency           char(3) NOT NULL DEFAULT 'EUR' CHECK (currency ~ '^[A-Z]{3}$'),
    counterparty_check text NOT NULL DEFAULT 'basic' CHECK (counterparty_check IN ('basic', 'strict')),
    -- Bumped by every balance change; the journal's account_version follows it.
    version            bigint NOT NULL DEFAULT 1 CHECK (version > 0),
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE bps.bulk_transfers (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    bank_account_id bigint NOT NULL REFERENCES bps.bank_accounts (id),
    -- sha256 of the payload's canonical jsonb text: key order and whitespace do not change it.
    payload_hash    bytea NOT NULL CHECK (length(payload_hash) = 32),
    idempotency_key text CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    transfer_count  integer NOT NULL CHECK (transfer_count > 0),
    total_cents     bigint NOT NULL CHECK (total_cents > 0),
    currency        char(3) NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The target of the transfers' composite foreign key, so a transfer always debits its request's account.
    UNIQUE (id, bank_account_id)
);
-- The duplicate check: same payload, same account, recent. payload_hash leads: an index led by
-- bank_account_id would tempt the planner into scanning a whole account's history for a foreign-key check.
CREATE INDEX bulk_transfers_dedup_idx ON bps.bulk_transfers (payload_hash, bank_account_id, created_at);

CREATE TABLE bps.transfers (
    id                bigint GENERATED ALWAYS AS IDENTITY (CACHE 1000) PRIMARY KEY,
    bank_account_id   bigint NOT NULL,
    bulk_transfer_id  bigint NOT NULL,
    position          integer NOT NULL CHECK (position >= 0),
    counterparty_name text NOT NULL CHECK (counterparty_name <> '' AND length(counterparty_name) <= 70),
    counterparty_iban text NOT NULL CHECK (counterparty_iban <> '' AND length(counterparty_iban) <= 34),
    counterparty_bic  text NOT NULL CHECK (counterparty_bic <> '' AND length(counterparty_bic) <= 11),
    amount_cents      bigint NOT NULL CHECK (amount_cents > 0 AND amount_cents <= 99999999999),
    amount_currency   char(3) NOT NULL,
    description       text NOT NULL CHECK (description <> '' AND length(description) <= 140),
    client_reference  text CHECK (length(client_reference) <= 35),
    status            text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'executed', 'failed')),
    status_changed_at timestamptz,
    failure_reason    text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (bulk_transfer_id, bank_account_id) REFERENCES bps.bulk_transfers (id, bank_account_id),
    UNIQUE (bulk_transfer_id, position)
);

-- An Idempotency-Key and the outcome it was first given; status and body are set before commit.
CREATE TABLE bps.idempotency_keys (
    bank_account_id  bigint NOT NULL REFERENCES bps.bank_accounts (id),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    payload_hash     bytea NOT NULL CHECK (length(payload_hash) = 32),
    status           integer CHECK (status BETWEEN 200 AND 599),
    body             jsonb,
    bulk_transfer_id bigint REFERENCES bps.bulk_transfers (id),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bank_account_id, idempotency_key)
);

-- The account journal: every balance change with the balance before and after, so any balance is auditable.
CREATE TABLE bps.account_entries (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    bank_account_id        bigint NOT NULL REFERENCES bps.bank_accounts (id),
    account_version        bigint NOT NULL,
    kind                   text NOT NULL CHECK (kind IN ('opening', 'bulk_debit', 'refund', 'credit')),
    amount_cents           bigint NOT NULL,
    previous_balance_cents bigint NOT NULL CHECK (previous_balance_cents >= 0),
    balance_cents          bigint NOT NULL CHECK (balance_cents >= 0),
    bulk_transfer_id       bigint REFERENCES bps.bulk_transfers (id),
    transfer_id            bigint REFERENCES bps.transfers (id),
    created_at             timestamptz NOT NULL DEFAULT now(),
    CHECK (balance_cents = previous_balance_cents + amount_cents),
    CHECK (amount_cents <> 0 OR kind = 'opening'),
    -- One entry per account version: the journal is a single unbroken chain per account.
    UNIQUE (bank_account_id, account_version)
);
