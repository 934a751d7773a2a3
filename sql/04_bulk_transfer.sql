-- bps.bulk_transfer: the product. Every rule of the intake (docs/api.md), in the order of docs/design.md,
-- in one transaction: validate, find the account, settle duplicates and idempotency,
-- check the balance, write the whole request, debit. Returns the HTTP status and body.

-- The insufficient_funds problem, with the figures a client needs to top up.
CREATE OR REPLACE FUNCTION bps.insufficient_funds(balance_cents bigint, required_cents bigint) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
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

-- Its return type changed: an earlier definition must go first (CREATE OR REPLACE cannot change it).
DROP FUNCTION IF EXISTS bps.bulk_transfer(jsonb, text, bigint[], bigint);
DROP FUNCTION IF EXISTS bps.bulk_transfer(jsonb, text, bigint[], bigint, bytea);

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

-- The answer to a request whose Idempotency-Key another request holds: that request's stored answer again
-- (marked Idempotent-Replayed) for the same payload, 422 idempotency_key_reused for another.
CREATE OR REPLACE FUNCTION bps.idempotent_replay(stored bps.idempotency_keys, payload_hash bytea,
                                                 OUT status integer, OUT body jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    IF stored.payload_hash <> payload_hash THEN
        status := 422;
        body := bps.problem(422, 'idempotency_key_reused',
            'This Idempotency-Key was used for a different payload; use a new key for a new request.');
        RETURN;
    END IF;
    status := stored.status;
    body := stored.body;
    PERFORM set_config('response.headers', (jsonb_build_object('Idempotent-Replayed', 'true')
        || CASE WHEN stored.bulk_transfer_id IS NOT NULL
                THEN jsonb_build_object('Location', '/bulk_transfers/' || stored.bulk_transfer_id)
                ELSE '{}' END)::text, true);
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

-- The steps of bps.bulk_transfer below that are plain queries: SQL functions the planner inlines into the
-- statement that calls them, so naming a step costs nothing at run time.

-- Step 1: the problem with the request's envelope (not a JSON object, too many transfers), or NULL.
CREATE OR REPLACE FUNCTION bps.envelope_problem(payload jsonb, max_transfers integer) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(payload) IS DISTINCT FROM 'object' THEN
            bps.problem(400, 'invalid_json', 'The request body must be a JSON object.')
        WHEN jsonb_typeof(payload -> 'credit_transfers') = 'array'
             AND jsonb_array_length(payload -> 'credit_transfers') > max_transfers THEN
            bps.problem(413, 'payload_too_large',
                format('A request may hold at most %s transfers; this one holds %s.',
                       max_transfers, jsonb_array_length(payload -> 'credit_transfers')))
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

-- Step 4: the bulk transfer with the same payload accepted for the account within the window, if any.
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

-- Step 7: the 201's body.
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

-- Validates, deduplicates and records one bulk transfer, debiting its account once; all or nothing.
-- bank_account_ids are the accounts the caller may debit, and api_key_id the key it called with (NULL and
-- NULL: any account, the owner's call). An account outside them is not found, exactly as an account that
-- does not exist. account_id: the account the request named, when it was found (for the access log).
-- A pain.001 file (sql/09_iso20022.sql) is one call per PmtInf: it passes payload_hash, what makes two
-- requests the same (else the hash of the canonical JSON), and deduplicate => false when it settles
-- idempotency and duplicates itself.
CREATE OR REPLACE FUNCTION bps.bulk_transfer(payload jsonb, idempotency_key text, bank_account_ids bigint[],
                                             api_key_id bigint, payload_hash bytea DEFAULT NULL,
                                             deduplicate boolean DEFAULT true,
                                             OUT status integer, OUT body jsonb, OUT account_id bigint)
LANGUAGE plpgsql
-- Plan each statement once per connection, not on every call, and with index scans: a plan cached
-- while a table was small must not stay a sequential scan. No JIT: the cost a disabled scan is given
-- (10^10) would make PostgreSQL compile even the one-row read of bps.settings (70 to 180 ms from psql).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off
AS $$
<<bulk_transfer>>
DECLARE
    settings        bps.settings;
    account         bps.bank_accounts;
    transfers       jsonb := payload -> 'credit_transfers';
    transfer_count  integer;
    total_cents     bigint;
    client_refs     text[];
    all_valid       boolean;
    request_hash    bytea;
    stored          bps.idempotency_keys;
    duplicate_id    bigint;
    bulk_id         bigint;
    balance_seen    bigint;
    balance_after   bigint;
    transfer_items  jsonb;
BEGIN
    -- The duplicate check and the balance check rely on each statement seeing what committed before it.
    IF NOT bps.at_read_committed() THEN
        PERFORM bps.refuse_isolation_level('bps.bulk_transfer');
    END IF;
    -- Headers for the HTTP layer go in response.headers (see sql/02_responses.sql); none so far.
    PERFORM set_config('response.headers', '{}', true);

    -- 1. The envelope: a JSON object, its transfer count bounded before any work.
    SELECT * INTO STRICT settings FROM bps.settings;
    body := bps.envelope_problem(payload, settings.max_transfers_per_request);
    IF body IS NOT NULL THEN
        status := (body ->> 'status')::integer;
        RETURN;
    END IF;

    -- 2. The account, so that rules that depend on it are reported with all the others.
    SELECT * INTO account FROM bps.account_named(payload, bank_account_ids);
    account_id := account.id;

    -- 3. Every rule, reported all at once: 422 with the list, or 404 for a valid request to no account.
    SELECT c.* INTO transfer_count, total_cents, client_refs, all_valid
      FROM bps.checked_transfers(transfers, account.currency, account.counterparty_check = 'strict') AS c;
    IF NOT coalesce(all_valid, false)
       OR bps.request_problems(payload, account.organization_name) <> '{}'
       OR length(idempotency_key) NOT BETWEEN 1 AND 255 THEN
        status := 422;
        body := bps.validation_failed(payload, account, idempotency_key);
        RETURN;
    END IF;
    IF account.id IS NULL THEN
        status := 404;
        body := bps.problem(404, 'account_not_found',
            'No bank account has this organization_iban and organization_bic.');
        RETURN;
    END IF;

    -- 4. Idempotency and duplicates. Requests with the same payload for the same account queue on this
    -- transaction-scoped lock (it dies with the transaction), so the duplicate check cannot race.
    request_hash := coalesce(payload_hash, sha256(convert_to(payload::text, 'UTF8')));
    IF idempotency_key IS NOT NULL THEN
        -- Claim the key. A concurrent request holding it makes this wait for its commit, then replay.
        stored := bps.claim_idempotency_key(account.id, idempotency_key, request_hash,
                                            settings.idempotency_retention);
        IF stored.bank_account_id IS NOT NULL THEN
            SELECT r.status, r.body INTO status, body FROM bps.idempotent_replay(stored, request_hash) AS r;
            RETURN;
        END IF;
    END IF;
    PERFORM pg_advisory_xact_lock(('x' || encode(substr(request_hash, 1, 8), 'hex'))::bit(64)::bigint
                                  # account.id);
    IF idempotency_key IS NULL AND deduplicate THEN
        SELECT d INTO duplicate_id FROM bps.recent_duplicate(account.id, request_hash, settings.dedup_window) AS d;
        IF duplicate_id IS NOT NULL THEN
            status := 409;
            body := bps.problem(409, 'duplicate_request',
                format('The same payload was already accepted as bulk transfer %s; nothing was transferred again.',
                       duplicate_id),
                jsonb_build_object('bulk_transfer_id', duplicate_id));
            RETURN;
        END IF;
    END IF;

    -- 5. The balance read at lookup turns most short requests away without writing.
    IF total_cents > account.balance_cents THEN
        status := 422;
        body := bps.insufficient_funds(account.balance_cents, total_cents);
    ELSE
        -- 6. Write the whole request: the bulk transfer and all its transfers in one statement. Every
        -- transfer's id follows from bulk_id and its position (bps.transfer_id), so none is read back.
        bulk_id := nextval('bps.bulk_transfers_id_seq');
        WITH bulk AS (
            INSERT INTO bps.bulk_transfers (id, bank_account_id, payload_hash, idempotency_key, transfer_count,
                                            total_cents, currency, api_key_id, requested_execution_date,
                                            pending_count)
            OVERRIDING SYSTEM VALUE
            VALUES (bulk_id, account.id, request_hash, bulk_transfer.idempotency_key,
                    bulk_transfer.transfer_count, bulk_transfer.total_cents, account.currency,
                    bulk_transfer.api_key_id, bps.date_of(payload ->> 'requested_execution_date'),
                    bulk_transfer.transfer_count)
        )
        INSERT INTO bps.transfers (id, bank_account_id, bulk_transfer_id, position, counterparty_name,
                                   counterparty_iban, counterparty_bic, amount_cents, amount_currency,
                                   description, client_reference)
        SELECT bps.transfer_id(bulk_id, t.ordinality - 1), account.id, bulk_id, t.ordinality - 1,
               t.counterparty_name, t.counterparty_iban, t.counterparty_bic, bps.cents(t.amount), account.currency,
               t.description, t.client_reference
          FROM jsonb_populate_recordset(NULL::bps.transfer_input, transfers) WITH ORDINALITY AS t;
        -- The 201's list of ids and client references, built before the lock is taken. Through a composite
        -- type: to_jsonb builds the array in one go (jsonb_agg of jsonb_build_object cost three times as much).
        SELECT to_jsonb(array_agg((bps.transfer_id(bulk_id, r.n - 1), r.reference)::bps.transfer_receipt ORDER BY r.n))
          INTO transfer_items
          FROM unnest(client_refs) WITH ORDINALITY AS r(reference, n);

        -- 7. The debit takes the account's row lock, as late as possible: concurrent requests on one account
        -- serialize only for the debit, the journal entry and the commit. It debits only what the account
        -- holds (a concurrent debit is waited for, then the condition is checked again on its result).
        LOOP
            WITH debit AS (
                UPDATE bps.bank_accounts AS a
                   SET balance_cents = a.balance_cents - bulk_transfer.total_cents, version = a.version + 1
                 WHERE a.id = account.id AND a.balance_cents >= bulk_transfer.total_cents
                RETURNING a.balance_cents, a.version
            )
            INSERT INTO bps.account_entries (bank_account_id, account_version, kind, amount_cents,
                                             previous_balance_cents, balance_cents, bulk_transfer_id)
            SELECT account.id, d.version, 'bulk_debit', -bulk_transfer.total_cents,
                   d.balance_cents + bulk_transfer.total_cents, d.balance_cents, bulk_id
              FROM debit AS d
            RETURNING account_entries.balance_cents INTO balance_after;
            EXIT WHEN FOUND;
            -- A concurrent request spent the money after the lookup. Decide under the account's lock, on
            -- the balance it holds now: a top-up may have come in too, and the debit is tried again.
            SELECT a.balance_cents INTO STRICT balance_seen
              FROM bps.bank_accounts AS a
             WHERE a.id = account.id
               FOR NO KEY UPDATE;
            IF balance_seen < total_cents THEN
                -- Not enough: this request's rows go, and the figures reported are the ones decided on.
                DELETE FROM bps.transfers AS t WHERE t.id IN (SELECT o.id FROM bps.transfers_of(bulk_id) AS o);
                DELETE FROM bps.bulk_transfers AS b WHERE b.id = bulk_id;
                bulk_id := NULL;
                status := 422;
                body := bps.insufficient_funds(balance_seen, total_cents);
                EXIT;
            END IF;
        END LOOP;

        IF bulk_id IS NOT NULL THEN
            status := 201;
            body := bps.accepted(bulk_id, transfer_count, total_cents, account.currency, balance_after,
                                 payload -> 'requested_execution_date', transfer_items);
            PERFORM set_config('response.headers', jsonb_build_object('Location', '/bulk_transfers/' || bulk_id)::text,
                               true);
        END IF;
    END IF;

    -- 8. Remember the answer for the key's retries.
    IF idempotency_key IS NOT NULL THEN
        PERFORM bps.remember_answer(account.id, idempotency_key, status, body, bulk_id);
    END IF;
END
$$;

-- The owner's call (a DBA in psql, the tests): any account.
CREATE OR REPLACE FUNCTION bps.bulk_transfer(payload jsonb, idempotency_key text DEFAULT NULL,
                                             OUT status integer, OUT body jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT r.status, r.body INTO status, body FROM bps.bulk_transfer(payload, idempotency_key, NULL, NULL) AS r;
END
$$;
