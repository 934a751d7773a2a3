-- The payload rules (docs/api.md, validation), one small function per rule. Each *_problem function
-- returns a machine-readable code, or NULL when the value is fine; bps.bulk_transfer's fast path and its
-- detailed error list are two aggregations over these same functions, so every rule is written once.

-- A string without the white space around it, as names are compared and blank fields are found: every
-- character Unicode calls White_Space (tabs, line breaks, spaces, no-break and ideographic spaces, ...).
CREATE OR REPLACE FUNCTION bps.trim_space(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT btrim(value, E' \t\n\r\f\v\u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005'
                        '\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000')
$$;

-- The longest text each field may hold (docs/api.md).
CREATE OR REPLACE FUNCTION bps.field_max_length(field text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE field
        WHEN 'counterparty_name' THEN 70
        WHEN 'description' THEN 140
        WHEN 'counterparty_iban' THEN 34
        WHEN 'organization_iban' THEN 34
        WHEN 'counterparty_bic' THEN 11
        WHEN 'organization_bic' THEN 11
        WHEN 'client_reference' THEN 35
        WHEN 'organization_name' THEN 140
        WHEN 'MsgId' THEN 35
        WHEN 'PmtInfId' THEN 35
    END
$$;

-- Earlier versions took the amount as jsonb; the rules below take the text of a JSON string.
DROP FUNCTION IF EXISTS bps.amount_cents(jsonb);
DROP FUNCTION IF EXISTS bps.amount_is_valid(jsonb);

-- The value of a wire amount (the text of a JSON string) written as digits with at most two decimals;
-- 'Infinity' past 12 significant characters (far over any valid amount, and too long to convert safely);
-- NULL when it is not written so. One simple regular expression: one with a look-ahead for "not zero"
-- cost twice as much per transfer.
CREATE OR REPLACE FUNCTION bps.amount_value(amount text) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN amount ~ '^[0-9]+(\.[0-9]{1,2})?$'
                THEN CASE WHEN length(ltrim(amount, '0')) <= 12 THEN amount::numeric ELSE 'Infinity' END
           END
$$;

-- A valid wire amount: more than 0 and at most 999999999.99; never NULL.
CREATE OR REPLACE FUNCTION bps.amount_is_valid(amount text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(bps.amount_value(amount) <@ numrange(0.01, 999999999.99, '[]'), false)
$$;

-- Cents of an amount bps.amount_is_valid accepts. Exact: the digits go through numeric, never a float.
CREATE OR REPLACE FUNCTION bps.cents(amount text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (amount::numeric * 100)::bigint
$$;

-- Cents of a wire amount, or NULL when it is not valid.
CREATE OR REPLACE FUNCTION bps.amount_cents(amount text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN bps.amount_is_valid(amount) THEN bps.cents(amount) END
$$;

-- What is wrong with a wire amount (any JSON value, NULL when absent), or NULL when bps.amount_cents
-- accepts its text.
CREATE OR REPLACE FUNCTION bps.amount_problem(amount jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN amount IS NULL THEN 'required'
        WHEN jsonb_typeof(amount) = 'number' THEN 'amount_not_string'
        WHEN jsonb_typeof(amount) <> 'string' THEN 'invalid_type'
        WHEN bps.amount_is_valid(amount #>> '{}') THEN NULL
        WHEN bps.amount_value(amount #>> '{}') IS NULL THEN 'invalid_amount'
        WHEN bps.amount_value(amount #>> '{}') = 0 THEN 'amount_not_positive'
        ELSE 'amount_too_large'
    END
$$;

-- Cents as the wire writes them: 1450 -> '14.50'.
CREATE OR REPLACE FUNCTION bps.format_cents(cents bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN cents < 0 THEN '-' ELSE '' END
        || (abs(cents) / 100)::text || '.' || lpad((abs(cents) % 100)::text, 2, '0')
$$;

-- What is wrong with the text of a JSON string field (NULL when absent): blank, or longer than its field
-- allows; NULL when it is fine. Cheap for the common case, as it runs for every field of every transfer:
-- a value that starts with a visible ASCII character is not blank, and one with no more bytes than the
-- limit has no more characters (only otherwise is the value trimmed, or its characters counted).
CREATE OR REPLACE FUNCTION bps.string_problem(value text, field text, required boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN value IS NULL THEN CASE WHEN required THEN 'required' END
        WHEN ascii(value) NOT BETWEEN 33 AND 126 AND bps.trim_space(value) = '' THEN 'empty'
        WHEN octet_length(value) > bps.field_max_length(field) AND length(value) > bps.field_max_length(field)
            THEN 'too_long'
    END
$$;

-- What is wrong with a text field (any JSON value, NULL when absent), or NULL.
CREATE OR REPLACE FUNCTION bps.text_problem(value jsonb, field text, required boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(value) <> 'string' THEN 'invalid_type'
        ELSE bps.string_problem(value #>> '{}', field, required)
    END
$$;

-- What is wrong with a transfer's optional currency (the text of a JSON string, NULL when absent), given
-- the account's (NULL while the account is unknown), or NULL.
CREATE OR REPLACE FUNCTION bps.currency_problem(value text, account_currency text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN value <> account_currency THEN 'currency_mismatch' END
$$;

-- The same for any JSON value.
CREATE OR REPLACE FUNCTION bps.currency_problem(value jsonb, account_currency text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(value) <> 'string' THEN 'invalid_type'
        ELSE bps.currency_problem(value #>> '{}', account_currency)
    END
$$;

-- An IBAN as stored and looked up: upper case, no spaces.
CREATE OR REPLACE FUNCTION bps.normalize_iban(iban text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT upper(replace(bps.trim_space(iban), ' ', ''))
$$;

-- A BIC as stored and looked up: upper case, and an 8-character BIC names the head office ('XXX').
CREATE OR REPLACE FUNCTION bps.normalize_bic(bic text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN length(bps.trim_space(bic)) = 8 THEN upper(bps.trim_space(bic)) || 'XXX' ELSE upper(bps.trim_space(bic)) END
$$;

-- ISO 13616: the country's length and the mod-97 check digits (used by accounts in 'strict' mode).
CREATE OR REPLACE FUNCTION bps.iban_is_valid(iban text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce((
        SELECT s ~ '^[A-Z]{2}[0-9]{2}[A-Z0-9]+$'
           AND length(s) = ('{"AD":24,"AE":23,"AL":28,"AT":20,"AZ":28,"BA":20,"BE":16,"BG":22,"BH":22,"BR":29,
               "BY":28,"CH":21,"CR":22,"CY":28,"CZ":24,"DE":22,"DK":18,"DO":28,"EE":20,"EG":29,"ES":24,"FI":18,
               "FO":18,"FR":27,"GB":22,"GE":22,"GI":23,"GL":18,"GR":27,"GT":28,"HR":21,"HU":28,"IE":22,"IL":23,
               "IQ":23,"IS":26,"IT":27,"JO":30,"KW":30,"KZ":20,"LB":28,"LC":32,"LI":21,"LT":20,"LU":20,"LV":21,
               "LY":25,"MC":27,"MD":24,"ME":22,"MK":19,"MR":27,"MT":31,"MU":30,"NL":18,"NO":15,"PK":24,"PL":28,
               "PS":29,"PT":25,"QA":29,"RO":24,"RS":22,"SA":24,"SC":31,"SD":18,"SE":24,"SI":19,"SK":24,"SM":27,
               "ST":25,"SV":28,"TL":23,"TN":24,"TR":26,"UA":29,"VA":22,"VG":24,"XK":20}'::jsonb
               ->> left(s, 2))::integer
           AND (SELECT string_agg(CASE WHEN c BETWEEN 'A' AND 'Z' THEN (ascii(c) - 55)::text ELSE c END, ''
                                  ORDER BY i)
                FROM unnest(string_to_array(substr(s, 5) || left(s, 4), NULL)) WITH ORDINALITY AS ch(c, i)
               )::numeric % 97 = 1
        FROM bps.normalize_iban(iban) AS s
    ), false)
$$;

-- ISO 9362: 4 letters of institution, 2 of country, 2 of location, optionally 3 of branch.
CREATE OR REPLACE FUNCTION bps.bic_is_valid(bic text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(bic ~ '^[A-Z]{4}[A-Z]{2}[A-Z0-9]{2}([A-Z0-9]{3})?$', false)
$$;

-- What is wrong with a counterparty IBAN or BIC (the text of a JSON string, NULL when absent); in
-- 'strict' mode (strict is NULL while the account is unknown) also the ISO check.
CREATE OR REPLACE FUNCTION bps.counterparty_iban_problem(value text, strict boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(bps.string_problem(value, 'counterparty_iban', true),
                    CASE WHEN strict AND NOT bps.iban_is_valid(value) THEN 'invalid_iban' END)
$$;

CREATE OR REPLACE FUNCTION bps.counterparty_bic_problem(value text, strict boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(bps.string_problem(value, 'counterparty_bic', true),
                    CASE WHEN strict AND NOT bps.bic_is_valid(value) THEN 'invalid_bic' END)
$$;

-- {"key": "unknown_field"} for each key of an object.
CREATE OR REPLACE FUNCTION bps.unknown_fields(extra jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_object_agg(k, 'unknown_field') FROM jsonb_object_keys(extra) AS k
$$;

-- {"key": "unknown_field"} for each key of an object outside the allowed ones; '{}' when there is none.
-- Without a subquery of its own, so the planner inlines it and the common case costs one jsonb operation.
CREATE OR REPLACE FUNCTION bps.unknown_field_problems(object jsonb, allowed text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN (object - allowed) = '{}'::jsonb THEN '{}'::jsonb ELSE bps.unknown_fields(object - allowed) END
$$;

-- The keys a transfer may have: the fields of bps.transfer_input (tests/test_validation.py checks they agree).
CREATE OR REPLACE FUNCTION bps.transfer_fields() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT '{amount,currency,counterparty_name,counterparty_iban,counterparty_bic,description,client_reference}'::text[]
$$;

-- Every rule one transfer breaks, as {"field": "code"}; '{}' when the transfer is valid.
-- account_currency and strict are NULL while the account is unknown.
CREATE OR REPLACE FUNCTION bps.transfer_problems(transfer jsonb, account_currency text, strict boolean)
RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN jsonb_typeof(transfer) IS DISTINCT FROM 'object' THEN '{"": "invalid_type"}'::jsonb
        ELSE jsonb_strip_nulls(jsonb_build_object(
            'amount', bps.amount_problem(transfer -> 'amount'),
            'counterparty_name', bps.text_problem(transfer -> 'counterparty_name', 'counterparty_name', true),
            'counterparty_iban', CASE WHEN jsonb_typeof(transfer -> 'counterparty_iban') <> 'string' THEN 'invalid_type'
                ELSE bps.counterparty_iban_problem(transfer ->> 'counterparty_iban', strict) END,
            'counterparty_bic', CASE WHEN jsonb_typeof(transfer -> 'counterparty_bic') <> 'string' THEN 'invalid_type'
                ELSE bps.counterparty_bic_problem(transfer ->> 'counterparty_bic', strict) END,
            'description', bps.text_problem(transfer -> 'description', 'description', true),
            'client_reference', bps.text_problem(transfer -> 'client_reference', 'client_reference', false),
            'currency', bps.currency_problem(transfer -> 'currency', account_currency)
        )) || bps.unknown_field_problems(transfer, bps.transfer_fields())
    END
$$;

-- The fast path's form of bps.transfer_problems, for a transfer already known to be an object whose values
-- are all JSON strings, read as text (a field is NULL when absent): true when it breaks no rule. The same
-- field rules, so the two agree (tests/test_validation.py checks it on generated transfers).
CREATE OR REPLACE FUNCTION bps.transfer_is_valid(t bps.transfer_input, account_currency text, strict boolean)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT t.amount IS NOT NULL AND bps.amount_is_valid(t.amount)
       AND num_nulls(bps.string_problem(t.counterparty_name, 'counterparty_name', true),
                     bps.counterparty_iban_problem(t.counterparty_iban, strict),
                     bps.counterparty_bic_problem(t.counterparty_bic, strict),
                     bps.string_problem(t.description, 'description', true),
                     bps.string_problem(t.client_reference, 'client_reference', false),
                     bps.currency_problem(t.currency, account_currency)) = 6
$$;

-- How many of a transfer's known fields it carries: fewer than its JSON object has values means a key
-- outside bps.transfer_input.
CREATE OR REPLACE FUNCTION bps.fields_present(t bps.transfer_input) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT num_nonnulls(t.amount, t.currency, t.counterparty_name, t.counterparty_iban, t.counterparty_bic,
                        t.description, t.client_reference)
$$;

-- Today, as the rules see it: the UTC date.
CREATE OR REPLACE FUNCTION bps.today() RETURNS date
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT (now() AT TIME ZONE 'UTC')::date
$$;

-- The date a 'YYYY-MM-DD' string names, or NULL when it names none (2026-02-30, 0000-01-01, 26-1-1, ...).
-- make_date, not a cast to date: a cast depends on DateStyle. PL/pgSQL and STRICT, not an inlined SQL
-- function: a statement that names it then builds one call, made only for a date that is there, where the
-- inlined expression (some thirty function calls) was built on every execution of the statement.
CREATE OR REPLACE FUNCTION bps.date_of(value text) RETURNS date
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN CASE WHEN value ~ '^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$' AND left(value, 4) <> '0000' THEN
        CASE WHEN substr(value, 9, 2)::integer
                  <= extract(day FROM make_date(left(value, 4)::integer, substr(value, 6, 2)::integer, 1)
                                      + interval '1 month' - interval '1 day')
             THEN make_date(left(value, 4)::integer, substr(value, 6, 2)::integer, substr(value, 9, 2)::integer) END
    END;
END
$$;

-- What is wrong with a request's requested_execution_date (any JSON value, NULL when absent): it must be a
-- 'YYYY-MM-DD' string naming a day from today to 365 days ahead (UTC).
CREATE OR REPLACE FUNCTION bps.execution_date_problem(value jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN value IS NULL THEN NULL
        WHEN jsonb_typeof(value) <> 'string' THEN 'invalid_type'
        WHEN bps.date_of(value #>> '{}') IS NULL THEN 'invalid_date'
        WHEN bps.date_of(value #>> '{}') NOT BETWEEN bps.today() AND bps.today() + 365 THEN 'date_out_of_range'
    END
$$;

-- Every rule the request's top level breaks, as {"field": "code"}; '{}' when it is valid.
-- transfers: payload -> 'credit_transfers', which the caller has taken out once (for a large request, each
-- `->` copies the whole list). account_name is NULL while the account is unknown.
DROP FUNCTION IF EXISTS bps.request_problems(jsonb, text);
CREATE OR REPLACE FUNCTION bps.request_problems(payload jsonb, transfers jsonb, account_name text) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'organization_iban', bps.text_problem(payload -> 'organization_iban', 'organization_iban', true),
        'organization_bic', bps.text_problem(payload -> 'organization_bic', 'organization_bic', true),
        'organization_name', coalesce(
            bps.text_problem(payload -> 'organization_name', 'organization_name', false),
            CASE WHEN lower(bps.trim_space(payload ->> 'organization_name')) <> lower(bps.trim_space(account_name))
                THEN 'organization_name_mismatch' END),
        'credit_transfers', CASE
            WHEN transfers IS NULL THEN 'required'
            WHEN jsonb_typeof(transfers) <> 'array' THEN 'invalid_type'
            WHEN jsonb_array_length(transfers) = 0 THEN 'empty'
        END,
        'requested_execution_date', bps.execution_date_problem(payload -> 'requested_execution_date')
    )) || bps.unknown_field_problems(payload, '{organization_name,organization_iban,organization_bic,credit_transfers,'
                                              'requested_execution_date}')
$$;

-- A JSON pointer reference token (RFC 6901): '~' and '/' escaped.
CREATE OR REPLACE FUNCTION bps.pointer_token(key text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT replace(replace(key, '~', '~0'), '/', '~1')
$$;

-- The sentence a client reads for one problem code on one field.
CREATE OR REPLACE FUNCTION bps.problem_detail(field text, code text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE code
        WHEN 'required' THEN format('%s is required', field)
        WHEN 'invalid_type' THEN CASE field
            WHEN '' THEN 'each credit transfer must be a JSON object'
            WHEN 'credit_transfers' THEN 'credit_transfers must be a JSON array of transfers'
            WHEN 'amount' THEN 'amount must be a string such as "14.50"'
            ELSE format('%s must be a string', field) END
        WHEN 'empty' THEN CASE field
            WHEN 'credit_transfers' THEN 'credit_transfers must hold at least one transfer'
            ELSE format('%s must not be empty', field) END
        WHEN 'too_long' THEN format('%s must be at most %s characters', field, bps.field_max_length(field))
        WHEN 'amount_not_string' THEN 'amount must be sent as a string such as "14.50", not as a JSON number'
        WHEN 'invalid_amount' THEN 'amount must be a decimal with at most two decimals, such as "14.50"'
        WHEN 'amount_not_positive' THEN 'amount must be greater than 0'
        WHEN 'amount_too_large' THEN 'amount must be at most 999999999.99'
        WHEN 'currency_mismatch' THEN 'currency must be the currency of the debited account'
        WHEN 'invalid_iban' THEN 'counterparty_iban is not a valid IBAN (ISO 13616 length and check digits)'
        WHEN 'invalid_bic' THEN 'counterparty_bic is not a valid BIC (ISO 9362)'
        WHEN 'unknown_field' THEN format('unknown field "%s"', field)
        WHEN 'organization_name_mismatch' THEN 'organization_name does not match the account''s organization'
        WHEN 'invalid_idempotency_key' THEN 'the Idempotency-Key header must be 1 to 255 characters'
        WHEN 'invalid_date' THEN format('%s must be a date written YYYY-MM-DD, such as "2026-12-24"', field)
        WHEN 'date_out_of_range' THEN format('%s must be from today to 365 days ahead (UTC)', field)
        ELSE code
    END
$$;

-- The 422 error list: every problem with its JSON pointer, the top level first, then transfer by transfer.
CREATE OR REPLACE FUNCTION bps.request_errors(payload jsonb, account_name text, account_currency text,
                                              strict boolean) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_agg(jsonb_build_object('pointer', e.pointer, 'code', e.code,
                                        'detail', bps.problem_detail(e.field, e.code))
                     ORDER BY e.n, e.pointer)
    FROM (
        SELECT 0 AS n, '/' || bps.pointer_token(p.key) AS pointer, p.key AS field, p.value AS code
        FROM jsonb_each_text(bps.request_problems(payload, payload -> 'credit_transfers', account_name)) AS p
        UNION ALL
        SELECT t.n,
               '/credit_transfers/' || (t.n - 1)
                   || CASE WHEN jsonb_typeof(t.transfer) = 'object' THEN '/' || bps.pointer_token(p.key) ELSE '' END,
               p.key, p.value
        FROM jsonb_array_elements(CASE WHEN jsonb_typeof(payload -> 'credit_transfers') = 'array'
                                       THEN payload -> 'credit_transfers' END) WITH ORDINALITY AS t(transfer, n)
        CROSS JOIN LATERAL jsonb_each_text(bps.transfer_problems(t.transfer, account_currency, strict)) AS p
    ) AS e
$$;
