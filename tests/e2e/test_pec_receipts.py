"""Unit tests of the sandbox PEC provider's pure parts: receipt and envelope builders (every
kind of pec-reference, the real-world variants, the recipient-address knobs) and its formal
checks (tests/support/pec_provider.py); and the receipt fixtures (tests/fixtures/receipts:
byte-identical to what generate.py produces, MANIFEST.json true to the files). No servers
involved."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import hashlib
import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

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


# ---------------------------------------------------------------------------
# every kind of the reference table, the variants, the recipient knobs
# ---------------------------------------------------------------------------

CET = dt.timezone(dt.timedelta(hours=1))
SUBJECT_PREFIX = {k: v[2] for k, v in pp.KINDS.items()}


def parts_of(msg):
    """(the multipart/mixed parts, the signature part) of a PEC message."""
    assert msg.get_content_type() == "multipart/signed"
    mixed, signature = msg.get_payload()
    assert mixed.get_content_type() == "multipart/mixed"
    return mixed.get_payload(), signature


def daticert_of(msg) -> ET.Element | None:
    for part in parts_of(msg)[0]:
        if part.get_filename() == "daticert.xml":
            assert part.get_content_type() == "application/xml"
            return ET.fromstring(part.get_payload(decode=True))
    return None


def classify(msg) -> str:
    """As pec-reference says: X-Trasporto first, then X-Ricevuta (names in any case); never
    the subject."""
    for name in ("X-Trasporto", "X-Ricevuta"):
        value = msg.get(name)
        if value is not None:
            return str(value).strip().lower()
    return "unknown"


def build(kind: str, sub=None, **kw) -> bytes:
    sub = sub or submission()
    defaults = {
        "accettazione": {},
        "non-accettazione": {"errore": "altro"},
        "presa-in-carico": {"domain": "pec.ente.test", "to": ["posta-certificata@pec.example.test"],
                            "ricezione": ["ufficio@pec.ente.test", "copia@pec.ente.test"]},
        "avvenuta-consegna": {"recipient": "ufficio@pec.ente.test", "ricevuta": "completa", "postacert": sub.raw},
        "errore-consegna": {"recipient": "ufficio@pec.ente.test", "errore": "no-dest",
                            "errore_esteso": "5.1.1 - G - indirizzo non valido"},
        "preavviso-errore-consegna": {"recipient": "ufficio@pec.ente.test", "errore": "altro",
                                      "errore_esteso": "5.4.1 - G - non consegnato entro le 24 ore",
                                      "when": WHEN + dt.timedelta(hours=24)},
        "rilevazione-virus": {"recipient": "ufficio@pec.ente.test", "errore": "virus",
                              "errore_esteso": "5.5.1 - G - virus rilevato"},
        "posta-certificata": {"to": sub.to, "cc": sub.cc, "postacert": sub.raw, "message_id": sub.identificativo},
        "errore": {"postacert": sub.raw},
    }[kind]
    args = {"gestore": "G", "domain": "pec.example.test", "to": [SENDER], **defaults, **kw}
    return pp.build_pec_message(kind, sub, **args)


@pytest.mark.parametrize("kind", list(pp.KINDS))
def test_every_kind_is_shaped_as_the_rules_say(kind):
    sub = submission()
    raw = build(kind, sub)
    assert b"\n" not in raw.replace(b"\r\n", b""), "CRLF line endings only"
    msg = parse(raw)
    header, value, prefix = pp.KINDS[kind]
    assert msg[header] == value and classify(msg) == value
    other = "X-Ricevuta" if header == "X-Trasporto" else "X-Trasporto"
    assert msg[other] is None
    assert msg["Subject"] == prefix + "Fattura n° 42"
    assert msg["X-Riferimento-Message-ID"] == "<orig.1@pec.example.test>"
    sender = msg["From"].addresses[0]
    if kind in pp.ENVELOPES:
        assert sender.display_name == f"Per conto di: {SENDER}"
        assert msg["Reply-To"] == SENDER
    else:
        assert msg["Reply-To"] is None
    domain = "pec.ente.test" if kind == "presa-in-carico" else "pec.example.test"
    assert sender.addr_spec == f"posta-certificata@{domain}"
    assert msg.get_param("protocol") == "application/x-pkcs7-signature"

    mixed, signature = parts_of(msg)
    assert signature.get_content_type() == "application/x-pkcs7-signature"
    assert signature.get_filename() == "smime.p7s"
    assert [p.get_content_type() for p in mixed[0].get_payload()] == ["text/plain", "text/html"]
    names = [p.get_filename() for p in mixed[1:]]
    with_postacert = kind in ("posta-certificata", "errore", "avvenuta-consegna")
    expected = ([] if kind == "errore" else ["daticert.xml"]) + (["postacert.eml"] if with_postacert else [])
    assert names == expected
    if with_postacert:
        assert mixed[-1].get_content_type() == "message/rfc822"

    x = daticert_of(msg)
    if kind == "errore":
        assert x is None, "the anomaly envelope carries no daticert.xml"
        return
    assert x.tag == "postacert" and x.get("tipo") == kind and x.get("errore") in pp.ERRORI
    head, data = x.find("intestazione"), x.find("dati")
    assert [c.tag for c in head] == ["mittente", "destinatari", "destinatari", "destinatari", "risposte", "oggetto"]
    assert {d.get("tipo") for d in head.findall("destinatari")} == {"certificato"}
    assert data.findtext("gestore-emittente") == ("G")
    assert data.find("data").get("zona") in ("+0100", "+0200")
    assert data.findtext("identificativo") == sub.identificativo
    assert data.findtext("msgid") == "<orig.1@pec.example.test>"
    if kind in pp.PER_RECIPIENT:
        assert data.findtext("consegna") == "ufficio@pec.ente.test"
    else:
        assert data.find("consegna") is None
    if kind == "presa-in-carico":
        assert [r.text for r in data.findall("ricezione")] == ["ufficio@pec.ente.test", "copia@pec.ente.test"]
    if kind == "avvenuta-consegna":
        assert data.find("ricevuta").get("tipo") == "completa" and msg["X-TipoRicevuta"] == "completa"
    if kind == "preavviso-errore-consegna":
        assert data.findtext("errore-esteso").startswith("5.4.1")
        assert data.find("data").findtext("giorno") == "23/11/2026"
    if kind in ("rilevazione-virus",):
        assert x.get("errore") == "virus" and data.findtext("errore-esteso").startswith("5.5.1")
    text = mixed[0].get_payload()[0].get_content()
    assert sub.identificativo in text


@pytest.mark.parametrize("form,expected", [
    ("escaped", b"<msgid>&lt;orig.1@pec.example.test&gt;</msgid>"),
    ("bare", b"<msgid>orig.1@pec.example.test</msgid>"),
    ("folded", b"<msgid>\r\n      &lt;orig.1@pec.example.test&gt;\r\n    </msgid>"),
    ("urlencoded", b"<msgid>%3Corig.1@pec.example.test%3E</msgid>"),
    ("missing", None),
])
def test_daticert_msgid_forms(form, expected):
    xml = pp.daticert_xml("accettazione", submission(), "G", msgid_form=form)
    ET.fromstring(xml)
    if expected is None:
        assert b"<msgid" not in xml
    else:
        assert expected in xml
    if form != "urlencoded":
        got = ET.fromstring(xml).find("dati").findtext("msgid")
        assert (pp.normalise_msgid(got) if got else None) == (None if form == "missing" else "orig.1@pec.example.test")


def test_builder_variants():
    sub = submission()
    common = dict(when=WHEN, zone=CET, boundary="fixed", message_id="<r.1@pec.example.test>")
    a = build("avvenuta-consegna", sub, **common)
    assert a == build("avvenuta-consegna", sub, **common), "fixed inputs, same bytes"
    assert b"----=_sandbox_signed_fixed" in a
    msg = parse(a)
    assert msg["Date"] == "Sun, 22 Nov 2026 22:05:03 +0100"
    d = daticert_of(msg).find("dati").find("data")
    assert (d.get("zona"), d.findtext("giorno"), d.findtext("ora")) == ("+0100", "22/11/2026", "22:05:03")

    msg = parse(build("accettazione", sub, signature_type="application/pkcs7-signature", micalg="sha1"))
    assert msg.get_param("protocol") == "application/pkcs7-signature" and msg.get_param("micalg") == "sha1"
    assert parts_of(msg)[1].get_content_type() == "application/pkcs7-signature"

    raw = build("avvenuta-consegna", sub, header_names={"X-Ricevuta": "x-ricevuta", "X-TipoRicevuta": "X-Tiporicevuta"},
                omit_headers=["X-Riferimento-Message-ID"], verifica_sicurezza="errore")
    assert b"\r\nx-ricevuta: avvenuta-consegna\r\n" in raw and b"\r\nX-Tiporicevuta: completa\r\n" in raw
    msg = parse(raw)
    assert classify(msg) == "avvenuta-consegna" and msg["X-Riferimento-Message-ID"] is None
    assert msg["X-VerificaSicurezza"] == "errore"

    long_subject = "Convocazione – ordine del giorno n° 3 e approvazione del bilancio consuntivo 2026"
    raw = build("accettazione", submission(original().replace(b"=?UTF-8?Q?Fattura_n=C2=B0_42?=",
                                                              pp.encode_header_value(long_subject).encode())))
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert parse(raw)["Subject"] == "ACCETTAZIONE: " + long_subject
    raw = build("accettazione", sub, subject="ACCETTAZIONE: plain", encode_subject=True)
    assert b"Subject: =?utf-8?" in raw and parse(raw)["Subject"] == "ACCETTAZIONE: plain"

    with pytest.raises(ValueError):
        build("accettazione", sub, signature_type="application/pgp-signature")
    with pytest.raises(ValueError):
        build("errore-consegna", sub, errore="boh")


def test_helpers():
    when = dt.datetime(2026, 6, 15, 7, 30, tzinfo=dt.timezone.utc)
    assert pp.make_identificativo("aruba", "pec.example.test", when, 7, token="a1b2c3d4") == \
        "opeca1b2c3d4.20260615073000.7@pec.example.test"
    ident = pp.make_identificativo("legalmail", "pec.example.test", when)
    assert pp.re.fullmatch(r"([0-9A-F]{8}\.){4}posta-certificata@pec\.example\.test", ident), ident
    assert pp.normalise_msgid(" \r\n &lt;a@b&gt;\r\n ") == "a@b"
    assert pp.normalise_msgid("a@b") == "a@b" and pp.normalise_msgid("") is None
    assert pp.knob_of("Timeout+x@pec.ente.test") == "timeout" and pp.knob_of("virus@x.test") == "virus"
    assert pp.knob_of("altro@pec.example.test") is None and pp.knob_of("timeouts@x.test") is None
    for a in ("ufficio@pec.ente.test", "x@legalmail.test", "x@arubapec.test", "x@postecert.example.test",
              "x@pec.altroente.test"):
        assert pp.is_certified(a), a
    for a in ("mario.rossi@gmail.com", "x@posta.example.com", "external+a@pec.ente.test",
              "anomaly+a@pec.ente.test"):
        assert not pp.is_certified(a), a
    assert pp.is_certified("x@example.com", pec_domains=["example.com"])
    assert not pp.is_certified("x@pec.ente.test", external_domains=["pec.ente.test"])
    assert pp.is_certified("x@sandbox.test", own_domain="sandbox.test")


def kinds_of(items):
    out = []
    for addr, raw in items:
        msg = parse(raw)
        x = daticert_of(msg)
        who = x.find("dati").findtext("consegna") if x is not None else None
        out.append((addr, classify(msg), who))
    return out


def knob_submission(to, cc=(), tipo=""):
    raw = (f"From: {SENDER}\r\nTo: {', '.join(to)}\r\n" + (f"Cc: {', '.join(cc)}\r\n" if cc else "") +
           f"Subject: Prova\r\nMessage-ID: <k.1@pec.example.test>\r\n{tipo}\r\nTesto\r\n").encode()
    return pp.submission_from(raw, SENDER, "opec9.20261122@pec.example.test", WHEN,
                              local=["altro@pec.example.test"], own_domain="pec.example.test")


def test_external_recipients_get_no_delivery_receipt():
    sub = knob_submission(["ufficio@pec.ente.test", "mario.rossi@gmail.com"], ["external+x@pec.ente.test"])
    assert sub.esterni == {"mario.rossi@gmail.com", "external+x@pec.ente.test"}
    items = pp.receipts_for(sub, gestore="G", domain="pec.example.test")
    assert kinds_of(items) == [(SENDER, "accettazione", None),
                               (SENDER, "avvenuta-consegna", "ufficio@pec.ente.test")]
    acc = parse(items[0][1])
    assert [(d.get("tipo"), d.text) for d in daticert_of(acc).find("intestazione").findall("destinatari")] == [
        ("certificato", "ufficio@pec.ente.test"), ("esterno", "mario.rossi@gmail.com"),
        ("esterno", "external+x@pec.ente.test")]
    assert 'mario.rossi@gmail.com ("posta ordinaria")' in parts_of(acc)[0][0].get_payload()[0].get_content()


def test_knobs():
    R = "@pec.ente.test"
    sub = knob_submission([f"timeout+a{R}", f"virus+b{R}", f"nouser+c{R}", f"nodomain+d{R}", f"slow+e{R}",
                           f"taken+f{R}", f"early+g{R}", f"reply+h{R}", f"unverified+i{R}", f"anomaly+j{R}",
                           "altro@pec.example.test"])
    items = pp.receipts_for(sub, gestore="G", domain="pec.example.test")
    assert kinds_of(items) == [
        (SENDER, "avvenuta-consegna", f"early+g{R}"),
        (SENDER, "accettazione", None),
        (SENDER, "preavviso-errore-consegna", f"timeout+a{R}"),
        (SENDER, "preavviso-errore-consegna", f"timeout+a{R}"),
        (SENDER, "rilevazione-virus", f"virus+b{R}"),
        (SENDER, "errore-consegna", f"virus+b{R}"),
        (SENDER, "errore-consegna", f"nouser+c{R}"),
        (SENDER, "errore-consegna", f"nodomain+d{R}"),
        (SENDER, "preavviso-errore-consegna", f"slow+e{R}"),
        (SENDER, "avvenuta-consegna", f"slow+e{R}"),
        (SENDER, "presa-in-carico", None),
        (SENDER, "avvenuta-consegna", f"taken+f{R}"),
        (SENDER, "avvenuta-consegna", f"reply+h{R}"),
        (SENDER, "posta-certificata", None),
        (SENDER, "avvenuta-consegna", f"unverified+i{R}"),
        (SENDER, "posta-certificata", None),
        (SENDER, "errore", None),
        ("altro@pec.example.test", "posta-certificata", None),
        (SENDER, "avvenuta-consegna", "altro@pec.example.test"),
    ]
    msgs = [parse(raw) for _, raw in items]
    xs = [daticert_of(m) for m in msgs]

    def ext(i):
        return xs[i].get("errore"), xs[i].find("dati").findtext("errore-esteso")

    # The two timeout notices: +12 h and +24 h, the second 5.4.1.
    assert [(x.find("dati").find("data").findtext("giorno"), x.find("dati").find("data").findtext("ora"))
            for x in xs[2:4]] == [("23/11/2026", "10:05:03"), ("23/11/2026", "22:05:03")]
    assert ext(2)[1].startswith("4.4.7") and ext(3)[1].startswith("5.4.1") and ext(3)[0] == "altro"
    assert msgs[2]["Subject"] == "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: Prova"
    assert ext(4) == ("virus", "5.5.1 - Gestore di pec.ente.test - virus rilevato")
    assert msgs[4]["From"] == "posta-certificata@pec.ente.test"
    assert ext(5)[0] == "virus" and ext(5)[1].startswith("5.5.1")
    assert ext(6)[0] == "no-dest" and ext(6)[1].startswith("5.1.1")
    assert ext(7)[0] == "no-dominio"
    assert xs[9].find("dati").find("data").findtext("ora") == "11:05:03"  # delivered 13 h later
    assert [r.text for r in xs[10].find("dati").findall("ricezione")] == [
        a for a in sub.recipients if a.endswith(R)]
    # The certified reply: In-Reply-To names the identificativo.
    reply = msgs[13]
    assert reply["X-VerificaSicurezza"] is None and msgs[15]["X-VerificaSicurezza"] == "errore"
    assert reply["From"].addresses[0].display_name == f"Per conto di: reply+h{R}"
    inner = parts_of(reply)[0][2].get_payload()[0]
    assert inner["In-Reply-To"] == f"<{sub.identificativo}>"
    assert reply["Subject"] == "POSTA CERTIFICATA: Re: POSTA CERTIFICATA: Prova"
    # The ordinary reply of an external recipient: an anomaly envelope, no daticert.
    anomaly = msgs[16]
    assert anomaly["Subject"].startswith("ANOMALIA MESSAGGIO: ") and xs[16] is None
    assert anomaly["Reply-To"] == f"anomaly+j{R}"
    assert {d.get("tipo") for d in xs[1].find("intestazione").findall("destinatari")} == {"certificato", "esterno"}


def test_reject_knob_and_knobs_off():
    sub = knob_submission(["ufficio@pec.ente.test", "reject+x@pec.ente.test"])
    items = pp.receipts_for(sub, gestore="G", domain="pec.example.test")
    assert kinds_of(items) == [(SENDER, "non-accettazione", None)]
    msg = parse(items[0][1])
    assert msg["Subject"] == "AVVISO DI NON ACCETTAZIONE: Prova"
    assert daticert_of(msg).get("errore") == "altro"
    items = pp.receipts_for(sub, gestore="G", domain="pec.example.test", knobs=False)
    assert [k for _, k, _ in kinds_of(items)] == ["accettazione", "avvenuta-consegna", "avvenuta-consegna"]


def test_sender_asks_for_the_kind_of_delivery_receipt():
    for tipo in ("completa", "breve", "sintetica"):
        sub = knob_submission(["ufficio@pec.ente.test"], ["copia@pec.ente.test"], f"X-TipoRicevuta: {tipo}\r\n")
        items = pp.receipts_for(sub, gestore="G", domain="pec.example.test")
        got = {}
        for _, raw in items[1:]:
            msg = parse(raw)
            x = daticert_of(msg)
            got[x.find("dati").findtext("consegna")] = (x.find("dati").find("ricevuta").get("tipo"),
                                                       msg["X-TipoRicevuta"], len(parts_of(msg)[0]))
        assert got == {"ufficio@pec.ente.test": (tipo, tipo, 2 if tipo == "sintetica" else 3),
                       "copia@pec.ente.test": ("sintetica", "sintetica", 2)}


# ---------------------------------------------------------------------------
# tests/fixtures/receipts
# ---------------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "receipts"


def _generator():
    spec = importlib.util.spec_from_file_location("receipt_fixtures_generate", FIXTURES / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest():
    return json.loads((FIXTURES / "MANIFEST.json").read_text(encoding="utf-8"))


def test_fixtures_are_what_generate_py_produces():
    files = _generator().build()
    on_disk = {p.name for p in FIXTURES.iterdir() if p.suffix in (".eml", ".json")}
    assert on_disk == set(files), "run tests/fixtures/receipts/generate.py"
    for name, data in files.items():
        assert (FIXTURES / name).read_bytes() == data, f"{name} differs: run generate.py"


def _daticert_rfc3339(data) -> str:
    giorno, ora, zona = data.findtext("giorno"), data.findtext("ora"), data.get("zona")
    when = dt.datetime.strptime(f"{giorno} {ora} {zona}", "%d/%m/%Y %H:%M:%S %z")
    return when.isoformat()


def _expected_msgid(msg, x):
    header = msg.get("X-Riferimento-Message-ID")
    if header is not None:
        return pp.normalise_msgid(str(header))
    if x is not None and x.find("dati").findtext("msgid"):
        return pp.normalise_msgid(x.find("dati").findtext("msgid"))
    return None


def test_fixture_manifest_matches_the_files():
    manifest = _manifest()
    entries = {e["file"]: e for e in manifest["files"]}
    assert set(entries) == {p.name for p in FIXTURES.glob("*.eml")}
    kinds = {e["kind"] for e in entries.values()}
    assert kinds == set(pp.KINDS) | {"unknown"}, kinds
    for name, e in entries.items():
        raw = (FIXTURES / name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == e["sha256"] and len(raw) == e["size"], name
        msg = parse(raw)
        assert classify(msg) == e["kind"], name
        if e["kind"] == "unknown":
            assert msg.get_content_type() != "multipart/signed"
            continue
        x = daticert_of(msg)
        assert _expected_msgid(msg, x) == e["msgid"], name
        if x is None:
            assert e["kind"] == "errore" and e["identificativo"] is None and e["data"] is None
            continue
        head, data = x.find("intestazione"), x.find("dati")
        assert x.get("tipo") == e["kind"] and x.get("errore") == e["errore"], name
        assert data.findtext("identificativo") == e["identificativo"], name
        assert data.findtext("consegna") == e["consegna"], name
        assert [{"address": d.text, "tipo": d.get("tipo")} for d in head.findall("destinatari")] == \
            e["destinatari"], name
        ricevuta = data.find("ricevuta")
        assert (ricevuta.get("tipo") if ricevuta is not None else None) == e["ricevuta"], name
        assert data.findtext("errore-esteso") == e["errore_esteso"], name
        assert _daticert_rfc3339(data.find("data")) == e["data"], name
        postacert = [p for p in parts_of(msg)[0] if p.get_filename() == "postacert.eml"]
        if e["kind"] == "avvenuta-consegna":
            assert bool(postacert) == (e["ricevuta"] != "sintetica"), name
    for s in manifest["scenarios"]:
        for name in s["arrival"]:
            assert entries[name]["scenario"] == s["name"]
            assert entries[name]["msgid"] == s["msgid"] and entries[name]["identificativo"] == s["identificativo"]


def test_fixtures_cover_the_real_world_variants():
    entries = {e["file"]: e for e in _manifest()["files"]}
    raws = {n: (FIXTURES / n).read_bytes() for n in entries}
    msgids = {n: daticert_of(parse(raws[n])).find("dati").findtext("msgid")
              for n in entries if entries[n]["kind"] not in ("unknown", "errore")}
    # Brackets in parsed text were &lt;...&gt; in the file (well-formed XML).
    assert any(v and v.strip().startswith("<") for v in msgids.values()), "escaped msgid"
    assert any(v and not v.strip().startswith("<") and "%3C" not in v for v in msgids.values()), "bare msgid"
    assert any(v is None and entries[n]["kind"] == "accettazione" for n, v in msgids.items()), "missing msgid"
    assert any(b"\r\nx-ricevuta: " in r for r in raws.values())
    assert any(b"\r\nX-Tiporicevuta: " in r for r in raws.values())
    assert any(b"Subject: =?utf-8?" in r for r in raws.values())
    assert any(b"Subject: ACCETTAZIONE: POSTA CERTIFICATA: Re: " in r for r in raws.values())
    signatures = {parts_of(parse(r))[1].get_content_type() for n, r in raws.items() if entries[n]["kind"] != "unknown"}
    assert signatures == set(pp.SIGNATURE_TYPES)
    idents = [e["identificativo"] for e in entries.values() if e["identificativo"]]
    assert any(i.startswith("opec") for i in idents)
    assert any(pp.re.fullmatch(r"([0-9A-F]{8}\.){4}posta-certificata@.+", i) for i in idents)
    zones = {e["data"][-6:] for e in entries.values() if e["data"]}
    assert zones == {"+01:00", "+02:00"}
    timeouts = [e for e in entries.values() if e["scenario"] == "timeout" and e["kind"] == "preavviso-errore-consegna"]
    assert [e["errore_esteso"][:5] for e in timeouts] == ["4.4.7", "5.4.1"]
    assert any(d["tipo"] == "esterno" for e in entries.values() for d in (e["destinatari"] or []))
    # A delivery reaching the mailbox before its acceptance.
    estate = next(s for s in _manifest()["scenarios"] if s["name"] == "estate")
    assert [entries[n]["kind"] for n in estate["arrival"]] == ["avvenuta-consegna", "accettazione"]
    # A subject saying CONSEGNA on a message that is no receipt.
    odd = entries["non-pec-oggetto-consegna.eml"]
    assert odd["kind"] == "unknown" and parse(raws[odd["file"]])["Subject"].startswith("CONSEGNA: ")
