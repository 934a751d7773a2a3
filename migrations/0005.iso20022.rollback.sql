ALTER TABLE bps.bulk_transfers
    DROP CONSTRAINT bulk_transfers_message_check,
    DROP COLUMN payment_information_id,
    DROP COLUMN message_name,
    DROP COLUMN message_id;
