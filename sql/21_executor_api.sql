-- The executor's entry points (schema bps_executor), the only functions its database role may execute:
-- SECURITY DEFINER wrappers of the execution functions of sql/08_execution.sql, with a pinned search_path.

-- Claims up to max_transfers due transfers (runs whose lease ran out first) for `executor`, for `lease`.
CREATE OR REPLACE FUNCTION bps_executor.claim_transfers(executor text, max_transfers integer, lease interval)
RETURNS TABLE (run_id bigint, attempt integer, recovering boolean, transfer_id bigint, amount_cents bigint,
               currency text, counterparty_name text, counterparty_iban text, counterparty_bic text,
               description text, client_reference text)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM bps.claim_transfers(executor, max_transfers, lease)
$$;

-- Records the rail's outcomes for runs under their attempts; refunds the failed.
CREATE OR REPLACE FUNCTION bps_executor.settle_transfers(run_ids bigint[], attempts integer[], transfer_ids bigint[],
                                                         outcomes text[], reasons text[])
RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT bps.settle_transfers(run_ids, attempts, transfer_ids, outcomes, reasons)
$$;

-- Ends the leases of runs the rail did not answer for, after a back-off; parks them after too many.
CREATE OR REPLACE FUNCTION bps_executor.release_runs(run_ids bigint[], attempts integer[], error text)
RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT bps.release_runs(run_ids, attempts, error)
$$;
