-- The HTTP service's entry points (schema bps_api), the only functions its database role may execute.
-- Each runs as the owner (SECURITY DEFINER, search_path pinned so nothing of the caller's can stand in for
-- what it names), checks the API key first (401, 403), then calls the function a DBA would call, limited
-- to the key's accounts. Each answers (status, body) as HTTP returns them, and for the access log the ids of
-- the account the call was about and of the key it was made with; headers travel in response.headers
-- (sql/02_responses.sql).

-- Their return type changed: earlier definitions must go first (CREATE OR REPLACE cannot change it).
DROP FUNCTION IF EXISTS bps_api.authenticate(text, text);
DROP FUNCTION IF EXISTS bps_api.bulk_transfer(text, text, text);
DROP FUNCTION IF EXISTS bps_api.get_bulk_transfer(text, text);

-- Whether a key may make calls that need `scope`: the refusal (401, 403), or a NULL status. The service asks
-- it only when it must refuse a request before the database sees it (a body too large, of the wrong type,
-- not JSON): a request without a valid key is told so first, whatever else is wrong with it.
CREATE OR REPLACE FUNCTION bps_api.authenticate(api_key text, scope text, OUT status integer, OUT body jsonb,
                                                OUT bank_account_id bigint, OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    SELECT a.status, a.body, a.api_key_id INTO status, body, api_key_id FROM bps.key_access(api_key, scope) AS a;
END
$$;

-- The service's first call in each statement: names the session after the HTTP request (application_name
-- 'bps <request id>', in pg_stat_activity and, with %a in log_line_prefix, in the server's log), and passes the
-- API key on, so that the entry point called with it (LATERAL) runs after it.
CREATE OR REPLACE FUNCTION bps_api.request(request_id text, api_key text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM set_config('application_name', left('bps ' || request_id, 63), false);
    RETURN api_key;
END
$$;

-- GET /metrics: the database's figures (no key: they name no account, and an SRE's scraper has none).
CREATE OR REPLACE FUNCTION bps_api.metrics(OUT name text, OUT help text, OUT kind text, OUT labels jsonb,
                                           OUT value numeric)
RETURNS SETOF record
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM bps.metrics()
$$;

-- POST /bulk_transfer and /transfers/bulk, many requests at once (the service's group commit): each with its
-- own key, answered as if it had come alone, the requests taken one after the other in array order. label
-- names the session after the requests (bps_api.request); NULL leaves the name as it is. The service casts
-- the bodies to jsonb in its own statement: a body that is not JSON fails it (SQLSTATE class 22 or 54), and
-- the service sends each request again on its own.
CREATE OR REPLACE FUNCTION bps_api.bulk_transfers(label text, api_keys text[], payloads jsonb[],
                                                  idempotency_keys text[])
RETURNS TABLE (status integer, body jsonb, headers jsonb, bank_account_id bigint, api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET jit = off AS $$
DECLARE
    key_ids  bigint[];
    refusals integer[];
    admitted jsonb[];  -- the payloads, NULL where the key is refused (the core answers those at once)
    stale    boolean;
BEGIN
    IF label IS NOT NULL THEN
        PERFORM bps_api.request(label, NULL);
    END IF;
    -- Every key checked in one statement (one index probe each); a key's last use written once a minute.
    SELECT array_agg(c.api_key_id), array_agg(c.refusal), array_agg(CASE WHEN c.refusal IS NULL THEN u.payload END),
           bool_or(c.refusal IS NULL AND c.stale)
      INTO key_ids, refusals, admitted, stale
      FROM unnest(api_keys, payloads) WITH ORDINALITY AS u(api_key, payload, n)  -- (aggregated in this order)
     CROSS JOIN LATERAL bps.key_check(u.api_key, 'transfers:write') AS c;
    IF stale THEN
        PERFORM bps.touch_api_key(s.id)
           FROM (SELECT DISTINCT k.id FROM unnest(key_ids, refusals) AS k(id, refusal) WHERE k.refusal IS NULL) AS s;
    END IF;
    -- Each request's answer from bps.bulk_transfers, limited to its key's accounts; a refused key's instead.
    RETURN QUERY
    SELECT coalesce(x.status, f.status), coalesce(x.body, f.body), coalesce(x.headers, f.headers), f.account_id,
           key_ids[f.n]
      FROM bps.bulk_transfers(admitted, idempotency_keys, key_ids) WITH ORDINALITY
           AS f(status, body, headers, account_id, n)
      LEFT JOIN LATERAL (SELECT * FROM bps.key_refusal(refusals[f.n], 'transfers:write') OFFSET 0) AS x ON true
     ORDER BY f.n;
END
$$;

-- POST /bulk_transfer and /transfers/bulk, one request: bps_api.bulk_transfers with one element (the
-- service's call when a request's group call failed). Headers go to response.headers.
CREATE OR REPLACE FUNCTION bps_api.bulk_transfer(api_key text, payload jsonb, idempotency_key text DEFAULT NULL,
                                                 OUT status integer, OUT body jsonb, OUT bank_account_id bigint,
                                                 OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    answer_headers jsonb;
BEGIN
    SELECT r.status, r.body, r.headers, r.bank_account_id, r.api_key_id
      INTO status, body, answer_headers, bank_account_id, api_key_id
      FROM bps_api.bulk_transfers(NULL, ARRAY[api_key], ARRAY[payload], ARRAY[idempotency_key]) AS r;
    PERFORM set_config('response.headers', answer_headers::text, true);
END
$$;

-- POST /bulk_transfer and /transfers/bulk with an XML body: a pain.001 file, for the key's accounts (each of
-- its PmtInf must debit one of them).
CREATE OR REPLACE FUNCTION bps_api.bulk_transfer_xml(api_key text, document text, idempotency_key text DEFAULT NULL,
                                                     OUT status integer, OUT body jsonb, OUT bank_account_id bigint,
                                                     OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    access record;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:write') AS a;
    api_key_id := access.api_key_id;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    SELECT r.status, r.body, r.account_id INTO status, body, bank_account_id
      FROM bps.bulk_transfer_xml(document, idempotency_key, access.bank_account_ids, access.api_key_id) AS r;
END
$$;

-- GET /bulk_transfers/{id} with Accept: application/xml: its pain.002 status report, as document (status 200),
-- or the problem in body.
CREATE OR REPLACE FUNCTION bps_api.get_payment_status_report(api_key text, bulk_transfer_id text, OUT status integer,
                                                             OUT body jsonb, OUT bank_account_id bigint,
                                                             OUT api_key_id bigint, OUT document text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access record;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:read') AS a;
    api_key_id := access.api_key_id;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    document := bps.payment_status_report(bps.id_of(bulk_transfer_id), access.bank_account_ids)::text;
    IF document IS NULL THEN
        status := 404;
        body := bps.problem(404, 'bulk_transfer_not_found', format('There is no bulk transfer %s.', bulk_transfer_id));
        RETURN;
    END IF;
    status := 200;
    document := '<?xml version="1.0" encoding="UTF-8"?>' || E'\n' || document;
    bank_account_id := (SELECT b.bank_account_id FROM bps.bulk_transfers AS b WHERE b.id = bps.id_of(bulk_transfer_id));
END
$$;

-- GET /bulk_transfers/{id}, for the key's accounts only: another account's bulk transfer is not found.
-- The id as the path gave it, so that a malformed one is this function's 404, after the key is checked.
CREATE OR REPLACE FUNCTION bps_api.get_bulk_transfer(api_key text, bulk_transfer_id text, OUT status integer,
                                                     OUT body jsonb, OUT bank_account_id bigint,
                                                     OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access record;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:read') AS a;
    api_key_id := access.api_key_id;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    SELECT g.status, g.body INTO status, body
      FROM bps.get_bulk_transfer(bps.id_of(bulk_transfer_id), access.bank_account_ids) AS g;
    bank_account_id := body ->> 'bank_account_id';
    IF status = 404 THEN
        body := bps.problem(404, 'bulk_transfer_not_found', format('There is no bulk transfer %s.', bulk_transfer_id));
    END IF;
END
$$;

-- The paging parameters of a list (limit: 1 to 200, 50 by default; cursor: of this list) and its filters,
-- from the query string as sent (a JSON object; a parameter given twice is an array): every problem with its
-- parameter, as the errors of a 422 validation_failed, or NULL when there is none.
CREATE OR REPLACE FUNCTION bps.page_problems(query jsonb, kind text, filters jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_agg(jsonb_build_object('parameter', p.name, 'code', p.code, 'detail', p.detail) ORDER BY p.name)
      FROM (
        SELECT q.key AS name,
               CASE
                   WHEN q.key NOT IN ('limit', 'cursor') AND NOT filters ? q.key THEN 'unknown_parameter'
                   WHEN jsonb_typeof(q.value) <> 'string' THEN 'repeated_parameter'
                   WHEN q.key = 'limit' AND NOT (q.value #>> '{}' ~ '^[0-9]{1,3}$'
                                                 AND (q.value #>> '{}')::integer BETWEEN 1 AND 200) THEN 'invalid_limit'
                   WHEN q.key = 'cursor' AND bps.cursor_position(kind, q.value #>> '{}') IS NULL THEN 'invalid_cursor'
                   WHEN filters ? q.key AND NOT filters -> q.key ? (q.value #>> '{}') THEN 'invalid_' || q.key
               END AS code,
               CASE
                   WHEN q.key NOT IN ('limit', 'cursor') AND NOT filters ? q.key
                       THEN format('unknown parameter "%s"', q.key)
                   WHEN jsonb_typeof(q.value) <> 'string' THEN format('%s is given more than once', q.key)
                   WHEN q.key = 'limit' THEN 'limit must be a whole number from 1 to 200'
                   WHEN q.key = 'cursor' THEN 'cursor must be the next_cursor of an earlier page of this list'
                   ELSE format('%s must be one of %s', q.key,
                               (SELECT string_agg(v, ', ') FROM jsonb_array_elements_text(filters -> q.key) AS v))
               END AS detail
          FROM jsonb_each(coalesce(query, '{}')) AS q
      ) AS p
     WHERE p.code IS NOT NULL
$$;

-- The 422 answer to a list request with bad parameters.
CREATE OR REPLACE FUNCTION bps.invalid_parameters(errors jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT bps.validation_problem('query', errors)
$$;

-- GET /bulk_transfers?limit=&cursor=&status=: the key's bulk transfers, newest first.
CREATE OR REPLACE FUNCTION bps_api.list_bulk_transfers(api_key text, query jsonb, OUT status integer, OUT body jsonb,
                                                       OUT bank_account_id bigint, OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Index scans, planned once per connection: a plan cached while a table was small must not stay a scan.
SET enable_seqscan = off SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access record;
    errors jsonb;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:read') AS a;
    api_key_id := access.api_key_id;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    errors := bps.page_problems(query, 'bulk_transfers', jsonb_build_object('status', jsonb_build_array(
        'pending', 'processing', 'completed', 'partially_completed', 'failed', 'cancelled')));
    IF errors IS NOT NULL THEN
        status := 422;
        body := bps.invalid_parameters(errors);
        RETURN;
    END IF;
    status := 200;
    body := bps.list_bulk_transfers(access.bank_account_ids, coalesce((query ->> 'limit')::integer, 50),
                                    bps.cursor_position('bulk_transfers', query ->> 'cursor'), query ->> 'status');
END
$$;

-- POST /bulk_transfers/{id}/cancel: cancels what is still pending, refunding it.
CREATE OR REPLACE FUNCTION bps_api.cancel_bulk_transfer(api_key text, bulk_transfer_id text, OUT status integer,
                                                        OUT body jsonb, OUT bank_account_id bigint,
                                                        OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access record;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:write') AS a;
    api_key_id := access.api_key_id;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    SELECT c.status, c.body INTO status, body
      FROM bps.cancel_bulk_transfer(bps.id_of(bulk_transfer_id), access.bank_account_ids) AS c;
    bank_account_id := body ->> 'bank_account_id';
    IF status = 404 THEN
        body := bps.problem(404, 'bulk_transfer_not_found', format('There is no bulk transfer %s.', bulk_transfer_id));
    END IF;
END
$$;

-- GET /transfers/{id}.
CREATE OR REPLACE FUNCTION bps_api.get_transfer(api_key text, transfer_id text, OUT status integer, OUT body jsonb,
                                                OUT bank_account_id bigint, OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access record;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:read') AS a;
    api_key_id := access.api_key_id;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    SELECT g.status, g.body INTO status, body FROM bps.get_transfer(bps.id_of(transfer_id), access.bank_account_ids) AS g;
    bank_account_id := body ->> 'bank_account_id';
    IF status = 404 THEN
        body := bps.problem(404, 'transfer_not_found', format('There is no transfer %s.', transfer_id));
    END IF;
END
$$;

-- GET /accounts: the key's accounts, each with its balance.
CREATE OR REPLACE FUNCTION bps_api.list_accounts(api_key text, OUT status integer, OUT body jsonb,
                                                 OUT bank_account_id bigint, OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access record;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:read') AS a;
    api_key_id := access.api_key_id;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    status := 200;
    body := bps.list_accounts(access.bank_account_ids);
END
$$;

-- GET /accounts/{id}/entries?limit=&cursor=: an account's journal, newest first.
CREATE OR REPLACE FUNCTION bps_api.list_account_entries(api_key text, account text, query jsonb,
                                                        OUT status integer, OUT body jsonb,
                                                        OUT bank_account_id bigint, OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET jit = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access record;
    errors jsonb;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:read') AS a;
    api_key_id := access.api_key_id;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    errors := bps.page_problems(query, 'account_entries', '{}');
    IF errors IS NOT NULL THEN
        status := 422;
        body := bps.invalid_parameters(errors);
        RETURN;
    END IF;
    SELECT e.status, e.body INTO status, body
      FROM bps.list_account_entries(bps.id_of(account), access.bank_account_ids,
                                    coalesce((query ->> 'limit')::integer, 50),
                                    bps.cursor_position('account_entries', query ->> 'cursor')) AS e;
    IF status = 404 THEN
        body := bps.problem(404, 'account_not_found', format('There is no bank account %s.', account));
    ELSE
        bank_account_id := bps.id_of(account);
    END IF;
END
$$;
