-- Back to identity ids, a per-row foreign key and the (bulk_transfer_id, position) index. Existing ids are
-- kept (they are unique, and stored replays name them), and the identity continues after the largest.
DROP TYPE bps.transfer_receipt;
DROP TYPE bps.transfer_input CASCADE;  -- with the functions of sql/ that take it
ALTER TABLE bps.bulk_transfers ALTER CONSTRAINT bulk_transfers_bank_account_id_fkey NOT DEFERRABLE;
ALTER TABLE bps.idempotency_keys ALTER CONSTRAINT idempotency_keys_bank_account_id_fkey NOT DEFERRABLE;
-- The triggers that stood in for the foreign key (sql/06_integrity.sql) go with it.
DROP TRIGGER IF EXISTS transfers_belong_to_their_bulk_transfer ON bps.transfers;
DROP TRIGGER IF EXISTS transfers_stay_with_their_bulk_transfer ON bps.transfers;
DROP TRIGGER IF EXISTS bulk_transfers_keep_their_key ON bps.bulk_transfers;
DROP TRIGGER IF EXISTS bulk_transfers_keep_their_transfers ON bps.bulk_transfers;
DROP TRIGGER IF EXISTS bulk_transfers_truncate_with_their_transfers ON bps.bulk_transfers;
COMMENT ON COLUMN bps.transfers.id IS NULL;
ALTER TABLE bps.bulk_transfers ADD CONSTRAINT bulk_transfers_id_bank_account_id_key UNIQUE (id, bank_account_id);
ALTER TABLE bps.transfers
    DROP CONSTRAINT transfers_id_check,
    DROP CONSTRAINT transfers_position_check,
    ADD CONSTRAINT transfers_position_check CHECK (position >= 0),
    ADD CONSTRAINT transfers_bulk_transfer_id_position_key UNIQUE (bulk_transfer_id, position),
    ADD CONSTRAINT transfers_bulk_transfer_id_bank_account_id_fkey
        FOREIGN KEY (bulk_transfer_id, bank_account_id) REFERENCES bps.bulk_transfers (id, bank_account_id);
ALTER TABLE bps.transfers ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (CACHE 1000);
SELECT setval(pg_get_serial_sequence('bps.transfers', 'id'), coalesce(max(id), 0) + 1, false) FROM bps.transfers;
ALTER TABLE bps.settings DROP CONSTRAINT settings_max_transfers_per_request_fits_ids;
