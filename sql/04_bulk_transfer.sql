-- bps.bulk_transfer: the product. Every rule of CONTRACT.md sections 1 to 3, in the order of
-- ARCHITECTURE.md, in one transaction: validate, find the account, settle duplicates and idempotency,
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

-- Validates, deduplicates and records one bulk transfer, debiting its account once; all or nothing.
CREATE OR REPLACE FUNCTION bps.bulk_transfer(payload jsonb, idempotency_key text DEFAULT NULL,
                                             OUT status integer, OUT body jsonb)
LANGUAGE plpgsql
-- Plan each statement once per connection, not on every call, and with index scans: a plan cached
-- while a table was small must not stay a sequential scan (this includes the foreign-key checks).
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
<<bulk_transfer>>
DECLARE
    settings        bps.settings;
    account         bps.bank_accounts;
    transfers       jsonb := payload -> 'credit_transfers';
    transfer_count  integer;
    total_cents     bigint;
    all_valid       boolean;
    errors          jsonb;
    payload_hash    bytea;
    claimed         boolean;
    stored          bps.idempotency_keys;
    duplicate_id    bigint;
    bulk_id         bigint;
    balance_before  bigint;
    balance_after   bigint;
    version_after   bigint;
    transfer_items  jsonb;
BEGIN
    -- The duplicate check and the balance check rely on each statement seeing what committed before it.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'bps.bulk_transfer runs at READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state';
    END IF;
    -- Headers for the HTTP layer go in response.headers (see sql/02_responses.sql); none so far.
    PERFORM set_config('response.headers', '{}', true);
    -- 1. Validate. Only a JSON object is a request; the transfer count is bounded before any work.
    IF jsonb_typeof(payload) IS DISTINCT FROM 'object' THEN
        status := 400;
        body := bps.problem(400, 'invalid_json', 'The request body must be a JSON object.');
        RETURN;
    END IF;
    SELECT * INTO STRICT settings FROM bps.settings;
    IF jsonb_typeof(transfers) = 'array'
       AND jsonb_array_length(transfers) > settings.max_transfers_per_request THEN
        status := 413;
        body := bps.problem(413, 'payload_too_large',
            format('A request may hold at most %s transfers; this one holds %s.',
                   settings.max_transfers_per_request, jsonb_array_length(transfers)));
        RETURN;
    END IF;

    -- 2. Find the account (no lock yet), so rules that depend on it are reported with all the others.
    SELECT * INTO account
      FROM bps.bank_accounts AS a
     WHERE a.iban = bps.normalize_iban(payload ->> 'organization_iban')
       AND a.bic = bps.normalize_bic(payload ->> 'organization_bic');

    -- The fast path: one pass over the transfers checks every rule and totals the amounts.
    IF jsonb_typeof(transfers) = 'array' THEN
        SELECT count(*), sum(bps.amount_cents(t -> 'amount')), bool_and(bps.transfer_problems(t, account.currency,
                                                     account.counterparty_check = 'strict') = '{}')
          INTO transfer_count, total_cents, all_valid
          FROM jsonb_array_elements(transfers) AS t;
    END IF;
    IF NOT coalesce(all_valid, false)
       OR bps.request_problems(payload, account.organization_name) <> '{}'
       OR length(idempotency_key) NOT BETWEEN 1 AND 255 THEN
        errors := coalesce(bps.request_errors(payload, account.organization_name, account.currency,
                                              account.counterparty_check = 'strict'), '[]')
            || CASE WHEN length(idempotency_key) NOT BETWEEN 1 AND 255 THEN jsonb_build_array(jsonb_build_object(
                   'header', 'Idempotency-Key', 'code', 'invalid_idempotency_key',
                   'detail', bps.problem_detail('Idempotency-Key', 'invalid_idempotency_key'))) ELSE '[]' END;
        status := 422;
        body := bps.problem(422, 'validation_failed',
            format('The request has %s problem(s); nothing was transferred.', jsonb_array_length(errors)),
            jsonb_build_object('errors', errors));
        RETURN;
    END IF;
    IF account.id IS NULL THEN
        status := 404;
        body := bps.problem(404, 'account_not_found',
            'No bank account has this organization_iban and organization_bic.');
        RETURN;
    END IF;

    -- 3. and 4. Duplicates and idempotency. Requests with the same payload for the same account queue on
    -- this transaction-scoped lock (it dies with the transaction), so the duplicate check cannot race.
    payload_hash := sha256(convert_to(payload::text, 'UTF8'));
    IF idempotency_key IS NOT NULL THEN
        -- Claim the key. A concurrent request holding it makes this insert wait for its commit, then replay.
        INSERT INTO bps.idempotency_keys AS k (bank_account_id, idempotency_key, payload_hash)
        VALUES (account.id, bulk_transfer.idempotency_key, bulk_transfer.payload_hash)
        ON CONFLICT ON CONSTRAINT idempotency_keys_pkey DO UPDATE
           SET payload_hash = excluded.payload_hash, status = NULL, body = NULL, bulk_transfer_id = NULL,
               created_at = now()
         WHERE k.created_at < now() - settings.idempotency_retention
        RETURNING true INTO claimed;
        IF claimed IS NULL THEN
            SELECT * INTO STRICT stored
              FROM bps.idempotency_keys AS k
             WHERE k.bank_account_id = account.id AND k.idempotency_key = bulk_transfer.idempotency_key;
            IF stored.payload_hash <> bulk_transfer.payload_hash THEN
                status := 422;
                body := bps.problem(422, 'idempotency_key_reused',
                    'This Idempotency-Key was used for a different payload; use a new key for a new request.');
            ELSE
                status := stored.status;
                body := stored.body;
                PERFORM set_config('response.headers', (jsonb_build_object('Idempotent-Replayed', 'true')
                    || CASE WHEN stored.bulk_transfer_id IS NOT NULL
                            THEN jsonb_build_object('Location', '/bulk_transfers/' || stored.bulk_transfer_id)
                            ELSE '{}' END)::text, true);
            END IF;
            RETURN;
        END IF;
    END IF;
    PERFORM pg_advisory_xact_lock(('x' || encode(substr(payload_hash, 1, 8), 'hex'))::bit(64)::bigint
                                  # account.id);
    IF idempotency_key IS NULL THEN
        SELECT b.id INTO duplicate_id
          FROM bps.bulk_transfers AS b
         WHERE b.bank_account_id = account.id
           AND b.payload_hash = bulk_transfer.payload_hash
           AND b.created_at > now() - settings.dedup_window
         ORDER BY b.created_at DESC
         LIMIT 1;
        IF duplicate_id IS NOT NULL THEN
            status := 409;
            body := bps.problem(409, 'duplicate_request',
                format('The same payload was already accepted as bulk transfer %s; nothing was transferred again.',
                       duplicate_id),
                jsonb_build_object('bulk_transfer_id', duplicate_id));
            RETURN;
        END IF;
    END IF;

    -- 5. to 7. Write the whole request, then lock, check and debit. The balance read at lookup turns most
    -- short requests away without writing; the check under the lock is the real one, and its failure
    -- undoes the writes (the block below is a subtransaction).
    IF total_cents > account.balance_cents THEN
        status := 422;
        body := bps.insufficient_funds(account.balance_cents, total_cents);
    ELSE
        BEGIN
            INSERT INTO bps.bulk_transfers (bank_account_id, payload_hash, idempotency_key, transfer_count,
                                            total_cents, currency)
            VALUES (account.id, bulk_transfer.payload_hash, bulk_transfer.idempotency_key,
                    bulk_transfer.transfer_count, bulk_transfer.total_cents, account.currency)
            RETURNING id INTO bulk_id;

            -- All transfers in one statement.
            WITH inserted AS (
                INSERT INTO bps.transfers (bank_account_id, bulk_transfer_id, position, counterparty_name,
                                           counterparty_iban, counterparty_bic, amount_cents, amount_currency,
                                           description, client_reference)
                SELECT account.id, bulk_id, t.n - 1, t.transfer ->> 'counterparty_name',
                       t.transfer ->> 'counterparty_iban', t.transfer ->> 'counterparty_bic',
                       bps.amount_cents(t.transfer -> 'amount'), account.currency,
                       t.transfer ->> 'description', t.transfer ->> 'client_reference'
                  FROM jsonb_array_elements(transfers) WITH ORDINALITY AS t(transfer, n)
                RETURNING id, position, client_reference
            )
            SELECT jsonb_agg(jsonb_build_object('id', i.id, 'client_reference', i.client_reference)
                             ORDER BY i.position)
              INTO transfer_items
              FROM inserted AS i;

            -- The account row is locked here, as late as possible: concurrent requests on one account
            -- serialize only for this check, the debit, the journal entry and the commit.
            SELECT a.balance_cents INTO balance_before
              FROM bps.bank_accounts AS a
             WHERE a.id = account.id
               FOR NO KEY UPDATE;
            IF balance_before < bulk_transfer.total_cents THEN
                RAISE EXCEPTION USING ERRCODE = 'BPS01', MESSAGE = 'insufficient funds at debit';
            END IF;
            UPDATE bps.bank_accounts AS a
               SET balance_cents = a.balance_cents - bulk_transfer.total_cents, version = a.version + 1
             WHERE a.id = account.id
            RETURNING a.balance_cents, a.version INTO balance_after, version_after;
            INSERT INTO bps.account_entries (bank_account_id, account_version, kind, amount_cents,
                                             previous_balance_cents, balance_cents, bulk_transfer_id)
            VALUES (account.id, version_after, 'bulk_debit', -bulk_transfer.total_cents,
                    balance_before, balance_after, bulk_id);

            status := 201;
            body := jsonb_build_object(
                'bulk_transfer_id', bulk_id,
                'status', 'pending',
                'transfer_count', bulk_transfer.transfer_count,
                'total_cents', bulk_transfer.total_cents,
                'total_amount', bps.format_cents(bulk_transfer.total_cents),
                'currency', account.currency,
                'balance_cents', balance_after,
                'transfers', transfer_items);
            PERFORM set_config('response.headers', jsonb_build_object('Location', '/bulk_transfers/' || bulk_id)::text,
                               true);
        EXCEPTION WHEN SQLSTATE 'BPS01' THEN
            -- A concurrent request spent the money after the lookup: this one's writes are rolled back,
            -- and the figures reported are those the denial was decided on, under the lock.
            bulk_id := NULL;
            status := 422;
            body := bps.insufficient_funds(balance_before, total_cents);
        END;
    END IF;

    IF idempotency_key IS NOT NULL THEN
        UPDATE bps.idempotency_keys AS k
           SET status = bulk_transfer.status, body = bulk_transfer.body, bulk_transfer_id = bulk_id
         WHERE k.bank_account_id = account.id AND k.idempotency_key = bulk_transfer.idempotency_key;
    END IF;
END
$$;
