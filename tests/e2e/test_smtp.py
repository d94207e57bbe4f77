"""SMTP submission through pecgate to the sandbox PEC provider: real clients (smtplib,
swaks), the PEC formal checks, receipts in the Dovecot mailbox, the sent ledger and audit."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import re
import shutil
import smtplib
import subprocess
import threading
import time
from email.utils import make_msgid

import pytest

import harness
from harness import (FAILING_ADDRESS, HOST, PEC_DOMAIN, PROVIDER_ADDRESS, PecProvider, free_port,
                     make_big_message, make_message, quote, strip_trace_headers, wait_until)

ALTRO = f"altro@{PEC_DOMAIN}"
EXTERNAL = "ufficio@pec.altroente.test"


@pytest.fixture(scope="module")
def provider(dovecot):
    p = PecProvider(dovecot)
    with p:
        yield p


@pytest.fixture(scope="module")
def smtp_gw(dovecot, provider, pecgate_binary):
    with harness.Pecgate(dovecot, binary=pecgate_binary, smtp_url=provider.smtps_url).set_up() as gw:
        yield gw


@pytest.fixture
def make_smtp_gateway(make_gateway, provider):
    """``make_gateway`` with the mailbox's SMTP on the sandbox PEC provider by default."""

    def factory(**kwargs):
        kwargs.setdefault("smtp_url", provider.smtps_url)
        return make_gateway(**kwargs)

    return factory


@pytest.fixture
def smtp_clients():
    """Collects smtplib clients and closes them after the test."""

    def close(c):
        with contextlib.suppress(Exception):
            c.quit()
        c.close()

    with harness.tracking(close) as track:
        yield track


def pec_message(subject: str, to=(ALTRO,), cc=(), body: str = "", extra=None, msgid: str | None = None,
                sender: str = PROVIDER_ADDRESS) -> bytes:
    extra = dict(extra or {})
    if cc:
        extra["Cc"] = ", ".join(cc)
    return make_message(subject, body, sender=sender, to=", ".join(to), extra_headers=extra, msgid=msgid)


def submit(client: smtplib.SMTP, raw: bytes, rcpts, sender: str = PROVIDER_ADDRESS):
    """MAIL, RCPT..., DATA; returns the first non-2xx (code, text) or DATA's answer."""
    code, text = client.mail(sender)
    if code != 250:
        client.rset()
        return code, text
    for r in rcpts:
        code, text = client.rcpt(r)
        if code not in (250, 251):
            client.rset()
            return code, text
    return client.data(raw)


def accepted_with(provider: PecProvider, msgid: str) -> list[dict]:
    return [m for m in provider.accepted() if m["msgid"] == msgid]


def spool_is_empty(gw) -> bool:
    spool = gw.state_dir / "spool"
    return not spool.exists() or not any(spool.iterdir())


def search_mailbox(dovecot, user: str, header: str, value: str) -> list[bytes]:
    c = dovecot.imap_direct(user)
    try:
        c.select("INBOX", readonly=True)
        typ, data = c.uid("SEARCH", None, "HEADER", header, quote(value))
        uids = data[0].split() if typ == "OK" and data and data[0] else []
        out = []
        for uid in uids:
            typ, fetched = c.uid("FETCH", uid, "(BODY.PEEK[])")
            out += [part[1] for part in fetched if isinstance(part, tuple)]
        return out
    finally:
        c.logout()


# ---------------------------------------------------------------------------
# listeners, EHLO, AUTH
# ---------------------------------------------------------------------------


def test_ehlo_and_auth_only_after_tls(smtp_gw, smtp_clients):
    plain = smtp_clients(smtp_gw.smtp(tls=False))
    code, text = plain.ehlo("client.example")
    assert code == 250
    assert plain.has_extn("starttls")
    assert not plain.has_extn("auth"), text
    code, text = plain.docmd("AUTH", "PLAIN AG1hcmlvAHg=")
    assert (code, text[:5]) == (530, b"5.7.0"), (code, text)
    code, text = plain.docmd("MAIL", f"FROM:<{PROVIDER_ADDRESS}>")
    assert code == 530, (code, text)

    tls = smtp_clients(smtp_gw.smtp(tls="starttls"))
    tls.ehlo("client.example")
    assert tls.has_extn("auth") and set(tls.esmtp_features["auth"].upper().split()) == {"PLAIN", "LOGIN"}
    for ext in ("size", "8bitmime", "pipelining", "enhancedstatuscodes"):
        assert tls.has_extn(ext), (ext, tls.esmtp_features)
    assert not tls.has_extn("starttls")
    assert int(tls.esmtp_features["size"]) == 104857600

    implicit = smtp_clients(smtp_gw.smtp(tls=True))
    implicit.ehlo("client.example")
    assert implicit.has_extn("auth") and not implicit.has_extn("starttls")


def test_auth_failures_are_refused_with_535(smtp_gw, smtp_clients):
    c = smtp_clients(smtp_gw.smtp(tls=True))
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        c.login("mario", "wrong-password")
    assert err.value.smtp_code == 535 and err.value.smtp_error.startswith(b"5.7.8"), err.value
    c2 = smtp_clients(smtp_gw.smtp(tls=True))
    with pytest.raises(smtplib.SMTPAuthenticationError):
        c2.login("ghost", "whatever")
    # Unauthenticated MAIL is refused.
    c3 = smtp_clients(smtp_gw.smtp(tls=True))
    c3.ehlo()
    code, text = c3.mail(PROVIDER_ADDRESS)
    assert (code, text[:5]) == (530, b"5.7.0"), (code, text)


# ---------------------------------------------------------------------------
# sending
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("login,tls", [("mario", True), ("mario/studio", "starttls")])
def test_message_arrives_byte_identical(smtp_gw, provider, smtp_clients, login, tls):
    msgid = make_msgid(domain=PEC_DOMAIN)
    raw = pec_message(f"Invio da {login}", to=(ALTRO, EXTERNAL), msgid=msgid,
                      body="Gentile ufficio,\n\nsi trasmette la documentazione.\nàèìòù €\n")
    c = smtp_clients(smtp_gw.smtp(login, tls=tls))
    code, text = submit(c, raw, [ALTRO, EXTERNAL])
    assert code == 250, (code, text)
    # The client's answer is the provider's, relayed.
    assert b"queued as opec" in text, text
    got = accepted_with(provider, msgid)
    assert len(got) == 1, got
    meta = got[0]
    assert meta["mail_from"] == PROVIDER_ADDRESS
    assert meta["rcpts"] == [ALTRO, EXTERNAL]
    assert meta["login"] == PROVIDER_ADDRESS  # the mailbox's provider login, not mario's
    assert text.decode().endswith(meta["identificativo"])
    assert strip_trace_headers(meta["raw"]) == raw
    assert meta["raw"].startswith(b"Received: by "), meta["raw"][:200]
    trace = meta["raw"][: len(meta["raw"]) - len(raw)]
    assert b"mario" not in trace and b"127.0.0.1" not in trace, trace
    assert spool_is_empty(smtp_gw)


def test_dot_stuffing_both_ways(smtp_gw, provider, smtp_clients):
    msgid = make_msgid(domain=PEC_DOMAIN)
    body = ".\n..\n.leading dot\n...three\nnormal\n. space\n"
    raw = pec_message("Punti", msgid=msgid, body=body)
    c = smtp_clients(smtp_gw.smtp("mario"))
    code, text = submit(c, raw, [ALTRO])
    assert code == 250, (code, text)
    got = accepted_with(provider, msgid)
    assert strip_trace_headers(got[0]["raw"]) == raw
    assert b"\r\n.\r\n..\r\n.leading dot\r\n...three\r\n" in got[0]["raw"]


def test_swaks_plain_and_login(smtp_gw, provider):
    if shutil.which("swaks") is None:
        pytest.skip("swaks not installed")
    for args, auth in ((["--tls-on-connect", "--port", str(smtp_gw.smtp_tls_port)], "PLAIN"),
                       (["--tls", "--port", str(smtp_gw.smtp_starttls_port)], "LOGIN")):
        msgid = make_msgid(domain=PEC_DOMAIN)
        res = subprocess.run(
            ["swaks", "--server", HOST, *args, "--auth", auth, "--auth-user", "mario",
             "--auth-password", smtp_gw.password("mario"), "--from", PROVIDER_ADDRESS, "--to", ALTRO,
             "--header", f"Message-Id: {msgid}", "--header", f"Subject: swaks {auth}",
             "--body", "Messaggio inviato con swaks.\n.riga con punto\n"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, stdin=subprocess.DEVNULL)
        out = res.stdout.decode(errors="replace")
        assert res.returncode == 0, out
        assert re.search(r"<~  250 2\.0\.0 Ok: queued as opec", out), out
        assert "mario-" not in out.split("AUTH", 1)[0]
        got = accepted_with(provider, msgid)
        assert len(got) == 1, out
        assert b"\r\n.riga con punto\r\n" in got[0]["raw"]


def test_message_id_generated_when_missing(smtp_gw, provider, smtp_clients, dovecot):
    raw = pec_message("Senza identificativo")
    raw = re.sub(rb"(?im)^Message-ID:[^\r\n]*\r\n", b"", raw)
    assert b"\r\nMessage-ID:" not in raw
    before = provider.accepted_count()
    c = smtp_clients(smtp_gw.smtp("mario"))
    code, text = submit(c, raw, [ALTRO])
    assert code == 250, (code, text)
    new = provider.accepted()[before:]
    assert len(new) == 1
    relayed = strip_trace_headers(new[0]["raw"])
    m = re.match(rb"Message-ID: (<pecgate\.\d+\.[0-9a-f]{16}@" + re.escape(PEC_DOMAIN.encode()) + rb">)\r\n",
                 relayed)
    assert m, relayed[:300]
    assert relayed[m.end():] == raw
    msgid = m.group(1).decode()
    assert new[0]["msgid"] == msgid
    rows = smtp_gw.ledger_rows("message_id = ?", (msgid,))
    assert len(rows) == 1 and rows[0]["generated_id"] == 1, rows
    # Receipts are matched on it.
    wait_until(lambda: search_mailbox(dovecot, PROVIDER_ADDRESS, "X-Riferimento-Message-ID", msgid), 30,
               "the acceptance receipt of the message with a generated Message-ID")


def test_receipts_land_in_the_mailbox(smtp_gw, provider, smtp_clients, dovecot):
    msgid = make_msgid(domain=PEC_DOMAIN)
    raw = pec_message("Fattura n. 7", to=(ALTRO, FAILING_ADDRESS), cc=(EXTERNAL,), msgid=msgid,
                      body="In allegato la fattura.\n")
    c = smtp_clients(smtp_gw.smtp("mario"))
    code, text = submit(c, raw, [ALTRO, FAILING_ADDRESS, EXTERNAL])
    assert code == 250, (code, text)
    ident = text.decode().rsplit(" ", 1)[-1]

    def receipts():
        found = search_mailbox(dovecot, PROVIDER_ADDRESS, "X-Riferimento-Message-ID", msgid)
        return found if len(found) >= 4 else None

    found = wait_until(receipts, 30, "acceptance + 2 delivery receipts + 1 non-delivery notice")
    by_kind = {}
    for r in found:
        m = email.message_from_bytes(r, policy=email.policy.default)
        by_kind.setdefault(str(m["X-Ricevuta"]), []).append(m)
    assert sorted((k, len(v)) for k, v in by_kind.items()) == [
        ("accettazione", 1), ("avvenuta-consegna", 2), ("errore-consegna", 1)], by_kind.keys()

    acc = by_kind["accettazione"][0]
    assert str(acc["Subject"]) == "ACCETTAZIONE: Fattura n. 7"
    assert str(acc["From"]) == f"posta-certificata@{PEC_DOMAIN}"
    assert acc.get_content_type() == "multipart/signed"
    assert acc.get_param("protocol") == "application/x-pkcs7-signature"
    signed, signature = acc.get_payload()
    assert signed.get_content_type() == "multipart/mixed"
    assert signature.get_content_type() == "application/x-pkcs7-signature"
    assert b"NOT A REAL S/MIME SIGNATURE" in signature.get_payload(decode=True)
    parts = signed.get_payload()
    assert parts[0].get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in parts[0].get_payload()] == ["text/plain", "text/html"]
    xml = parts[1].get_payload(decode=True).decode()
    assert parts[1].get_filename() == "daticert.xml"
    assert '<postacert tipo="accettazione" errore="nessuno">' in xml
    assert f"<identificativo>{ident}</identificativo>" in xml
    assert f"<msgid>{msgid.replace('<', '&lt;').replace('>', '&gt;')}</msgid>" in xml
    assert len(parts) == 2, "an acceptance receipt carries no postacert.eml"

    deliveries = {}
    for m in by_kind["avvenuta-consegna"]:
        assert str(m["Subject"]) == "CONSEGNA: Fattura n. 7"
        mixed = m.get_payload()[0].get_payload()
        xml = mixed[1].get_payload(decode=True).decode()
        rcpt = re.search(r"<consegna>([^<]+)</consegna>", xml).group(1)
        deliveries[rcpt] = (xml, mixed)
    assert set(deliveries) == {ALTRO, EXTERNAL}
    # To recipient: "completa" with the original as postacert.eml; Cc: always "sintetica".
    xml, mixed = deliveries[ALTRO]
    assert '<ricevuta tipo="completa" />' in xml
    assert mixed[2].get_filename() == "postacert.eml"
    xml, mixed = deliveries[EXTERNAL]
    assert '<ricevuta tipo="sintetica" />' in xml and len(mixed) == 2

    err = by_kind["errore-consegna"][0]
    assert str(err["Subject"]) == "AVVISO DI MANCATA CONSEGNA: Fattura n. 7"
    xml = err.get_payload()[0].get_payload()[1].get_payload(decode=True).decode()
    assert 'errore="no-dest"' in xml and f"<consegna>{FAILING_ADDRESS}</consegna>" in xml
    assert "<errore-esteso>5.1.1" in xml

    # The local recipient gets the transport envelope.
    envelopes = wait_until(lambda: search_mailbox(dovecot, ALTRO, "X-Riferimento-Message-ID", msgid), 30,
                           "the transport envelope in the recipient's mailbox")
    env = email.message_from_bytes(envelopes[0], policy=email.policy.default)
    assert str(env["X-Trasporto"]) == "posta-certificata"
    assert str(env["Subject"]) == "POSTA CERTIFICATA: Fattura n. 7"
    assert str(env["Reply-To"]) == PROVIDER_ADDRESS
    assert str(env["From"]).startswith(f'"Per conto di: {PROVIDER_ADDRESS}"')
    assert str(env["Message-ID"]) == ident
    postacert = env.get_payload()[0].get_payload()[2]
    assert postacert.get_filename() == "postacert.eml"


# ---------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------


FORMAL_CASES = [
    # (name, sender, header From, to, cc, rcpts, extra headers, expected code, enhanced, text)
    ("envelope sender", "mario.rossi@gmail.com", PROVIDER_ADDRESS, [ALTRO], [], [ALTRO], {},
     553, b"5.7.1", b"Sender address rejected: PEC mailbox studio can only send as " + PROVIDER_ADDRESS.encode()),
    ("From header", PROVIDER_ADDRESS, "mario.rossi@gmail.com", [ALTRO], [], [ALTRO], {},
     554, b"5.7.1", b"The From header must be exactly this mailbox's PEC address"),
    ("Bcc", PROVIDER_ADDRESS, PROVIDER_ADDRESS, [ALTRO], [], [ALTRO, EXTERNAL], {"Bcc": EXTERNAL},
     554, b"5.7.0", b"PEC does not allow Bcc recipients: move them to To or Cc"),
    ("hidden recipient", PROVIDER_ADDRESS, PROVIDER_ADDRESS, [ALTRO], [], [ALTRO, EXTERNAL], {},
     554, b"5.1.0", b"PEC requires every recipient to appear in To or Cc, and " + EXTERNAL.encode()),
    ("To not in envelope", PROVIDER_ADDRESS, PROVIDER_ADDRESS, [ALTRO], [EXTERNAL], [ALTRO], {},
     554, b"5.1.0", EXTERNAL.encode() + b" is in To or Cc but was not given as a recipient"),
    ("unparseable To", PROVIDER_ADDRESS, PROVIDER_ADDRESS, ["Ufficio Protocollo"], [], [ALTRO], {},
     554, b"5.6.0", b"The message cannot be checked for PEC: the To header cannot be parsed"),
]


@pytest.mark.parametrize("case", FORMAL_CASES, ids=[c[0] for c in FORMAL_CASES])
def test_formal_check_violations_are_refused(smtp_gw, provider, smtp_clients, case):
    name, sender, header_from, to, cc, rcpts, extra, code, enhanced, text = case
    before = provider.accepted_count()
    msgid = make_msgid(domain=PEC_DOMAIN)
    raw = pec_message(f"Violazione: {name}", to=to, cc=cc, extra=extra, msgid=msgid, sender=header_from)
    c = smtp_clients(smtp_gw.smtp("mario"))
    got_code, got_text = submit(c, raw, rcpts, sender=sender)
    assert got_code == code, (got_code, got_text)
    assert got_text.startswith(enhanced + b" "), got_text
    assert text in got_text.replace(b"\n", b""), got_text
    # The session goes on after a refusal.
    assert c.noop()[0] == 250
    assert provider.accepted_count() == before, "a refused message reached the provider"
    assert not smtp_gw.ledger_rows("message_id = ?", (msgid,))
    assert spool_is_empty(smtp_gw)


def test_size_times_recipients(make_smtp_gateway, provider, smtp_clients):
    gw = make_smtp_gateway(mailbox_options={"max_message_bytes": 20000})
    before = provider.accepted_count()
    raw = pec_message("Troppo grande", to=(ALTRO, EXTERNAL), body="x" * 70 + "\n" * 1 + ("y" * 78 + "\n") * 150)
    assert 10000 < len(raw) < 20000
    c = smtp_clients(gw.smtp("mario"))
    assert int(c.ehlo()[0]) == 250 and int(c.esmtp_features["size"]) == 20000
    # Declared with SIZE: refused at the second RCPT.
    assert c.mail(PROVIDER_ADDRESS, [f"SIZE={len(raw)}"])[0] == 250
    assert c.rcpt(ALTRO)[0] == 250
    code, text = c.rcpt(EXTERNAL)
    assert (code, text[:6]) == (552, b"5.2.3 "), (code, text)
    assert b"exceeds this mailbox's limit" in text
    c.rset()
    # Not declared: refused at the end of DATA.
    code, text = submit(c, raw, [ALTRO, EXTERNAL])
    assert (code, text[:6]) == (552, b"5.2.3 "), (code, text)
    # One recipient fits.
    code, text = submit(c, raw.replace(f", {EXTERNAL}".encode(), b""), [ALTRO])
    assert code == 250, (code, text)
    assert provider.accepted_count() == before + 1
    assert spool_is_empty(gw)


def test_user_without_send_permission_is_refused(smtp_gw, provider, smtp_clients):
    before = provider.accepted_count()
    c = smtp_clients(smtp_gw.smtp("anna"))  # role reception: read, flag
    code, text = c.mail(PROVIDER_ADDRESS)
    assert (code, text[:6]) == (550, b"5.7.1 "), (code, text)
    assert b"You may not send from mailbox studio" in text and b"send permission" in text
    assert c.rcpt(ALTRO)[0] == 503
    assert provider.accepted_count() == before


def test_send_rate_answers_4xx(make_smtp_gateway, provider, smtp_clients):
    gw = make_smtp_gateway(mailbox_options={"send_rate": "2/min"})
    before = provider.accepted_count()
    c = smtp_clients(gw.smtp("mario"))
    for i in range(2):
        code, text = submit(c, pec_message(f"Rate {i}"), [ALTRO])
        assert code == 250, (code, text)
    code, text = c.mail(PROVIDER_ADDRESS)
    assert (code, text[:6]) == (451, b"4.7.0 "), (code, text)
    assert b"at most 2/min messages" in text and b"try again in" in text
    assert provider.accepted_count() == before + 2


def test_provider_down_gives_4xx_and_nothing_is_kept(make_smtp_gateway, provider, smtp_clients):
    gw = make_smtp_gateway(smtp_url=f"smtps://{HOST}:{free_port()}")
    msgid = make_msgid(domain=PEC_DOMAIN)
    c = smtp_clients(gw.smtp("mario"))
    t0 = time.monotonic()
    code, text = submit(c, pec_message("Provider giù", msgid=msgid), [ALTRO])
    assert (code, text[:6]) == (451, b"4.4.1 "), (code, text)
    assert b"nothing was sent" in text
    assert time.monotonic() - t0 < 20
    rows = gw.ledger_rows("message_id = ?", (msgid,))
    assert [r["status"] for r in rows] == ["failed"], rows
    assert spool_is_empty(gw)
    assert c.noop()[0] == 250


def test_provider_rejection_is_relayed_faithfully(dovecot, pecgate_binary, make_smtp_gateway, smtp_clients):
    with PecProvider(dovecot, rate=(1, 3600)) as strict:
        gw = make_smtp_gateway(smtp_url=strict.smtp_url)  # smtp:// with mandatory STARTTLS
        c = smtp_clients(gw.smtp("mario"))
        code, text = submit(c, pec_message("Primo"), [ALTRO])
        assert code == 250, (code, text)
        msgid = make_msgid(domain=PEC_DOMAIN)
        code, text = submit(c, pec_message("Secondo", msgid=msgid), [ALTRO])
        assert (code, text) == (550, b"5.7.1 Too much traffic from this sender")
        assert strict.accepted_count() == 1
        rows = gw.ledger_rows("message_id = ?", (msgid,))
        assert rows[0]["status"] == "rejected"
        assert rows[0]["provider_reply"] == "550 5.7.1 Too much traffic from this sender"


def test_ledger_and_audit_rows(smtp_gw, provider, smtp_clients):
    msgid = make_msgid(domain=PEC_DOMAIN)
    raw = pec_message("=?UTF-8?Q?Convocazione_riunione_=E2=82=AC?=", to=(ALTRO,), cc=(EXTERNAL,), msgid=msgid)
    mark = max([r["id"] for r in smtp_gw.audit_rows()] or [0])
    c = smtp_gw.smtp("mario/studio")
    code, text = submit(c, raw, [ALTRO, EXTERNAL])
    assert code == 250, (code, text)
    c.quit()

    rows = smtp_gw.ledger_rows("message_id = ?", (msgid,))
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["user"], row["mailbox"], row["sender"]) == ("mario", "studio", PROVIDER_ADDRESS)
    assert json.loads(row["recipients"]) == [ALTRO, EXTERNAL]
    assert row["subject"] == "Convocazione riunione €"
    assert row["status"] == "accepted"
    assert row["provider_reply"] == text.decode().join(["250 ", ""])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", row["submitted_at"]), row
    accepted = accepted_with(provider, msgid)[0]
    assert row["size"] == len(accepted["raw"])
    assert row["generated_id"] == 0

    shown = smtp_gw.cli("ledger", "show", "--user", "mario")
    assert shown.returncode == 0, shown.stderr
    assert msgid in shown.stdout.decode()

    def audited():
        rows = smtp_gw.audit_rows("id > ? AND protocol = 'smtp'", (mark,))
        commands = [(r["command"], r["outcome"]) for r in rows]
        return rows if ("logout", "ok") in commands else None

    rows = wait_until(audited, 10, "the audit rows of the SMTP session")
    session = rows[-1]["session"]
    rows = [r for r in rows if r["session"] == session]
    commands = [(r["command"], r["outcome"]) for r in rows]
    assert commands == [("EHLO", "ok"), ("AUTH", "ok"), ("MAIL", "ok"), ("RCPT", "ok"), ("RCPT", "ok"),
                        ("DATA", "ok"), ("QUIT", "ok"), ("logout", "ok")], commands
    auth = rows[1]
    assert 'login="mario/studio"' in auth["detail"] and auth["user"] == "mario" and auth["mailbox"] == "studio"
    data = rows[5]
    assert f"message-id={msgid}" in data["detail"] and "provider=\"250 2.0.0" in data["detail"]
    password = smtp_gw.password("mario")
    for r in smtp_gw.audit_rows():
        assert password not in r["detail"], r
    assert smtp_gw.cli("audit", "verify").returncode == 0


def test_big_message_relays_with_flat_memory(smtp_gw, provider, smtp_clients):
    size = 30 * 1024 * 1024
    raw = make_big_message(size, subject="30 MB")
    raw = raw.replace(b"From: mittente@pec.example.test", f"From: {PROVIDER_ADDRESS}".encode(), 1)
    raw = raw.replace(f"To: {PROVIDER_ADDRESS}".encode(), f"To: {EXTERNAL}\r\nX-TipoRicevuta: sintetica".encode(), 1)
    msgid = harness.message_id_of(raw)
    pid = smtp_gw.proc.pid

    def rss_kib() -> int:
        status = open(f"/proc/{pid}/status").read()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    c = smtp_clients(smtp_gw.smtp("mario", timeout=300))
    c.noop()
    baseline = rss_kib()
    peak = baseline
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kib())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        t0 = time.monotonic()
        code, text = submit(c, raw, [EXTERNAL])
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        sampler.join()
    assert code == 250, (code, text)
    got = accepted_with(provider, msgid)
    assert len(got) == 1 and strip_trace_headers(got[0]["raw"]) == raw
    growth_mib = (peak - baseline) / 1024
    print(f"30 MiB relay: {elapsed:.1f}s, pecgate RSS {baseline / 1024:.1f} MiB -> peak {peak / 1024:.1f} MiB "
          f"(+{growth_mib:.1f} MiB)")
    assert growth_mib < 8, f"RSS grew by {growth_mib:.1f} MiB while relaying a 30 MiB message"
    assert spool_is_empty(smtp_gw)


# ---------------------------------------------------------------------------
# on the wire
# ---------------------------------------------------------------------------


class RawSmtp:
    """Line-level SMTP over implicit TLS, for the tests that must control the bytes."""

    def __init__(self, gw, timeout: float = 30):
        import socket
        ctx = harness.tls_context(gw.cert)
        sock = socket.create_connection((HOST, gw.smtp_tls_port), timeout=timeout)
        self.sock = ctx.wrap_socket(sock, server_hostname=HOST)
        self.buf = b""
        self.greeting = self.reply()

    def reply(self) -> bytes:
        """One complete (possibly multi-line) reply, without the final CRLF."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"closed; got {lines!r} {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def send(self, data: bytes):
        self.sock.sendall(data)

    def cmd(self, line: str) -> bytes:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


def _raw_login(gw) -> RawSmtp:
    import base64
    r = RawSmtp(gw)
    assert r.cmd("EHLO raw.client").startswith(b"250-")
    token = base64.b64encode(b"\0mario\0" + gw.password("mario").encode()).decode()
    assert r.cmd(f"AUTH PLAIN {token}").startswith(b"235 2.7.0"), "login failed"
    return r


def test_pipelining_and_smuggling_attempt(smtp_gw, provider):
    before = provider.accepted_count()
    r = _raw_login(smtp_gw)
    try:
        # Pipelined envelope in one write.
        r.send(f"MAIL FROM:<{PROVIDER_ADDRESS}>\r\nRCPT TO:<{ALTRO}>\r\nDATA\r\n".encode())
        assert r.reply().startswith(b"250 2.1.0")
        assert r.reply().startswith(b"250 2.1.5")
        assert r.reply().startswith(b"354")
        # A bare-LF "end of data" followed by a smuggled transaction: not an end for
        # pecgate, and a message pecgate will not relay.
        r.send(f"From: {PROVIDER_ADDRESS}\r\nTo: {ALTRO}\r\nSubject: x\r\n\r\nciao\n.\r\n"
               f"MAIL FROM:<{PROVIDER_ADDRESS}>\r\nRCPT TO:<{EXTERNAL}>\r\nDATA\r\n"
               f"From: {PROVIDER_ADDRESS}\r\nTo: {EXTERNAL}\r\n\r\nsmuggled\r\n.\r\n".encode())
        reply = r.reply()
        assert reply.startswith(b"554 5.6.0 "), reply
        assert b"bare CR or LF" in reply
        # Exactly one reply: the smuggled commands were message data.
        assert r.cmd("NOOP").startswith(b"250 2.0.0")
        assert r.cmd("QUIT").startswith(b"221")
    finally:
        r.close()
    assert provider.accepted_count() == before
    assert spool_is_empty(smtp_gw)


def test_unknown_and_unsupported_commands(smtp_gw):
    r = _raw_login(smtp_gw)
    try:
        assert r.cmd("FROB x").startswith(b"500 5.5.2")
        assert r.cmd("VRFY mario").startswith(b"502 5.5.1")
        assert r.cmd("BDAT 10 LAST").startswith(b"502 5.5.1")
        assert r.cmd(f"RCPT TO:<{ALTRO}>").startswith(b"503 5.5.1")
        assert r.cmd("DATA").startswith(b"503 5.5.1")
        assert r.cmd(f"MAIL FROM:<{PROVIDER_ADDRESS}> SMTPUTF8").startswith(b"555 5.5.4")
        assert r.cmd(f"MAIL FROM:<{PROVIDER_ADDRESS}>").startswith(b"250")
        assert r.cmd(f"MAIL FROM:<{PROVIDER_ADDRESS}>").startswith(b"503 5.5.1")
        assert r.cmd("DATA").startswith(b"554 5.5.1")
        assert r.cmd("RSET").startswith(b"250 2.0.0")
        assert r.cmd("AUTH PLAIN AGEAYg==").startswith(b"503 5.5.1")
    finally:
        r.close()


def test_sigterm_says_421_and_exits_zero(make_smtp_gateway):
    import signal
    gw = make_smtp_gateway()
    r = _raw_login(gw)
    try:
        gw.proc.send_signal(signal.SIGTERM)
        reply = r.reply()
        assert reply.startswith(b"421 4.3.2"), reply
        assert gw.stop(timeout=15) == 0, gw.log_text()
    finally:
        r.close()
