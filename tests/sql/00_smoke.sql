BEGIN;
SELECT plan(1);
SELECT has_function('bps', 'bulk_transfer', ARRAY['jsonb', 'text']);
SELECT * FROM finish();
ROLLBACK;
