-- Runs parked for a DBA, found without reading every run there ever was (GET /metrics counts them).
CREATE INDEX execution_runs_parked_idx ON bps.execution_runs (parked_at)
    WHERE settled_at IS NULL AND parked_at IS NOT NULL;
