-- API keys: made and revoked by the owner in SQL, checked on every call of the service's entry points.
--
-- A key is 'bps_', 32 random base62 characters (190 bits from gen_random_uuid, PostgreSQL's strong random
-- source) and a 6-character checksum of what precedes it (the first 4 bytes of its sha256, in base62), so
-- a secret scanner or the service can tell a mistyped key from a real one without a lookup. Only the
-- sha256 of the whole key is stored.

-- n as `width` base62 digits (0-9, A-Z, a-z), most significant first; n is below 62^width.
CREATE OR REPLACE FUNCTION bps.base62(n numeric, width integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT string_agg(substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz',
                             (div(n, 62::numeric ^ i) % 62)::integer + 1, 1), '' ORDER BY i DESC)
      FROM generate_series(0, width - 1) AS i
$$;

-- The checksum that ends a key: base62 of the first 4 bytes of sha256('bps_' || its random part).
CREATE OR REPLACE FUNCTION bps.api_key_checksum(key_body text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT bps.base62(('x' || encode(substr(sha256(convert_to(key_body, 'UTF8')), 1, 4), 'hex'))::bit(32)::bigint, 6)
$$;

-- A new key's text. Each gen_random_uuid() holds 122 random bits; dropping its version and variant
-- digits leaves 30 random hex digits, so two give 240 random bits, of which 32 base62 digits keep 190.
CREATE OR REPLACE FUNCTION bps.new_api_key() RETURNS text
LANGUAGE sql VOLATILE AS $$
    WITH random AS (
        SELECT decode(string_agg(overlay(overlay(replace(gen_random_uuid()::text, '-', '') PLACING '' FROM 17 FOR 1)
                                         PLACING '' FROM 13 FOR 1), ''), 'hex') AS bytes
          FROM generate_series(1, 2)
    ), body AS (
        SELECT 'bps_' || bps.base62(sum(get_byte(r.bytes, i)::numeric * 256::numeric ^ (29 - i)) % 62::numeric ^ 32, 32)
                   AS text
          FROM random AS r, generate_series(0, 29) AS i
    )
    SELECT b.text || bps.api_key_checksum(b.text) FROM body AS b
$$;

-- Makes an API key for the given accounts with the given scopes, valid until expires_at (NULL: until
-- revoked). Returns the key: this is the only time it is shown.
CREATE OR REPLACE FUNCTION bps.create_api_key(bank_account_ids bigint[], label text,
                                              scopes text[] DEFAULT ARRAY['transfers:write', 'transfers:read'],
                                              expires_at timestamptz DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    accounts bigint[] := ARRAY(SELECT DISTINCT a FROM unnest(bank_account_ids) AS a WHERE a IS NOT NULL ORDER BY a);
    missing  bigint[];
    api_key  text := bps.new_api_key();
BEGIN
    IF cardinality(accounts) = 0 OR array_position(bank_account_ids, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'an API key needs at least one bank account, and no NULL among them'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    missing := ARRAY(SELECT a FROM unnest(accounts) AS a
                      WHERE NOT EXISTS (SELECT FROM bps.bank_accounts AS b WHERE b.id = a));
    IF cardinality(missing) > 0 THEN
        RAISE EXCEPTION 'no bank account with id %', array_to_string(missing, ', ')
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF scopes IS NULL OR cardinality(scopes) = 0 OR NOT scopes <@ ARRAY['transfers:write', 'transfers:read'] THEN
        RAISE EXCEPTION 'scopes must be one or both of transfers:write and transfers:read, not %', scopes
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF expires_at <= now() THEN
        RAISE EXCEPTION 'expires_at % is not in the future', expires_at USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO bps.api_credentials (key_hash, hint, label, bank_account_ids, scopes, expires_at)
    VALUES (sha256(convert_to(api_key, 'UTF8')), right(api_key, 4), bps.trim_space(label), accounts,
            ARRAY(SELECT DISTINCT s FROM unnest(scopes) AS s ORDER BY s), create_api_key.expires_at);
    RETURN api_key;
END
$$;

-- Revokes a key, given its text: true when it was live (not revoked, not expired). It stops working at once.
CREATE OR REPLACE FUNCTION bps.revoke_api_key(api_key text) RETURNS boolean
LANGUAGE sql AS $$
    WITH revoked AS (
        UPDATE bps.api_credentials AS c SET revoked_at = now()
         WHERE c.key_hash = sha256(convert_to(api_key, 'UTF8'))
           AND c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now())
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM revoked)
$$;

-- Revokes a key by its id (bps.api_keys lists them), for a key whose text is lost.
CREATE OR REPLACE FUNCTION bps.revoke_api_key(api_key_id bigint) RETURNS boolean
LANGUAGE sql AS $$
    WITH revoked AS (
        UPDATE bps.api_credentials AS c SET revoked_at = now()
         WHERE c.id = api_key_id AND c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now())
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM revoked)
$$;

-- Every key, without its hash: what it may do, and whether it still works.
CREATE OR REPLACE VIEW bps.api_keys AS
SELECT c.id, c.label, 'bps_…' || c.hint AS hint, c.bank_account_ids, c.scopes, c.created_at, c.expires_at,
       c.revoked_at, c.last_used_at,
       CASE WHEN c.revoked_at IS NOT NULL THEN 'revoked'
            WHEN c.expires_at <= now() THEN 'expired'
            ELSE 'live' END AS state
  FROM bps.api_credentials AS c;

-- The 401 every refused key gets, whatever the reason (absent, malformed, unknown, revoked, expired): the
-- answer says nothing about which.
CREATE OR REPLACE FUNCTION bps.unauthorized() RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT bps.problem(401, 'unauthorized',
        'A valid API key is required: send it as Authorization: Bearer <key>. Missing, malformed, unknown, '
        'revoked and expired keys are refused alike.')
$$;

-- What a key may do for a call that needs `scope`: its id (NULL for a key that does not exist) and accounts,
-- the refusal it gets (401, 403; NULL: none), and whether its last use should be written. A SQL function
-- the planner inlines into the caller's statement: the check is one unique-index probe, no call of its own.
CREATE OR REPLACE FUNCTION bps.key_check(api_key text, scope text)
RETURNS TABLE (api_key_id bigint, bank_account_ids bigint[], refusal integer, stale boolean)
LANGUAGE sql STABLE AS $$
    SELECT c.id, c.bank_account_ids,
           CASE WHEN c.id IS NULL OR c.revoked_at IS NOT NULL OR c.expires_at <= now() THEN 401
                WHEN NOT scope = ANY (c.scopes) THEN 403 END,
           c.last_used_at IS NULL OR c.last_used_at < now() - interval '1 minute'
      FROM (SELECT 1) AS one
      LEFT JOIN bps.api_credentials AS c ON c.key_hash = sha256(convert_to(api_key, 'UTF8'))
$$;

-- The answer to a refused key (bps.key_check's refusal): the 401 with its challenge header, or the 403.
-- No row for no refusal. (A set-returning SQL function: the planner inlines it into the caller's statement.)
DROP FUNCTION IF EXISTS bps.key_refusal(integer, text);  -- (it answers its headers now)
CREATE OR REPLACE FUNCTION bps.key_refusal(refusal integer, scope text)
RETURNS TABLE (status integer, body jsonb, headers jsonb)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT refusal,
           CASE WHEN refusal = 401 THEN bps.unauthorized()
                ELSE bps.problem(403, 'forbidden', format('This API key lacks the scope %s.', scope)) END,
           CASE WHEN refusal = 401 THEN '{"WWW-Authenticate": "Bearer realm=\"bps\""}'::jsonb ELSE '{}' END
     WHERE refusal IS NOT NULL
$$;

-- Writes a key's last use, at most once a minute (bps.key_check says when), without waiting for a concurrent
-- request of the same key that is writing it.
CREATE OR REPLACE FUNCTION bps.touch_api_key(api_key_id bigint) RETURNS void
LANGUAGE sql AS $$
    UPDATE bps.api_credentials AS c SET last_used_at = now()
     WHERE c.id = (SELECT l.id FROM bps.api_credentials AS l WHERE l.id = api_key_id FOR NO KEY UPDATE SKIP LOCKED)
$$;

-- bps.key_check with its consequences, for the entry points that are not the hot path: the refusal's
-- (status, body), or the key's id and accounts with its last use written.
CREATE OR REPLACE FUNCTION bps.key_access(api_key text, scope text, OUT api_key_id bigint,
                                          OUT bank_account_ids bigint[], OUT status integer, OUT body jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    checked         record;
    refusal_headers jsonb;
BEGIN
    SELECT * INTO checked FROM bps.key_check(api_key, scope) AS k;
    api_key_id := checked.api_key_id;
    IF checked.refusal IS NOT NULL THEN
        SELECT r.status, r.body, r.headers INTO status, body, refusal_headers
          FROM bps.key_refusal(checked.refusal, scope) AS r;
        PERFORM set_config('response.headers', refusal_headers::text, true);
        RETURN;
    END IF;
    IF checked.stale THEN
        PERFORM bps.touch_api_key(checked.api_key_id);
    END IF;
    bank_account_ids := checked.bank_account_ids;
END
$$;
