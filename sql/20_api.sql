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

-- POST /bulk_transfer and /transfers/bulk. The service casts the body to jsonb in its own statement: a body
-- that is not JSON fails there (SQLSTATE class 22 or 54), and the service asks bps_api.authenticate first.
-- The hot path: the key check is inlined into its first statement, and the planner settings are the core's.
CREATE OR REPLACE FUNCTION bps_api.bulk_transfer(api_key text, payload jsonb, idempotency_key text DEFAULT NULL,
                                                 OUT status integer, OUT body jsonb, OUT bank_account_id bigint,
                                                 OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    checked record;
BEGIN
    SELECT * INTO checked FROM bps.key_check(api_key, 'transfers:write') AS k;
    api_key_id := checked.api_key_id;
    IF checked.refusal IS NOT NULL THEN
        SELECT r.status, r.body INTO status, body FROM bps.key_refusal(checked.refusal, 'transfers:write') AS r;
        RETURN;
    END IF;
    IF checked.stale THEN
        PERFORM bps.touch_api_key(checked.api_key_id);
    END IF;
    SELECT r.status, r.body, r.account_id INTO status, body, bank_account_id
      FROM bps.bulk_transfer(payload, idempotency_key, checked.bank_account_ids, checked.api_key_id) AS r;
END
$$;

-- GET /bulk_transfers/{id}, for the key's accounts only: another account's bulk transfer is not found.
-- The id as the path gave it, so that a malformed one is this function's 404, after the key is checked.
CREATE OR REPLACE FUNCTION bps_api.get_bulk_transfer(api_key text, bulk_transfer_id text, OUT status integer,
                                                     OUT body jsonb, OUT bank_account_id bigint,
                                                     OUT api_key_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
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
