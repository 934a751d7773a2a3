-- ISO 20022 from psql: a pain.001 file in (each PmtInf a bulk transfer, the whole file one transaction),
-- a pain.002 status report out. Over HTTP: the same file as Content-Type: application/xml.

SELECT bps.create_bank_account('ACME Corp', 'FR10474608000002006107XXXXX', 'OIVUSCLQXXX', 7777777);

-- A file from a server's disk reads as bps.bulk_transfer_xml(pg_read_file('/path/pain.001.xml')).
SELECT status, jsonb_pretty(body) AS body FROM bps.bulk_transfer_xml($$<?xml version="1.0" encoding="UTF-8"?>
<Document xmlns="urn:iso:std:iso:20022:tech:xsd:pain.001.001.03">
  <CstmrCdtTrfInitn>
    <GrpHdr>
      <MsgId>ACME-2026-11-PAYROLL</MsgId><CreDtTm>2026-11-30T09:00:00</CreDtTm>
      <NbOfTxs>2</NbOfTxs><CtrlSum>1014.79</CtrlSum><InitgPty><Nm>ACME Corp</Nm></InitgPty>
    </GrpHdr>
    <PmtInf>
      <PmtInfId>PAYROLL-1</PmtInfId><PmtMtd>TRF</PmtMtd><NbOfTxs>2</NbOfTxs><CtrlSum>1014.79</CtrlSum>
      <ReqdExctnDt>2020-01-01</ReqdExctnDt>
      <Dbtr><Nm>ACME Corp</Nm></Dbtr>
      <DbtrAcct><Id><IBAN>FR10474608000002006107XXXXX</IBAN></Id></DbtrAcct>
      <DbtrAgt><FinInstnId><BIC>OIVUSCLQXXX</BIC></FinInstnId></DbtrAgt>
      <CdtTrfTxInf>
        <PmtId><EndToEndId>E2E-4410</EndToEndId></PmtId>
        <Amt><InstdAmt Ccy="EUR">1000.50</InstdAmt></Amt>
        <CdtrAgt><FinInstnId><BIC>CRLYFRPPTOU</BIC></FinInstnId></CdtrAgt>
        <Cdtr><Nm>Bip Bip</Nm></Cdtr>
        <CdtrAcct><Id><IBAN>EE383680981021245685</IBAN></Id></CdtrAcct>
        <RmtInf><Ustrd>Wonderland/4410</Ustrd></RmtInf>
      </CdtTrfTxInf>
      <CdtTrfTxInf>
        <PmtId><EndToEndId>E2E-4411</EndToEndId></PmtId>
        <Amt><InstdAmt Ccy="EUR">14.29</InstdAmt></Amt>
        <Cdtr><Nm>Road Runner</Nm></Cdtr>
        <CdtrAcct><Id><IBAN>FR7630006000011234567890189</IBAN></Id></CdtrAcct>
      </CdtTrfTxInf>
    </PmtInf>
  </CstmrCdtTrfInitn>
</Document>$$);

-- How each CdtTrfTxInf was read: no CdtrAgt is NOTPROVIDED, no RmtInf the EndToEndId, a past date as soon as possible.
SELECT id, amount_cents, counterparty_name, counterparty_bic, description, client_reference FROM bps.transfers_of(1);
SELECT id, requested_execution_date FROM bps.bulk_transfer_summaries;

-- The pain.002 status report of bulk transfer 1 (as GET /bulk_transfers/1 with Accept: application/xml),
-- here one element a line.
SELECT regexp_replace(bps.payment_status_report(1)::text, '><(?!/)', E'>\n<', 'g') AS pain002;
