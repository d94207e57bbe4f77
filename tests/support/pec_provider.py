#!/usr/bin/env python3
"""A sandbox PEC provider for pecgate's tests and sandbox (test support, not part of the daemon).

It accepts SMTP submission (implicit TLS and/or STARTTLS, AUTH PLAIN/LOGIN against a small
user table), applies the formal checks a real PEC provider applies at its access point
(answering with provider-like texts), keeps every accepted message byte for byte, and for
each one delivers over LMTP into the sender's Dovecot mailbox:

* an ``accettazione`` receipt;
* per recipient an ``avvenuta-consegna`` receipt, or an ``errore-consegna`` notice for
  addresses configured to fail;
* for recipients local to the sandbox, the transport envelope (``X-Trasporto:
  posta-certificata``) into their own mailbox.

Receipts follow the PEC technical rules (DM 2 novembre 2005 annex, RFC 6109; summary in
``shared/pec-reference.md``): ``X-Ricevuta`` / ``X-Trasporto``, ``X-Riferimento-Message-ID``,
subject prefixes, and ``multipart/signed`` ( ``multipart/mixed`` [ ``multipart/alternative``
text+html, ``daticert.xml``, ``postacert.eml`` where the rules put one ], ``smime.p7s`` ).
The signature is a DUMMY blob that says so: nothing here is really signed.

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
from dataclasses import dataclass, field
from pathlib import Path

DUMMY_SIGNATURE = (
    b"SANDBOX DUMMY SIGNATURE - NOT A REAL S/MIME SIGNATURE.\r\n"
    b"Written by pecgate's sandbox PEC provider (tests/support/pec_provider.py).\r\n"
    b"It signs nothing and proves nothing; a real provider puts its PKCS#7 signature here.\r\n"
)

# kind -> (header name, header value, subject prefix)
KINDS = {
    "posta-certificata": ("X-Trasporto", "posta-certificata", "POSTA CERTIFICATA: "),
    "accettazione": ("X-Ricevuta", "accettazione", "ACCETTAZIONE: "),
    "non-accettazione": ("X-Ricevuta", "non-accettazione", "AVVISO DI NON ACCETTAZIONE: "),
    "avvenuta-consegna": ("X-Ricevuta", "avvenuta-consegna", "CONSEGNA: "),
    "errore-consegna": ("X-Ricevuta", "errore-consegna", "AVVISO DI MANCATA CONSEGNA: "),
}

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


def _rome(now: dt.datetime) -> tuple[str, str, str]:
    """(giorno dd/mm/yyyy, ora hh:mm:ss, zona +HHMM) in Italian time."""
    try:
        from zoneinfo import ZoneInfo

        local = now.astimezone(ZoneInfo("Europe/Rome"))
    except Exception:  # noqa: BLE001 - no tz database: UTC is still a correct statement
        local = now.astimezone(dt.timezone.utc)
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


def encode_header_value(text: str) -> str:
    if all(32 <= ord(c) < 127 for c in text):
        return text
    return email.header.Header(text, "utf-8").encode()


def _boundary(tag: str) -> str:
    return f"----=_sandbox_{tag}_{secrets.token_hex(8)}"


def _qp(text: str) -> bytes:
    import quopri

    data = quopri.encodestring(text.replace("\r\n", "\n").encode("utf-8"))
    return data.replace(b"\r\n", b"\n").replace(b"\n", CRLF)


def _b64(data: bytes) -> bytes:
    encoded = base64.encodebytes(data).replace(b"\n", CRLF)
    return encoded


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

    @property
    def recipients(self) -> list[str]:
        return self.to + [c for c in self.cc if c not in self.to]


def submission_from(raw: bytes, sender: str, identificativo: str, when: dt.datetime,
                    local=()) -> Submission:
    h = parse_headers(raw)
    tipo = str(h.get("X-TipoRicevuta", "completa")).strip().lower()
    if tipo not in ("completa", "breve", "sintetica"):
        tipo = "completa"
    return Submission(
        sender=sender,
        to=addresses(h.get_all("To", [])),
        cc=addresses(h.get_all("Cc", [])),
        subject=str(h.get("Subject", "")),
        msgid=str(h.get("Message-ID", "")).strip(),
        identificativo=identificativo,
        raw=raw,
        when=when,
        tipo_ricevuta=tipo,
        local=set(a.lower() for a in local),
    )


def daticert_xml(tipo: str, sub: Submission, gestore: str, *, errore: str = "nessuno",
                 ricevuta: str | None = None, consegna: str | None = None,
                 errore_esteso: str | None = None) -> bytes:
    """daticert.xml with the elements of the technical rules."""
    e = html.escape
    giorno, ora, zona = _rome(sub.when)
    dest = []
    for addr in sub.recipients:
        # In the sandbox every address is a PEC address ("certificato").
        dest.append(f'    <destinatari tipo="certificato">{e(addr)}</destinatari>')
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
        f"    <msgid>{e(sub.msgid)}</msgid>",
    ]
    if ricevuta:
        lines.append(f'    <ricevuta tipo="{e(ricevuta)}" />')
    if consegna:
        lines.append(f"    <consegna>{e(consegna)}</consegna>")
    if errore_esteso:
        lines.append(f"    <errore-esteso>{e(errore_esteso)}</errore-esteso>")
    lines += ["  </dati>", "</postacert>", ""]
    return "\r\n".join(lines).encode("utf-8")


def notice_text(kind: str, sub: Submission, *, recipient: str | None = None,
                error: str | None = None) -> str:
    giorno, ora, zona = _rome(sub.when)
    quando = f"Il giorno {giorno} alle ore {ora} ({zona})"
    if kind == "accettazione":
        dests = "\n".join(f'{a} ("posta certificata")' for a in sub.recipients)
        body = (f'Ricevuta di accettazione\n\n{quando} il messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\ned indirizzato a:\n{dests}\nè stato accettato dal sistema ed inoltrato.')
    elif kind == "avvenuta-consegna":
        body = (f'Ricevuta di avvenuta consegna\n\n{quando} il messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\ned indirizzato a "{recipient}"\nè stato consegnato nella casella di destinazione.')
    elif kind == "errore-consegna":
        body = (f'Avviso di mancata consegna\n\n{quando} nel messaggio\n"{sub.subject}" proveniente da '
                f'"{sub.sender}"\ned indirizzato a "{recipient}"\nè stato rilevato un errore: {error}.\n'
                "Il messaggio non è stato consegnato.")
    elif kind == "posta-certificata":
        dests = "\n".join(sub.recipients)
        body = (f'Messaggio di posta certificata\n\n{quando} il messaggio\n"{sub.subject}" è stato inviato da '
                f'"{sub.sender}"\nindirizzato a:\n{dests}\nIl messaggio originale è incluso in allegato '
                "(postacert.eml).")
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
                      message_id: str | None = None) -> bytes:
    """One PEC message (receipt or transport envelope) as bytes with CRLF line endings."""
    header_name, header_value, prefix = KINDS[kind]
    certifier = f"posta-certificata@{domain}"
    text = notice_text(kind, sub, recipient=recipient, error=errore_esteso)
    xml = daticert_xml(
        kind, sub, gestore, errore=errore, ricevuta=ricevuta,
        consegna=recipient if kind in ("avvenuta-consegna", "errore-consegna") else None,
        errore_esteso=errore_esteso,
    )
    b_signed, b_mixed, b_alt = _boundary("signed"), _boundary("mixed"), _boundary("alt")
    message_id = message_id or f"<opec{secrets.token_hex(6)}.{int(time.time())}@{domain}>"
    head = [
        ("Date", email.utils.format_datetime(sub.when)),
    ]
    if kind == "posta-certificata":
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
        ("Subject", encode_header_value(prefix + sub.subject)),
        ("Message-ID", message_id),
        (header_name, header_value),
        ("X-Riferimento-Message-ID", sub.msgid),
    ]
    if kind == "posta-certificata":
        head.append(("X-TipoRicevuta", sub.tipo_ricevuta))
    head += [
        ("MIME-Version", "1.0"),
        ("Content-Type", f'multipart/signed; protocol="application/x-pkcs7-signature"; '
                         f'micalg="sha-256"; boundary="{b_signed}"'),
    ]
    out = bytearray()
    for name, value in head:
        out += f"{name}: {value}".encode("utf-8") + CRLF
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
    out += b'Content-Type: application/x-pkcs7-signature; name="smime.p7s"' + CRLF
    out += b"Content-Transfer-Encoding: base64" + CRLF
    out += b'Content-Disposition: attachment; filename="smime.p7s"' + CRLF
    out += b"Content-Description: DUMMY signature - sandbox provider, not a real S/MIME signature" + CRLF + CRLF
    out += _b64(DUMMY_SIGNATURE) + CRLF
    out += f"--{b_signed}--".encode() + CRLF
    return bytes(out)


def receipts_for(sub: Submission, *, gestore: str, domain: str, failing=()) -> list[tuple[str, bytes]]:
    """Every message the provider delivers for an accepted submission, as (mailbox address,
    bytes): the acceptance and per-recipient delivery receipts go to the sender; transport
    envelopes go to local recipients."""
    failing = {a.lower() for a in failing}
    out = [(sub.sender, build_pec_message("accettazione", sub, gestore=gestore, domain=domain,
                                          to=[sub.sender]))]
    envelope = build_pec_message("posta-certificata", sub, gestore=gestore, domain=domain,
                                 to=sub.to, cc=sub.cc, postacert=sub.raw, message_id=sub.identificativo)
    for rcpt in sub.recipients:
        if rcpt.lower() in failing:
            out.append((sub.sender, build_pec_message(
                "errore-consegna", sub, gestore=gestore, domain=domain, to=[sub.sender], recipient=rcpt,
                errore="no-dest", errore_esteso=f"5.1.1 - {gestore} - indirizzo non valido")))
            continue
        if rcpt.lower() in sub.local:
            out.append((rcpt, envelope))
        # Cc recipients always get a "sintetica" receipt (technical rules).
        tipo = "sintetica" if rcpt in sub.cc and rcpt not in sub.to else sub.tipo_ricevuta
        postacert = {"completa": sub.raw, "breve": None, "sintetica": None}[tipo]
        if tipo == "breve":
            postacert = breve_copy(sub.raw)
        out.append((sub.sender, build_pec_message(
            "avvenuta-consegna", sub, gestore=gestore, domain=domain, to=[sub.sender], recipient=rcpt,
            postacert=postacert, ricevuta=tipo)))
    return out


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
            items = receipts_for(sub, gestore=self.c.gestore, domain=self.c.domain, failing=self.c.fail)
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
        ident = f"opec{secrets.token_hex(4)}.{when.strftime('%Y%m%d%H%M%S')}.{self.p.counter + 1}@{self.p.c.domain}"
        sub = submission_from(raw, sender, ident, when, local=self.p.c.local.keys())
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
