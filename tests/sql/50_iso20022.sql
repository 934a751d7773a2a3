-- ISO 20022 from psql, as a DBA uses it: a pain.001 file through bps.bulk_transfer_xml (each PmtInf one
-- bulk transfer on its own account, the file accepted once), a DTD refused, and the pain.002 status report of
-- bps.payment_status_report read with xpath, before and after the rail's answers.
BEGIN;
SELECT plan(24);

\ir helpers.psql

SELECT bps.create_bank_account('Iso Org', 'FR7630000000000000000000501', 'ISOBFRPPXXX', 10000) AS x \gset
SELECT bps.create_bank_account('Iso Org', 'FR7630000000000000000000502', 'ISOBFRPPXXX', 10000) AS y \gset

-- One CdtTrfTxInf, and a file of two PmtInf: PMT-X on x (by IBAN and BIC, dated long ago: at once), two
-- transactions; PMT-Y on y (by IBAN alone, dated tomorrow), one.
CREATE FUNCTION pg_temp.tx(end_to_end_id text, amount text, name text) RETURNS text
LANGUAGE sql AS $$
    SELECT format('<CdtTrfTxInf><PmtId><EndToEndId>%s</EndToEndId></PmtId>'
                  '<Amt><InstdAmt Ccy="EUR">%s</InstdAmt></Amt>'
                  '<CdtrAgt><FinInstnId><BIC>CRLYFRPPTOU</BIC></FinInstnId></CdtrAgt><Cdtr><Nm>%s</Nm></Cdtr>'
                  '<CdtrAcct><Id><IBAN>EE383680981021245685</IBAN></Id></CdtrAcct>'
                  '<RmtInf><Ustrd>Invoice %s</Ustrd></RmtInf></CdtTrfTxInf>', end_to_end_id, amount, name, end_to_end_id)
$$;
CREATE FUNCTION pg_temp.pain001(msg_id text, doctype text DEFAULT '') RETURNS text
LANGUAGE sql AS $$
    SELECT '<?xml version="1.0" encoding="UTF-8"?>' || doctype
        || '<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.001.001.03"><CstmrCdtTrfInitn>'
        || format('<GrpHdr><MsgId>%s</MsgId><CreDtTm>2026-12-01T10:00:00</CreDtTm><NbOfTxs>3</NbOfTxs>', msg_id)
        || '<CtrlSum>31.00</CtrlSum><InitgPty><Nm>Iso Org</Nm></InitgPty></GrpHdr>'
        || '<PmtInf><PmtInfId>PMT-X</PmtInfId><PmtMtd>TRF</PmtMtd><NbOfTxs>2</NbOfTxs><CtrlSum>30.00</CtrlSum>'
        || '<ReqdExctnDt>2020-01-01</ReqdExctnDt><Dbtr><Nm>Iso Org</Nm></Dbtr>'
        || '<DbtrAcct><Id><IBAN>FR7630000000000000000000501</IBAN></Id></DbtrAcct>'
        || '<DbtrAgt><FinInstnId><BIC>ISOBFRPPXXX</BIC></FinInstnId></DbtrAgt>'
        || pg_temp.tx('E2E-1', '10.00', 'Bip Bip') || pg_temp.tx('E2E-2', '20', 'Wile E. Coyote') || '</PmtInf>'
        || '<PmtInf><PmtInfId>PMT-Y</PmtInfId><PmtMtd>TRF</PmtMtd><NbOfTxs>1</NbOfTxs>'
        || format('<ReqdExctnDt>%s</ReqdExctnDt><Dbtr><Nm>Iso Org</Nm></Dbtr>', bps.today() + 1)
        || '<DbtrAcct><Id><IBAN>FR7630000000000000000000502</IBAN></Id></DbtrAcct>'
        || '<DbtrAgt><FinInstnId><Othr><Id>NOTPROVIDED</Id></Othr></FinInstnId></DbtrAgt>'
        || pg_temp.tx('E2E-3', '1.0', 'Road Runner') || '</PmtInf>'
        || '</CstmrCdtTrfInitn></Document>'
$$;
-- Values of a report, by an XPath in the pain.002 namespace (prefix p).
CREATE FUNCTION pg_temp.report_values(report xml, path text) RETURNS text[]
LANGUAGE sql AS $$
    SELECT xpath(path, report, ARRAY[ARRAY['p', 'urn:iso:std:iso:20022:tech:xsd:pain.002.001.10']])::text[]
$$;

-- 201: two bulk transfers, in file order, each on its own account, remembering where it came from.
CREATE TEMP TABLE accepted AS SELECT * FROM bps.bulk_transfer_xml(pg_temp.pain001('MSG-TAP-1'));
SELECT is((SELECT status FROM accepted), 201, 'a two-PmtInf pain.001 file is accepted with 201');
SELECT results_eq(
    $$SELECT body ->> 'message_id', body ->> 'message_name', (body ->> 'transfer_count')::int,
             (body ->> 'total_cents')::bigint, jsonb_array_length(body -> 'bulk_transfers') FROM accepted$$,
    $$VALUES ('MSG-TAP-1', 'pain.001.001.03', 3, 3100::bigint, 2)$$,
    'the answer names the message, its transactions, its total and its two bulk transfers');
SELECT (body -> 'bulk_transfers' -> 0 ->> 'bulk_transfer_id')::bigint AS bulk_x,
       (body -> 'bulk_transfers' -> 1 ->> 'bulk_transfer_id')::bigint AS bulk_y FROM accepted \gset
SELECT results_eq(
    format($$SELECT id, bank_account_id, payment_information_id, message_id, message_name, transfer_count,
                    total_cents, requested_execution_date
               FROM bps.bulk_transfers WHERE id IN (%s, %s) ORDER BY payment_information_id$$, :bulk_x, :bulk_y),
    format($$VALUES (%s::bigint, %s::bigint, 'PMT-X', 'MSG-TAP-1', 'pain.001.001.03', 2, 3000::bigint, NULL::date),
                    (%s::bigint, %s::bigint, 'PMT-Y', 'MSG-TAP-1', 'pain.001.001.03', 1, 100::bigint, bps.today() + 1)$$,
           :bulk_x, :x, :bulk_y, :y),
    'each PmtInf is a bulk transfer on its debtor account, with its MsgId, PmtInfId and date (a past one: at once)');
SELECT results_eq(
    format($$SELECT bulk_transfer_id, amount_cents, counterparty_name, counterparty_bic, description, client_reference
               FROM bps.transfers WHERE bulk_transfer_id IN (%s, %s) ORDER BY id$$, :bulk_x, :bulk_y),
    format($$VALUES (%1$s::bigint, 1000::bigint, 'Bip Bip', 'CRLYFRPPTOU', 'Invoice E2E-1', 'E2E-1'),
                    (%1$s::bigint, 2000::bigint, 'Wile E. Coyote', 'CRLYFRPPTOU', 'Invoice E2E-2', 'E2E-2'),
                    (%2$s::bigint, 100::bigint, 'Road Runner', 'CRLYFRPPTOU', 'Invoice E2E-3', 'E2E-3')$$,
           :bulk_x, :bulk_y),
    'every transaction is a transfer: its amount in cents, creditor, agent, remittance and EndToEndId');
SELECT is((SELECT balance_cents FROM bps.bank_accounts WHERE id = :x), 7000::bigint, 'x is debited by its PmtInf');
SELECT is((SELECT balance_cents FROM bps.bank_accounts WHERE id = :y), 9900::bigint, '... and y by its own');
SELECT is(current_setting('response.headers', true)::jsonb ->> 'Location', '/bulk_transfers/' || :bulk_x,
          'the Location header names the first bulk transfer');
SELECT ok((SELECT bool_and(consistent) FROM bps.account_audit WHERE bank_account_id IN (:x, :y)),
          'both journals explain their balances');

-- 409: the same file (the same MsgId on the same accounts) again, nothing written.
SELECT pg_temp.written(:x) AS before_x, pg_temp.written(:y) AS before_y \gset
CREATE TEMP TABLE again AS SELECT * FROM bps.bulk_transfer_xml(pg_temp.pain001('MSG-TAP-1'));
SELECT results_eq($$SELECT status, body ->> 'code' FROM again$$, $$VALUES (409, 'duplicate_request')$$,
                  'the same file again is 409 duplicate_request');
SELECT ok((SELECT (body ->> 'bulk_transfer_id')::bigint IN (:bulk_x, :bulk_y) FROM again),
          '... naming a bulk transfer the file made');
SELECT is(ARRAY[pg_temp.written(:x), pg_temp.written(:y)], ARRAY[:'before_x'::bigint[], :'before_y'::bigint[]],
          '... and nothing is written');

-- 400: a DTD is refused before anything is parsed or expanded.
CREATE TEMP TABLE dtd AS SELECT * FROM bps.bulk_transfer_xml(pg_temp.pain001('MSG-TAP-2',
    '<!DOCTYPE Document [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'));
SELECT results_eq($$SELECT status, body ->> 'code' FROM dtd$$, $$VALUES (400, 'invalid_xml')$$,
                  'a file with a DOCTYPE is 400 invalid_xml');
SELECT is(ARRAY[pg_temp.written(:x), pg_temp.written(:y)], ARRAY[:'before_x'::bigint[], :'before_y'::bigint[]],
          '... and nothing is written');

-- The pain.002 report: every transaction accepted (ACSP) at first.
SELECT bps.payment_status_report(:bulk_x) AS report \gset
SELECT is(pg_temp.report_values(:'report', '/p:Document/p:CstmrPmtStsRpt/p:OrgnlGrpInfAndSts/p:OrgnlMsgId/text()'),
          ARRAY['MSG-TAP-1'], 'the report names the original message');
SELECT is(pg_temp.report_values(:'report', '/p:Document/p:CstmrPmtStsRpt/p:OrgnlPmtInfAndSts/p:OrgnlPmtInfId/text()'),
          ARRAY['PMT-X'], '... and its PmtInf');
SELECT is(pg_temp.report_values(:'report', '/p:Document/p:CstmrPmtStsRpt/p:OrgnlGrpInfAndSts/p:GrpSts/text()'),
          ARRAY['ACSP'], 'a pending bulk transfer is ACSP');
SELECT is(pg_temp.report_values(:'report', '//p:TxInfAndSts/p:TxSts/text()'), ARRAY['ACSP', 'ACSP'],
          '... and so is each of its transactions');
SELECT is(pg_temp.report_values(:'report', '//p:TxInfAndSts/p:OrgnlEndToEndId/text()'), ARRAY['E2E-1', 'E2E-2'],
          '... each named by its EndToEndId');

-- The rail executes E2E-1 and refuses E2E-2 (AC01): PART, ACSC and RJCT with its reason.
CREATE TEMP TABLE claimed AS SELECT * FROM bps.claim_transfers('tap', 1000, '1 hour');
SELECT is((SELECT array_agg(transfer_id ORDER BY transfer_id) FROM claimed),
          ARRAY[:bulk_x * 100000, :bulk_x * 100000 + 1]::bigint[], 'a claim takes the due PmtInf only');
SELECT is(bps.settle_transfers((SELECT array_agg(DISTINCT run_id) FROM claimed),
                               (SELECT array_agg(DISTINCT attempt) FROM claimed),
                               ARRAY[:bulk_x * 100000, :bulk_x * 100000 + 1]::bigint[],
                               ARRAY['executed', 'failed'], ARRAY[NULL, 'AC01']), 2, 'the rail answers both');
SELECT bps.payment_status_report(:bulk_x) AS settled \gset
SELECT is(pg_temp.report_values(:'settled', '/p:Document/p:CstmrPmtStsRpt/p:OrgnlGrpInfAndSts/p:GrpSts/text()')
          || pg_temp.report_values(:'settled', '/p:Document/p:CstmrPmtStsRpt/p:OrgnlPmtInfAndSts/p:PmtInfSts/text()'),
          ARRAY['PART', 'PART'], 'one executed and one refused: PART');
SELECT is(pg_temp.report_values(:'settled', '//p:TxInfAndSts/p:TxSts/text()'), ARRAY['ACSC', 'RJCT'],
          '... ACSC for the executed one, RJCT for the refused one');
SELECT is(pg_temp.report_values(:'settled', '//p:TxInfAndSts/p:StsRsnInf/p:Rsn/p:Cd/text()'), ARRAY['AC01'],
          '... with the rail''s reason code');

-- Another account's bulk transfer, and one that does not exist: no report.
SELECT ok(bps.payment_status_report(:bulk_x, ARRAY[:y::bigint]) IS NULL
          AND bps.payment_status_report(:bulk_y + 1000000) IS NULL,
          'no report for a bulk transfer of another account, nor for a missing one');

SELECT * FROM finish();
ROLLBACK;
