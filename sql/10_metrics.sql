-- The figures of the work itself, for GET /metrics: each a few index entries to read, whatever the size of
-- the history (transfers already final are counted by the processes that finish them, not here).

-- One row per sample: the metric's name, its help text and type, its labels, and its value now.
CREATE OR REPLACE FUNCTION bps.metrics(OUT name text, OUT help text, OUT kind text, OUT labels jsonb,
                                       OUT value numeric)
RETURNS SETOF record
LANGUAGE sql STABLE
-- Index scans: the partial indexes of pending bulk transfers and open runs hold only what is in flight.
SET enable_seqscan = off
SET jit = off
AS $$
    WITH pending AS (
        SELECT b.pending_count, b.execute_on <= bps.today() AS due,
               greatest(b.created_at, b.execute_on::timestamp AT TIME ZONE 'UTC') AS due_since
          FROM bps.bulk_transfers AS b
         WHERE b.pending_count > 0
    ),
    runs AS (
        SELECT r.open_count, r.parked_at IS NOT NULL AS parked, r.lease_expires_at < now() AS lapsed
          FROM bps.execution_runs AS r
         WHERE r.settled_at IS NULL AND r.parked_at IS NULL
        UNION ALL
        SELECT r.open_count, true, false
          FROM bps.execution_runs AS r
         WHERE r.settled_at IS NULL AND r.parked_at IS NOT NULL
    )
    SELECT 'bps_transfers', 'Transfers not yet final: pending (due now, or on a later requested day) and processing.',
           'gauge', jsonb_build_object('status', 'pending', 'due', CASE WHEN d.due THEN 'now' ELSE 'later' END),
           coalesce((SELECT sum(p.pending_count) FROM pending AS p WHERE p.due = d.due), 0)
      FROM (VALUES (true), (false)) AS d(due)
    UNION ALL
    SELECT 'bps_transfers', NULL, 'gauge', '{"status": "processing"}',
           coalesce((SELECT sum(r.open_count) FROM runs AS r), 0)
    UNION ALL
    SELECT 'bps_oldest_due_pending_transfer_age_seconds',
           'How long the oldest transfer due for execution has been waiting for an executor (0: none waits).',
           'gauge', NULL,
           coalesce(round(extract(epoch FROM now() - (SELECT min(p.due_since) FROM pending AS p WHERE p.due)), 3), 0)
    UNION ALL
    SELECT 'bps_execution_runs',
           'Runs not settled: leased, lapsed (an executor will take them over) or parked for a DBA.',
           'gauge', jsonb_build_object('state', s.state),
           (SELECT count(*) FROM runs AS r
             WHERE CASE s.state WHEN 'parked' THEN r.parked WHEN 'lapsed' THEN NOT r.parked AND r.lapsed
                                ELSE NOT r.parked AND NOT r.lapsed END)
      FROM (VALUES ('leased'), ('lapsed'), ('parked')) AS s(state)
$$;
