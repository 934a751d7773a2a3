-- The HTTP service's entry points (schema bps_api), the only functions its database role may execute.
-- Each runs as the owner (SECURITY DEFINER, search_path pinned so nothing of the caller's can stand in for
-- what it names), checks the API key first (401, 403), then calls the function a DBA would call, limited
-- to the key's accounts. Headers for the HTTP answer travel in response.headers (sql/02_responses.sql);
-- the account a call was for, for the access log, in response.account_id.

-- Whether a key may make calls that need `scope`: (status, body) of the refusal, or (NULL, NULL). The
-- service asks it only when it must refuse a request before the database sees it (a body too large or
-- of the wrong type): a request without a valid key is told so first, whatever else is wrong with it.
CREATE OR REPLACE FUNCTION bps_api.authenticate(api_key text, scope text, OUT status integer, OUT body jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Index scans, planned once per connection: a plan cached while a table was small must not stay a scan.
SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    SELECT a.status, a.body INTO status, body FROM bps.key_access(api_key, scope) AS a;
END
$$;

-- POST /bulk_transfer and /transfers/bulk: the body as sent (text, so that a body that is not JSON is
-- this function's 400 after the key is checked, not an error before it runs).
CREATE OR REPLACE FUNCTION bps_api.bulk_transfer(api_key text, body text, idempotency_key text DEFAULT NULL,
                                                 OUT status integer, OUT response jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Index scans, planned once per connection: a plan cached while a table was small must not stay a scan.
SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access  record;
    payload jsonb;
    reason  text;
    detail  text;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:write') AS a;
    IF access.status IS NOT NULL THEN
        status := access.status;
        response := access.body;
        RETURN;
    END IF;
    BEGIN
        payload := body::jsonb;
    EXCEPTION
        -- Not JSON (22P02), \u0000 (22P05), a number out of range (22003), too deep (54001), too big (54000).
        WHEN data_exception OR program_limit_exceeded OR statement_too_complex THEN
            GET STACKED DIAGNOSTICS reason = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL;
            status := 400;
            response := bps.problem(400, 'invalid_json', left(format('The request body is not valid JSON: %s. %s',
                                                                     reason, detail), 300));
            RETURN;
    END;
    SELECT r.status, r.body INTO status, response
      FROM bps.bulk_transfer(payload, idempotency_key, access.bank_account_ids, access.api_key_id) AS r;
END
$$;

-- GET /bulk_transfers/{id}, for the key's accounts only: another account's bulk transfer is not found.
-- The id as the path gave it, so that a malformed one is this function's 404, after the key is checked.
CREATE OR REPLACE FUNCTION bps_api.get_bulk_transfer(api_key text, bulk_transfer_id text,
                                                     OUT status integer, OUT body jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Index scans, planned once per connection: a plan cached while a table was small must not stay a scan.
SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    access record;
BEGIN
    SELECT * INTO access FROM bps.key_access(api_key, 'transfers:read') AS a;
    IF access.status IS NOT NULL THEN
        status := access.status;
        body := access.body;
        RETURN;
    END IF;
    SELECT g.status, g.body INTO status, body
      FROM bps.get_bulk_transfer(bps.id_of(bulk_transfer_id), access.bank_account_ids) AS g;
    PERFORM set_config('response.account_id', coalesce(body ->> 'bank_account_id', ''), true);
    IF status = 404 THEN
        body := bps.problem(404, 'bulk_transfer_not_found', format('There is no bulk transfer %s.', bulk_transfer_id));
    END IF;
END
$$;
