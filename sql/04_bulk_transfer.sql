-- bps.bulk_transfers: the product. Every rule of the intake (docs/api.md), in the order of docs/design.md,
-- for many requests in one transaction: validate, find the accounts, settle duplicates and idempotency,
-- decide the balances, write the accepted requests, debit. bps.bulk_transfer is its call with one request.

-- The insufficient_funds problem, with the figures a client needs to top up.
CREATE OR REPLACE FUNCTION bps.insufficient_funds(balance_cents bigint, required_cents bigint) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT bps.problem(422, 'insufficient_funds',
        format('The transfers total %s but the account holds %s: nothing was transferred.',
               bps.format_cents(required_cents), bps.format_cents(balance_cents)),
        jsonb_build_object('balance_cents', balance_cents, 'required_cents', required_cents,
                           'shortfall_cents', required_cents - balance_cents))
$$;

-- A transfer's id: its bulk transfer's id * 100000 + its position in the request, 0 to 99999
-- (migrations/0002 enforces it with a CHECK). Inlined by the planner wherever it is called.
CREATE OR REPLACE FUNCTION bps.transfer_id(bulk_transfer_id bigint, position_in_request bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT bulk_transfer_id * 100000 + position_in_request
$$;

-- A bulk transfer's transfers, in order: the primary-key range its id gives. Inlined by the planner, so
-- `FROM bps.transfers_of(42)` is an index range scan (a filter on bulk_transfer_id would scan the table).
CREATE OR REPLACE FUNCTION bps.transfers_of(bulk_transfer_id bigint) RETURNS SETOF bps.transfers
LANGUAGE sql STABLE AS $$
    SELECT * FROM bps.transfers AS t
     WHERE t.id BETWEEN bps.transfer_id(transfers_of.bulk_transfer_id, 0)
                    AND bps.transfer_id(transfers_of.bulk_transfer_id, 99999)
     ORDER BY t.id
$$;

-- Whether this transaction runs at READ COMMITTED, as what relies on each statement seeing what committed
-- before it requires. (A SQL function: the planner inlines it, where a PL/pgSQL call cost 2% of a
-- one-transfer request; bps.refuse_isolation_level is called only when the answer is no.)
CREATE OR REPLACE FUNCTION bps.at_read_committed() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT current_setting('transaction_isolation') = 'read committed'
$$;

-- The refusal of `what` at any other isolation level.
CREATE OR REPLACE FUNCTION bps.refuse_isolation_level(what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% runs at READ COMMITTED, not %', what, current_setting('transaction_isolation')
        USING ERRCODE = 'invalid_transaction_state';
END
$$;

-- Earlier definitions whose arguments or return type changed (CREATE OR REPLACE cannot change them).
DROP FUNCTION IF EXISTS bps.bulk_transfer(jsonb, text, bigint[], bigint);
DROP FUNCTION IF EXISTS bps.bulk_transfer(jsonb, text, bigint[], bigint, bytea);
DROP FUNCTION IF EXISTS bps.bulk_transfer(jsonb, text, bigint[], bigint, bytea, boolean);
DROP FUNCTION IF EXISTS bps.idempotent_replay(bps.idempotency_keys, bytea);
DROP FUNCTION IF EXISTS bps.idempotent_replay(bytea, integer, jsonb, bigint, bytea);
DROP FUNCTION IF EXISTS bps.record_bulk_transfers(integer[], bigint[], bigint[], text[], bytea[], text[], integer[],
                                                  bigint[], bigint[], jsonb[]);
DROP FUNCTION IF EXISTS bps.record_bulk_transfers(integer[], bigint[], bigint[], text[], bytea[], text[], integer[],
                                                  bigint[], bigint[], date[], jsonb[]);
DROP FUNCTION IF EXISTS bps.unrecord_bulk_transfers(integer[], bigint[]);
DROP FUNCTION IF EXISTS bps.intake_decisions(text[], bigint[], bigint[], bytea[], boolean[], bigint[], bigint[],
                                             bigint[]);
DROP FUNCTION IF EXISTS bps.intake_decisions(text[], bigint[], bigint[], bytea[], boolean[], bigint[], bigint[],
                                             bigint[], boolean[]);
DROP FUNCTION IF EXISTS bps.intake_decisions(text[], bigint[], bigint[], bytea[], boolean[], bigint[], bigint[],
                                             boolean[]);

-- Claims an Idempotency-Key for a request on an account: NULL when it is this request's now, else the record
-- of the request that holds it (waiting for that one to commit first, so its outcome is there).
CREATE OR REPLACE FUNCTION bps.claim_idempotency_key(bank_account_id bigint, idempotency_key text,
                                                     payload_hash bytea, retention interval)
RETURNS bps.idempotency_keys
LANGUAGE plpgsql AS $$
DECLARE
    stored bps.idempotency_keys;
BEGIN
    INSERT INTO bps.idempotency_keys AS k (bank_account_id, idempotency_key, payload_hash)
    VALUES (claim_idempotency_key.bank_account_id, claim_idempotency_key.idempotency_key,
            claim_idempotency_key.payload_hash)
    ON CONFLICT ON CONSTRAINT idempotency_keys_pkey DO UPDATE
       SET payload_hash = excluded.payload_hash, status = NULL, body = NULL, bulk_transfer_id = NULL,
           created_at = now()
     WHERE k.created_at < now() - retention
    RETURNING k.* INTO stored;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    -- A statement of its own: it sees what the key's holder committed while the insert waited for it.
    SELECT * INTO STRICT stored
      FROM bps.idempotency_keys AS k
     WHERE k.bank_account_id = claim_idempotency_key.bank_account_id
       AND k.idempotency_key = claim_idempotency_key.idempotency_key;
    RETURN stored;
END
$$;

-- Stores the answer a request with an Idempotency-Key was given, for its retries.
CREATE OR REPLACE FUNCTION bps.remember_answer(bank_account_id bigint, idempotency_key text, status integer,
                                               body jsonb, bulk_transfer_id bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE bps.idempotency_keys AS k
       SET status = remember_answer.status, body = remember_answer.body,
           bulk_transfer_id = remember_answer.bulk_transfer_id
     WHERE k.bank_account_id = remember_answer.bank_account_id AND k.idempotency_key = remember_answer.idempotency_key
$$;

-- The steps of bps.bulk_transfers below that are plain queries: SQL functions the planner inlines into the
-- statement that calls them, so naming a step costs nothing at run time.

-- Step 1: the problem with the request's envelope (not a JSON object, too many transfers), or NULL.
-- transfers: payload -> 'credit_transfers', taken out once by the caller.
DROP FUNCTION IF EXISTS bps.envelope_problem(jsonb, integer);
CREATE OR REPLACE FUNCTION bps.envelope_problem(payload jsonb, transfers jsonb, max_transfers integer) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(payload) IS DISTINCT FROM 'object' THEN
            bps.problem(400, 'invalid_json', 'The request body must be a JSON object.')
        WHEN jsonb_typeof(transfers) = 'array' AND jsonb_array_length(transfers) > max_transfers THEN
            bps.problem(413, 'payload_too_large',
                format('A request may hold at most %s transfers; this one holds %s.',
                       max_transfers, jsonb_array_length(transfers)))
    END
$$;

-- Step 2: the account the request names, among bank_account_ids (NULL: any account); no lock yet.
CREATE OR REPLACE FUNCTION bps.account_named(payload jsonb, bank_account_ids bigint[])
RETURNS SETOF bps.bank_accounts
LANGUAGE sql STABLE AS $$
    SELECT * FROM bps.bank_accounts AS a
     WHERE a.iban = bps.normalize_iban(payload ->> 'organization_iban')
       AND a.bic = bps.normalize_bic(payload ->> 'organization_bic')
       AND (bank_account_ids IS NULL OR a.id = ANY (bank_account_ids))
$$;

-- Step 3, the fast path for valid transfers: two jsonpath scans (in C) show every transfer is an object and
-- every value in them a string; then one pass reads them as bps.transfer_input (text fields), checks every
-- field rule and totals the amounts. A key outside those fields makes the fields counted fall short of the
-- values jsonpath saw. all_valid is NULL or false when in doubt: the detailed error list decides then.
CREATE OR REPLACE FUNCTION bps.checked_transfers(transfers jsonb, account_currency text, strict boolean)
RETURNS TABLE (transfer_count integer, total_cents bigint, client_refs text[], all_valid boolean)
LANGUAGE sql STABLE AS $$
    SELECT count(*)::integer, sum(bps.amount_cents(t.amount)), array_agg(t.client_reference),
           bool_and(bps.transfer_is_valid(t, account_currency, strict)) AND sum(bps.fields_present(t)) = max(v.value_count)
      FROM (SELECT jsonb_array_length(x.types) AS value_count
              FROM (SELECT jsonb_path_query_array(transfers, 'lax $[*].*.type()') AS types
                     WHERE CASE WHEN jsonb_typeof(transfers) = 'array'  -- (CASE: the array test comes first)
                                THEN NOT jsonb_path_exists(transfers, 'strict $[*] ? (@.type() != "object")') END
                    OFFSET 0) AS x  -- (computed once)
             WHERE x.types - 'string' = '[]') AS v
     CROSS JOIN jsonb_populate_recordset(NULL::bps.transfer_input, transfers) AS t
$$;

-- Step 3, when the fast path is in doubt: the 422 with every problem of the request and its key.
CREATE OR REPLACE FUNCTION bps.validation_failed(payload jsonb, account bps.bank_accounts, idempotency_key text)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT bps.validation_problem('request', e.errors, '; nothing was transferred')
      FROM (SELECT coalesce(bps.request_errors(payload, account.organization_name, account.currency,
                                               account.counterparty_check = 'strict'), '[]')
                   || CASE WHEN length(idempotency_key) NOT BETWEEN 1 AND 255 THEN jsonb_build_array(
                          jsonb_build_object('header', 'Idempotency-Key', 'code', 'invalid_idempotency_key',
                              'detail', bps.problem_detail('Idempotency-Key', 'invalid_idempotency_key')))
                      ELSE '[]' END AS errors) AS e
$$;

-- Step 5: the bulk transfer with the same payload accepted for the account within the window, if any.
CREATE OR REPLACE FUNCTION bps.recent_duplicate(bank_account_id bigint, payload_hash bytea, dedup_window interval)
RETURNS SETOF bigint
LANGUAGE sql STABLE AS $$
    SELECT b.id FROM bps.bulk_transfers AS b
     WHERE b.bank_account_id = recent_duplicate.bank_account_id
       AND b.payload_hash = recent_duplicate.payload_hash
       AND b.created_at > now() - dedup_window
     ORDER BY b.created_at DESC
     LIMIT 1
$$;

-- Step 9: the 201's body.
CREATE OR REPLACE FUNCTION bps.accepted(bulk_transfer_id bigint, transfer_count integer, total_cents bigint,
                                        currency text, balance_cents bigint, requested_execution_date jsonb,
                                        transfers jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'bulk_transfer_id', bulk_transfer_id, 'status', 'pending', 'transfer_count', transfer_count,
        'total_cents', total_cents, 'total_amount', bps.format_cents(total_cents), 'currency', currency,
        'balance_cents', balance_cents, 'requested_execution_date', requested_execution_date,
        'transfers', transfers)
$$;

-- The sequential decision of a call's requests, in array order, on their accounts' balances (`balances`,
-- by request: an account's balance is read at the first request that names it): a duplicate of an earlier
-- accepted request (in the call: dup_request; in the database: dup_id), short of funds (balance: what it
-- saw), or accepted (balance: what it left). Only requests with outcome 'open' are decided; a request refused for funds consumes
-- nothing. With the rows already `written`: the accepted requests still to write (added) and the written
-- ones no longer accepted (dropped), and the accounts the accepted ones debit. Arithmetic on arrays, no
-- statement: the loop is over requests, never over transfers.
CREATE OR REPLACE FUNCTION bps.intake_decisions(outcomes text[], accounts bigint[], totals bigint[],
                                                hashes bytea[], dedup boolean[], db_duplicates bigint[],
                                                balances bigint[], written boolean[],
                                                OUT decided text[], OUT balance bigint[], OUT dup_request integer[],
                                                OUT dup_id bigint[], OUT accepted integer[], OUT added integer[],
                                                OUT dropped integer[], OUT debited bigint[])
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    slot integer;
    n    integer := coalesce(array_length(outcomes, 1), 0);
BEGIN
    -- (Full length from the start: an element assigned into a NULL array would start it at its index.)
    decided := outcomes;
    balance := array_fill(NULL::bigint, ARRAY[n]);
    dup_request := array_fill(NULL::integer, ARRAY[n]);
    dup_id := array_fill(NULL::bigint, ARRAY[n]);
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN outcomes[i] IS DISTINCT FROM 'open';
        IF dedup[i] THEN
            -- The latest earlier request of the call accepted for the same account with the same payload.
            FOR j IN REVERSE i - 1 .. 1 LOOP
                IF decided[j] = 'accepted' AND accounts[j] = accounts[i] AND hashes[j] = hashes[i] THEN
                    dup_request[i] := j;
                    EXIT;
                END IF;
            END LOOP;
            IF dup_request[i] IS NOT NULL OR db_duplicates[i] IS NOT NULL THEN
                decided[i] := 'duplicate';
                dup_id[i] := CASE WHEN dup_request[i] IS NULL THEN db_duplicates[i] END;
                CONTINUE;
            END IF;
        END IF;
        slot := array_position(accounts, accounts[i]);
        IF totals[i] > balances[slot] THEN
            decided[i] := 'short';
            balance[i] := balances[slot];
        ELSE
            balances[slot] := balances[slot] - totals[i];
            decided[i] := 'accepted';
            balance[i] := balances[slot];
        END IF;
    END LOOP;
    -- Which requests are accepted, which of them are not written yet, and which written ones are no longer.
    FOR i IN 1 .. n LOOP
        IF decided[i] = 'accepted' THEN
            accepted := accepted || i;
            IF debited IS NULL OR NOT accounts[i] = ANY (debited) THEN
                debited := debited || accounts[i];
            END IF;
            IF NOT written[i] THEN
                added := added || i;
            END IF;
        ELSIF written[i] THEN
            dropped := dropped || i;
        END IF;
    END LOOP;
END
$$;

-- The answer to a request whose Idempotency-Key another request holds (stored_*: that request's payload hash
-- and answer): the same answer again, marked Idempotent-Replayed, for the same payload; 422
-- idempotency_key_reused for another.
-- (A set-returning SQL function, one row: the planner inlines it into the statement that calls it.)
CREATE OR REPLACE FUNCTION bps.idempotent_replay(stored_hash bytea, stored_status integer, stored_body jsonb,
                                                 stored_bulk_transfer_id bigint, payload_hash bytea)
RETURNS TABLE (status integer, body jsonb, headers jsonb)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN r.reused THEN 422 ELSE stored_status END,
           CASE WHEN r.reused THEN bps.problem(422, 'idempotency_key_reused',
                    'This Idempotency-Key was used for a different payload; use a new key for a new request.')
                ELSE stored_body END,
           CASE WHEN r.reused THEN '{}'
                ELSE jsonb_build_object('Idempotent-Replayed', 'true')
                     || CASE WHEN stored_bulk_transfer_id IS NOT NULL
                             THEN jsonb_build_object('Location', '/bulk_transfers/' || stored_bulk_transfer_id)
                             ELSE '{}' END END
      FROM (SELECT stored_hash <> payload_hash AS reused) AS r
$$;

-- The 409 of a request whose payload the account had accepted within the window, as bulk_transfer_id.
CREATE OR REPLACE FUNCTION bps.duplicate_request(bulk_transfer_id bigint) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT bps.problem(409, 'duplicate_request',
        format('The same payload was already accepted as bulk transfer %s; nothing was transferred again.',
               bulk_transfer_id),
        jsonb_build_object('bulk_transfer_id', bulk_transfer_id))
$$;

-- Validates, deduplicates and records many bulk transfer requests in one transaction, each exactly as if
-- they had arrived one after the other in array order, and answers each (status, body, headers, and the
-- account it named, for the access log). Each request is all or nothing; what one request does to the next
-- is what order decides: the balance (a request refused for funds consumes nothing), duplicates and
-- Idempotency-Keys. api_key_ids: the key each request came with, whose accounts it may debit (NULL: any
-- account, the owner's call). payload_hashes: what makes two requests the same (NULL: the hash of the
-- canonical JSON); deduplicate => false when the caller settles duplicates itself (a pain.001 file).
--
-- Each step is one statement over all the requests. Every call takes its locks in one order, so two calls
-- cannot deadlock: Idempotency-Keys (by account and key), the per-payload advisory locks (by id), then the
-- accounts (by id), as late as possible. A statement that joins a table names its rows by id or key (a probe,
-- or `= ANY` of the ids it holds): plans are cached per connection, and a join planned while the table was
-- small would otherwise go on reading all of it.
CREATE OR REPLACE FUNCTION bps.bulk_transfers(payloads jsonb[], idempotency_keys text[] DEFAULT NULL,
                                              api_key_ids bigint[] DEFAULT NULL,
                                              payload_hashes bytea[] DEFAULT NULL,
                                              deduplicate boolean DEFAULT true)
RETURNS TABLE (status integer, body jsonb, headers jsonb, account_id bigint)
LANGUAGE plpgsql
-- Plan each statement once per connection, not on every call, and with index scans: a plan cached
-- while a table was small must not stay a sequential scan. No JIT: the cost a disabled scan is given
-- (10^10) would make PostgreSQL compile even the one-row read of bps.settings (70 to 180 ms from psql).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    settings       bps.settings;
    -- Each request's figures, by its position in the call.
    accounts       bigint[];   -- the account it names, once found
    currencies     text[];
    read_balances  bigint[];
    counts         integer[];
    totals         bigint[];
    dates          date[];     -- its requested_execution_date
    hashes         bytea[];    -- what makes two requests the same
    outcomes       text[];     -- 'answered' (statuses, bodies: its answer), 'replay', or 'open' until decided
    statuses       integer[];
    bodies         jsonb[];
    answer_headers jsonb[];
    any_keyed      boolean;
    holders        integer[];  -- with a key: the first request of the call with that key on that account
    claimants      integer[];  -- holders that claimed their key (another request holds the others')
    dedup          boolean[];
    db_duplicates  bigint[];
    -- The decisions: accepted, short (of funds) or duplicate, with the balance left or seen.
    decided        text[];
    balances_left  bigint[];
    dup_requests   integer[];
    dup_ids        bigint[];
    bulk_ids       bigint[];
    receipts       jsonb[];
    -- Each request's account's balance as read, then under its lock (see bps.intake_decisions).
    balances       bigint[];
    locked_balances bigint[];
    locked         boolean := false;
    lock_now       boolean := false;
    redecide       boolean := true;
    debited        bigint[];   -- the accounts the accepted requests debit
    written        boolean[];  -- whether its rows are written
    dropped        integer[];
    added          integer[];
    accepted       integer[];
    answer         record;
    decision       record;
    m              integer;
    entries        integer;
BEGIN
    -- The duplicate check and the balance check rely on each statement seeing what committed before it.
    IF NOT bps.at_read_committed() THEN
        PERFORM bps.refuse_isolation_level('bps.bulk_transfer');
    END IF;
    SELECT * INTO STRICT settings FROM bps.settings;

    -- 1-3. Each request's envelope (a JSON object, its transfer count bounded), its account (so that rules
    -- that depend on it are reported with all the others) and every rule, reported all at once: 422 with the
    -- list, or 404 for a valid request to no account.
    SELECT array_agg(x.account_id), array_agg(x.currency), array_agg(x.balance_cents), array_agg(x.transfer_count),
           array_agg(x.total_cents), array_agg(x.execution_date), array_agg(x.hash), array_agg(x.outcome),
           array_agg((x.problem ->> 'status')::integer), array_agg(x.problem),
           coalesce(bool_or(x.outcome = 'open' AND x.idempotency_key IS NOT NULL), false)
      INTO accounts, currencies, read_balances, counts, totals, dates, hashes, outcomes, statuses, bodies,
           any_keyed
      -- (Aggregated in the order of this subquery: one sort, not one per aggregate.)
      FROM (SELECT a.id AS account_id, a.currency, a.balance_cents, c.transfer_count, c.total_cents,
                   bps.date_of(r.payload ->> 'requested_execution_date') AS execution_date,
                   CASE WHEN v.problem IS NULL
                        THEN coalesce(r.payload_hash, sha256(convert_to(r.payload::text, 'UTF8'))) END AS hash,
                   CASE WHEN v.problem IS NULL THEN 'open' ELSE 'answered' END AS outcome,
                   v.problem, r.idempotency_key
              FROM unnest(payloads, idempotency_keys, api_key_ids, payload_hashes) WITH ORDINALITY
                   AS r(payload, idempotency_key, api_key_id, payload_hash, n)
              LEFT JOIN bps.api_credentials AS k ON k.id = r.api_key_id
             -- (OFFSET 0: computed once, not wherever the inlined steps name it; each `->` of a large request
             -- copies its whole list of transfers.)
             CROSS JOIN LATERAL (SELECT r.payload -> 'credit_transfers' AS transfers OFFSET 0) AS l
             CROSS JOIN LATERAL (SELECT bps.envelope_problem(r.payload, l.transfers,
                                                             settings.max_transfers_per_request) AS problem,
                                        l.transfers
                                 OFFSET 0) AS e
              LEFT JOIN LATERAL (SELECT * FROM bps.account_named(r.payload,
                                                                 CASE WHEN r.api_key_id IS NOT NULL
                                                                      THEN coalesce(k.bank_account_ids, '{}') END)
                                 OFFSET 0) AS a  -- (a probe of the IBAN's index per request, never a join)
                     ON e.problem IS NULL
              LEFT JOIN LATERAL bps.checked_transfers(e.transfers, a.currency, a.counterparty_check = 'strict') AS c
                     ON e.problem IS NULL
             CROSS JOIN LATERAL (SELECT CASE
                    WHEN e.problem IS NOT NULL THEN e.problem
                    WHEN NOT coalesce(c.all_valid, false)
                         OR bps.request_problems(r.payload, e.transfers, a.organization_name) <> '{}'
                         OR length(r.idempotency_key) NOT BETWEEN 1 AND 255
                        THEN bps.validation_failed(r.payload, a, r.idempotency_key)
                    WHEN a.id IS NULL THEN bps.problem(404, 'account_not_found',
                        'No bank account has this organization_iban and organization_bic.')
                END AS problem) AS v
             ORDER BY r.n) AS x;

    -- 4. Idempotency-Keys. The first request of the call with a key holds it for the call (a later one with
    -- the same key replays its answer, at the end) and claims it, unless another request holds it: the claim
    -- waits for that one to commit, and its answer is replayed (or 422 for another payload).
    IF any_keyed THEN
        SELECT array_agg(x.holder ORDER BY x.n) INTO holders
          FROM (SELECT u.n, CASE WHEN u.k IS NOT NULL AND u.o = 'open'
                                 THEN min(u.n) OVER (PARTITION BY u.a, u.k, u.o = 'open') END AS holder
                  FROM unnest(idempotency_keys, accounts, outcomes) WITH ORDINALITY AS u(k, a, o, n)) AS x;
        WITH candidates AS (
            SELECT DISTINCT u.h FROM unnest(holders) AS u(h) WHERE u.h IS NOT NULL
        ), claimed AS (
            INSERT INTO bps.idempotency_keys AS k (bank_account_id, idempotency_key, payload_hash)
            SELECT accounts[c.h], idempotency_keys[c.h], hashes[c.h] FROM candidates AS c ORDER BY 1, 2
            ON CONFLICT ON CONSTRAINT idempotency_keys_pkey DO UPDATE
               SET payload_hash = excluded.payload_hash, status = NULL, body = NULL, bulk_transfer_id = NULL,
                   created_at = now()
             WHERE k.created_at < now() - settings.idempotency_retention
            RETURNING k.bank_account_id, k.idempotency_key
        )
        SELECT array_agg(c.h) INTO claimants
          FROM candidates AS c
          JOIN claimed AS k ON k.bank_account_id = accounts[c.h] AND k.idempotency_key = idempotency_keys[c.h];
        -- A statement of its own: it sees what the keys' holders committed while the claim waited for them.
        FOR answer IN
            SELECT u.n, p.*
              FROM unnest(holders) WITH ORDINALITY AS u(h, n)
              JOIN bps.idempotency_keys AS s
                ON s.bank_account_id = accounts[u.h] AND s.idempotency_key = idempotency_keys[u.h]
             CROSS JOIN LATERAL bps.idempotent_replay(s.payload_hash, s.status, s.body, s.bulk_transfer_id,
                                                     hashes[u.n]) AS p
             WHERE u.h IS NOT NULL AND NOT u.h = ANY (coalesce(claimants, '{}'))
        LOOP
            outcomes[answer.n] := 'answered';
            statuses[answer.n] := answer.status;
            bodies[answer.n] := answer.body;
            answer_headers[answer.n] := answer.headers;
        END LOOP;
        FOR i IN 1 .. cardinality(holders) LOOP
            IF outcomes[i] = 'open' AND holders[i] <> i THEN
                outcomes[i] := 'replay';
            END IF;
        END LOOP;
    END IF;

    -- 5. Duplicates. Requests with the same payload for the same account queue on a transaction-scoped lock
    -- (it dies with the transaction), so the check cannot race. A request with a key is never a duplicate.
    PERFORM pg_advisory_xact_lock(l.id)
       FROM (SELECT DISTINCT ('x' || encode(substr(u.h, 1, 8), 'hex'))::bit(64)::bigint # u.a AS id
               FROM unnest(hashes, accounts, outcomes) AS u(h, a, o)
              WHERE u.o = 'open'
              ORDER BY 1) AS l;
    SELECT array_agg(d.id), array_agg(u.o = 'open' AND u.k IS NULL AND deduplicate)  -- (in the unnest's order)
      INTO db_duplicates, dedup
      FROM unnest(idempotency_keys, accounts, hashes, outcomes) WITH ORDINALITY AS u(k, a, h, o, n)
      LEFT JOIN LATERAL bps.recent_duplicate(u.a, u.h, settings.dedup_window) AS d(id)
             ON u.o = 'open' AND u.k IS NULL AND deduplicate;

    -- 6. The decisions, in order, on the balances read at lookup (most short requests are turned away
    -- without a lock); every accepted request is written before any account is locked.
    balances := read_balances;  -- (one statement's reads: the same for every request on an account)
    written := array_fill(false, ARRAY[coalesce(cardinality(outcomes), 0)]);
    bulk_ids := array_fill(NULL::bigint, ARRAY[coalesce(cardinality(outcomes), 0)]);
    LOOP
        -- (Step 7's locks, when the pass before asked for them; see below.)
        IF lock_now THEN
            SELECT array_agg(coalesce(l.balance_cents, s.b) ORDER BY s.o) INTO locked_balances
              FROM unnest(accounts, balances) WITH ORDINALITY AS s(a, b, o)
              LEFT JOIN (SELECT a.id, a.balance_cents FROM bps.bank_accounts AS a
                          WHERE a.id = ANY (debited)
                          ORDER BY a.id
                            FOR NO KEY UPDATE) AS l ON l.id = s.a;
            locked := true;
            lock_now := false;
            redecide := locked_balances IS DISTINCT FROM balances;
            balances := locked_balances;
        END IF;
        IF redecide THEN
            -- (An expression, not a query: PL/pgSQL evaluates it without starting an executor.)
            decision := bps.intake_decisions(outcomes, accounts, totals, hashes, dedup, db_duplicates, balances,
                                             written);
            decided := decision.decided;
            balances_left := decision.balance;
            dup_requests := decision.dup_request;
            dup_ids := decision.dup_id;
            accepted := decision.accepted;
            added := decision.added;
            dropped := decision.dropped;
            debited := decision.debited;
            -- Requests written and no longer accepted lose their rows; accepted ones not yet written get theirs.
            IF dropped IS NOT NULL THEN
                DELETE FROM bps.transfers AS t
                 WHERE t.id IN (SELECT o.id FROM unnest(dropped) AS u(n)
                                 CROSS JOIN LATERAL bps.transfers_of(bulk_ids[u.n]) AS o);
                DELETE FROM bps.bulk_transfers AS b WHERE b.id IN (SELECT bulk_ids[u.n] FROM unnest(dropped) AS u(n));
                FOREACH m IN ARRAY dropped LOOP
                    written[m] := false;
                    bulk_ids[m] := NULL;
                END LOOP;
            END IF;
            IF added IS NOT NULL THEN
                FOREACH m IN ARRAY added LOOP
                    bulk_ids[m] := nextval('bps.bulk_transfers_id_seq');
                    written[m] := true;
                END LOOP;
                -- Each bulk transfer and all its transfers, two inserts for the whole call. A transfer's id follows
                -- from its bulk transfer's id and its position (bps.transfer_id). The 201's lists of transfer ids
                -- and client references come back through a composite type: to_jsonb builds an array in one go
                -- (jsonb_agg of jsonb_build_object cost three times as much).
                FOR answer IN
                    WITH bulk AS (
                        INSERT INTO bps.bulk_transfers (id, bank_account_id, payload_hash, idempotency_key,
                                                        transfer_count, total_cents, currency, api_key_id,
                                                        requested_execution_date, pending_count)
                        OVERRIDING SYSTEM VALUE
                        SELECT bulk_ids[u.n], accounts[u.n], hashes[u.n], idempotency_keys[u.n], counts[u.n],
                               totals[u.n], currencies[u.n], api_key_ids[u.n], dates[u.n], counts[u.n]
                          FROM unnest(added) AS u(n)
                    ), made AS (
                        INSERT INTO bps.transfers (id, bank_account_id, bulk_transfer_id, position, counterparty_name,
                                                   counterparty_iban, counterparty_bic, amount_cents, amount_currency,
                                                   description, client_reference)
                        SELECT bps.transfer_id(q.bulk_id, t.ordinality - 1), q.account_id, q.bulk_id, t.ordinality - 1,
                               t.counterparty_name, t.counterparty_iban, t.counterparty_bic, bps.cents(t.amount),
                               q.currency, t.description, t.client_reference
                          FROM (SELECT bulk_ids[u.n] AS bulk_id, accounts[u.n] AS account_id,
                                       currencies[u.n] AS currency, payloads[u.n] -> 'credit_transfers' AS transfers
                                  FROM unnest(added) AS u(n) OFFSET 0) AS q  -- (once per request, not per transfer)
                         CROSS JOIN LATERAL jsonb_populate_recordset(NULL::bps.transfer_input, q.transfers)
                               WITH ORDINALITY AS t
                        RETURNING bps.transfers.bulk_transfer_id, bps.transfers.id, bps.transfers.client_reference
                    )
                    SELECT array_position(bulk_ids, w.bulk_transfer_id) AS n,
                           to_jsonb(array_agg((w.id, w.client_reference)::bps.transfer_receipt ORDER BY w.id)) AS list
                      FROM made AS w
                     GROUP BY w.bulk_transfer_id
                LOOP
                    receipts[answer.n] := answer.list;
                END LOOP;
            END IF;
            redecide := false;
        END IF;
        EXIT WHEN accepted IS NULL;

        -- 7. The row locks of the accounts debited, in id order, as late as possible (at the top of the next
        -- pass): concurrent calls on one account serialize only for the debit, the journal and the commit.
        -- Where a balance moved since the lookup (a concurrent call spent or credited the account), the
        -- requests are decided again on what it holds. One account needs no lock first (step 8).
        IF NOT locked AND cardinality(debited) > 1 THEN
            lock_now := true;
            CONTINUE;
        END IF;

        -- 8. The debits, one per account, and a journal entry per request, each with the balance before and
        -- after it (the account's version counts them). Each debit requires the balance the decisions were
        -- made on: under the locks it is there; one account's debit is its own lock (one row: no order to
        -- keep), and where its balance moved since the lookup, nothing is debited and it is locked and
        -- decided again.
        WITH per_request AS (
            SELECT u.n, u.a, u.t, u.b AS after, bulk_ids[u.n] AS bulk_id,
                   row_number() OVER (PARTITION BY u.a ORDER BY u.n) AS k
              FROM unnest(accounts, totals, balances_left, decided) WITH ORDINALITY AS u(a, t, b, d, n)
             WHERE u.d = 'accepted'
        ), debit AS (
            UPDATE bps.bank_accounts AS a
               SET balance_cents = a.balance_cents - s.total, version = a.version + s.entries
              FROM (SELECT p.a, sum(p.t)::bigint AS total, count(*) AS entries,
                           balances[array_position(accounts, p.a)] AS decided_on
                      FROM per_request AS p GROUP BY p.a) AS s
             WHERE a.id = s.a AND a.id = ANY (debited) AND a.balance_cents = s.decided_on
            RETURNING a.id, a.version - s.entries AS version_before
        )
        INSERT INTO bps.account_entries (bank_account_id, account_version, kind, amount_cents,
                                         previous_balance_cents, balance_cents, bulk_transfer_id)
        SELECT p.a, d.version_before + p.k, 'bulk_debit', -p.t, p.after + p.t, p.after, p.bulk_id
          FROM per_request AS p
          JOIN debit AS d ON d.id = p.a;
        GET DIAGNOSTICS entries = ROW_COUNT;
        EXIT WHEN entries = cardinality(accepted);
        IF locked OR entries <> 0 THEN
            RAISE EXCEPTION 'bps.bulk_transfers: % debits decided, % made', cardinality(accepted), entries
                USING ERRCODE = 'internal_error';
        END IF;
        lock_now := true;
    END LOOP;

    -- 9-10. The answers, in one statement: the decided requests', the replays of a key's holder in the call,
    -- and each claimed key's record of its holder's answer, for the retries.
    RETURN QUERY
    WITH answered AS (
        SELECT u.n,
               CASE u.d WHEN 'accepted' THEN 201 WHEN 'short' THEN 422 WHEN 'duplicate' THEN 409
                        ELSE statuses[u.n] END AS status,
               CASE u.d
                   WHEN 'accepted' THEN bps.accepted(bulk_ids[u.n], counts[u.n], totals[u.n], currencies[u.n],
                                                     balances_left[u.n], payloads[u.n] -> 'requested_execution_date',
                                                     receipts[u.n])
                   WHEN 'short' THEN bps.insufficient_funds(balances_left[u.n], totals[u.n])
                   WHEN 'duplicate' THEN bps.duplicate_request(coalesce(dup_ids[u.n], bulk_ids[dup_requests[u.n]]))
                   ELSE bodies[u.n] END AS body,
               CASE WHEN u.d = 'accepted' THEN jsonb_build_object('Location', '/bulk_transfers/' || bulk_ids[u.n])
                    ELSE coalesce(answer_headers[u.n], '{}') END AS headers
          FROM unnest(decided) WITH ORDINALITY AS u(d, n)
    ), remembered AS (
        UPDATE bps.idempotency_keys AS k
           SET status = a.status, body = a.body, bulk_transfer_id = bulk_ids[a.n]
          FROM answered AS a
         WHERE a.n = ANY (claimants)
           AND k.bank_account_id = accounts[a.n] AND k.idempotency_key = idempotency_keys[a.n]
    )
    SELECT coalesce(p.status, a.status), coalesce(p.body, a.body), coalesce(p.headers, a.headers), accounts[a.n]
      FROM answered AS a
      LEFT JOIN answered AS h ON decided[a.n] = 'replay' AND h.n = holders[a.n]
      LEFT JOIN LATERAL (SELECT * FROM bps.idempotent_replay(hashes[h.n], h.status, h.body, bulk_ids[h.n], hashes[a.n])
                          WHERE h.n IS NOT NULL OFFSET 0) AS p ON true
     ORDER BY a.n;
END
$$;

-- One request: the call of bps.bulk_transfers with one element, so it takes the same path. Its headers go
-- to response.headers (sql/02_responses.sql).
CREATE OR REPLACE FUNCTION bps.bulk_transfer(payload jsonb, idempotency_key text, api_key_id bigint,
                                             payload_hash bytea DEFAULT NULL, deduplicate boolean DEFAULT true,
                                             OUT status integer, OUT body jsonb, OUT account_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    answer_headers jsonb;
BEGIN
    SELECT r.status, r.body, r.headers, r.account_id INTO status, body, answer_headers, account_id
      FROM bps.bulk_transfers(ARRAY[payload], ARRAY[idempotency_key], ARRAY[api_key_id], ARRAY[payload_hash],
                              deduplicate) AS r;
    PERFORM set_config('response.headers', answer_headers::text, true);
END
$$;

-- The owner's call (a DBA in psql, the tests): any account.
CREATE OR REPLACE FUNCTION bps.bulk_transfer(payload jsonb, idempotency_key text DEFAULT NULL,
                                             OUT status integer, OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    answer_headers jsonb;
BEGIN
    SELECT r.status, r.body, r.headers INTO status, body, answer_headers
      FROM bps.bulk_transfers(ARRAY[payload], ARRAY[idempotency_key]) AS r;
    PERFORM set_config('response.headers', answer_headers::text, true);
END
$$;
