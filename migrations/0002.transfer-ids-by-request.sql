-- Transfers keyed by their request: a transfer's id is its bulk transfer's id * 100000 + its position.
--
-- Why: bps.bulk_transfer writes up to max_transfers_per_request rows per call, and every index and per-row
-- check on bps.transfers is paid once per transfer. With ids derived from (bulk_transfer_id, position) the
-- primary key alone orders a request's transfers and enforces one row per position, so the separate
-- (bulk_transfer_id, position) index and the identity sequence go, and the function knows every id
-- without reading the rows back. A request's transfers are the primary-key range
-- [bulk_transfer_id * 100000, bulk_transfer_id * 100000 + 99999] (bps.transfers_of reads it).
--
-- The link to bps.bulk_transfers stays enforced, checked once per statement instead of once per row:
-- the per-row foreign key becomes statement-level triggers (sql/06_integrity.sql creates them).
--
-- Existing transfers are renumbered, and the 201 bodies stored for idempotent replays with them. A 201 a
-- client received before this migration still names the old ids: read them again with GET
-- /bulk_transfers/{id}.

-- A request can no longer hold more transfers than an id has positions (a larger setting is lowered).
UPDATE bps.settings SET max_transfers_per_request = 100000 WHERE max_transfers_per_request > 100000;
ALTER TABLE bps.settings
    ADD CONSTRAINT settings_max_transfers_per_request_fits_ids CHECK (max_transfers_per_request <= 100000);

-- What bps.bulk_transfer's 201 body lists per transfer (to_jsonb of an array of these is its fastest form).
CREATE TYPE bps.transfer_receipt AS (id bigint, client_reference text);

-- A credit transfer's fields as bps.bulk_transfer reads them, each the text of a JSON string: the one
-- column list its passes over the request use (jsonb_populate_recordset) and its rules take.
CREATE TYPE bps.transfer_input AS (
    amount            text,
    currency          text,
    counterparty_name text,
    counterparty_iban text,
    counterparty_bic  text,
    description       text,
    client_reference  text
);

-- Stored replays list their transfers' new ids as bps.bulk_transfer lists them (rebuilt from the rows,
-- while the (bulk_transfer_id, position) index still exists).
UPDATE bps.idempotency_keys AS k
   SET body = jsonb_set(k.body, '{transfers}', (
           SELECT to_jsonb(array_agg((t.bulk_transfer_id * 100000 + t.position,
                                      t.client_reference)::bps.transfer_receipt ORDER BY t.position))
             FROM bps.transfers AS t
            WHERE t.bulk_transfer_id = k.bulk_transfer_id))
 WHERE k.bulk_transfer_id IS NOT NULL AND k.body ? 'transfers';

ALTER TABLE bps.account_entries DROP CONSTRAINT account_entries_transfer_id_fkey;
ALTER TABLE bps.transfers
    DROP CONSTRAINT transfers_bulk_transfer_id_bank_account_id_fkey,
    DROP CONSTRAINT transfers_bulk_transfer_id_position_key,
    DROP CONSTRAINT transfers_pkey,
    DROP CONSTRAINT transfers_position_check;
ALTER TABLE bps.transfers ALTER COLUMN id DROP IDENTITY IF EXISTS;

-- Renumber what exists (the journal's references first).
UPDATE bps.account_entries AS e
   SET transfer_id = t.bulk_transfer_id * 100000 + t.position
  FROM bps.transfers AS t
 WHERE e.transfer_id = t.id;
UPDATE bps.transfers SET id = bulk_transfer_id * 100000 + position;

ALTER TABLE bps.transfers
    ADD CONSTRAINT transfers_pkey PRIMARY KEY (id),
    ADD CONSTRAINT transfers_position_check CHECK (position >= 0 AND position < 100000),
    ADD CONSTRAINT transfers_id_check CHECK (id = bulk_transfer_id * 100000 + position);
ALTER TABLE bps.account_entries
    ADD CONSTRAINT account_entries_transfer_id_fkey FOREIGN KEY (transfer_id) REFERENCES bps.transfers (id);

-- (id, bank_account_id) was unique only as the target of the per-row foreign key.
ALTER TABLE bps.bulk_transfers DROP CONSTRAINT bulk_transfers_id_bank_account_id_key;

COMMENT ON COLUMN bps.transfers.id IS
    'bulk_transfer_id * 100000 + position: a request''s transfers are one primary-key range (see bps.transfers_of)';

-- The account a bulk transfer or an idempotency key names is checked at commit, when bps.bulk_transfer holds
-- the account's row lock already. Checked at once, the foreign key's KEY SHARE lock on a busy account row
-- met another request's debit lock and made PostgreSQL build a multixact for the pair, on every request
-- to a hot account.
ALTER TABLE bps.bulk_transfers ALTER CONSTRAINT bulk_transfers_bank_account_id_fkey DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE bps.idempotency_keys ALTER CONSTRAINT idempotency_keys_bank_account_id_fkey DEFERRABLE INITIALLY DEFERRED;
