"""Unit tests of the sandbox PEC provider's pure parts: receipt and envelope builders and its
formal checks (tests/support/pec_provider.py). No servers involved."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import xml.etree.ElementTree as ET

import pytest

import pec_provider as pp

SENDER = "studio@pec.example.test"
WHEN = dt.datetime(2026, 11, 22, 21, 5, 3, tzinfo=dt.timezone.utc)


def original(extra: str = "", body: str = "Testo.\r\n") -> bytes:
    return (
        f"From: Studio <{SENDER}>\r\n"
        "To: altro@pec.example.test, ufficio@pec.ente.test\r\n"
        "Cc: copia@pec.ente.test\r\n"
        "Subject: =?UTF-8?Q?Fattura_n=C2=B0_42?=\r\n"
        "Message-ID: <orig.1@pec.example.test>\r\n"
        f"{extra}"
        "\r\n" + body
    ).encode()


def submission(raw: bytes | None = None) -> pp.Submission:
    return pp.submission_from(raw or original(), SENDER, "opec1.20261122@pec.example.test", WHEN,
                              local=["altro@pec.example.test"])


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def daticert(msg) -> ET.Element:
    mixed = msg.get_payload()[0]
    part = mixed.get_payload()[1]
    assert part.get_filename() == "daticert.xml"
    assert part.get_content_type() == "application/xml"
    return ET.fromstring(part.get_payload(decode=True))


def test_submission_reads_the_header():
    sub = submission()
    assert sub.to == ["altro@pec.example.test", "ufficio@pec.ente.test"]
    assert sub.cc == ["copia@pec.ente.test"]
    assert sub.subject == "Fattura n° 42"
    assert sub.msgid == "<orig.1@pec.example.test>"
    assert sub.tipo_ricevuta == "completa"
    assert pp.submission_from(original("X-TipoRicevuta: breve\r\n"), SENDER, "x", WHEN).tipo_ricevuta == "breve"


def test_acceptance_receipt_layout_and_daticert():
    sub = submission()
    raw = pp.build_pec_message("accettazione", sub, gestore="Sandbox PEC", domain="pec.example.test", to=[SENDER])
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg["X-Ricevuta"] == "accettazione"
    assert msg["X-Riferimento-Message-ID"] == "<orig.1@pec.example.test>"
    assert msg["Subject"] == "ACCETTAZIONE: Fattura n° 42"
    assert msg["From"] == "posta-certificata@pec.example.test"
    assert msg["To"] == SENDER
    assert msg.get_content_type() == "multipart/signed"
    assert msg.get_param("protocol") == "application/x-pkcs7-signature"
    mixed, signature = msg.get_payload()
    assert signature.get_filename() == "smime.p7s"
    assert b"NOT A REAL S/MIME SIGNATURE" in signature.get_payload(decode=True)
    alternative = mixed.get_payload()[0]
    assert [p.get_content_type() for p in alternative.get_payload()] == ["text/plain", "text/html"]
    text = alternative.get_payload()[0].get_content()
    assert "Ricevuta di accettazione" in text and "Fattura n° 42" in text
    assert len(mixed.get_payload()) == 2  # no postacert.eml in an acceptance

    x = daticert(msg)
    assert x.tag == "postacert" and x.get("tipo") == "accettazione" and x.get("errore") == "nessuno"
    head = x.find("intestazione")
    assert head.findtext("mittente") == SENDER
    assert [(d.get("tipo"), d.text) for d in head.findall("destinatari")] == [
        ("certificato", "altro@pec.example.test"), ("certificato", "ufficio@pec.ente.test"),
        ("certificato", "copia@pec.ente.test")]
    assert head.findtext("risposte") == SENDER
    assert head.findtext("oggetto") == "Fattura n° 42"
    data = x.find("dati")
    assert data.findtext("gestore-emittente") == "Sandbox PEC"
    assert data.find("data").get("zona") in ("+0100", "+0200", "+0000")
    assert data.find("data").findtext("giorno") == "22/11/2026"
    assert data.find("data").findtext("ora") in ("22:05:03", "21:05:03")
    assert data.findtext("identificativo") == "opec1.20261122@pec.example.test"
    assert data.findtext("msgid") == "<orig.1@pec.example.test>"
    # In the file itself the brackets are escaped.
    xml_bytes = msg.get_payload()[0].get_payload()[1].get_payload(decode=True)
    assert b"<msgid>&lt;orig.1@pec.example.test&gt;</msgid>" in xml_bytes


def test_receipts_for_a_submission():
    sub = submission()
    items = pp.receipts_for(sub, gestore="Sandbox PEC", domain="pec.example.test",
                            failing=["ufficio@pec.ente.test"])
    kinds = [(addr, parse(raw)["X-Ricevuta"] or parse(raw)["X-Trasporto"]) for addr, raw in items]
    assert kinds == [
        (SENDER, "accettazione"),
        ("altro@pec.example.test", "posta-certificata"),
        (SENDER, "avvenuta-consegna"),
        (SENDER, "errore-consegna"),
        (SENDER, "avvenuta-consegna"),
    ]
    by_rcpt = {}
    for addr, raw in items:
        msg = parse(raw)
        x = daticert(msg)
        if msg["X-Ricevuta"] in ("avvenuta-consegna", "errore-consegna"):
            by_rcpt[x.find("dati").findtext("consegna")] = (msg, x)

    msg, x = by_rcpt["altro@pec.example.test"]
    assert msg["Subject"] == "CONSEGNA: Fattura n° 42"
    assert x.find("dati").find("ricevuta").get("tipo") == "completa"
    postacert = msg.get_payload()[0].get_payload()[2]
    assert postacert.get_filename() == "postacert.eml"
    assert postacert.get_content_type() == "message/rfc822"
    assert sub.raw in msg.as_bytes() or sub.raw.replace(b"\r\n", b"\n") in msg.as_bytes().replace(b"\r\n", b"\n")

    msg, x = by_rcpt["copia@pec.ente.test"]
    assert x.find("dati").find("ricevuta").get("tipo") == "sintetica"
    assert len(msg.get_payload()[0].get_payload()) == 2

    msg, x = by_rcpt["ufficio@pec.ente.test"]
    assert msg["Subject"] == "AVVISO DI MANCATA CONSEGNA: Fattura n° 42"
    assert x.get("tipo") == "errore-consegna" and x.get("errore") == "no-dest"
    assert x.find("dati").findtext("errore-esteso") == "5.1.1 - Sandbox PEC - indirizzo non valido"


def test_transport_envelope():
    sub = submission()
    raw = pp.build_pec_message("posta-certificata", sub, gestore="G", domain="pec.example.test",
                               to=sub.to, cc=sub.cc, postacert=sub.raw, message_id=sub.identificativo)
    msg = parse(raw)
    assert msg["X-Trasporto"] == "posta-certificata"
    assert msg["Subject"] == "POSTA CERTIFICATA: Fattura n° 42"
    assert msg["From"].addresses[0].display_name == f"Per conto di: {SENDER}"
    assert msg["From"].addresses[0].addr_spec == "posta-certificata@pec.example.test"
    assert msg["Reply-To"] == SENDER
    assert msg["Message-ID"] == sub.identificativo
    assert msg["X-Riferimento-Message-ID"] == sub.msgid
    assert msg["X-TipoRicevuta"] == "completa"
    assert daticert(msg).get("tipo") == "posta-certificata"
    postacert = msg.get_payload()[0].get_payload()[2]
    assert postacert.get_filename() == "postacert.eml"
    # The original travels byte for byte.
    assert b"\r\n\r\n" + sub.raw + b"\r\n" in raw


def test_breve_receipt_replaces_attachments_with_hashes():
    raw = (
        f"From: {SENDER}\r\nTo: altro@pec.example.test\r\nSubject: allegato\r\n"
        "Message-ID: <b@x>\r\nX-TipoRicevuta: breve\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nTesto visibile\r\n"
        "--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--B--\r\n"
    ).encode()
    sub = submission(raw)
    items = pp.receipts_for(sub, gestore="G", domain="pec.example.test")
    delivery = parse([r for a, r in items if parse(r)["X-Ricevuta"] == "avvenuta-consegna"][0])
    assert daticert(delivery).find("dati").find("ricevuta").get("tipo") == "breve"
    copy = delivery.get_payload()[0].get_payload()[2].as_bytes()
    assert b"Testo visibile" in copy
    assert b"JVBERi0xLjQK" not in copy
    import hashlib
    assert hashlib.sha256(b"%PDF-1.4\n").hexdigest().encode() in copy


@pytest.mark.parametrize("raw,sender,rcpts,expected", [
    (original(), SENDER, ["altro@pec.example.test", "ufficio@pec.ente.test", "copia@pec.ente.test"], None),
    (original(), "other@pec.example.test", ["altro@pec.example.test"], 553),
    (original("Bcc: nascosto@pec.ente.test\r\n"), SENDER,
     ["altro@pec.example.test", "ufficio@pec.ente.test", "copia@pec.ente.test", "nascosto@pec.ente.test"], 554),
    (original(), SENDER, ["altro@pec.example.test"], 554),
])
def test_provider_formal_checks(raw, sender, rcpts, expected):
    result = pp.check_message(raw, sender, rcpts, 10_000_000)
    assert (result[0] if result else None) == expected, result


def test_provider_size_limit():
    assert pp.check_message(original(), SENDER, ["a"] * 3, 100) == (552, "5.3.4 Message size exceeds fixed limit")
