-- ISO 20022: bulk transfers made from a pain.001 file remember where they came from, so that a pain.002
-- status report can name the original message, payment information block and transactions.

ALTER TABLE bps.bulk_transfers
    -- The file's GrpHdr/MsgId and its message (pain.001.001.03, ...); NULL for a JSON request.
    ADD COLUMN message_id text CHECK (length(message_id) BETWEEN 1 AND 35),
    ADD COLUMN message_name text CHECK (message_name ~ '^pain\.001\.[0-9]{3}\.[0-9]{2}'),
    -- The PmtInf/PmtInfId this bulk transfer was made from.
    ADD COLUMN payment_information_id text CHECK (length(payment_information_id) BETWEEN 1 AND 35),
    ADD CONSTRAINT bulk_transfers_message_check
        CHECK ((message_id IS NULL) = (message_name IS NULL) AND (message_id IS NULL) = (payment_information_id IS NULL));
