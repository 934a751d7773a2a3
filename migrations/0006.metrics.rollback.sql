DROP INDEX bps.execution_runs_parked_idx;
