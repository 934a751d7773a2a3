-- Access: API keys scoped to accounts, and the database roles the service and the executor log in as.
--
-- The migrating role owns the schemas, tables and functions. The service and the executor log in as roles
-- of their own that own nothing: each may use one schema of SECURITY DEFINER entry points (bps_api for the
-- HTTP service, bps_executor for the executor) and nothing else; they have no privilege on schema bps.
-- Roles are global to a PostgreSQL server, so they are named after the database (<database>_service,
-- <database>_executor): two BPS databases on one server never share a role.

-- An API key, stored only as the sha256 of the key text: the key itself is shown once, by
-- bps.create_api_key. The view bps.api_keys lists keys without their hash.
CREATE TABLE bps.api_credentials (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_hash         bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    -- The key's last 4 characters (of its checksum, so they reveal nothing of its secret), to tell keys apart.
    hint             text NOT NULL CHECK (hint ~ '^[0-9A-Za-z]{4}$'),
    label            text NOT NULL CHECK (btrim(label) <> '' AND length(label) <= 200),
    bank_account_ids bigint[] NOT NULL CHECK (cardinality(bank_account_ids) > 0 AND array_position(bank_account_ids, NULL) IS NULL),
    scopes           text[] NOT NULL CHECK (cardinality(scopes) > 0 AND scopes <@ '{transfers:write,transfers:read}'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    revoked_at       timestamptz,
    -- Updated at most once a minute per key (bps.key_access), so a busy key's row is not a lock every
    -- request of that key waits on.
    last_used_at     timestamptz
);

-- Which key made each bulk transfer (NULL: the owner, in SQL), for audit. Keys are revoked, never deleted.
ALTER TABLE bps.bulk_transfers ADD COLUMN api_key_id bigint;

-- The roles of this database, by what they are for, and the password the run command keeps for each
-- (set by `python -m service serve` when it is given only the owner's DATABASE_URL).
CREATE TABLE bps.database_roles (
    purpose   text PRIMARY KEY CHECK (purpose IN ('service', 'executor')),
    role_name text NOT NULL UNIQUE,
    password  text
);

INSERT INTO bps.database_roles (purpose, role_name)
SELECT purpose,
       -- At most 63 bytes (PostgreSQL's limit): a long database name is cut and told apart by its md5.
       CASE WHEN octet_length(current_database()) + octet_length(purpose) + 1 <= 63
            THEN current_database() || '_' || purpose
            ELSE left(current_database(), 40) || '_' || left(md5(current_database()), 8) || '_' || purpose END
  FROM unnest(ARRAY['service', 'executor']) AS purpose;

CREATE SCHEMA bps_api;
CREATE SCHEMA bps_executor;
COMMENT ON SCHEMA bps_api IS 'The entry points of the HTTP service: SECURITY DEFINER functions that take an API key';
COMMENT ON SCHEMA bps_executor IS 'The entry points of the executor: claiming and settling transfers';

-- Each role: may log in, owns nothing, is a member of nothing, and can use only its own schema. An existing
-- role (a database restored under the same name) is brought back to exactly that.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT purpose, role_name FROM bps.database_roles LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r.role_name) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', r.role_name);
        END IF;
        EXECUTE format('ALTER ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS '
                       'INHERIT CONNECTION LIMIT -1', r.role_name);
        EXECUTE format('REVOKE ALL ON SCHEMA bps FROM %I', r.role_name);
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), r.role_name);
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I',
                       CASE r.purpose WHEN 'service' THEN 'bps_api' ELSE 'bps_executor' END, r.role_name);
    END LOOP;
END
$$;

-- Functions are executable by PUBLIC unless revoked: no function of the BPS schemas is (sql/99_grants.sql
-- grants each role its entry points after every migrate, and revokes PUBLIC again from new functions).
REVOKE ALL ON SCHEMA bps FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA bps FROM PUBLIC;
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
