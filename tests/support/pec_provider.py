#!/usr/bin/env python3
"""A sandbox PEC provider for pecgate's tests and sandbox (test support, not part of the daemon).

It accepts SMTP submission (implicit TLS and/or STARTTLS, AUTH PLAIN/LOGIN against a small
user table), applies the formal checks a real PEC provider applies at its access point
(answering with provider-like texts), keeps every accepted message byte for byte, and for
each one delivers over LMTP into the sender's Dovecot mailbox:

* an ``accettazione`` receipt;
* per certified recipient an ``avvenuta-consegna`` receipt (``completa``, ``breve`` or
  ``sintetica`` as the sender's ``X-TipoRicevuta`` asks; Cc recipients always ``sintetica``),
  or an ``errore-consegna`` notice for addresses configured to fail;
* for recipients local to the sandbox, the transport envelope (``X-Trasporto:
  posta-certificata``) into their own mailbox.

Behaviour knobs, asked for by a recipient address (off otherwise: the flow above is the
default). The recipient's local part, or its part before the first ``+``, names the knob
(case-insensitive), e.g. ``timeout+fattura7@pec.ente.test``:

* ``nouser``     -> ``errore-consegna``, errore ``no-dest``, errore-esteso ``5.1.1`` (what the
  configured ``fail`` addresses get);
* ``nodomain``   -> ``errore-consegna``, errore ``no-dominio``, errore-esteso ``5.1.2`` (the
  code is a sandbox choice, not observed);
* ``virus``      -> ``rilevazione-virus`` then ``errore-consegna``, both errore ``virus`` and
  errore-esteso ``5.5.1``;
* ``timeout``    -> two ``preavviso-errore-consegna`` notices dated +12 h and +24 h (the 24 h
  one with errore-esteso ``5.4.1``, the 12 h one ``4.4.7``: sandbox choice), no delivery;
* ``slow``       -> the 12 h notice, then the delivery receipt (dated +13 h);
* ``silent``     -> accepted, then nothing at all (a receipt lost on the way; the recipient
  stays pending until the sender's alert);
* ``early``      -> the delivery receipt reaches the mailbox before the acceptance;
* ``taken``      -> a ``presa-in-carico`` from the recipient's provider before the delivery
  receipt (provider-to-provider in real life; here it lands in the sender's mailbox);
* ``reply``      -> after the delivery receipt, a certified reply from that recipient: a
  transport envelope whose ``postacert.eml`` has ``In-Reply-To: <identificativo>``;
* ``unverified`` -> as ``reply``, the envelope carrying ``X-VerificaSicurezza: errore``;
* ``anomaly``    -> the recipient is external (no delivery receipt); an ordinary (non-PEC)
  reply from it arrives wrapped in an anomaly envelope (``X-Trasporto: errore``);
* ``external``   -> the recipient is external (``esterno``, no delivery receipt);
* ``reject``     -> the whole submission gets only an ``avviso di non accettazione``
  (SMTP still answers 250, as providers that check after queueing do).

Recipients on non-PEC domains are ``esterno`` in daticert.xml, listed as "posta ordinaria" in
the acceptance, and get no delivery receipt. A domain is a PEC one if it is the provider's
own, is listed in ``ProviderConfig.pec_domains``, or has a label ``pec``, ``legalmail``,
``postecert`` or ``sicurezzapostale`` or one beginning or ending with ``pec``
(``pec.ente.test``, ``arubapec.test``); ``ProviderConfig.external_domains`` forces the
opposite. Everything the knobs produce goes to the sender's mailbox over LMTP.

Receipts follow the PEC technical rules (DM 2 novembre 2005 annex, RFC 6109; summary in
``shared/pec-reference.md``): ``X-Ricevuta`` / ``X-Trasporto``, ``X-Riferimento-Message-ID``,
subject prefixes, and ``multipart/signed`` ( ``multipart/mixed`` [ ``multipart/alternative``
text+html, ``daticert.xml``, ``postacert.eml`` where the rules put one ], ``smime.p7s`` ).
The signature is a DUMMY blob that says so: nothing here is really signed. Every kind of the
reference table can be built with ``build_pec_message`` (``KINDS``), including the variants
seen in the wild (msgid forms, header-name case, signature content types, identificativo
shapes, fixed dates, zones and boundaries for reproducible fixtures:
``tests/fixtures/receipts/generate.py``).

Run: ``python3 pec_provider.py --config provider.json`` (see ``ProviderConfig``). The
receipt builders are pure functions, unit-tested in ``tests/e2e/test_pec_receipts.py``.
Python 3.11 standard library only.

Every command a client sends (AUTH arguments and SASL lines redacted, message data left out)
and every end of data is appended to ``store/journal.jsonl``, one JSON object per line with
the connection number (``conn``), so tests can tell what a client really sent. Fault knobs for
tests (``ProviderConfig.faults``, all off by default) make it misbehave the way real servers
and networks do; see ``FAULTS``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import datetime as dt
import email
import email.header
import email.policy
import email.utils
import hashlib
import html
import json
import re
import secrets
import signal
import smtplib
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

DUMMY_SIGNATURE = (
    b"SANDBOX DUMMY SIGNATURE - NOT A REAL S/MIME SIGNATURE.\r\n"
    b"Written by pecgate's sandbox PEC provider (tests/support/pec_provider.py).\r\n"
    b"It signs nothing and proves nothing; a real provider puts its PKCS#7 signature here.\r\n"
)

# kind -> (header name, header value, subject prefix). "errore" is the anomaly envelope.
KINDS = {
    "posta-certificata": ("X-Trasporto", "posta-certificata", "POSTA CERTIFICATA: "),
    "errore": ("X-Trasporto", "errore", "ANOMALIA MESSAGGIO: "),
    "accettazione": ("X-Ricevuta", "accettazione", "ACCETTAZIONE: "),
    "non-accettazione": ("X-Ricevuta", "non-accettazione", "AVVISO DI NON ACCETTAZIONE: "),
    "presa-in-carico": ("X-Ricevuta", "presa-in-carico", "PRESA IN CARICO: "),
    "avvenuta-consegna": ("X-Ricevuta", "avvenuta-consegna", "CONSEGNA: "),
    "errore-consegna": ("X-Ricevuta", "errore-consegna", "AVVISO DI MANCATA CONSEGNA: "),
    "preavviso-errore-consegna": ("X-Ricevuta", "preavviso-errore-consegna",
                                  "AVVISO DI MANCATA CONSEGNA PER SUP. TEMPO MASSIMO: "),
    "rilevazione-virus": ("X-Ricevuta", "rilevazione-virus", "PROBLEMA DI SICUREZZA: "),
}
# Envelopes (From "Per conto di: <sender>", Reply-To the sender); the others are receipts.
ENVELOPES = ("posta-certificata", "errore")
# Receipts about one recipient (daticert <consegna>).
PER_RECIPIENT = ("avvenuta-consegna", "errore-consegna", "preavviso-errore-consegna", "rilevazione-virus")
# daticert.xml postacert/@errore values.
ERRORI = ("nessuno", "no-dest", "no-dominio", "virus", "altro")
# Content types of the signature part seen in the wild.
SIGNATURE_TYPES = ("application/x-pkcs7-signature", "application/pkcs7-signature")
# daticert <msgid> forms: as the rules say, without brackets, missing, folded over lines,
# URL-encoded (see pec-reference "msgid").
MSGID_FORMS = ("escaped", "bare", "missing", "folded", "urlencoded")

# Recipient-address knobs (see the module docstring).
KNOBS = ("nouser", "nodomain", "virus", "timeout", "slow", "early", "taken", "reply",
         "unverified", "anomaly", "external", "reject", "silent")
PEC_LABELS = ("pec", "legalmail", "postecert", "sicurezzapostale")

CRLF = b"\r\n"

# Fault knobs (``ProviderConfig.faults``); an absent key means the normal behaviour.
FAULTS = {
    # "stall": accept the TCP connection and never send the greeting.
    "greeting",
    # On the plain (STARTTLS) port: "hide" offers no STARTTLS but AUTH in clear text (a
    # stripped or downgraded server); "refuse" offers STARTTLS and answers it 454.
    "starttls",
    # {address (lowercase): "CODE text"}: RCPT TO for that address is answered so.
    "rcpt",
    # "stall": DATA is never answered (no 354).
    "data_cmd",
    # After the final dot: "CODE text" (or a list of lines: a multi-line reply) is answered
    # instead of accepting; "close" keeps the message (it has left) and drops the connection
    # without a reply; "stall" keeps it and never replies.
    "data_end",
    # True: end of data is also a bare CR or LF, a dot, and a bare CR or LF (\n.\n, \r.\r,
    # \n.\r\n, ...), as the servers of the SMTP smuggling research did.
    "lenient_data",
    # True: NUL bytes in message data are dropped before the end of data is looked for.
    "strip_nul",
    # N: the faults apply to the first N connections that send EHLO (or HELO) only; later
    # ones are served normally (the greeting fault, decided before any command, always
    # applies).
    "connections",
}

# A bare or CRLF line break, a dot, a line break: any "end of data" some server accepted.
_LENIENT_END = re.compile(rb"(\r\n|\r|\n)\.(\r\n|\r|\n)")
_LENIENT_STUFFED = re.compile(rb"(\A|\r\n|\r|\n)\.")


# ---------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------


def _local_time(now: dt.datetime, zone: dt.tzinfo | None = None) -> dt.datetime:
    """``now`` in ``zone``, or in Italian time (UTC if there is no tz database)."""
    if zone is not None:
        return now.astimezone(zone)
    try:
        from zoneinfo import ZoneInfo

        return now.astimezone(ZoneInfo("Europe/Rome"))
    except Exception:  # noqa: BLE001 - no tz database: UTC is still a correct statement
        return now.astimezone(dt.timezone.utc)


def _rome(now: dt.datetime, zone: dt.tzinfo | None = None) -> tuple[str, str, str]:
    """(giorno dd/mm/yyyy, ora hh:mm:ss, zona +HHMM) in Italian time (or in ``zone``)."""
    local = _local_time(now, zone)
    zona = local.strftime("%z") or "+0000"
    return local.strftime("%d/%m/%Y"), local.strftime("%H:%M:%S"), zona


def header_block(raw: bytes) -> bytes:
    end = raw.find(b"\r\n\r\n")
    return raw if end < 0 else raw[: end + 2]


def parse_headers(raw: bytes):
    """The original's header as an email.message.Message (values decoded on access)."""
    return email.message_from_bytes(header_block(raw) + CRLF, policy=email.policy.default)


def addresses(values) -> list[str]:
    return [a for _, a in email.utils.getaddresses([str(v) for v in values]) if a]


def encode_header_value(text: str, force: bool = False) -> str:
    """``text`` as is if it is printable ASCII (and not ``force``), else RFC 2047 encoded
    words, folded with CRLF."""
    if not force and all(32 <= ord(c) < 127 for c in text):
        return text
    return email.header.Header(text, "utf-8").encode(linesep="\r\n")


def _boundary(tag: str, fixed: str | None = None) -> str:
    if fixed is not None:
        return f"----=_sandbox_{tag}_{fixed}"
    return f"----=_sandbox_{tag}_{secrets.token_hex(8)}"


def _qp(text: str) -> bytes:
    import quopri

    data = quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8"))
    return data.replace(b"\r\n", b"\n").replace(b"\n", CRLF)


def _b64(data: bytes) -> bytes:
    encoded = base64.encodebytes(data).replace(b"\n", CRLF)
    return encoded


def knob_of(address: str) -> str | None:
    """The behaviour knob a recipient address asks for (module docstring), or None."""
    local = address.rsplit("@", 1)[0].lower()
    name = local.split("+", 1)[0]
    return name if name in KNOBS else None


def is_certified(address: str, *, own_domain: str | None = None, pec_domains=(),
                 external_domains=()) -> bool:
    """Whether ``address`` is a PEC mailbox ("certificato") rather than "esterno"."""
    if knob_of(address) in ("external", "anomaly"):
        return False
    domain = address.rsplit("@", 1)[-1].lower()
    if domain in {d.lower() for d in external_domains}:
        return False
    if domain in {d.lower() for d in pec_domains} or (own_domain and domain == own_domain.lower()):
        return True
    for label in domain.split("."):
        if label in PEC_LABELS or label.startswith("pec") or label.endswith("pec"):
            return True
    return False


def make_identificativo(style: str, domain: str, when: dt.datetime, n: int = 1,
                        token: str | None = None) -> str:
    """A provider-assigned identificativo (no angle brackets) in one of the shapes seen:
    ``aruba`` ``opec<hex>.<yyyymmddHHMMSS>.<n>@domain`` (Aruba, Namirial, Sogei) or
    ``legalmail`` / ``poste`` four hex groups ``XXXXXXXX.XXXXXXXX.XXXXXXXX.XXXXXXXX.
    posta-certificata@domain``. ``token``: hex digits to use (8 for aruba, 32 for the others)
    instead of random ones."""
    if style == "aruba":
        token = token or secrets.token_hex(4)
        return f"opec{token}.{when.strftime('%Y%m%d%H%M%S')}.{n}@{domain}"
    if style in ("legalmail", "poste"):
        token = (token or secrets.token_hex(16)).upper()
        groups = ".".join(token[i:i + 8] for i in range(0, 32, 8))
        return f"{groups}.posta-certificata@{domain}"
    raise ValueError(style)


def normalise_msgid(value: str | None) -> str | None:
    """A Message-ID as pec-reference says to compare them: unfold, trim, unescape XML
    entities, drop one pair of angle brackets. None/empty -> None."""
    if value is None:
        return None
    text = re.sub(r"\s+", "", str(value))
    text = html.unescape(text)
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text or None


@dataclass
class Submission:
    """An accepted message, as the receipts describe it."""

    sender: str
    to: list[str]
    cc: list[str]
    subject: str
    msgid: str
    identificativo: str
    raw: bytes
    when: dt.datetime
    tipo_ricevuta: str = "completa"
    local: set = field(default_factory=set)
    # Recipients that are not PEC addresses (daticert destinatari tipo="esterno").
    esterni: set = field(default_factory=set)

    @property
    def recipients(self) -> list[str]:
        return self.to + [c for c in self.cc if c not in self.to]

    def certified(self, address: str) -> bool:
        return address.lower() not in self.esterni


def submission_from(raw: bytes, sender: str, identificativo: str, when: dt.datetime,
                    local=(), *, own_domain: str | None = None, pec_domains=(),
                    external_domains=()) -> Submission:
    h = parse_headers(raw)
    tipo = str(h.get("X-TipoRicevuta", "completa")).strip().lower()
    if tipo not in ("completa", "breve", "sintetica"):
        tipo = "completa"
    to = addresses(h.get_all("To", []))
    cc = addresses(h.get_all("Cc", []))
    esterni = {a.lower() for a in to + cc
               if not is_certified(a, own_domain=own_domain, pec_domains=pec_domains,
                                   external_domains=external_domains)}
    return Submission(
        sender=sender,
        to=to,
        cc=cc,
        subject=str(h.get("Subject", "")),
        msgid=str(h.get("Message-ID", "")).strip(),
        identificativo=identificativo,
        raw=raw,
        when=when,
        tipo_ricevuta=tipo,
        local=set(a.lower() for a in local),
        esterni=esterni,
    )


def _msgid_text(msgid: str, form: str) -> str | None:
    e = html.escape
    if form == "escaped":
        return e(msgid)
    if form == "bare":
        return e(msgid[1:-1] if msgid.startswith("<") and msgid.endswith(">") else msgid)
    if form == "missing":
        return None
    if form == "folded":
        return "\r\n      " + e(msgid) + "\r\n    "
    if form == "urlencoded":
        return e(urllib.parse.quote(msgid, safe="@.-_"))
    raise ValueError(form)


def daticert_xml(tipo: str, sub: Submission, gestore: str, *, errore: str = "nessuno",
                 ricevuta: str | None = None, consegna: str | None = None,
                 errore_esteso: str | None = None, when: dt.datetime | None = None,
                 zone: dt.tzinfo | None = None, msgid_form: str = "escaped",
                 ricezione=()) -> bytes:
    """daticert.xml with the elements of the technical rules. ``when``: the date of the event
    (default: the submission's); ``zone``: a fixed zone instead of Italian time;
    ``msgid_form``: one of ``MSGID_FORMS``; ``ricezione``: recipients a presa-in-carico
    covers."""
    e = html.escape
    giorno, ora, zona = _rome(when or sub.when, zone)
    dest = []
    for addr in sub.recipients:
        kind = "certificato" if sub.certified(addr) else "esterno"
        dest.append(f'    <destinatari tipo="{kind}">{e(addr)}</destinatari>')
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<postacert tipo="{e(tipo)}" errore="{e(errore)}">',
        "  <intestazione>",
        f"    <mittente>{e(sub.sender)}</mittente>",
        *dest,
        f"    <risposte>{e(sub.sender)}</risposte>",
        f"    <oggetto>{e(sub.subject)}</oggetto>",
        "  </intestazione>",
        "  <dati>",
        f"    <gestore-emittente>{e(gestore)}</gestore-emittente>",
        f'    <data zona="{zona}">',
        f"      <giorno>{giorno}</giorno>",
        f"      <ora>{ora}</ora>",
        "    </data>",
        f"    <identificativo>{e(sub.identificativo)}</identificativo>",
    ]
    msgid = _msgid_text(sub.msgid, msgid_form) if sub.msgid else None
    if msgid is not None:
        lines.append(f"    <msgid>{msgid}</msgid>")
    if ricevuta:
        lines.append(f'    <ricevuta tipo="{e(ricevuta)}" />')
    if consegna:
        lines.append(f"    <consegna>{e(consegna)}</consegna>")
    for addr in ricezione:
        lines.append(f"    <ricezione>{e(addr)}</ricezione>")
    if errore_esteso:
        lines.append(f"    <errore-esteso>{e(errore_esteso)}</errore-esteso>")
    lines += ["  </dati>", "</postacert>", ""]
    return "\r\n".join(lines).encode("utf-8")


def notice_text(kind: str, sub: Submission, *, recipient: str | None = None,
                error: str | None = None, when: dt.datetime | None = None,
                zone: dt.tzinfo | None = None, ricezione=()) -> str:
    giorno, ora, zona = _rome(when or sub.when, zone)
    quando = f"Il giorno {giorno} alle ore {ora} ({zona})"
    if kind == "accettazione":
        dests = "\n".join(
            f'{a} ("posta certificata")' if sub.certified(a) else f'{a} ("posta ordinaria")'
            for a in sub.recipients)
        body = (f'Ricevuta di accettazione\n\n{quando} il messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\ned indirizzato a:\n{dests}\nè stato accettato dal sistema ed inoltrato.')
    elif kind == "non-accettazione":
        body = (f'Avviso di non accettazione\n\n{quando} il messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\nnon è stato accettato dal sistema'
                + (f" per il seguente motivo: {error}" if error else "")
                + ".\nIl messaggio non è stato inoltrato.")
    elif kind == "presa-in-carico":
        dests = "\n".join(ricezione or sub.recipients)
        body = (f'Ricevuta di presa in carico\n\n{quando} il messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\ned indirizzato a:\n{dests}\nè stato accettato dal sistema del '
                "gestore del destinatario.")
    elif kind == "avvenuta-consegna":
        body = (f'Ricevuta di avvenuta consegna\n\n{quando} il messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\ned indirizzato a "{recipient}"\nè stato consegnato nella casella di destinazione.')
    elif kind == "errore-consegna":
        body = (f'Avviso di mancata consegna\n\n{quando} nel messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\ned indirizzato a "{recipient}"\nè stato rilevato un errore: {error}.\n'
                "Il messaggio non è stato consegnato.")
    elif kind == "preavviso-errore-consegna":
        body = (f'Avviso di mancata consegna per superamento dei tempi massimi\n\n{quando} il messaggio\n'
                f'"{sub.subject}" proveniente da "{sub.sender}"\ned indirizzato a "{recipient}"\n'
                f"non è ancora stato consegnato ({error}).\n"
                "Il gestore del destinatario potrebbe non essere in grado di consegnarlo.")
    elif kind == "rilevazione-virus":
        body = (f'Avviso di rilevazione virus\n\n{quando} nel messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\ned indirizzato a "{recipient}"\nè stato rilevato un virus informatico '
                f"({error}).\nIl messaggio non è stato consegnato.")
    elif kind == "posta-certificata":
        dests = "\n".join(sub.recipients)
        body = (f'Messaggio di posta certificata\n\n{quando} il messaggio\n"{sub.subject}" è stato inviato da '
                f'"{sub.sender}"\nindirizzato a:\n{dests}\nIl messaggio originale è incluso in allegato '
                "(postacert.eml).")
    elif kind == "errore":
        dests = "\n".join(sub.recipients)
        body = (f'Anomalia nel messaggio\n\n{quando} è stato ricevuto il messaggio\n"{sub.subject}" '
                f'inviato da "{sub.sender}"\nindirizzato a:\n{dests}\nQuesto messaggio non è una posta '
                "certificata valida (messaggio di posta ordinaria o busta non conforme).\n"
                "Il messaggio originale è incluso in allegato (postacert.eml).")
    else:
        raise ValueError(kind)
    return body + f"\nIdentificativo messaggio: {sub.identificativo}\n"


def breve_copy(raw: bytes) -> bytes:
    """The original with each attachment replaced by its SHA-256 (a "breve" receipt)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    if not msg.is_multipart():
        return raw
    for part in msg.walk():
        if part.is_multipart():
            continue
        disposition = (part.get("Content-Disposition") or "").lower()
        if "attachment" not in disposition and part.get_content_maintype() == "text":
            continue
        digest = hashlib.sha256(part.get_payload(decode=True) or b"").hexdigest()
        for h in ("Content-Transfer-Encoding",):
            del part[h]
        part.set_payload(f"SHA-256: {digest}\n")
    return msg.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", CRLF)


def build_pec_message(kind: str, sub: Submission, *, gestore: str, domain: str, to: list[str],
                      cc: list[str] | None = None, recipient: str | None = None,
                      postacert: bytes | None = None, ricevuta: str | None = None,
                      errore: str = "nessuno", errore_esteso: str | None = None,
                      message_id: str | None = None, when: dt.datetime | None = None,
                      zone: dt.tzinfo | None = None, boundary: str | None = None,
                      signature_type: str = "application/x-pkcs7-signature",
                      micalg: str = "sha-256", msgid_form: str = "escaped",
                      header_names: dict | None = None, omit_headers=(),
                      extra_headers=(), subject: str | None = None,
                      encode_subject: bool = False, verifica_sicurezza: str | None = None,
                      ricezione=(), daticert: bool | None = None) -> bytes:
    """One PEC message (receipt or envelope, any of ``KINDS``) as bytes with CRLF line endings.

    Defaults are what the sandbox sends. For fixtures and variants: ``when`` (date of the event,
    default the submission's; also the Date header), ``zone`` (fixed zone for daticert and Date
    instead of Italian time / UTC), ``boundary`` (fixed boundary suffix instead of a random
    one), ``message_id`` (instead of a random ``opec...``), ``signature_type`` / ``micalg``,
    ``msgid_form`` (``MSGID_FORMS``), ``header_names`` ({canonical name: spelling}, e.g.
    ``{"X-Ricevuta": "x-ricevuta"}``), ``omit_headers`` (canonical names left out),
    ``extra_headers`` ((name, value) pairs appended before MIME-Version), ``subject`` (the
    whole Subject instead of prefix + original's), ``encode_subject`` (RFC 2047 even if
    ASCII), ``verifica_sicurezza`` (``X-VerificaSicurezza`` value), ``ricezione`` (presa in
    carico), ``daticert`` (default: every kind but the anomaly envelope carries one)."""
    kind = "errore" if kind == "anomalia" else kind
    header_name, header_value, prefix = KINDS[kind]
    if signature_type not in SIGNATURE_TYPES:
        raise ValueError(signature_type)
    if errore not in ERRORI:
        raise ValueError(errore)
    certifier = f"posta-certificata@{domain}"
    when = when or sub.when
    if daticert is None:
        daticert = kind != "errore"
    text = notice_text(kind, sub, recipient=recipient, error=errore_esteso, when=when, zone=zone,
                       ricezione=ricezione)
    xml = daticert_xml(
        kind, sub, gestore, errore=errore, ricevuta=ricevuta,
        consegna=recipient if kind in PER_RECIPIENT else None,
        errore_esteso=errore_esteso, when=when, zone=zone, msgid_form=msgid_form,
        ricezione=ricezione,
    ) if daticert else None
    b_signed, b_mixed, b_alt = (_boundary(t, boundary) for t in ("signed", "mixed", "alt"))
    message_id = message_id or f"<opec{secrets.token_hex(6)}.{int(time.time())}@{domain}>"
    date = when if zone is None else when.astimezone(zone)
    head = [
        ("Date", email.utils.format_datetime(date)),
    ]
    if kind in ENVELOPES:
        head += [
            ("From", f'"Per conto di: {sub.sender}" <{certifier}>'),
            ("Reply-To", sub.sender),
        ]
    else:
        head += [("From", certifier)]
    head.append(("To", ", ".join(to)))
    if cc:
        head.append(("Cc", ", ".join(cc)))
    head += [
        ("Subject", encode_header_value(subject if subject is not None else prefix + sub.subject,
                                        force=encode_subject)),
        ("Message-ID", message_id),
        (header_name, header_value),
    ]
    if sub.msgid:
        head.append(("X-Riferimento-Message-ID", sub.msgid))
    if kind == "posta-certificata" or (kind == "avvenuta-consegna" and ricevuta):
        head.append(("X-TipoRicevuta", ricevuta if kind == "avvenuta-consegna" else sub.tipo_ricevuta))
    if verifica_sicurezza:
        head.append(("X-VerificaSicurezza", verifica_sicurezza))
    head += list(extra_headers)
    head += [
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/signed; protocol="{signature_type}"; '
                         f'micalg="{micalg}"; boundary="{b_signed}"'),
    ]
    names = header_names or {}
    omit = {h.lower() for h in omit_headers}
    out = bytearray()
    for name, value in head:
        if name.lower() in omit:
            continue
        out += f"{names.get(name, name)}: {value}".encode("utf-8") + CRLF
    out += CRLF + b"This is a cryptographically signed message in MIME format." + CRLF + CRLF
    out += f"--{b_signed}".encode() + CRLF
    out += f'Content-Type: multipart/mixed; boundary="{b_mixed}"'.encode() + CRLF + CRLF
    out += f"--{b_mixed}".encode() + CRLF
    out += f'Content-Type: multipart/alternative; boundary="{b_alt}"'.encode() + CRLF + CRLF
    out += f"--{b_alt}".encode() + CRLF
    out += b"Content-Type: text/plain; charset=UTF-8" + CRLF
    out += b"Content-Transfer-Encoding: quoted-printable" + CRLF + CRLF
    out += _qp(text) + CRLF
    out += f"--{b_alt}".encode() + CRLF
    out += b"Content-Type: text/html; charset=UTF-8" + CRLF
    out += b"Content-Transfer-Encoding: quoted-printable" + CRLF + CRLF
    html_text = "<html><body><p>" + html.escape(text).replace("\n", "<br/>\n") + "</p></body></html>\n"
    out += _qp(html_text) + CRLF
    out += f"--{b_alt}--".encode() + CRLF + CRLF
    if xml is not None:
        out += f"--{b_mixed}".encode() + CRLF
        out += b'Content-Type: application/xml; name="daticert.xml"' + CRLF
        out += b"Content-Transfer-Encoding: base64" + CRLF
        out += b'Content-Disposition: inline; filename="daticert.xml"' + CRLF + CRLF
        out += _b64(xml) + CRLF
    if postacert is not None:
        cte = "8bit" if any(b >= 0x80 for b in postacert) else "7bit"
        out += f"--{b_mixed}".encode() + CRLF
        out += b'Content-Type: message/rfc822; name="postacert.eml"' + CRLF
        out += f"Content-Transfer-Encoding: {cte}".encode() + CRLF
        out += b'Content-Disposition: inline; filename="postacert.eml"' + CRLF + CRLF
        out += postacert
        if not postacert.endswith(CRLF):
            out += CRLF
        out += CRLF
    out += f"--{b_mixed}--".encode() + CRLF + CRLF
    out += f"--{b_signed}".encode() + CRLF
    out += f'Content-Type: {signature_type}; name="smime.p7s"'.encode() + CRLF
    out += b"Content-Transfer-Encoding: base64" + CRLF
    out += b'Content-Disposition: attachment; filename="smime.p7s"' + CRLF
    out += b"Content-Description: DUMMY signature - sandbox provider, not a real S/MIME signature" + CRLF + CRLF
    out += _b64(DUMMY_SIGNATURE) + CRLF
    out += f"--{b_signed}--".encode() + CRLF
    return bytes(out)


def reply_message(sub: Submission, replier: str, *, when: dt.datetime, msgid: str | None = None) -> bytes:
    """A recipient's reply to a submission, as its client writes it. It answers the message
    the recipient received, whose Message-ID was the provider's identificativo: so
    ``In-Reply-To`` names the identificativo, not the sender's Message-ID."""
    domain = replier.rsplit("@", 1)[-1]
    msgid = msgid or f"<reply.{secrets.token_hex(6)}@{domain}>"
    # What the replier saw was the transport envelope and its subject.
    subject = "Re: " + KINDS["posta-certificata"][2] + sub.subject
    lines = [
        ("From", replier),
        ("To", sub.sender),
        ("Subject", encode_header_value(subject)),
        ("Date", email.utils.format_datetime(when)),
        ("Message-ID", msgid),
        ("In-Reply-To", f"<{sub.identificativo}>"),
        ("References", f"<{sub.identificativo}>"),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=UTF-8"),
        ("Content-Transfer-Encoding", "8bit"),
    ]
    head = "".join(f"{k}: {v}\r\n" for k, v in lines)
    body = f"Ricevuto, grazie.\r\n\r\n{replier}\r\n"
    return (head + "\r\n" + body).encode("utf-8")


def _hours(sub: Submission, hours: float) -> dt.datetime:
    return sub.when + dt.timedelta(hours=hours)


def receipts_for(sub: Submission, *, gestore: str, domain: str, failing=(), knobs: bool = True,
                 ident_style: str = "aruba") -> list[tuple[str, bytes]]:
    """Every message the provider delivers for an accepted submission, as (mailbox address,
    bytes), in delivery order: the acceptance and per-recipient receipts go to the sender;
    transport envelopes go to local recipients. ``knobs``: honour the recipient-address knobs
    of the module docstring (an address with no knob gets the default flow)."""
    failing = {a.lower() for a in failing}
    knob = (lambda a: knob_of(a)) if knobs else (lambda a: None)

    def receipt(kind, **kw):
        kw.setdefault("to", [sub.sender])
        return build_pec_message(kind, sub, gestore=gestore, domain=domain, **kw)

    if any(knob(r) == "reject" for r in sub.recipients):
        return [(sub.sender, receipt("non-accettazione", errore="altro",
                                     errore_esteso=f"5.7.1 - {gestore} - messaggio non accettato"))]

    early: list[tuple[str, bytes]] = []
    out = [(sub.sender, receipt("accettazione"))]
    envelope = build_pec_message("posta-certificata", sub, gestore=gestore, domain=domain,
                                 to=sub.to, cc=sub.cc, postacert=sub.raw, message_id=sub.identificativo)
    for rcpt in sub.recipients:
        k = knob(rcpt)
        if rcpt.lower() in failing or k == "nouser":
            out.append((sub.sender, receipt(
                "errore-consegna", recipient=rcpt,
                errore="no-dest", errore_esteso=f"5.1.1 - {gestore} - indirizzo non valido")))
            continue
        if k == "nodomain":
            out.append((sub.sender, receipt(
                "errore-consegna", recipient=rcpt,
                errore="no-dominio", errore_esteso=f"5.1.2 - {gestore} - dominio non valido")))
            continue
        if k == "virus":
            rdomain = rcpt.rsplit("@", 1)[-1]
            out.append((sub.sender, build_pec_message(
                "rilevazione-virus", sub, gestore=f"Gestore di {rdomain}", domain=rdomain,
                to=[f"posta-certificata@{domain}"], recipient=rcpt, errore="virus",
                errore_esteso=f"5.5.1 - Gestore di {rdomain} - virus rilevato")))
            out.append((sub.sender, receipt(
                "errore-consegna", recipient=rcpt,
                errore="virus", errore_esteso=f"5.5.1 - {gestore} - virus rilevato")))
            continue
        if not sub.certified(rcpt):
            # External: no delivery receipt; an "anomaly" one answers with ordinary mail.
            if k == "anomaly":
                reply = reply_message(sub, rcpt, when=_hours(sub, 1))
                rsub = submission_from(reply, rcpt, make_identificativo(ident_style, domain, _hours(sub, 1)),
                                       _hours(sub, 1), own_domain=domain)
                out.append((sub.sender, build_pec_message(
                    "errore", rsub, gestore=gestore, domain=domain, to=[sub.sender], postacert=reply,
                    message_id=rsub.identificativo)))
            continue
        if k == "silent":
            continue
        if k == "timeout":
            for hours, code, what in ((12, "4.4.7", "entro 12 ore"), (24, "5.4.1", "entro le 24 ore")):
                out.append((sub.sender, receipt(
                    "preavviso-errore-consegna", recipient=rcpt, errore="altro", when=_hours(sub, hours),
                    errore_esteso=f"{code} - {gestore} - messaggio non consegnato {what}")))
            continue
        if rcpt.lower() in sub.local:
            out.append((rcpt, envelope))
        delivered_at = None
        if k == "slow":
            out.append((sub.sender, receipt(
                "preavviso-errore-consegna", recipient=rcpt, errore="altro", when=_hours(sub, 12),
                errore_esteso=f"4.4.7 - {gestore} - messaggio non consegnato entro 12 ore")))
            delivered_at = _hours(sub, 13)
        if k == "taken":
            rdomain = rcpt.rsplit("@", 1)[-1]
            out.append((sub.sender, build_pec_message(
                "presa-in-carico", sub, gestore=f"Gestore di {rdomain}", domain=rdomain,
                to=[f"posta-certificata@{domain}"],
                ricezione=[r for r in sub.recipients if r.rsplit("@", 1)[-1].lower() == rdomain.lower()])))
        # Cc recipients always get a "sintetica" receipt (technical rules).
        tipo = "sintetica" if rcpt in sub.cc and rcpt not in sub.to else sub.tipo_ricevuta
        postacert = {"completa": sub.raw, "breve": None, "sintetica": None}[tipo]
        if tipo == "breve":
            postacert = breve_copy(sub.raw)
        delivery = (sub.sender, receipt("avvenuta-consegna", recipient=rcpt, postacert=postacert,
                                        ricevuta=tipo, when=delivered_at))
        (early if k == "early" else out).append(delivery)
        if k in ("reply", "unverified"):
            rdomain = rcpt.rsplit("@", 1)[-1]
            reply = reply_message(sub, rcpt, when=_hours(sub, 1))
            rsub = submission_from(reply, rcpt, make_identificativo(ident_style, rdomain, _hours(sub, 1)),
                                   _hours(sub, 1), own_domain=rdomain)
            out.append((sub.sender, build_pec_message(
                "posta-certificata", rsub, gestore=f"Gestore di {rdomain}", domain=rdomain,
                to=[sub.sender], postacert=reply, message_id=rsub.identificativo,
                verifica_sicurezza="errore" if k == "unverified" else None)))
    return early + out



# ---------------------------------------------------------------------------
# formal checks (what the provider's access point refuses)
# ---------------------------------------------------------------------------


def check_message(raw: bytes, sender: str, rcpts: list[str], max_total: int) -> tuple[int, str] | None:
    """None if the message passes, else (code, text with enhanced code)."""
    if len(raw) * max(1, len(rcpts)) > max_total:
        return 552, "5.3.4 Message size exceeds fixed limit"
    h = parse_headers(raw)
    froms = addresses(h.get_all("From", []))
    if len(froms) != 1 or froms[0].lower() != sender.lower():
        return 553, "5.7.1 From header not matching the authenticated sender: not logged in"
    if h.get_all("Bcc"):
        return 554, "5.7.1 Messaggio non conforme: destinatari in Bcc non ammessi"
    listed = {a.lower() for a in addresses(h.get_all("To", []) + h.get_all("Cc", []))}
    envelope = {r.lower() for r in rcpts}
    if listed != envelope:
        return 554, "5.7.1 Messaggio non conforme: destinatari della busta diversi da To/Cc"
    return None


# ---------------------------------------------------------------------------
# the SMTP server
# ---------------------------------------------------------------------------


@dataclass
class ProviderConfig:
    domain: str
    store: Path
    users: dict  # login -> {"password", "address", "mailbox" (Dovecot user)}
    local: dict  # address (lowercase) -> Dovecot user
    lmtp: tuple[str, int] | None
    cert: str
    key: str
    host: str = "127.0.0.1"
    listen_tls: int | None = None
    listen_starttls: int | None = None
    gestore: str = "Sandbox PEC (pecgate)"
    fail: list = field(default_factory=list)
    max_total_bytes: int = 100 * 1024 * 1024
    rate: tuple[int, int] | None = None  # (messages, seconds)
    faults: dict = field(default_factory=dict)  # see FAULTS
    # Recipients' domains forced to be PEC ("certificato") / not PEC ("esterno"); the others
    # are judged by name (see the module docstring).
    pec_domains: list = field(default_factory=list)
    external_domains: list = field(default_factory=list)
    # Shape of the identificativo: "aruba" (opec...), "legalmail" or "poste" (hex groups).
    ident_style: str = "aruba"
    # Honour the recipient-address knobs (module docstring).
    knobs: bool = True

    @classmethod
    def load(cls, path) -> "ProviderConfig":
        data = json.loads(Path(path).read_text())
        data["store"] = Path(data["store"])
        data["lmtp"] = tuple(data["lmtp"]) if data.get("lmtp") else None
        data["rate"] = tuple(data["rate"]) if data.get("rate") else None
        data["local"] = {k.lower(): v for k, v in data.get("local", {}).items()}
        unknown = set(data.get("faults") or {}) - FAULTS
        if unknown:
            raise ValueError(f"unknown fault knobs: {sorted(unknown)}")
        data["faults"] = dict(data.get("faults") or {})
        return cls(**data)


class Provider:
    def __init__(self, config: ProviderConfig):
        self.c = config
        self.accepted_dir = config.store / "accepted"
        self.accepted_dir.mkdir(parents=True, exist_ok=True)
        self.counter = len(list(self.accepted_dir.glob("*.eml")))
        self.sent_times: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(config.cert, config.key)
        self.connections = 0
        self.greeted_connections = 0
        self.journal_path = config.store / "journal.jsonl"

    def journal(self, conn: int, **event):
        with self.lock:
            with open(self.journal_path, "a") as f:
                f.write(json.dumps({"conn": conn, **event}) + "\n")

    def faults_after_ehlo(self) -> dict:
        """The faults of a connection that has just greeted for the first time."""
        faults = self.c.faults
        limit = faults.get("connections")
        if limit is None:
            return faults
        with self.lock:
            self.greeted_connections += 1
            return faults if self.greeted_connections <= limit else {}

    def log(self, text: str):
        print(f"pec_provider: {text}", file=sys.stderr, flush=True)

    # -- persistence and delivery ----------------------------------------
    def store(self, raw: bytes, meta: dict) -> str:
        with self.lock:
            self.counter += 1
            n = self.counter
        name = f"{n:05d}"
        (self.accepted_dir / f"{name}.eml").write_bytes(raw)
        (self.accepted_dir / f"{name}.json").write_text(json.dumps(meta, indent=1))
        return name

    def deliver_receipts(self, sub: Submission, sender_mailbox: str):
        if self.c.lmtp is None:
            return
        try:
            items = receipts_for(sub, gestore=self.c.gestore, domain=self.c.domain, failing=self.c.fail,
                                 knobs=self.c.knobs, ident_style=self.c.ident_style)
            with smtplib.LMTP(self.c.lmtp[0], self.c.lmtp[1], timeout=120) as lmtp:
                for address, message in items:
                    mailbox = sender_mailbox if address == sub.sender else self.c.local.get(address.lower())
                    if mailbox is None:
                        continue
                    refused = lmtp.sendmail(f"posta-certificata@{self.c.domain}", [mailbox], message)
                    if refused:
                        self.log(f"LMTP refused {mailbox}: {refused}")
        except Exception as exc:  # noqa: BLE001 - a test will notice the missing receipt
            self.log(f"receipt delivery failed: {exc!r}")

    def rate_ok(self, login: str) -> bool:
        if not self.c.rate:
            return True
        count, per = self.c.rate
        now = time.monotonic()
        with self.lock:
            times = [t for t in self.sent_times.get(login, []) if now - t < per]
            self.sent_times[login] = times
            return len(times) < count

    def note_sent(self, login: str):
        with self.lock:
            self.sent_times.setdefault(login, []).append(time.monotonic())

    # -- one connection ----------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, implicit: bool):
        with self.lock:
            self.connections += 1
            conn = self.connections
        session = _Session(self, reader, writer, tls=implicit, conn=conn)
        self.journal(conn, event="connect", port="tls" if implicit else "starttls")
        try:
            await session.run()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.LimitOverrunError):
            pass
        except Exception as exc:  # noqa: BLE001
            self.log(f"session error: {exc!r}")
        finally:
            self.journal(conn, event="closed")
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def serve(self, stop: asyncio.Event):
        servers = []
        limit = 1024 * 1024
        # Port 0: the system picks one; the real ports are in the "listening" line (read by the
        # harness: no probe-and-release race).
        ports = {"tls": None, "starttls": None}
        if self.c.listen_tls is not None:
            server = await asyncio.start_server(
                lambda r, w: self.handle(r, w, True), self.c.host, self.c.listen_tls, ssl=self.tls, limit=limit)
            servers.append(server)
            ports["tls"] = server.sockets[0].getsockname()[1]
        if self.c.listen_starttls is not None:
            server = await asyncio.start_server(
                lambda r, w: self.handle(r, w, False), self.c.host, self.c.listen_starttls, limit=limit)
            servers.append(server)
            ports["starttls"] = server.sockets[0].getsockname()[1]
        self.log(f"listening tls={ports['tls']} starttls={ports['starttls']}")
        await stop.wait()
        for s in servers:
            s.close()


class _Session:
    def __init__(self, provider: Provider, reader, writer, tls: bool, conn: int = 0):
        self.p = provider
        self.reader = reader
        self.writer = writer
        self.tls = tls
        self.conn = conn
        self.faults = provider.c.faults
        self.greeted = False
        # Bytes read past a lenient end of data: the next commands.
        self.pending = b""
        self.login: str | None = None
        self.reset()

    def reset(self):
        self.mail_from: str | None = None
        self.rcpts: list[str] = []

    async def reply(self, text: str):
        self.writer.write(text.encode() + CRLF)
        await self.writer.drain()

    async def raw_line(self) -> bytes:
        if self.pending:
            i = self.pending.find(b"\n")
            if i >= 0:
                data, self.pending = self.pending[: i + 1], self.pending[i + 1:]
                return data
            data, self.pending = self.pending, b""
            return data + await self.reader.readuntil(b"\n")
        return await self.reader.readuntil(b"\n")

    async def line(self) -> bytes:
        data = await self.raw_line()
        return data.rstrip(b"\r\n")

    async def stall(self):
        """Never answer again: read and drop whatever comes until the client goes away."""
        self.p.journal(self.conn, event="stalled")
        while await self.reader.read(65536):
            pass

    async def run(self):
        if self.faults.get("greeting") == "stall":
            return await self.stall()
        await self.reply(f"220 {self.p.c.domain} ESMTP sandbox PEC provider")
        while True:
            raw = await self.line()
            text = raw.decode("utf-8", "replace")
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            self.p.journal(self.conn, cmd=f"{verb} <redacted>" if verb == "AUTH" else text, tls=self.tls)
            if verb in ("EHLO", "HELO"):
                if not self.greeted:
                    self.greeted = True
                    self.faults = self.p.faults_after_ehlo()
                self.reset()
                caps = ["PIPELINING", f"SIZE {self.p.c.max_total_bytes}", "8BITMIME", "ENHANCEDSTATUSCODES"]
                if self.tls or self.faults.get("starttls") == "hide":
                    caps.append("AUTH PLAIN LOGIN")
                else:
                    caps.append("STARTTLS")
                lines = [f"{self.p.c.domain}"] + caps
                out = "".join(f"250-{l}\r\n" for l in lines[:-1]) + f"250 {lines[-1]}"
                await self.reply(out)
            elif verb == "STARTTLS":
                if self.tls or self.p.c.listen_starttls is None:
                    await self.reply("503 5.5.1 TLS already active")
                    continue
                if self.faults.get("starttls") == "refuse":
                    await self.reply("454 4.7.0 TLS not available due to temporary reason")
                    continue
                await self.reply("220 2.0.0 Ready to start TLS")
                await self.writer.start_tls(self.p.tls)
                self.tls = True
                self.reset()
            elif verb == "AUTH":
                await self.auth(arg)
            elif verb == "MAIL":
                await self.mail(arg)
            elif verb == "RCPT":
                m = re.match(r"(?i)TO:\s*<([^>]*)>", arg)
                if self.mail_from is None:
                    await self.reply("503 5.5.1 Error: need MAIL command")
                elif not m:
                    await self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
                elif m.group(1).lower() in self.faults.get("rcpt", {}):
                    await self.reply(self.faults["rcpt"][m.group(1).lower()])
                else:
                    self.rcpts.append(m.group(1))
                    await self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                await self.data()
            elif verb == "RSET":
                self.reset()
                await self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                await self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                await self.reply("221 2.0.0 Bye")
                return
            else:
                await self.reply("502 5.5.2 Error: command not recognized")

    async def auth(self, arg: str):
        if not self.tls and self.faults.get("starttls") != "hide":
            await self.reply("530 5.7.0 Must issue a STARTTLS command first")
            return
        mech, _, initial = arg.partition(" ")
        try:
            if mech.upper() == "PLAIN":
                if not initial:
                    await self.reply("334 ")
                    initial = (await self.line()).decode()
                    self.p.journal(self.conn, sasl="<redacted>", tls=self.tls)
                parts = base64.b64decode(initial, validate=True).split(b"\0")
                user, password = parts[1].decode(), parts[2].decode()
            elif mech.upper() == "LOGIN":
                await self.reply("334 VXNlcm5hbWU6")
                user = base64.b64decode(await self.line(), validate=True).decode()
                self.p.journal(self.conn, sasl="<redacted>", tls=self.tls)
                await self.reply("334 UGFzc3dvcmQ6")
                password = base64.b64decode(await self.line(), validate=True).decode()
                self.p.journal(self.conn, sasl="<redacted>", tls=self.tls)
            else:
                await self.reply("504 5.5.4 Unrecognized authentication type")
                return
        except (binascii.Error, IndexError, UnicodeDecodeError):
            await self.reply("501 5.5.2 Cannot decode response")
            return
        entry = self.p.c.users.get(user)
        if entry is None or not secrets.compare_digest(entry["password"], password):
            await self.reply("535 5.7.8 Error: authentication failed")
            return
        self.login = user
        await self.reply("235 2.7.0 Authentication successful")

    async def mail(self, arg: str):
        m = re.match(r"(?i)FROM:\s*<([^>]*)>", arg)
        if self.login is None:
            await self.reply("530 5.7.0 Authentication required")
        elif self.mail_from is not None:
            await self.reply("503 5.5.1 Error: nested MAIL command")
        elif not m:
            await self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
        elif m.group(1).lower() != self.p.c.users[self.login]["address"].lower():
            await self.reply(f"553 5.7.1 <{m.group(1)}>: Sender address rejected: not logged in")
        elif not self.p.rate_ok(self.login):
            await self.reply("550 5.7.1 Too much traffic from this sender")
        else:
            self.mail_from = m.group(1)
            await self.reply("250 2.1.0 Ok")

    async def data(self):
        if self.mail_from is None or not self.rcpts:
            await self.reply("503 5.5.1 Error: need RCPT command")
            return
        if self.faults.get("data_cmd") == "stall":
            return await self.stall()
        await self.reply("354 End data with <CR><LF>.<CR><LF>")
        nul_dropped = 0
        if self.faults.get("lenient_data") or self.faults.get("strip_nul"):
            raw, nul_dropped = await self.lenient_data()
        else:
            chunks = []
            while True:
                line = await self.raw_line()
                if line == b".\r\n":
                    break
                if line.startswith(b"."):
                    line = line[1:]
                chunks.append(line)
            raw = b"".join(chunks)
        sender, rcpts = self.mail_from, list(self.rcpts)
        self.reset()
        self.p.journal(self.conn, data_end=True, mail_from=sender, rcpts=rcpts, size=len(raw),
                       sha256=hashlib.sha256(raw).hexdigest(), nul_dropped=nul_dropped)
        data_end = self.faults.get("data_end")
        if isinstance(data_end, (str, list)) and data_end not in ("close", "stall"):
            lines = [data_end] if isinstance(data_end, str) else data_end
            await self.reply("\r\n".join(f"{l[:3]}-{l[4:]}" for l in lines[:-1]) +
                             ("\r\n" if len(lines) > 1 else "") + lines[-1])
            return
        problem = check_message(raw, sender, rcpts, self.p.c.max_total_bytes)
        if problem:
            code, text = problem
            await self.reply(f"{code} {text}")
            return
        when = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        ident = make_identificativo(self.p.c.ident_style, self.p.c.domain, when, self.p.counter + 1)
        sub = submission_from(raw, sender, ident, when, local=self.p.c.local.keys(), own_domain=self.p.c.domain,
                              pec_domains=self.p.c.pec_domains, external_domains=self.p.c.external_domains)
        meta = {"mail_from": sender, "rcpts": rcpts, "login": self.login, "identificativo": ident,
                "msgid": sub.msgid, "size": len(raw)}
        await asyncio.to_thread(self.p.store, raw, meta)
        self.p.note_sent(self.login)
        mailbox = self.p.c.users[self.login].get("mailbox", self.login)
        if data_end in ("close", "stall"):
            # The message has left (receipts will come); the client never hears so.
            threading.Thread(target=self.p.deliver_receipts, args=(sub, mailbox), daemon=True).start()
            if data_end == "stall":
                await self.stall()
            else:
                self.p.journal(self.conn, event="dropped")
                self.writer.transport.abort()
            raise ConnectionResetError("fault: no reply after the final dot")
        await self.reply(f"250 2.0.0 Ok: queued as {ident}")
        threading.Thread(target=self.p.deliver_receipts, args=(sub, mailbox), daemon=True).start()

    async def lenient_data(self) -> tuple[bytes, int]:
        """Message data up to the first "end of data" a lenient server would see (see
        ``_LENIENT_END``), NUL bytes dropped first if ``strip_nul``; what follows it is kept
        for the command reader. Returns the message and how many NUL bytes were dropped
        while reading it (those read past its end included)."""
        strip = bool(self.faults.get("strip_nul"))
        lenient = bool(self.faults.get("lenient_data"))
        end = _LENIENT_END if lenient else re.compile(rb"(\r\n)\.(\r\n)")
        dropped = self.pending.count(b"\0") if strip else 0
        # The line break before DATA's first line, so a lone "." there ends the message.
        buf = b"\r\n" + (self.pending.replace(b"\0", b"") if strip else self.pending)
        self.pending = b""
        while True:
            m = end.search(buf)
            # A final bare CR may still be the start of a CRLF: wait for the next byte.
            if m and not (m.group(2) == b"\r" and m.end() == len(buf)):
                break
            chunk = await self.reader.read(65536)
            if not chunk:
                raise asyncio.IncompleteReadError(buf, None)
            if strip:
                dropped += chunk.count(b"\0")
                chunk = chunk.replace(b"\0", b"")
            buf += chunk
        self.pending = buf[m.end():]
        body = buf[: m.start(2) - 1]
        stuffed = _LENIENT_STUFFED if lenient else re.compile(rb"(\A|\r\n)\.")
        return stuffed.sub(rb"\1", body)[2:], dropped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="JSON file (see ProviderConfig)")
    args = ap.parse_args(argv)
    provider = Provider(ProviderConfig.load(args.config))

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await provider.serve(stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
