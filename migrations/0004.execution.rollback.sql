-- Back to transfers that stay pending: statuses other than pending and failed cannot be kept, so the
-- rollback refuses to run once any transfer is processing or cancelled (resolve them first).
DO $$
BEGIN
    IF EXISTS (SELECT FROM bps.transfers WHERE status IN ('processing', 'cancelled')) THEN
        RAISE EXCEPTION 'transfers are processing or cancelled: 0004 cannot be rolled back'
            USING ERRCODE = 'object_in_use';
    END IF;
END
$$;
-- The views of sql/ that read the columns going away (sql/ makes them again after the next migrate).
DROP VIEW IF EXISTS bps.parked_transfers;
DROP VIEW IF EXISTS bps.bulk_transfer_summaries;
DROP TABLE bps.execution_runs;
DROP INDEX bps.bulk_transfers_account_idx;
DROP INDEX bps.bulk_transfers_due_idx;
ALTER TABLE bps.bulk_transfers
    DROP COLUMN status,
    DROP COLUMN claimed_positions,
    DROP COLUMN cancelled_count,
    DROP COLUMN failed_count,
    DROP COLUMN executed_count,
    DROP COLUMN processing_count,
    DROP COLUMN pending_count,
    DROP COLUMN execute_on,
    DROP COLUMN requested_execution_date;
ALTER TABLE bps.transfers
    DROP CONSTRAINT transfers_failure_reason_check,
    DROP CONSTRAINT transfers_status_check,
    ADD CONSTRAINT transfers_status_check CHECK (status IN ('pending', 'executed', 'failed'));
ALTER TABLE bps.settings DROP COLUMN execution_retry_cap, DROP COLUMN execution_max_attempts;
