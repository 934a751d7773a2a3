-- The columns that name a bulk transfer or a transfer, indexed: removing a row they could name (a request
-- bps.bulk_transfers wrote, then found short of funds under the account's lock) checks each foreign key with
-- a probe, not a scan of the whole journal or of every key ever stored.
CREATE INDEX account_entries_bulk_transfer_idx ON bps.account_entries (bulk_transfer_id)
    WHERE bulk_transfer_id IS NOT NULL;
CREATE INDEX account_entries_transfer_idx ON bps.account_entries (transfer_id) WHERE transfer_id IS NOT NULL;
CREATE INDEX idempotency_keys_bulk_transfer_idx ON bps.idempotency_keys (bulk_transfer_id)
    WHERE bulk_transfer_id IS NOT NULL;
