-- What the functions called over HTTP answer: RFC 9457 problem documents and response headers.

-- An RFC 9457 problem document for one of the contract's codes; extra members (errors, ...) merged in.
-- STABLE, as jsonb_build_object is: a function declared IMMUTABLE over it would not be inlined, and each call
-- would be planned anew (about 80 us).
CREATE OR REPLACE FUNCTION bps.problem(status integer, code text, detail text, extra jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'type', '/problems/' || code,
        'title', CASE code
            WHEN 'invalid_json' THEN 'Request body is not a JSON object'
            WHEN 'invalid_xml' THEN 'Request body is not a well-formed XML document'
            WHEN 'unsupported_media_type' THEN 'Unsupported media type'
            WHEN 'validation_failed' THEN 'Request is not valid'
            WHEN 'account_not_found' THEN 'Bank account not found'
            WHEN 'insufficient_funds' THEN 'Insufficient funds'
            WHEN 'duplicate_request' THEN 'Duplicate request'
            WHEN 'idempotency_key_reused' THEN 'Idempotency key reused with a different payload'
            WHEN 'request_in_progress' THEN 'Request still in progress'
            WHEN 'payload_too_large' THEN 'Payload too large'
            WHEN 'bulk_transfer_not_found' THEN 'Bulk transfer not found'
            WHEN 'transfer_not_found' THEN 'Transfer not found'
            WHEN 'not_cancellable' THEN 'Nothing left to cancel'
            WHEN 'unauthorized' THEN 'Unauthorized'
            WHEN 'forbidden' THEN 'Forbidden'
            ELSE code END,
        'status', status,
        'detail', detail,
        'code', code
    ) || extra
$$;

-- The 422 validation_failed problem with every error found in `what` (the request, the file, the query):
-- the one form the JSON intake, pain.001 files and list parameters answer with.
CREATE OR REPLACE FUNCTION bps.validation_problem(what text, errors jsonb, consequence text DEFAULT '') RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT bps.problem(422, 'validation_failed',
                       format('The %s has %s problem(s)%s.', what, jsonb_array_length(errors), consequence),
                       jsonb_build_object('errors', errors))
$$;

-- Headers for the HTTP layer: bps.bulk_transfers answers them per request (a column); the one-request
-- functions put a JSON object of them PostgREST-style in the transaction-local setting response.headers
-- (set_config(..., true)), which the service reads in the same statement; psql callers simply ignore it.

-- The id a path names (decimal digits within bigint), or NULL: an id that cannot exist is simply not found.
CREATE OR REPLACE FUNCTION bps.id_of(path_segment text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN path_segment ~ '^[0-9]{1,19}$' AND path_segment::numeric <= 9223372036854775807
                THEN path_segment::bigint END
$$;
