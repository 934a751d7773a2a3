DROP INDEX bps.idempotency_keys_bulk_transfer_idx;
DROP INDEX bps.account_entries_transfer_idx;
DROP INDEX bps.account_entries_bulk_transfer_idx;
