-- Execution: every transfer goes from pending to the payment rail and reaches a final status; a failed or
-- cancelled transfer's amount goes back to its account, journalled, in the transaction that sets its status.
--
-- Executors claim work in runs: a run is a contiguous range of one bulk transfer's transfers, leased to one
-- executor. Claiming needs no index on bps.transfers (intake would pay for it on every transfer): a bulk
-- transfer with pending transfers is in a small partial index of its own, and its transfers are claimed in
-- position order, so the ones not yet claimed always start at claimed_positions.

-- Business settings of execution, beside the others.
ALTER TABLE bps.settings
    ADD COLUMN execution_max_attempts integer NOT NULL DEFAULT 10 CHECK (execution_max_attempts > 0),
    ADD COLUMN execution_retry_cap interval NOT NULL DEFAULT interval '5 minutes'
        CHECK (execution_retry_cap > interval '0');

ALTER TABLE bps.transfers
    DROP CONSTRAINT transfers_status_check,
    ADD CONSTRAINT transfers_status_check
        CHECK (status IN ('pending', 'processing', 'executed', 'failed', 'cancelled')),
    -- An ISO 20022 status reason code (AC01, RC01, MS03, ...) exactly when the rail refused the transfer.
    ADD CONSTRAINT transfers_failure_reason_check
        CHECK ((status = 'failed') = (failure_reason IS NOT NULL) AND failure_reason ~ '^[A-Z0-9]{4}$');

ALTER TABLE bps.bulk_transfers
    -- As the request asked (NULL: as soon as possible); its transfers go to the rail from that day on (UTC).
    ADD COLUMN requested_execution_date date,
    ADD COLUMN execute_on date GENERATED ALWAYS AS
        (coalesce(requested_execution_date, (created_at AT TIME ZONE 'UTC')::date)) STORED,
    -- How many of its transfers have each status, kept by every statement that changes one.
    ADD COLUMN pending_count integer NOT NULL DEFAULT 0 CHECK (pending_count >= 0),
    ADD COLUMN processing_count integer NOT NULL DEFAULT 0 CHECK (processing_count >= 0),
    ADD COLUMN executed_count integer NOT NULL DEFAULT 0 CHECK (executed_count >= 0),
    ADD COLUMN failed_count integer NOT NULL DEFAULT 0 CHECK (failed_count >= 0),
    ADD COLUMN cancelled_count integer NOT NULL DEFAULT 0 CHECK (cancelled_count >= 0),
    -- Its transfers at positions below this have been claimed (or cancelled): none of them is pending.
    ADD COLUMN claimed_positions integer NOT NULL DEFAULT 0 CHECK (claimed_positions >= 0);

-- Existing transfers were all pending (nothing executed them before this migration). Checked at once: a
-- deferred foreign-key event still pending would stop the ALTER TABLE below.
SET CONSTRAINTS ALL IMMEDIATE;
UPDATE bps.bulk_transfers AS b
   SET pending_count = c.pending, executed_count = c.executed, failed_count = c.failed
  FROM (SELECT t.bulk_transfer_id, count(*) FILTER (WHERE t.status = 'pending') AS pending,
               count(*) FILTER (WHERE t.status = 'executed') AS executed,
               count(*) FILTER (WHERE t.status = 'failed') AS failed
          FROM bps.transfers AS t GROUP BY t.bulk_transfer_id) AS c
 WHERE c.bulk_transfer_id = b.id;

ALTER TABLE bps.bulk_transfers
    ADD CONSTRAINT bulk_transfers_counts_check
        CHECK (pending_count + processing_count + executed_count + failed_count + cancelled_count = transfer_count),
    ADD CONSTRAINT bulk_transfers_claimed_within_check CHECK (claimed_positions <= transfer_count),
    ADD COLUMN status text NOT NULL GENERATED ALWAYS AS (CASE
        WHEN pending_count = transfer_count THEN 'pending'
        WHEN pending_count + processing_count > 0 THEN 'processing'
        WHEN executed_count = transfer_count THEN 'completed'
        WHEN executed_count > 0 THEN 'partially_completed'
        WHEN cancelled_count = transfer_count THEN 'cancelled'
        ELSE 'failed' END) STORED;

-- The executors' queue: bulk transfers with transfers still to claim, the first due first.
CREATE INDEX bulk_transfers_due_idx ON bps.bulk_transfers (execute_on, id) WHERE pending_count > 0;
-- An account's bulk transfers, newest first (GET /bulk_transfers).
CREATE INDEX bulk_transfers_account_idx ON bps.bulk_transfers (bank_account_id, id);

-- A run: transfers first_position to last_position of one bulk transfer, leased to one executor until
-- lease_expires_at. Each new lease of a run (a recovery after its lease ran out, a retry after the rail
-- failed to answer) raises attempt; an outcome reported with an older attempt changes nothing.
CREATE TABLE bps.execution_runs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    bank_account_id  bigint NOT NULL,
    bulk_transfer_id bigint NOT NULL REFERENCES bps.bulk_transfers (id),
    first_position   integer NOT NULL CHECK (first_position >= 0),
    last_position    integer NOT NULL CHECK (last_position >= first_position),
    executor         text NOT NULL CHECK (length(executor) BETWEEN 1 AND 200),
    attempt          integer NOT NULL DEFAULT 1 CHECK (attempt > 0),
    lease_expires_at timestamptz NOT NULL,
    -- Leases that ended without an answer from the rail (a timeout, an error), and the last such error.
    failures         integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    last_error       text,
    -- Set after execution_max_attempts failures: no executor takes the run again until a DBA retries it.
    parked_at        timestamptz,
    -- How many of its transfers are still processing; the run is settled when none is.
    open_count       integer NOT NULL CHECK (open_count >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    settled_at       timestamptz,
    CHECK ((open_count = 0) = (settled_at IS NOT NULL))
);
-- Runs an executor may have to take over: not settled, not parked, ordered by the end of their lease.
CREATE INDEX execution_runs_open_idx ON bps.execution_runs (lease_expires_at) WHERE settled_at IS NULL AND parked_at IS NULL;
CREATE INDEX execution_runs_bulk_transfer_idx ON bps.execution_runs (bulk_transfer_id);
