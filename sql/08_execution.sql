-- Execution: executors claim due pending transfers in runs, send them to the payment rail, and settle what
-- it answered; failed and cancelled transfers are refunded. Every step is one call over a whole batch, and a
-- DBA can drive each from psql.
--
-- Locks are always taken in this order, so no two of these calls (nor a request's debit) can deadlock:
-- runs, then transfers, then bulk transfers (by id), then bank accounts (by id).
--
-- Each statement names the rows it may touch by id (`= ANY` of an array it holds), beside any join: its plan
-- is cached per connection, and a join planned while a table was small would otherwise scan all of it.

-- Claims up to max_transfers transfers for `executor`, leased for `lease`: first the runs whose lease ran
-- out (recovering: their outcome at the rail is unknown, so the rail must be asked before anything else),
-- then due pending transfers, oldest due first. Runs and bulk transfers another executor holds are skipped,
-- and only those this claim takes are locked (cursors fetch them one by one): the rest stay free for others.
-- The last run taken may go past the budget, and the last bulk transfer is cut to it.
CREATE OR REPLACE FUNCTION bps.claim_transfers(executor text, max_transfers integer, lease interval)
RETURNS TABLE (run_id bigint, attempt integer, recovering boolean, transfer_id bigint, amount_cents bigint,
               currency text, counterparty_name text, counterparty_iban text, counterparty_bic text,
               description text, client_reference text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    budget    integer := max_transfers;
    expired   CURSOR FOR
        SELECT r.id, r.last_position - r.first_position + 1 AS size,
               bps.transfer_id(r.bulk_transfer_id, r.first_position) AS first_id,
               bps.transfer_id(r.bulk_transfer_id, r.last_position) AS last_id
          FROM bps.execution_runs AS r
         WHERE r.settled_at IS NULL AND r.parked_at IS NULL AND r.lease_expires_at < now()
         ORDER BY r.lease_expires_at
           FOR NO KEY UPDATE SKIP LOCKED;
    due       CURSOR FOR
        SELECT b.id, b.bank_account_id, b.claimed_positions, b.transfer_count
          FROM bps.bulk_transfers AS b
         WHERE b.pending_count > 0 AND b.execute_on <= bps.today()
         ORDER BY b.execute_on, b.id
           FOR NO KEY UPDATE SKIP LOCKED;
    candidate record;
    renewing  bigint[] := '{}';
    bulks     bigint[] := '{}';
    accounts  bigint[] := '{}';
    firsts    integer[] := '{}';
    lasts     integer[] := '{}';
    claimed   bigint[];  -- the ids of the transfers in the runs made or renewed
BEGIN
    IF executor IS NULL OR max_transfers IS NULL OR max_transfers < 1 OR lease IS NULL OR lease <= interval '0' THEN
        RAISE EXCEPTION 'claim_transfers needs an executor name, max_transfers >= 1 and a positive lease'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- 1. Runs whose executor is gone (or released them after the rail did not answer): a new lease, a new
    -- attempt; an outcome reported under the old attempt will change nothing.
    OPEN expired;
    WHILE budget > 0 LOOP
        FETCH expired INTO candidate;
        EXIT WHEN NOT FOUND;
        renewing := renewing || candidate.id;
        budget := budget - candidate.size;
        claimed := claimed || ARRAY(SELECT generate_series(candidate.first_id, candidate.last_id));
    END LOOP;
    CLOSE expired;
    IF cardinality(renewing) > 0 THEN
        RETURN QUERY
        WITH renewed AS (
            UPDATE bps.execution_runs AS r
               SET attempt = r.attempt + 1, executor = claim_transfers.executor, lease_expires_at = now() + lease
             WHERE r.id = ANY (renewing)
            RETURNING r.*
        )
        SELECT r.id, r.attempt, true, t.id, t.amount_cents, t.amount_currency::text, t.counterparty_name,
               t.counterparty_iban, t.counterparty_bic, t.description, t.client_reference
          FROM renewed AS r
          JOIN bps.transfers AS t
            ON t.id BETWEEN bps.transfer_id(r.bulk_transfer_id, r.first_position)
                        AND bps.transfer_id(r.bulk_transfer_id, r.last_position)
           AND t.status = 'processing'
         WHERE t.id = ANY (claimed)
         ORDER BY t.id;
    END IF;

    -- 2. Due pending transfers. A bulk transfer's unclaimed transfers start at claimed_positions, so each
    -- run is one primary-key range.
    OPEN due;
    WHILE budget > 0 AND cardinality(bulks) < 100 LOOP
        FETCH due INTO candidate;
        EXIT WHEN NOT FOUND;
        bulks := bulks || candidate.id;
        accounts := accounts || candidate.bank_account_id;
        firsts := firsts || candidate.claimed_positions;
        lasts := lasts || least(candidate.transfer_count, candidate.claimed_positions + budget) - 1;
        budget := budget - (least(candidate.transfer_count, candidate.claimed_positions + budget)
                            - candidate.claimed_positions);
    END LOOP;
    CLOSE due;
    IF cardinality(bulks) = 0 THEN
        RETURN;
    END IF;
    -- The transfers of the runs about to be made: each run's primary-key range, as ids.
    claimed := ARRAY(SELECT bps.transfer_id(c.bulk_transfer_id, p)
                       FROM unnest(bulks, firsts, lasts) AS c(bulk_transfer_id, first_position, last_position)
                      CROSS JOIN LATERAL generate_series(c.first_position, c.last_position) AS p);
    RETURN QUERY
    WITH runs AS (
        INSERT INTO bps.execution_runs (bank_account_id, bulk_transfer_id, first_position, last_position, executor,
                                        lease_expires_at, open_count)
        SELECT c.bank_account_id, c.bulk_transfer_id, c.first_position, c.last_position, claim_transfers.executor,
               now() + lease, c.last_position - c.first_position + 1
          FROM unnest(accounts, bulks, firsts, lasts) AS c(bank_account_id, bulk_transfer_id, first_position,
                                                          last_position)
        RETURNING *
    ), moved AS (
        UPDATE bps.transfers AS t
           SET status = 'processing', status_changed_at = now()
         WHERE t.id = ANY (claimed) AND t.status = 'pending'
        RETURNING t.*
    ), counted AS (
        UPDATE bps.bulk_transfers AS b
           SET claimed_positions = r.last_position + 1,
               pending_count = b.pending_count - (r.last_position - r.first_position + 1),
               processing_count = b.processing_count + (r.last_position - r.first_position + 1)
          FROM runs AS r
         WHERE b.id = r.bulk_transfer_id AND b.id = ANY (bulks)
    )
    SELECT r.id, r.attempt, false, t.id, t.amount_cents, t.amount_currency::text, t.counterparty_name,
           t.counterparty_iban, t.counterparty_bic, t.description, t.client_reference
      FROM moved AS t
      JOIN runs AS r ON r.bulk_transfer_id = t.bulk_transfer_id
     ORDER BY t.id;
END
$$;

-- Gives back to their accounts the amounts of transfers that this transaction just failed or cancelled:
-- one journal entry each, with the balance before and after, accounts locked in id order.
CREATE OR REPLACE FUNCTION bps.refund_transfers(transfer_ids bigint[]) RETURNS void
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    accounts bigint[];
BEGIN
    IF coalesce(cardinality(transfer_ids), 0) = 0 THEN
        RETURN;
    END IF;
    accounts := ARRAY(SELECT DISTINCT t.bank_account_id FROM bps.transfers AS t WHERE t.id = ANY (transfer_ids));
    PERFORM FROM bps.bank_accounts AS a
     WHERE a.id = ANY (accounts)
     ORDER BY a.id
       FOR NO KEY UPDATE;
    WITH refunded AS (
        SELECT t.id, t.bank_account_id, t.bulk_transfer_id, t.amount_cents,
               row_number() OVER w AS n, sum(t.amount_cents) OVER w AS through
          FROM bps.transfers AS t
         WHERE t.id = ANY (transfer_ids)
        WINDOW w AS (PARTITION BY t.bank_account_id ORDER BY t.id)
    ), totals AS (
        SELECT r.bank_account_id, count(*) AS entries, sum(r.amount_cents) AS cents
          FROM refunded AS r
         GROUP BY r.bank_account_id
    ), credited AS (
        UPDATE bps.bank_accounts AS a
           SET balance_cents = a.balance_cents + t.cents, version = a.version + t.entries
          FROM totals AS t
         WHERE a.id = t.bank_account_id AND a.id = ANY (accounts)
        RETURNING a.id, a.balance_cents - t.cents AS balance_before, a.version - t.entries AS version_before
    )
    INSERT INTO bps.account_entries (bank_account_id, account_version, kind, amount_cents, previous_balance_cents,
                                     balance_cents, bulk_transfer_id, transfer_id)
    SELECT r.bank_account_id, c.version_before + r.n, 'refund', r.amount_cents,
           c.balance_before + r.through - r.amount_cents, c.balance_before + r.through, r.bulk_transfer_id, r.id
      FROM refunded AS r
      JOIN credited AS c ON c.id = r.bank_account_id;
END
$$;

-- Records what the rail answered: for each transfer of a run under its current attempt, executed or failed
-- (with the ISO 20022 reason code); failed ones are refunded in the same transaction. Outcomes of a stale
-- attempt, of a settled run, or of a transfer that is no longer processing change nothing. A run with no
-- transfer left processing is settled. Returns how many transfers changed.
CREATE OR REPLACE FUNCTION bps.settle_transfers(run_ids bigint[], attempts integer[], transfer_ids bigint[],
                                                outcomes text[], reasons text[])
RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    live             bigint[];
    live_from        bigint[];
    live_to          bigint[];
    settled          bigint[];
    settled_bulks    bigint[];
    settled_statuses text[];
    settled_runs     bigint[];
BEGIN
    IF cardinality(run_ids) IS DISTINCT FROM cardinality(attempts)
       OR cardinality(transfer_ids) IS DISTINCT FROM cardinality(outcomes)
       OR cardinality(transfer_ids) IS DISTINCT FROM cardinality(reasons) THEN
        RAISE EXCEPTION 'settle_transfers: run_ids and attempts, and transfer_ids, outcomes and reasons, pair up'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM unnest(outcomes, reasons) AS o(outcome, reason)
                WHERE o.outcome IS DISTINCT FROM 'executed' AND o.outcome IS DISTINCT FROM 'failed'
                   OR (o.outcome = 'failed') <> (o.reason IS NOT NULL)) THEN
        RAISE EXCEPTION 'settle_transfers: an outcome is executed (no reason) or failed (with its reason code)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The runs still leased under the given attempt (the fence), locked against a concurrent takeover.
    SELECT array_agg(r.id ORDER BY r.id), array_agg(bps.transfer_id(r.bulk_transfer_id, r.first_position) ORDER BY r.id),
           array_agg(bps.transfer_id(r.bulk_transfer_id, r.last_position) ORDER BY r.id)
      INTO live, live_from, live_to
      FROM (SELECT r.* FROM bps.execution_runs AS r
              JOIN unnest(run_ids, attempts) AS g(run_id, attempt) ON g.run_id = r.id AND g.attempt = r.attempt
             WHERE r.id = ANY (run_ids) AND r.settled_at IS NULL
             ORDER BY r.id
               FOR NO KEY UPDATE OF r) AS r;
    IF live IS NULL THEN
        RETURN 0;
    END IF;

    -- The outcomes for transfers of those runs (a few ranges), then each such transfer still processing.
    WITH fenced AS (
        SELECT o.transfer_id, o.outcome, o.reason, l.run_id
          FROM unnest(transfer_ids, outcomes, reasons) AS o(transfer_id, outcome, reason)
          JOIN unnest(live, live_from, live_to) AS l(run_id, first_id, last_id)
            ON o.transfer_id BETWEEN l.first_id AND l.last_id
    ), answered AS (
        UPDATE bps.transfers AS t
           SET status = f.outcome, failure_reason = f.reason, status_changed_at = now()
          FROM fenced AS f
         WHERE t.id = f.transfer_id AND t.id = ANY (transfer_ids) AND t.status = 'processing'
        RETURNING t.id, t.bulk_transfer_id, t.status, f.run_id
    )
    SELECT array_agg(a.id), array_agg(a.bulk_transfer_id), array_agg(a.status), array_agg(a.run_id)
      INTO settled, settled_bulks, settled_statuses, settled_runs
      FROM answered AS a;
    IF settled IS NULL THEN
        RETURN 0;
    END IF;

    PERFORM FROM bps.bulk_transfers AS b
     WHERE b.id = ANY (settled_bulks)
     ORDER BY b.id
       FOR NO KEY UPDATE;
    UPDATE bps.bulk_transfers AS b
       SET processing_count = b.processing_count - c.n, executed_count = b.executed_count + c.executed,
           failed_count = b.failed_count + c.failed
      FROM (SELECT s.bulk_transfer_id, count(*) AS n, count(*) FILTER (WHERE s.status = 'executed') AS executed,
                   count(*) FILTER (WHERE s.status = 'failed') AS failed
              FROM unnest(settled_bulks, settled_statuses) AS s(bulk_transfer_id, status)
             GROUP BY s.bulk_transfer_id) AS c
     WHERE b.id = c.bulk_transfer_id AND b.id = ANY (settled_bulks);

    PERFORM bps.refund_transfers(ARRAY(SELECT s.id FROM unnest(settled, settled_statuses) AS s(id, status)
                                        WHERE s.status = 'failed'));

    -- A run is settled when none of its transfers is processing any more.
    UPDATE bps.execution_runs AS r
       SET open_count = r.open_count - c.n,
           settled_at = CASE WHEN r.open_count = c.n THEN now() END
      FROM (SELECT s.run_id, count(*) AS n FROM unnest(settled_runs) AS s(run_id) GROUP BY s.run_id) AS c
     WHERE r.id = c.run_id AND r.id = ANY (settled_runs);
    RETURN cardinality(settled);
END
$$;

-- The rail did not answer for these runs (a timeout, an error): each lease ends after a back-off (doubling
-- per failure, up to execution_retry_cap, with jitter), when an executor takes the run over and asks the rail
-- first. After execution_max_attempts failures the run is parked: bps.parked_transfers lists it, and no
-- executor takes it until a DBA calls bps.retry_run. Stale attempts change nothing. Returns the runs parked.
CREATE OR REPLACE FUNCTION bps.release_runs(run_ids bigint[], attempts integer[], error text)
RETURNS integer
LANGUAGE sql AS $$
    WITH released AS (
        UPDATE bps.execution_runs AS r
           SET failures = r.failures + 1,
               last_error = left(error, 500),
               lease_expires_at = now() + least(s.execution_retry_cap, interval '1 second' * 2 ^ least(r.failures, 20))
                                           * (0.5 + random()),
               parked_at = CASE WHEN r.failures + 1 >= s.execution_max_attempts THEN now() END
          FROM unnest(run_ids, attempts) AS g(run_id, attempt), bps.settings AS s
         WHERE r.id = g.run_id AND r.id = ANY (run_ids) AND r.attempt = g.attempt AND r.settled_at IS NULL
        RETURNING r.parked_at
    )
    SELECT count(*) FILTER (WHERE parked_at IS NOT NULL)::integer FROM released
$$;

-- A DBA's retry of a parked run (after checking the rail): it is taken over at once, asking the rail first.
CREATE OR REPLACE FUNCTION bps.retry_run(run_id bigint) RETURNS boolean
LANGUAGE sql AS $$
    WITH retried AS (
        UPDATE bps.execution_runs AS r
           SET parked_at = NULL, failures = 0, lease_expires_at = now()
         WHERE r.id = run_id AND r.parked_at IS NOT NULL AND r.settled_at IS NULL
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM retried)
$$;

-- Transfers whose run is parked: sent to the rail, outcome unknown after every retry. For a DBA to check
-- with the rail, then settle (bps.settle_transfers with the run's attempt) or retry (bps.retry_run).
CREATE OR REPLACE VIEW bps.parked_transfers AS
SELECT t.id AS transfer_id, t.bank_account_id, t.bulk_transfer_id, t.amount_cents, t.amount_currency,
       r.id AS run_id, r.attempt, r.failures, r.last_error, r.parked_at, r.executor
  FROM bps.execution_runs AS r
  JOIN bps.transfers AS t
    ON t.id BETWEEN bps.transfer_id(r.bulk_transfer_id, r.first_position)
                AND bps.transfer_id(r.bulk_transfer_id, r.last_position)
 WHERE r.parked_at IS NOT NULL AND r.settled_at IS NULL AND t.status = 'processing';

-- Cancels every transfer of a bulk transfer that is still pending and refunds them, in one transaction:
-- (200, the bulk transfer as GET shows it), (409, not_cancellable) when none was pending, (404) when there
-- is no such bulk transfer among bank_account_ids (NULL: any, the owner's call).
CREATE OR REPLACE FUNCTION bps.cancel_bulk_transfer(bulk_transfer_id bigint, bank_account_ids bigint[],
                                                    OUT status integer, OUT body jsonb)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    bulk      bps.bulk_transfers;
    cancelled bigint[];
BEGIN
    -- The bulk transfer's row first: an executor claiming from it waits, or is waited for.
    SELECT * INTO bulk FROM bps.bulk_transfers AS b
     WHERE b.id = cancel_bulk_transfer.bulk_transfer_id
       AND (cancel_bulk_transfer.bank_account_ids IS NULL OR b.bank_account_id = ANY (cancel_bulk_transfer.bank_account_ids))
       FOR NO KEY UPDATE;
    IF bulk.id IS NULL THEN
        status := 404;
        body := bps.problem(404, 'bulk_transfer_not_found',
                            format('There is no bulk transfer %s.', cancel_bulk_transfer.bulk_transfer_id));
        RETURN;
    END IF;
    WITH cancelled_now AS (
        UPDATE bps.transfers AS t
           SET status = 'cancelled', status_changed_at = now()
         WHERE t.id BETWEEN bps.transfer_id(bulk.id, 0) AND bps.transfer_id(bulk.id, 99999)
           AND t.status = 'pending'
        RETURNING t.id
    )
    SELECT array_agg(c.id) INTO cancelled FROM cancelled_now AS c;
    IF cancelled IS NULL THEN
        status := 409;
        body := bps.problem(409, 'not_cancellable',
            format('Bulk transfer %s has no pending transfer left to cancel (it is %s).', bulk.id, bulk.status),
            jsonb_build_object('bulk_transfer_id', bulk.id, 'bulk_transfer_status', bulk.status));
        RETURN;
    END IF;
    UPDATE bps.bulk_transfers AS b
       SET pending_count = 0, cancelled_count = b.cancelled_count + cardinality(cancelled),
           claimed_positions = b.transfer_count
     WHERE b.id = bulk.id;
    PERFORM bps.refund_transfers(cancelled);
    SELECT g.status, g.body INTO status, body FROM bps.get_bulk_transfer(bulk.id, NULL) AS g;
END
$$;

-- The owner's call: any account.
CREATE OR REPLACE FUNCTION bps.cancel_bulk_transfer(bulk_transfer_id bigint, OUT status integer, OUT body jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT c.status, c.body INTO status, body FROM bps.cancel_bulk_transfer(bulk_transfer_id, NULL) AS c;
END
$$;
