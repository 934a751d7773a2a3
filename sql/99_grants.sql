-- Who may execute what, re-applied after every migrate so that a new function is covered at once: no
-- function of the BPS schemas is executable by PUBLIC; the service's role executes the entry points of
-- bps_api, the executor's those of bps_executor; neither has any privilege in schema bps.
DO $$
DECLARE
    service  text := (SELECT role_name FROM bps.database_roles WHERE purpose = 'service');
    executor text := (SELECT role_name FROM bps.database_roles WHERE purpose = 'executor');
BEGIN
    REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA bps, bps_api, bps_executor FROM PUBLIC;
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA bps_api TO %I', service);
    EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA bps_executor TO %I', executor);
END
$$;
