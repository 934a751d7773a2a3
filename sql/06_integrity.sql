-- The link between a transfer and its bulk transfer (same request, same account), enforced like a foreign
-- key but checked once per statement instead of once per row: bps.bulk_transfer writes up to 100000
-- transfers in one statement, and a per-row foreign-key check cost more than the row itself
-- (migrations/0002). Together these triggers give what the foreign key gave: no transfer without its bulk
-- transfer on the same account, and no bulk transfer removed or re-keyed while it has transfers.

-- Every bulk transfer the inserted transfers name exists, on the account they name; each is locked
-- FOR KEY SHARE, as a foreign-key check does, so a concurrent delete waits for this transaction.
CREATE OR REPLACE FUNCTION bps.transfers_check_bulk_transfers() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off  -- (probes whatever the statistics say, as the checks of a foreign key are)
AS $$
DECLARE
    orphan record;
BEGIN
    -- (A probe of the primary key per bulk transfer, LATERAL so that it stays one whatever the table's
    -- size was when the plan was cached: a join let the planner scan the whole table instead.)
    SELECT n.* INTO orphan
      FROM (SELECT DISTINCT i.bulk_transfer_id, i.bank_account_id FROM inserted AS i) AS n
      LEFT JOIN LATERAL (SELECT b.id FROM bps.bulk_transfers AS b
                          WHERE b.id = n.bulk_transfer_id AND b.bank_account_id = n.bank_account_id
                            FOR KEY SHARE) AS f ON true
     WHERE f.id IS NULL
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert into bps.transfers names bulk transfer % on account %, which does not exist',
                        orphan.bulk_transfer_id, orphan.bank_account_id
            USING ERRCODE = 'foreign_key_violation', TABLE = 'transfers', SCHEMA = 'bps';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER transfers_belong_to_their_bulk_transfer
    AFTER INSERT ON bps.transfers REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION bps.transfers_check_bulk_transfers();

-- The columns named as the trigger's arguments never change: a transfer never moves to another request or
-- account (its id says which request it belongs to), and a bulk transfer is never re-keyed (its transfers
-- are the primary-key range its id gives).
CREATE OR REPLACE FUNCTION bps.refuse_key_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    key_column text;
BEGIN
    FOREACH key_column IN ARRAY TG_ARGV LOOP
        IF to_jsonb(NEW) -> key_column IS DISTINCT FROM to_jsonb(OLD) -> key_column THEN
            RAISE EXCEPTION '%.% of the row with id % cannot change: it ties the row to its bulk transfer',
                            TG_TABLE_NAME, key_column, OLD.id
                USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME, SCHEMA = TG_TABLE_SCHEMA;
        END IF;
    END LOOP;
    RETURN NEW;
END
$$;

CREATE OR REPLACE TRIGGER transfers_stay_with_their_bulk_transfer
    BEFORE UPDATE OF bulk_transfer_id, bank_account_id ON bps.transfers
    FOR EACH ROW EXECUTE FUNCTION bps.refuse_key_change('bulk_transfer_id', 'bank_account_id');

CREATE OR REPLACE TRIGGER bulk_transfers_keep_their_key
    BEFORE UPDATE OF id, bank_account_id ON bps.bulk_transfers
    FOR EACH ROW EXECUTE FUNCTION bps.refuse_key_change('id', 'bank_account_id');

-- A bulk transfer that still has transfers is neither deleted nor truncated away (TRUNCATE fires no delete
-- trigger: it must take bps.transfers along in the same statement).
CREATE OR REPLACE FUNCTION bps.bulk_transfers_check_transfers() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off  -- (probes whatever the statistics say, as the checks of a foreign key are)
AS $$
DECLARE
    kept bigint;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        SELECT t.bulk_transfer_id INTO kept FROM bps.transfers AS t LIMIT 1;
    ELSE
        -- The check must see transfers committed while this delete waited for their KEY SHARE lock; a
        -- REPEATABLE READ snapshot would not (a foreign key re-checks with a fresh one; a trigger cannot).
        IF NOT bps.at_read_committed() THEN
            PERFORM bps.refuse_isolation_level('deleting from bps.bulk_transfers');
        END IF;
        -- (LATERAL with LIMIT: a range probe of the primary key per bulk transfer, never a scan of the table.)
        SELECT d.id INTO kept
          FROM deleted AS d
         CROSS JOIN LATERAL (SELECT FROM bps.transfers_of(d.id) LIMIT 1) AS t
         LIMIT 1;
    END IF;
    IF kept IS NOT NULL THEN
        RAISE EXCEPTION 'bulk transfer % still has transfers (a TRUNCATE must take bps.transfers along)', kept
            USING ERRCODE = 'foreign_key_violation', TABLE = 'bulk_transfers', SCHEMA = 'bps';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER bulk_transfers_keep_their_transfers
    AFTER DELETE ON bps.bulk_transfers REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION bps.bulk_transfers_check_transfers();

CREATE OR REPLACE TRIGGER bulk_transfers_truncate_with_their_transfers
    AFTER TRUNCATE ON bps.bulk_transfers
    FOR EACH STATEMENT EXECUTE FUNCTION bps.bulk_transfers_check_transfers();
