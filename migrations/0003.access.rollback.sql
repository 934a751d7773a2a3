-- Back to no keys and no roles of our own: the roles lose what they were granted here, then go.
ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA bps TO PUBLIC;
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT role_name FROM bps.database_roles LOOP
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = r.role_name) THEN
            EXECUTE format('DROP OWNED BY %I', r.role_name);
            EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM %I', current_database(), r.role_name);
            EXECUTE format('DROP ROLE %I', r.role_name);
        END IF;
    END LOOP;
END
$$;
DROP VIEW IF EXISTS bps.api_keys;
DROP FUNCTION IF EXISTS bps.key_access, bps.unauthorized, bps.create_api_key, bps.revoke_api_key(text),
    bps.revoke_api_key(bigint), bps.new_api_key, bps.api_key_checksum, bps.base62;
DROP SCHEMA bps_executor CASCADE;
DROP SCHEMA bps_api CASCADE;
DROP TABLE bps.database_roles;
ALTER TABLE bps.bulk_transfers DROP COLUMN api_key_id;
DROP TABLE bps.api_credentials;
