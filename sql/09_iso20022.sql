-- ISO 20022. In: a pain.001 Customer Credit Transfer Initiation, each of its PmtInf one bulk transfer made
-- by bps.bulk_transfer, the whole file in one transaction. Out: a pain.002.001.10 Customer Payment Status
-- Report of a bulk transfer. Parsed by PostgreSQL's own XML (libxml2), with no DTD: no entity is declared,
-- so none is expanded, and nothing is ever fetched.

-- The message a pain.001 namespace names (pain.001.001.03, ...), or NULL when it is not one accepted here:
-- pain.001.001.03 to .12, and the German (pain.001.002.03, pain.001.003.03) and Swiss variants of .03.
CREATE OR REPLACE FUNCTION bps.pain001_message_name(namespace text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN namespace ~ '^urn:iso:std:iso:20022:tech:xsd:pain\.001\.001\.(0[3-9]|1[0-2])$'
          OR namespace IN ('urn:iso:std:iso:20022:tech:xsd:pain.001.002.03',
                           'urn:iso:std:iso:20022:tech:xsd:pain.001.003.03')
            THEN substr(namespace, length('urn:iso:std:iso:20022:tech:xsd:') + 1)
        WHEN namespace = 'http://www.six-interbank-clearing.com/de/pain.001.001.03.ch.02.xsd'
            THEN 'pain.001.001.03.ch.02'
    END
$$;

-- The element that holds a BIC in a message: BIC up to version .03 (and its national variants), BICFI after.
CREATE OR REPLACE FUNCTION bps.pain001_bic_element(message_name text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN message_name ~ '^pain\.001\.00[1-3]\.03' THEN 'BIC' ELSE 'BICFI' END
$$;

-- Whether a text is an xs:decimal (white space around it allowed) of at most 40 characters.
CREATE OR REPLACE FUNCTION bps.is_xml_decimal(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT length(value) <= 40 AND btrim(value, E' \t\n\r') ~ '^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)$'
$$;

-- The value of an xs:decimal, or NULL when the text is not one.
CREATE OR REPLACE FUNCTION bps.xml_decimal(value text) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN bps.is_xml_decimal(value) THEN btrim(value, E' \t\n\r')::numeric END
$$;

-- A count (NbOfTxs: 1 to 15 digits), or NULL when the text is not one.
CREATE OR REPLACE FUNCTION bps.xml_count(value text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN btrim(value, E' \t\n\r') ~ '^[0-9]{1,15}$' THEN btrim(value, E' \t\n\r')::bigint END
$$;

-- An xs:decimal as a wire amount ('+0012.50' -> '12.5', '7.' -> '7', '1.230' -> '1.23'); any other text
-- unchanged, for the amount rules to refuse with their own code. One expression, so that the planner
-- inlines it: a wire amount already (the common case) costs one regular expression.
CREATE OR REPLACE FUNCTION bps.xml_amount(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN value ~ '^[0-9]+(\.[0-9]{1,2})?$' THEN value
        -- (Nested, so that only a decimal is ever cast: AND does not promise to test its left side first.)
        WHEN bps.is_xml_decimal(value) THEN
            CASE WHEN scale(trim_scale(btrim(value, E' \t\n\r')::numeric)) <= 2
                 THEN trim_scale(btrim(value, E' \t\n\r')::numeric)::text ELSE value END
        ELSE value
    END
$$;

-- A requested execution date as the JSON rules take it: the day of an xs:date or xs:dateTime (its time and
-- zone dropped); NULL (as soon as possible) for a day already past: files are made ahead and sent late.
CREATE OR REPLACE FUNCTION bps.xml_execution_date(value text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN bps.date_of(d) < bps.today() THEN NULL ELSE nullif(d, '') END
      FROM (SELECT CASE WHEN v ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}(T|Z|[+-][0-9]{2}:[0-9]{2}$)' THEN left(v, 10) ELSE v END
              FROM btrim(value, E' \t\n\r') AS v) AS s(d)
$$;

-- Where a field of the JSON form of a PmtInf comes from, below its PmtInf (top-level fields) or its
-- CdtTrfTxInf (a transfer's): the XPath step an error names.
CREATE OR REPLACE FUNCTION bps.pain001_element(field text, bic_element text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE field
        WHEN 'organization_iban' THEN 'DbtrAcct/Id/IBAN'
        WHEN 'organization_bic' THEN 'DbtrAgt/FinInstnId/' || bic_element
        WHEN 'requested_execution_date' THEN 'ReqdExctnDt'
        WHEN 'amount' THEN 'Amt/InstdAmt'
        WHEN 'currency' THEN 'Amt/InstdAmt/@Ccy'
        WHEN 'counterparty_name' THEN 'Cdtr/Nm'
        WHEN 'counterparty_iban' THEN 'CdtrAcct/Id/IBAN'
        WHEN 'counterparty_bic' THEN 'CdtrAgt/FinInstnId/' || bic_element
        WHEN 'description' THEN 'RmtInf/Ustrd'
        WHEN 'client_reference' THEN 'PmtId/EndToEndId'
    END
$$;

-- What is wrong with a file's identifier (MsgId, PmtInfId: 1 to 35 characters, not blank): no row when
-- nothing is.
CREATE OR REPLACE FUNCTION bps.xml_identifier_problem(element text, value text, OUT code text, OUT detail text)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p.code, bps.problem_detail(element, p.code)
      FROM (SELECT CASE WHEN value IS NULL THEN 'required'
                        WHEN bps.trim_space(value) = '' THEN 'empty'
                        WHEN length(value) > 35 THEN 'too_long' END AS code) AS p
     WHERE p.code IS NOT NULL
$$;

-- The path of a PmtInf, as errors name it.
CREATE OR REPLACE FUNCTION bps.pain001_block_path(block integer) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT format('/Document/CstmrCdtTrfInitn/PmtInf[%s]', block)
$$;

-- The validation errors of a file's PmtInf, each block's JSON form checked by the JSON rules
-- (bps.request_errors), with an XPath where the JSON has a pointer and the XML names in the sentences.
-- blocks and payloads: the blocks and their JSON requests, as bps.bulk_transfer_xml reads them.
DROP FUNCTION IF EXISTS bps.pain001_block_errors(jsonb, text);
CREATE OR REPLACE FUNCTION bps.pain001_block_errors(blocks jsonb, payloads jsonb[], bic_element text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'path', bps.pain001_block_path(b.n)
                       || CASE WHEN p.transfer IS NOT NULL THEN format('/CdtTrfTxInf[%s]', p.transfer + 1) ELSE '' END
                       || coalesce('/' || bps.pain001_element(p.field, bic_element), ''),
               'code', e.value ->> 'code',
               'detail', CASE WHEN bps.pain001_element(p.field, bic_element) IS NULL THEN e.value ->> 'detail'
                              ELSE regexp_replace(e.value ->> 'detail', '^' || p.field,
                                                  bps.pain001_element(p.field, bic_element)) END)
           ORDER BY b.n, e.n), '[]')
      FROM jsonb_to_recordset(blocks) AS b(n integer, currency text, strict boolean)
     CROSS JOIN LATERAL jsonb_array_elements(bps.request_errors(payloads[b.n], NULL, b.currency, b.strict))
                        WITH ORDINALITY AS e(value, n)
     CROSS JOIN LATERAL (
        SELECT CASE WHEN s[1] = 'credit_transfers' AND s[2] IS NOT NULL THEN s[2]::integer END AS transfer,
               CASE WHEN s[1] = 'credit_transfers' THEN s[3] ELSE s[1] END AS field
          FROM string_to_array(ltrim(e.value ->> 'pointer', '/'), '/') AS s
     ) AS p
$$;

-- A 422 validation_failed of a file: the errors, each with its path.
CREATE OR REPLACE FUNCTION bps.pain001_invalid(errors jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT bps.validation_problem('file', errors, '; nothing was transferred')
$$;

-- An XPath naming (space-separated) the elements of a GrpHdr, PmtInf or CdtTrfTxInf given more than once
-- where the schema allows them once; '' when there is none.
CREATE OR REPLACE FUNCTION bps.pain001_repeats() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'concat('
        || string_agg(format('substring("%s ", 1, %s * (count(%s) > 1))', e.name, length(e.name) + 1, e.path), ',')
        || ')'
      FROM (VALUES ('MsgId', 'p:MsgId'), ('NbOfTxs', 'p:NbOfTxs'), ('CtrlSum', 'p:CtrlSum'),
                   ('PmtInfId', 'p:PmtInfId'), ('PmtMtd', 'p:PmtMtd'), ('ReqdExctnDt', 'p:ReqdExctnDt'),
                   ('DbtrAcct/Id/IBAN', 'p:DbtrAcct/p:Id/p:IBAN'),
                   ('DbtrAgt/FinInstnId', 'p:DbtrAgt/p:FinInstnId/p:BIC | p:DbtrAgt/p:FinInstnId/p:BICFI'),
                   ('Amt/InstdAmt', 'p:Amt/p:InstdAmt'), ('Cdtr/Nm', 'p:Cdtr/p:Nm'),
                   ('CdtrAcct/Id/IBAN', 'p:CdtrAcct/p:Id/p:IBAN'),
                   ('CdtrAgt/FinInstnId', 'p:CdtrAgt/p:FinInstnId/p:BIC | p:CdtrAgt/p:FinInstnId/p:BICFI'),
                   ('PmtId/EndToEndId', 'p:PmtId/p:EndToEndId')) AS e(name, path)
$$;

-- A column's XPath: as it is (PostgreSQL refuses a column that finds two values), or its first value, when a
-- file with an element given twice is read again to name it.
CREATE OR REPLACE FUNCTION bps.xml_path(path text, first boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN first THEN '(' || path || ')[1]' ELSE path END
$$;

-- The refusal of an XML document that is not a pain.001 accepted here.
CREATE OR REPLACE FUNCTION bps.unsupported_xml() RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT bps.problem(415, 'unsupported_media_type',
        'The XML body must be a pain.001 Customer Credit Transfer Initiation: a Document of namespace '
        || 'urn:iso:std:iso:20022:tech:xsd:pain.001.001.03 to .12, pain.001.002.03, pain.001.003.03 or '
        || 'http://www.six-interbank-clearing.com/de/pain.001.001.03.ch.02.xsd. Or send JSON.')
$$;

-- Its return type changed: an earlier definition must go first (CREATE OR REPLACE cannot change it).
DROP FUNCTION IF EXISTS bps.bulk_transfer_xml(text, text, bigint[], bigint);

-- Accepts a pain.001 file: each PmtInf is a bulk transfer on the account of its DbtrAcct/Id/IBAN (and
-- DbtrAgt BIC, when given), made by bps.bulk_transfer with every rule of a JSON request; all of them, or
-- none. A file whose GrpHdr/MsgId was accepted for an account before is a duplicate there; with an
-- Idempotency-Key, the key (on the first PmtInf's account) decides instead, for the whole file.
-- bank_account_ids, api_key_id and account_id as for bps.bulk_transfer.
CREATE OR REPLACE FUNCTION bps.bulk_transfer_xml(document text, idempotency_key text, bank_account_ids bigint[],
                                                 api_key_id bigint, OUT status integer, OUT body jsonb,
                                                 OUT account_id bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
<<bulk_transfer_xml>>
DECLARE
    doc            xml;
    xml_namespace  text;
    parse_error    text;
    message_name   text;
    message_id     text;
    bic_element    text;
    group_nb_of_txs text;
    group_ctrl_sum text;
    blocks         jsonb;
    payloads       jsonb[];
    errors         jsonb;
    read_errors    jsonb;
    diagnose       boolean;
    key_accounts   bigint[];
    claimed        bigint[] := '{}';
    failed_block   integer;
    made           jsonb;
    document_hash  bytea;
    stored         bps.idempotency_keys;
    replay_headers jsonb;
    key_account_id bigint;
BEGIN
    IF NOT bps.at_read_committed() THEN
        PERFORM bps.refuse_isolation_level('bps.bulk_transfer_xml');
    END IF;
    PERFORM set_config('response.headers', '{}', true);

    -- 1. The document: without a DTD (entities can only be declared in one), well-formed, a pain.001 of a
    -- version accepted here. Each XML function call parses the document again: the namespace is read from
    -- the root's start tag as text, and one XMLTABLE reads everything else.
    -- A byte order mark is no character of the document. (Tested as a prefix: ltrim would measure every
    -- character of a multibyte text.)
    IF starts_with(document, U&'\FEFF') THEN
        document := substr(document, 2);
    END IF;
    IF strpos(document, '<!DOCTYPE') > 0 OR strpos(document, '<!ENTITY') > 0 THEN
        status := 400;
        body := bps.problem(400, 'invalid_xml',
            'A DTD or entity declaration is refused: send the pain.001 document without <!DOCTYPE ...>.');
        RETURN;
    END IF;
    -- No tag of a pain.001 is near 1000 characters. A longer one is refused before the parser: libxml2 checks
    -- each attribute of a tag against all before it, in a loop no cancel or statement_timeout interrupts
    -- (80,000 attributes, 0.8 MB, parse in over a minute). The pattern is a DFA: about 15 ms a MiB.
    IF document ~ '<[^<>]{250}[^<>]{250}[^<>]{250}[^<>]{250}' THEN
        status := 400;
        body := bps.problem(400, 'invalid_xml', 'A tag longer than 1000 characters is refused.');
        RETURN;
    END IF;
    BEGIN
        doc := xmlparse(DOCUMENT document);
    EXCEPTION WHEN invalid_xml_document OR invalid_xml_content OR invalid_xml_comment
                   OR invalid_xml_processing_instruction THEN
        GET STACKED DIAGNOSTICS parse_error = PG_EXCEPTION_DETAIL;
        status := 400;
        body := bps.problem(400, 'invalid_xml', 'The body is not well-formed XML: '
            || coalesce(nullif(left(split_part(parse_error, E'\n', 1), 200), ''), 'it could not be parsed.'));
        RETURN;
    END;
    -- The root's default namespace when the root follows the XML declaration at once, as ERPs write it.
    xml_namespace := substring(left(document, 4096)
                               FROM '^\s*(?:<\?xml[^?]*\?>\s*)?<Document\s[^>]*?\mxmlns\s*=\s*["'']([^"'']*)["'']');
    message_name := bps.pain001_message_name(xml_namespace);
    IF message_name IS NULL THEN
        -- Any other form (a prefixed root, a comment before it, another document): ask the parser.
        xml_namespace := (xpath('namespace-uri(/*[local-name() = "Document"])', doc))[1]::text;
        message_name := bps.pain001_message_name(xml_namespace);
    END IF;
    IF message_name IS NULL THEN
        status := 415;
        body := bps.unsupported_xml();
        RETURN;
    END IF;
    bic_element := bps.pain001_bic_element(message_name);

    -- 2. Read it: the group header, and each PmtInf with its account and its transactions as a JSON request.
    -- One XMLTABLE over the header, the PmtInf and their transactions, in document order: a transaction
    -- belongs to the PmtInf before it.
    -- An element given twice where the schema allows it once fails the first read (a column finds two values);
    -- the second reads first values only, and names each such element among the file's problems.
    diagnose := false;
    LOOP
        BEGIN
            WITH node AS (
                SELECT x.*, count(*) FILTER (WHERE x.element = 'PmtInf') OVER (ORDER BY x.n) AS block
                  FROM XMLTABLE(XMLNAMESPACES(bulk_transfer_xml.xml_namespace AS p),
                                ('/p:Document/p:CstmrCdtTrfInitn/p:GrpHdr | /p:Document/p:CstmrCdtTrfInitn/p:PmtInf'
                                 || ' | /p:Document/p:CstmrCdtTrfInitn/p:PmtInf/p:CdtTrfTxInf')
                                PASSING doc
                                COLUMNS n FOR ORDINALITY,
                                        element text PATH 'local-name()',
                                        -- Only when diagnosing: the elements given more than once here, by name.
                                        repeated text PATH CASE WHEN diagnose THEN bps.pain001_repeats() ELSE '""' END,
                                        -- GrpHdr, and PmtInf
                                        message_id text PATH bps.xml_path('p:MsgId', diagnose),
                                        nb_of_txs text PATH bps.xml_path('p:NbOfTxs', diagnose),
                                        ctrl_sum text PATH bps.xml_path('p:CtrlSum', diagnose),
                                        -- PmtInf
                                        payment_information_id text PATH bps.xml_path('p:PmtInfId', diagnose),
                                        method text PATH bps.xml_path('p:PmtMtd', diagnose),
                                        -- A date (.03), or the Dt or DtTm in it (.09 on).
                                        execution_date text PATH bps.xml_path(
                                            'p:ReqdExctnDt[not(*)] | p:ReqdExctnDt/p:Dt | p:ReqdExctnDt/p:DtTm',
                                            diagnose),
                                        debtor_iban text PATH bps.xml_path('p:DbtrAcct/p:Id/p:IBAN', diagnose),
                                        debtor_bic text
                                            PATH bps.xml_path('p:DbtrAgt/p:FinInstnId/p:BIC'
                                                              || ' | p:DbtrAgt/p:FinInstnId/p:BICFI', diagnose),
                                        -- CdtTrfTxInf
                                        instructed_amount text PATH bps.xml_path('p:Amt/p:InstdAmt', diagnose),
                                        currency text PATH bps.xml_path('p:Amt/p:InstdAmt', diagnose) || '/@Ccy',
                                        counterparty_name text PATH bps.xml_path('p:Cdtr/p:Nm', diagnose),
                                        counterparty_iban text PATH bps.xml_path('p:CdtrAcct/p:Id/p:IBAN', diagnose),
                                        counterparty_bic text
                                            PATH bps.xml_path('p:CdtrAgt/p:FinInstnId/p:BIC'
                                                              || ' | p:CdtrAgt/p:FinInstnId/p:BICFI', diagnose),
                                        unstructured text PATH 'p:RmtInf/p:Ustrd[1]',
                                        creditor_reference text PATH 'p:RmtInf/p:Strd[1]/p:CdtrRefInf/p:Ref',
                                        end_to_end_id text PATH bps.xml_path('p:PmtId/p:EndToEndId', diagnose)) AS x
            ),
            grp AS (
                SELECT g.message_id, g.nb_of_txs, g.ctrl_sum
                  FROM node AS g WHERE g.element = 'GrpHdr' ORDER BY g.n LIMIT 1
            ),
            transfers AS (
                SELECT tx.block, count(*) AS transfer_count,
                       -- The sum a CtrlSum is checked against: NULL when an amount is not a decimal (its own error).
                       CASE WHEN bool_and(tx.is_wire) THEN sum(CASE WHEN tx.is_wire THEN tx.amount::numeric END)
                       END AS total,
                       -- The transfers as the JSON request's, through bps.transfer_input: to_jsonb makes the
                       -- array in one pass (jsonb_agg of jsonb_build_object took three times as long). A
                       -- missing element is a JSON null there, and an absent field in a request: stripped,
                       -- only when there is one (the two array_agg are one aggregate to PostgreSQL).
                       CASE WHEN bool_or(num_nulls(tx.amount, tx.counterparty_name, tx.counterparty_iban,
                                                   tx.description, tx.end_to_end_id) > 0)
                            THEN jsonb_strip_nulls(to_jsonb(array_agg(tx.input ORDER BY tx.n)))
                            ELSE to_jsonb(array_agg(tx.input ORDER BY tx.n)) END AS list
                  FROM (SELECT t.*, coalesce(t.amount ~ '^[0-9]+(\.[0-9]{1,2})?$', false) AS is_wire,
                               (t.amount,
                                -- Ccy is required in XML: without it, '' (no account's currency) is refused.
                                coalesce(t.currency, ''), t.counterparty_name, t.counterparty_iban,
                                -- IBAN-only SEPA: no CdtrAgt; the rail takes the EPC's placeholder.
                                coalesce(t.counterparty_bic, 'NOTPROVIDED'), t.description,
                                t.end_to_end_id)::bps.transfer_input AS input
                          -- (OFFSET 0 keeps each subquery a step of its own: each expression runs once a row.)
                          FROM (SELECT node.n, node.block, bps.xml_amount(node.instructed_amount) AS amount,
                                       node.currency, node.counterparty_name, node.counterparty_iban,
                                       node.counterparty_bic, node.end_to_end_id,
                                       coalesce(node.unstructured, node.creditor_reference, node.end_to_end_id)
                                           AS description
                                  FROM node WHERE node.element = 'CdtTrfTxInf' OFFSET 0) AS t
                        OFFSET 0) AS tx
                 GROUP BY tx.block
            ),
            block AS (
                SELECT pmt.block AS n, jsonb_build_object(
                           'n', pmt.block, 'id', pmt.payment_information_id, 'method', pmt.method,
                           'nb_of_txs', pmt.nb_of_txs, 'ctrl_sum', pmt.ctrl_sum,
                           'transfer_count', coalesce(t.transfer_count, 0), 'total', t.total,
                           'account_id', a.id, 'currency', a.currency, 'strict', a.counterparty_check = 'strict',
                           -- What makes two files the same on an account: the message id, on the first PmtInf for it.
                           'hash', encode(sha256(convert_to(
                               'pain.001 ' || coalesce((SELECT grp.message_id FROM grp), '')
                               || CASE WHEN row_number() OVER (PARTITION BY a.id ORDER BY pmt.block) = 1 THEN ''
                                       ELSE ' ' || pmt.block END, 'UTF8')), 'hex')) AS block,
                       -- Its JSON request, apart (in an array of jsonb, not in that jsonb: folding it in would
                       -- walk every transfer again). The optional fields are added, not stripped when NULL.
                       jsonb_build_object(
                           -- Without a DbtrAgt BIC, the one account of this IBAN the caller may debit (none found:
                           -- a BIC no account has, so that the answer is account_not_found).
                           'organization_bic', coalesce(pmt.debtor_bic, a.bic, 'NOTPROVIDED'),
                           'credit_transfers', coalesce(t.list, '[]'))
                       || jsonb_strip_nulls(jsonb_build_object(
                              'organization_iban', pmt.debtor_iban,
                              'requested_execution_date', bps.xml_execution_date(pmt.execution_date))) AS payload
                  FROM node AS pmt
                  LEFT JOIN transfers AS t ON t.block = pmt.block
                  LEFT JOIN LATERAL (
                      SELECT (array_agg(c.id))[1] AS id, (array_agg(c.bic))[1] AS bic,
                             (array_agg(c.currency))[1] AS currency,
                             (array_agg(c.counterparty_check))[1] AS counterparty_check
                        FROM bps.bank_accounts AS c
                       WHERE c.iban = bps.normalize_iban(pmt.debtor_iban)
                         AND (pmt.debtor_bic IS NULL OR c.bic = bps.normalize_bic(pmt.debtor_bic))
                         AND (bulk_transfer_xml.bank_account_ids IS NULL
                              OR c.id = ANY (bulk_transfer_xml.bank_account_ids))
                      HAVING count(*) = 1
                  ) AS a ON true
                 WHERE pmt.element = 'PmtInf'
            )
            SELECT (SELECT grp.message_id FROM grp), (SELECT grp.nb_of_txs FROM grp), (SELECT grp.ctrl_sum FROM grp),
                   (SELECT jsonb_agg(block.block ORDER BY block.n) FROM block),
                   (SELECT array_agg(block.payload ORDER BY block.n) FROM block),
                   -- Each element given twice where the schema allows it once, at its path: which one is meant?
                   (SELECT jsonb_agg(jsonb_build_object(
                               'path', r.path || '/' || e.name
                                       || CASE WHEN e.name LIKE '%FinInstnId' THEN '/' || bic_element ELSE '' END,
                               'code', 'repeated_element',
                               'detail', format('%s appears more than once here, where it may appear once', e.name))
                           ORDER BY r.n, e.i)
                      FROM (SELECT node.n, node.repeated,
                                   CASE node.element
                                       WHEN 'GrpHdr' THEN '/Document/CstmrCdtTrfInitn/GrpHdr'
                                       WHEN 'PmtInf' THEN bps.pain001_block_path(node.block::integer)
                                       ELSE bps.pain001_block_path(node.block::integer) || format('/CdtTrfTxInf[%s]',
                                           row_number() OVER (PARTITION BY node.block, node.element ORDER BY node.n))
                                   END AS path
                              FROM node) AS r
                     CROSS JOIN LATERAL unnest(string_to_array(rtrim(r.repeated), ' ')) WITH ORDINALITY AS e(name, i)
                     WHERE diagnose AND r.repeated <> '')
              INTO message_id, group_nb_of_txs, group_ctrl_sum, blocks, payloads, read_errors;
            EXIT;
        EXCEPTION WHEN cardinality_violation THEN
            IF diagnose THEN
                RAISE;
            END IF;
            diagnose := true;
        END;
    END LOOP;
    IF message_id IS NULL AND blocks IS NULL
       AND (xpath('concat(local-name(/*), " ", namespace-uri(/*))', doc))[1]::text
           IS DISTINCT FROM 'Document ' || xml_namespace THEN
        -- Nothing read: the root is not a pain.001 Document after all.
        status := 415;
        body := bps.unsupported_xml();
        RETURN;
    END IF;
    blocks := coalesce(blocks, '[]');
    account_id := (blocks -> 0 ->> 'account_id')::bigint;

    -- 3. A bank's upload checks: identifiers there, counts and control sums agreeing with the transactions.
    SELECT coalesce(jsonb_agg(jsonb_build_object('path', c.path, 'code', c.code, 'detail', c.detail) ORDER BY c.n),
                    '[]')
      INTO errors
      FROM (
        SELECT 0 AS n, '/Document/CstmrCdtTrfInitn/GrpHdr/MsgId' AS path, i.code, i.detail
          FROM bps.xml_identifier_problem('MsgId', message_id) AS i
        UNION ALL
        SELECT 0, '/Document/CstmrCdtTrfInitn/GrpHdr/NbOfTxs', 'count_mismatch',
               format('NbOfTxs is %s but the file holds %s transactions', coalesce(group_nb_of_txs, 'missing'), t.n)
          FROM (SELECT coalesce(sum((b ->> 'transfer_count')::integer), 0) AS n
                  FROM jsonb_array_elements(blocks) AS b) AS t
         WHERE bps.xml_count(group_nb_of_txs) IS DISTINCT FROM t.n
        UNION ALL
        SELECT 0, '/Document/CstmrCdtTrfInitn/GrpHdr/CtrlSum', 'sum_mismatch',
               format('CtrlSum is %s but the file''s amounts sum to %s', group_ctrl_sum, s.total)
          FROM (SELECT sum((b ->> 'total')::numeric) AS total, bool_and(b ->> 'total' IS NOT NULL) AS known
                  FROM jsonb_array_elements(blocks) AS b) AS s
          WHERE group_ctrl_sum IS NOT NULL AND s.known AND bps.xml_decimal(group_ctrl_sum) IS DISTINCT FROM s.total
        UNION ALL
        SELECT 0, '/Document/CstmrCdtTrfInitn/PmtInf', 'required', 'the file must hold at least one PmtInf'
          WHERE blocks = '[]'
        UNION ALL
        SELECT (b ->> 'n')::integer, bps.pain001_block_path((b ->> 'n')::integer) || e.step, e.code, e.detail
          FROM jsonb_array_elements(blocks) AS b
         CROSS JOIN LATERAL (
            SELECT '/PmtInfId', i.code, i.detail FROM bps.xml_identifier_problem('PmtInfId', b ->> 'id') AS i
            UNION ALL
            SELECT '/PmtMtd', CASE WHEN b ->> 'method' IS NULL THEN 'required' ELSE 'unsupported_payment_method' END,
                   CASE WHEN b ->> 'method' IS NULL THEN 'PmtMtd is required: TRF'
                        ELSE format('PmtMtd is %s; only credit transfers (TRF) are executed', b ->> 'method') END
             WHERE btrim(b ->> 'method') IS DISTINCT FROM 'TRF'
            UNION ALL
            SELECT '/NbOfTxs', 'count_mismatch',
                   format('NbOfTxs is %s but this PmtInf holds %s transactions', b ->> 'nb_of_txs',
                          b ->> 'transfer_count')
             WHERE b ->> 'nb_of_txs' IS NOT NULL
               AND bps.xml_count(b ->> 'nb_of_txs') IS DISTINCT FROM (b ->> 'transfer_count')::bigint
            UNION ALL
            SELECT '/CtrlSum', 'sum_mismatch',
                   format('CtrlSum is %s but this PmtInf''s amounts sum to %s', b ->> 'ctrl_sum', b ->> 'total')
             WHERE b ->> 'ctrl_sum' IS NOT NULL AND b ->> 'total' IS NOT NULL
               AND bps.xml_decimal(b ->> 'ctrl_sum') IS DISTINCT FROM (b ->> 'total')::numeric
         ) AS e(step, code, detail)
      ) AS c;
    errors := coalesce(read_errors, '[]') || errors;
    IF errors <> '[]' THEN
        status := 422;
        body := bps.pain001_invalid(errors || bps.pain001_block_errors(blocks, payloads, bic_element));
        RETURN;
    END IF;
    IF length(idempotency_key) NOT BETWEEN 1 AND 255 THEN
        status := 422;
        body := bps.pain001_invalid(jsonb_build_array(jsonb_build_object(
            'header', 'Idempotency-Key', 'code', 'invalid_idempotency_key',
            'detail', bps.problem_detail('Idempotency-Key', 'invalid_idempotency_key'))));
        RETURN;
    END IF;

    -- 4. With an Idempotency-Key: the key, on every account the file debits (in id order), for the file as sent.
    SELECT array_agg(DISTINCT (b ->> 'account_id')::bigint ORDER BY (b ->> 'account_id')::bigint) INTO key_accounts
      FROM jsonb_array_elements(blocks) AS b
     WHERE idempotency_key IS NOT NULL AND b ->> 'account_id' IS NOT NULL;
    IF key_accounts IS NOT NULL THEN
        document_hash := sha256(convert_to(document, 'UTF8'));
        FOREACH key_account_id IN ARRAY key_accounts LOOP
            stored := bps.claim_idempotency_key(key_account_id, idempotency_key, document_hash,
                                                (SELECT s.idempotency_retention FROM bps.settings AS s));
            IF stored.bank_account_id IS NOT NULL THEN
                -- Another request holds the key here: this call's claims go, and that request's answer is given.
                DELETE FROM bps.idempotency_keys AS k
                 WHERE k.bank_account_id = ANY (claimed) AND k.idempotency_key = bulk_transfer_xml.idempotency_key;
                SELECT r.status, r.body, r.headers INTO status, body, replay_headers
                  FROM bps.idempotent_replay(stored.payload_hash, stored.status, stored.body, stored.bulk_transfer_id,
                                             document_hash) AS r;
                PERFORM set_config('response.headers', replay_headers::text, true);
                RETURN;
            END IF;
            claimed := claimed || key_account_id;
        END LOOP;
    END IF;

    -- 5. Every PmtInf a bulk transfer, all in one call of bps.bulk_transfers (so a file takes its locks in the
    -- order every call takes them), in the order of their accounts; the first refusal undoes them all.
    BEGIN
        -- The first refusal in that order, if any, and every answer (made, sorted by n below).
        SELECT (array_agg(o.blocks_n[r.k] ORDER BY r.k) FILTER (WHERE r.status <> 201))[1],
               (array_agg(r.status ORDER BY r.k) FILTER (WHERE r.status <> 201))[1],
               (array_agg(r.body ORDER BY r.k) FILTER (WHERE r.status <> 201))[1],
               jsonb_agg(jsonb_build_object('n', o.blocks_n[r.k], 'payment_information_id', o.ids[r.k]) || r.body)
          INTO failed_block, status, body, made
          -- (Aggregated in the order of this subquery: one sort, not one per aggregate.)
          FROM (SELECT array_agg(b.n) AS blocks_n, array_agg(b.id) AS ids, array_agg(payloads[b.n]) AS block_payloads,
                       array_agg(decode(b.hash, 'hex')) AS hashes
                  FROM (SELECT * FROM jsonb_to_recordset(blocks) AS b(n integer, hash text, id text, account_id bigint)
                         ORDER BY b.account_id, b.n) AS b) AS o
         CROSS JOIN LATERAL bps.bulk_transfers(o.block_payloads, NULL,
                                               array_fill(api_key_id, ARRAY[cardinality(o.block_payloads)]), o.hashes,
                                               deduplicate => idempotency_key IS NULL)
                    WITH ORDINALITY AS r(status, body, headers, account_id, k);
        IF failed_block IS NOT NULL THEN
            RAISE EXCEPTION 'PmtInf % refused', failed_block USING ERRCODE = 'BPS01';
        END IF;
    EXCEPTION WHEN SQLSTATE 'BPS01' THEN
        made := NULL;
    END;

    IF made IS NULL THEN
        -- Nothing stays. A validation error is reported with every other one in the file.
        IF body ->> 'code' = 'validation_failed' THEN
            body := bps.pain001_invalid(bps.pain001_block_errors(blocks, payloads, bic_element));
        ELSE
            IF body ->> 'code' = 'duplicate_request' THEN
                body := body || jsonb_build_object('detail', format(
                    'Message %s was already accepted for this account, as bulk transfer %s; '
                    'nothing was transferred again.',
                    message_id, body ->> 'bulk_transfer_id'));
            END IF;
            -- Which PmtInf was refused, and why.
            body := body || jsonb_build_object(
                'path', bps.pain001_block_path(failed_block),
                'payment_information_id', blocks -> (failed_block - 1) ->> 'id',
                'detail', format('PmtInf[%s] (%s): %s', failed_block, blocks -> (failed_block - 1) ->> 'id',
                                 body ->> 'detail'));
        END IF;
        PERFORM set_config('response.headers', '{}', true);
    ELSE
        UPDATE bps.bulk_transfers AS b
           SET message_id = bulk_transfer_xml.message_id, message_name = bulk_transfer_xml.message_name,
               payment_information_id = m.payment_information_id
          FROM jsonb_to_recordset(made) AS m(bulk_transfer_id bigint, payment_information_id text)
         WHERE b.id = m.bulk_transfer_id;
        SELECT jsonb_agg(m.value - 'n' ORDER BY (m.value ->> 'n')::integer) INTO made
          FROM jsonb_array_elements(made) AS m;
        status := 201;
        body := jsonb_build_object(
            'message_id', message_id,
            'message_name', message_name,
            'transfer_count', (SELECT sum((m ->> 'transfer_count')::integer) FROM jsonb_array_elements(made) AS m),
            'total_cents', (SELECT sum((m ->> 'total_cents')::bigint) FROM jsonb_array_elements(made) AS m),
            'bulk_transfers', made);
        PERFORM set_config('response.headers', jsonb_build_object(
            'Location', '/bulk_transfers/' || (made -> 0 ->> 'bulk_transfer_id'))::text, true);
    END IF;

    -- The key keeps what a JSON request's would: an acceptance or a refusal for funds, not a file to correct.
    IF claimed <> '{}' THEN
        IF status = 201 OR body ->> 'code' = 'insufficient_funds' THEN
            FOREACH key_account_id IN ARRAY claimed LOOP
                PERFORM bps.remember_answer(key_account_id, idempotency_key, status, body,
                                            (made -> 0 ->> 'bulk_transfer_id')::bigint);
            END LOOP;
        ELSE
            DELETE FROM bps.idempotency_keys AS k
             WHERE k.bank_account_id = ANY (claimed) AND k.idempotency_key = bulk_transfer_xml.idempotency_key;
        END IF;
    END IF;
END
$$;

-- The owner's call (a DBA in psql, the tests): any account.
CREATE OR REPLACE FUNCTION bps.bulk_transfer_xml(document text, idempotency_key text DEFAULT NULL,
                                                 OUT status integer, OUT body jsonb)
LANGUAGE sql AS $$
    SELECT r.status, r.body FROM bps.bulk_transfer_xml(document, idempotency_key, NULL, NULL) AS r
$$;

-- A text as XML 1.0 can hold it: the characters it has no place for (C0 controls but tab, line feed and carriage
-- return; U+FFFE, U+FFFF), which a JSON string may carry, become U+FFFD.
CREATE OR REPLACE FUNCTION bps.xml_text(value text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT regexp_replace(value, '[\x01-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]', U&'\FFFD', 'g')
$$;

-- A transfer's ISO 20022 transaction status: ACSP accepted (pending or processing), ACSC executed,
-- RJCT refused by the rail, CANC cancelled.
CREATE OR REPLACE FUNCTION bps.iso_status(status text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE status
        WHEN 'pending' THEN 'ACSP' WHEN 'processing' THEN 'ACSP' WHEN 'executed' THEN 'ACSC'
        WHEN 'failed' THEN 'RJCT' WHEN 'cancelled' THEN 'CANC'
    END
$$;

-- An xs:dateTime in UTC.
CREATE OR REPLACE FUNCTION bps.iso_date_time(at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- The pain.002.001.10 Customer Payment Status Report of a bulk transfer (of one of bank_account_ids; NULL:
-- any), or NULL when there is none: its status (PART when its transactions' differ), a count and sum per
-- status, and each transaction's status, reason code when refused, EndToEndId and amount.
CREATE OR REPLACE FUNCTION bps.payment_status_report(bulk_transfer_id bigint, bank_account_ids bigint[] DEFAULT NULL)
RETURNS xml
LANGUAGE sql STABLE AS $$
    WITH bulk AS (
        SELECT b.*
          FROM bps.bulk_transfers AS b
         WHERE b.id = payment_status_report.bulk_transfer_id
           AND (payment_status_report.bank_account_ids IS NULL
                OR b.bank_account_id = ANY (payment_status_report.bank_account_ids))
    ),
    per_status AS (
        SELECT bps.iso_status(t.status) AS code, count(*) AS transfer_count, sum(t.amount_cents)::bigint AS total_cents
          FROM bulk CROSS JOIN LATERAL bps.transfers_of(bulk.id) AS t
         GROUP BY 1
    ),
    overall AS (
        SELECT CASE WHEN count(*) = 1 THEN min(code) ELSE 'PART' END AS code FROM per_status
    )
    SELECT xmlelement(name "Document", xmlattributes('urn:iso:std:iso:20022:tech:xsd:pain.002.001.10' AS xmlns),
        xmlelement(name "CstmrPmtStsRpt",
            xmlelement(name "GrpHdr",
                -- Unique: the bulk transfer and the millisecond the report was made.
                xmlelement(name "MsgId",
                           'BPS' || bulk.id || 'R' || floor(extract(epoch FROM clock_timestamp()) * 1000)),
                xmlelement(name "CreDtTm", bps.iso_date_time(now()))),
            xmlelement(name "OrgnlGrpInfAndSts",
                xmlelement(name "OrgnlMsgId", coalesce(bps.xml_text(bulk.message_id), 'BPS' || bulk.id)),
                xmlelement(name "OrgnlMsgNmId", coalesce(bulk.message_name, 'bps.bulk_transfer')),
                xmlelement(name "OrgnlCreDtTm", bps.iso_date_time(bulk.created_at)),
                xmlelement(name "GrpSts", overall.code)),
            xmlelement(name "OrgnlPmtInfAndSts",
                xmlelement(name "OrgnlPmtInfId", coalesce(bps.xml_text(bulk.payment_information_id), bulk.id::text)),
                xmlelement(name "OrgnlNbOfTxs", bulk.transfer_count),
                xmlelement(name "OrgnlCtrlSum", bps.format_cents(bulk.total_cents)),
                xmlelement(name "PmtInfSts", overall.code),
                (SELECT xmlagg(xmlelement(name "NbOfTxsPerSts",
                            xmlelement(name "DtldNbOfTxs", s.transfer_count),
                            xmlelement(name "DtldSts", s.code),
                            xmlelement(name "DtldCtrlSum", bps.format_cents(s.total_cents))) ORDER BY s.code)
                   FROM per_status AS s),
                (SELECT xmlagg(xmlelement(name "TxInfAndSts",
                            CASE WHEN t.client_reference IS NOT NULL THEN
                                xmlelement(name "OrgnlEndToEndId", bps.xml_text(t.client_reference))
                            END,
                            xmlelement(name "TxSts", bps.iso_status(t.status)),
                            CASE WHEN t.failure_reason IS NOT NULL THEN
                                xmlelement(name "StsRsnInf",
                                           xmlelement(name "Rsn", xmlelement(name "Cd", t.failure_reason)))
                            END,
                            xmlelement(name "AcctSvcrRef", t.id),
                            xmlelement(name "OrgnlTxRef",
                                xmlelement(name "Amt",
                                    xmlelement(name "InstdAmt", xmlattributes(t.amount_currency AS "Ccy"),
                                               bps.format_cents(t.amount_cents))))) ORDER BY t.id)
                   FROM bps.transfers_of(bulk.id) AS t))))
      FROM bulk, overall
$$;
