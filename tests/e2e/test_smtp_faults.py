"""SMTP submission when the provider misbehaves, and SMTP smuggling, end to end.

Provider failures, each against the sandbox PEC provider with one of its fault knobs
(``pec_provider.FAULTS``): a 4xx after the final dot, refused recipients, the connection
dropped after the final dot (the message may have left: ledger ``unknown``, ``451 4.4.2`` to the
client, and the client's retry of the same Message-ID refused ``554 5.7.1`` without reaching the
provider), no STARTTLS on an ``smtp://`` URL (fail closed before AUTH), and a provider that stops
answering (before the message: ``451 4.4.1`` "nothing was sent", ledger ``failed``; after the
final dot: as for the drop).

Smuggling: every bare-CR/LF (and NUL) "end of data" a lenient server has been known to accept,
embedded in a message and followed by a smuggled ``MAIL/RCPT/DATA`` transaction, sent to
pecgate in one write, split in two at every byte around the fake terminator, and one byte per
write there. The provider behind pecgate is itself lenient (it ends data at any of those
sequences and drops NUL bytes, as the vulnerable servers did), so a smuggled transaction that
got through would show up in its journal as a second envelope.

Split writes are made to reach pecgate's DATA receiver separately: after each write the test
waits until pecgate's socket has nothing left to read (``/proc/net/tcp``), so the next write
cannot be coalesced with it.

The three stall tests give their pecgate a short provider timeout (``[gateway]
provider_timeout_secs``, ``STALL_TIMEOUT``) and wait it out: a few seconds each.
"""

from __future__ import annotations

import base64
import contextlib
import re
import smtplib
import socket
import time
from email.utils import make_msgid

import pytest

import harness
from harness import HOST, PEC_DOMAIN, PROVIDER_ADDRESS, PecProvider, wait_until
from test_smtp import (ALTRO, EXTERNAL, RawSmtp, accepted_with, pec_message, smtp_clients,  # noqa: F401
                       spool_is_empty, submit)

# The provider timeout the stall tests configure (`[gateway] provider_timeout_secs`, default
# 60 s): connect, TLS, greeting, EHLO, AUTH, every command reply and the answer to the final dot.
STALL_TIMEOUT = 4
STALL_OPTIONS = {"provider_timeout_secs": STALL_TIMEOUT}
# What a client may wait on top of it for pecgate's 4xx.
SLACK = 10

# pecgate's own answers (src/smtp/session.rs).
UNREACHABLE = b"4.4.1 The PEC provider cannot be reached right now; nothing was sent, try again later"


def unconfirmed(msgid: str) -> bytes:
    """The 451 text when the final dot went out and no answer came back."""
    return (f"4.4.2 The PEC provider did not confirm the message (Message-ID {msgid}): it may have been "
            f"sent. Check its receipts before sending it again; pecgate will not send it twice").encode()


def duplicate(msgid: str, at: str, status: str) -> bytes:
    """The 554 text for a Message-ID the mailbox already handed to the provider."""
    return (f"5.7.1 This message (Message-ID {msgid}) was already handed to the PEC provider at {at} "
            f"(status {status}); it is not sent again. Check its receipts; to send it anyway, send it "
            f"as a new message").encode()


BAD_BYTES = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture
def faulty(dovecot, make_gateway):
    """``faulty(faults, url="smtps"|"smtp", gateway_options=None)`` -> (gateway, provider): a
    sandbox provider with these fault knobs and a fresh pecgate (with these ``[gateway]``
    options) whose mailbox sends through it."""
    with contextlib.ExitStack() as stack:
        def factory(faults: dict, url: str = "smtps", gateway_options: dict | None = None):
            provider = stack.enter_context(PecProvider(dovecot, faults=faults))
            gw = make_gateway(smtp_url=provider.smtps_url if url == "smtps" else provider.smtp_url,
                              gateway_options=gateway_options)
            return gw, provider

        yield factory


def commands(events) -> list[str]:
    """The verbs a provider connection received, in order."""
    return [e["cmd"].split(" ", 1)[0].upper() for e in events if "cmd" in e]


def ledger_status(gw, msgid: str) -> list[str]:
    return [r["status"] for r in gw.ledger_rows("message_id = ?", (msgid,))]


def provider_copies(provider: PecProvider, msgid: str) -> int:
    return len(accepted_with(provider, msgid))


def data_reply(code: int, text: bytes) -> str:
    return f"{code} {text.decode(errors='replace')}"


def data_audit(gw, msgid: str, count: int) -> list[tuple[str, str]]:
    """(outcome, detail) of the SMTP DATA audit rows naming ``msgid``, once there are
    ``count`` of them (a refusal's row is not written synchronously with the reply)."""
    def rows():
        found = [(r["outcome"], r["detail"]) for r in gw.audit_rows("protocol = 'smtp' AND command = 'DATA'")
                 if f"message-id={msgid} " in r["detail"]]
        return found if len(found) >= count else None

    return wait_until(rows, 10, f"{count} DATA audit row(s) for {msgid}")


def data_ends(provider: PecProvider) -> list[dict]:
    """Every end of data the provider received, over all its connections."""
    return [e for es in provider.sessions().values() for e in es if e.get("data_end")]


def assert_retry_is_refused(gw, provider, c, raw: bytes, msgid: str):
    """The client sends the very same message again (as a client does after a 4xx): pecgate
    refuses it 554 5.7.1 naming the earlier ``unknown`` row, records the refusal, and the
    provider is not contacted again; the session goes on."""
    (row,) = gw.ledger_rows("message_id = ?", (msgid,))
    connections = provider.last_connection()
    code, text = submit(c, raw, [ALTRO])
    assert (code, text) == (554, duplicate(msgid, row["submitted_at"], "unknown")), (code, text)
    assert provider.last_connection() == connections, provider.journal()[-5:]
    assert provider_copies(provider, msgid) == 1
    assert len(data_ends(provider)) == 1, data_ends(provider)
    # Still one ledger row, still unknown: the refusal sent nothing.
    assert [r["status"] for r in gw.ledger_rows("message_id = ?", (msgid,))] == ["unknown"]
    audit = data_audit(gw, msgid, 2)
    assert len(audit) == 2, audit
    outcome, detail = audit[1]
    assert outcome == "denied" and "refused=duplicate" in detail and "earlier=unknown" in detail, audit[1]
    assert c.noop()[0] == 250


def assert_unknown_recorded(gw, msgid: str, text: bytes):
    """One ledger row, ``unknown``, with pecgate's 451 as its reply; one DATA audit row,
    outcome ``error``."""
    rows = gw.ledger_rows("message_id = ?", (msgid,))
    assert [(r["status"], r["provider_reply"]) for r in rows] == [("unknown", f"451 {text.decode()}")], rows
    audit = data_audit(gw, msgid, 1)
    assert len(audit) == 1, audit
    outcome, detail = audit[0]
    assert outcome == "error" and "upstream-error=" in detail and "it may have been sent" in detail, audit[0]


def timed_submit(c, raw: bytes, what: str):
    """``submit`` to a client whose socket timeout is STALL_TIMEOUT + SLACK; returns
    (code, text, seconds taken)."""
    t0 = time.monotonic()
    try:
        code, text = submit(c, raw, [ALTRO])
    except (TimeoutError, socket.timeout, smtplib.SMTPServerDisconnected) as exc:
        pytest.fail(f"{what}: no answer within {STALL_TIMEOUT + SLACK} s with provider_timeout_secs = "
                    f"{STALL_TIMEOUT} ({exc!r})")
    return code, text, time.monotonic() - t0


# ---------------------------------------------------------------------------
# the provider answers 4xx at the end of DATA
# ---------------------------------------------------------------------------

TEMPFAIL_CASES = [
    ("451", "451 4.3.0 Temporary local problem - please try later", b"4.3.0 Temporary local problem - please try later",
     "451 4.3.0 Temporary local problem - please try later"),
    ("452", "452 4.3.1 Insufficient system storage", b"4.3.1 Insufficient system storage",
     "452 4.3.1 Insufficient system storage"),
    ("multi-line", ["450 4.7.1 Greylisted", "450 4.7.1 please retry in 5 minutes"],
     b"4.7.1 Greylisted\n4.7.1 please retry in 5 minutes", "450 4.7.1 Greylisted / please retry in 5 minutes"),
    ("no enhanced code", "451 Try again later", b"4.0.0 Try again later", "451 4.0.0 Try again later"),
]


@pytest.mark.parametrize("name,fault,client_text,ledger_reply", TEMPFAIL_CASES, ids=[c[0] for c in TEMPFAIL_CASES])
def test_4xx_after_the_final_dot_is_relayed_and_nothing_is_kept(faulty, smtp_clients, name, fault, client_text,
                                                                 ledger_reply):
    gw, provider = faulty({"data_end": fault})
    msgid = make_msgid(domain=PEC_DOMAIN)
    c = smtp_clients(gw.smtp("mario"))
    code, text = submit(c, pec_message(f"Tempfail {name}", msgid=msgid), [ALTRO])
    # The client's answer is the provider's, line by line (an enhanced code added where the
    # provider gave none, since pecgate advertises ENHANCEDSTATUSCODES).
    assert (code, text) == (int(ledger_reply[:3]), client_text)
    # The provider really did receive the whole message, and kept nothing.
    ends = [e for es in provider.sessions().values() for e in es if e.get("data_end")]
    assert len(ends) == 1 and ends[0]["rcpts"] == [ALTRO], ends
    assert provider.accepted_count() == 0
    rows = gw.ledger_rows("message_id = ?", (msgid,))
    assert [(r["status"], r["provider_reply"]) for r in rows] == [("failed", ledger_reply)], rows
    assert spool_is_empty(gw)
    # The session goes on: the client can retry.
    assert c.noop()[0] == 250


# ---------------------------------------------------------------------------
# the provider refuses some recipients
# ---------------------------------------------------------------------------

RCPT_CASES = [
    # (id, refused recipient, provider's RCPT answer, ledger status)
    ("second 550", EXTERNAL, f"550 5.1.1 <{EXTERNAL}>: Recipient address rejected: User unknown", "rejected"),
    ("first 550", ALTRO, f"550 5.1.1 <{ALTRO}>: Recipient address rejected: User unknown", "rejected"),
    ("second 450", EXTERNAL, f"450 4.2.1 <{EXTERNAL}>: Recipient address rejected: try again later", "failed"),
]


@pytest.mark.parametrize("name,refused,answer,status", RCPT_CASES, ids=[c[0] for c in RCPT_CASES])
def test_a_refused_recipient_refuses_the_whole_message(faulty, smtp_clients, name, refused, answer, status):
    """pecgate accepts RCPT itself (the provider is reached only once the message has passed
    every check), so the provider's refusal of one recipient comes back as the answer to the
    end of DATA: the whole message is refused, for every recipient (a PEC names all its
    recipients in To/Cc: it is never sent to a subset), and the ledger says so."""
    gw, provider = faulty({"rcpt": {refused.lower(): answer}})
    msgid = make_msgid(domain=PEC_DOMAIN)
    c = smtp_clients(gw.smtp("mario"))
    assert c.mail(PROVIDER_ADDRESS)[0] == 250
    for r in (ALTRO, EXTERNAL):
        code, text = c.rcpt(r)
        assert (code, text) == (250, f"2.1.5 Recipient <{r}> OK".encode()), (r, code, text)
    code, text = c.data(pec_message(f"Destinatari: {name}", to=(ALTRO, EXTERNAL), msgid=msgid))
    assert data_reply(code, text) == answer
    sessions = list(provider.sessions().values())
    assert len(sessions) == 1, sessions
    verbs = commands(sessions[0])
    # pecgate stopped at the refusal: no DATA, the transaction reset, no recipient got it.
    assert [v for v in verbs if v in ("MAIL", "RCPT", "RSET", "DATA")] == (
        ["MAIL", "RCPT", "RSET"] if refused == ALTRO else ["MAIL", "RCPT", "RCPT", "RSET"]), verbs
    assert provider.accepted_count() == 0
    rows = gw.ledger_rows("message_id = ?", (msgid,))
    assert [(r["status"], r["provider_reply"]) for r in rows] == [(status, answer)], rows
    assert spool_is_empty(gw)
    assert c.noop()[0] == 250


# ---------------------------------------------------------------------------
# the connection drops after the final dot: the message may have left
# ---------------------------------------------------------------------------


def test_drop_after_final_dot_is_unknown_and_the_retry_is_not_sent_twice(faulty, smtp_clients):
    """The provider takes the message (it has left: receipts will come) and drops the
    connection before answering; a later connection would be served normally. The ledger says
    ``unknown``, the client gets 451 4.4.2 (which does not claim nothing was sent), and the
    client's retry of the same message is refused 554 5.7.1 without reaching the provider."""
    gw, provider = faulty({"data_end": "close", "connections": 1})
    msgid = make_msgid(domain=PEC_DOMAIN)
    raw = pec_message("Caduta dopo il punto", msgid=msgid)
    c = smtp_clients(gw.smtp("mario"))

    code, text = submit(c, raw, [ALTRO])
    assert (code, text) == (451, unconfirmed(msgid)), (code, text)
    assert provider_copies(provider, msgid) == 1
    (end,) = data_ends(provider)
    assert end["rcpts"] == [ALTRO], end
    assert any(e.get("event") == "dropped" for es in provider.sessions().values() for e in es)
    assert_unknown_recorded(gw, msgid, text)
    shown = gw.cli("ledger", "show", "--message-id", msgid)
    assert shown.returncode == 0, shown.stderr
    assert "-> unknown" in shown.stdout.decode(), shown.stdout
    assert c.noop()[0] == 250

    assert_retry_is_refused(gw, provider, c, raw, msgid)
    assert len(provider.sessions()) == 1, provider.sessions()
    assert spool_is_empty(gw)


# ---------------------------------------------------------------------------
# STARTTLS missing on an smtp:// URL
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode,log_says", [("hide", "does not offer STARTTLS"), ("refuse", "454 4.7.0")])
def test_no_starttls_fails_closed_before_auth(faulty, smtp_clients, mode, log_says):
    """``hide``: the provider's EHLO offers AUTH in clear text and no STARTTLS (a stripped
    or downgraded server); ``refuse``: it offers STARTTLS and answers 454. Either way pecgate
    must stop before AUTH: the password never leaves over clear text."""
    gw, provider = faulty({"starttls": mode}, url="smtp")
    msgid = make_msgid(domain=PEC_DOMAIN)
    c = smtp_clients(gw.smtp("mario"))
    code, text = submit(c, pec_message(f"Senza STARTTLS ({mode})", msgid=msgid), [ALTRO])
    assert (code, text[:6]) == (451, b"4.4.1 "), (code, text)
    assert b"nothing was sent" in text
    sessions = list(provider.sessions().values())
    assert len(sessions) == 1, sessions
    events = sessions[0]
    verbs = commands(events)
    assert verbs == (["EHLO"] if mode == "hide" else ["EHLO", "STARTTLS"]), verbs
    assert all(e.get("tls") is False for e in events if "cmd" in e)
    assert not any("sasl" in e for e in events)
    assert provider.accepted_count() == 0
    assert ledger_status(gw, msgid) == ["failed"]
    log = gw.log_text()
    assert log_says in log, log[-2000:]
    assert gw.mailboxes["studio"]["_password"] not in log
    assert c.noop()[0] == 250


# ---------------------------------------------------------------------------
# the provider stops answering
# ---------------------------------------------------------------------------


def test_provider_accepts_tcp_and_never_answers(make_gateway, smtp_clients):
    """A listener that never accepts: the kernel completes the TCP handshake, pecgate's TLS
    ClientHello is never answered. The client gets 4.4.1 once the provider timeout is over."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind((HOST, 0))
        silent.listen(8)
        gw = make_gateway(smtp_url=f"smtps://{HOST}:{silent.getsockname()[1]}", gateway_options=STALL_OPTIONS)
        msgid = make_msgid(domain=PEC_DOMAIN)
        c = smtp_clients(gw.smtp("mario", timeout=STALL_TIMEOUT + SLACK))
        code, text, elapsed = timed_submit(c, pec_message("Provider muto", msgid=msgid), "silent provider")
    assert (code, text) == (451, UNREACHABLE), (code, text)
    assert STALL_TIMEOUT <= elapsed < STALL_TIMEOUT + SLACK, elapsed
    rows = gw.ledger_rows("message_id = ?", (msgid,))
    assert [(r["status"], r["provider_reply"]) for r in rows] == [("failed", f"451 {UNREACHABLE.decode()}")], rows
    ((outcome, detail),) = data_audit(gw, msgid, 1)
    assert outcome == "error" and f"did not answer within {STALL_TIMEOUT} s" in detail, detail
    assert f"did not answer within {STALL_TIMEOUT} s" in gw.log_text()
    assert spool_is_empty(gw)
    assert c.noop()[0] == 250


def test_provider_stalls_after_the_data_command(faulty, smtp_clients):
    """DATA is never answered (no 354): nothing of the message left, so 4.4.1 'nothing was
    sent' is true, and the ledger says ``failed``."""
    gw, provider = faulty({"data_cmd": "stall"}, gateway_options=STALL_OPTIONS)
    msgid = make_msgid(domain=PEC_DOMAIN)
    c = smtp_clients(gw.smtp("mario", timeout=STALL_TIMEOUT + SLACK))
    code, text, elapsed = timed_submit(c, pec_message("Stallo dopo DATA", msgid=msgid), "DATA stalled")
    assert (code, text) == (451, UNREACHABLE), (code, text)
    assert STALL_TIMEOUT <= elapsed < STALL_TIMEOUT + SLACK, elapsed
    sessions = list(provider.sessions().values())
    assert len(sessions) == 1 and commands(sessions[0])[-1] == "DATA", sessions
    assert any(e.get("event") == "stalled" for e in sessions[0]), sessions
    assert not data_ends(provider)
    assert provider.accepted_count() == 0
    rows = gw.ledger_rows("message_id = ?", (msgid,))
    assert [(r["status"], r["provider_reply"]) for r in rows] == [("failed", f"451 {UNREACHABLE.decode()}")], rows
    ((outcome, detail),) = data_audit(gw, msgid, 1)
    assert outcome == "error" and f"did not answer within {STALL_TIMEOUT} s" in detail, detail
    assert spool_is_empty(gw)
    assert c.noop()[0] == 250


def test_provider_stalls_after_the_final_dot(faulty, smtp_clients):
    """The provider takes the message and never answers the final dot. Once the provider
    timeout is over the client gets 451 4.4.2, the ledger says ``unknown`` (the message may
    have left: here it has), and a retry of the same message is refused 554 5.7.1."""
    gw, provider = faulty({"data_end": "stall"}, gateway_options=STALL_OPTIONS)
    msgid = make_msgid(domain=PEC_DOMAIN)
    raw = pec_message("Stallo dopo il punto", msgid=msgid)
    c = smtp_clients(gw.smtp("mario", timeout=STALL_TIMEOUT + SLACK))
    code, text, elapsed = timed_submit(c, raw, "final dot stalled")
    assert (code, text) == (451, unconfirmed(msgid)), (code, text)
    assert STALL_TIMEOUT <= elapsed < STALL_TIMEOUT + SLACK, elapsed
    assert provider_copies(provider, msgid) == 1
    (end,) = data_ends(provider)
    assert end["rcpts"] == [ALTRO], end
    assert_unknown_recorded(gw, msgid, text)
    ((_, detail),) = data_audit(gw, msgid, 1)
    assert f"did not answer within {STALL_TIMEOUT} s" in detail, detail
    assert c.noop()[0] == 250

    assert_retry_is_refused(gw, provider, c, raw, msgid)
    assert len(provider.sessions()) == 1, provider.sessions()
    assert spool_is_empty(gw)


# ---------------------------------------------------------------------------
# SMTP smuggling
# ---------------------------------------------------------------------------

# (id, fake end of data, what pecgate must answer): only CRLF.CRLF ends data, and the message
# is refused for its first malformed byte (after dot-unstuffing): "bare" = 554 5.6.0 (a bare CR
# or LF), "nul" = 554 5.6.0 (NUL bytes). In "CR-NUL-LF", "CRLF.CR-NUL-LF" and "NUL-everywhere"
# a CR followed by a NUL comes first: a bare CR.
SMUGGLING = [
    ("LF.LF", b"\n.\n", "bare"),
    ("CRLF.LF", b"\r\n.\n", "bare"),
    ("LF.CRLF", b"\n.\r\n", "bare"),
    ("CR.CRLF", b"\r.\r\n", "bare"),
    ("CRLF.CR", b"\r\n.\r", "bare"),
    ("CR.CR", b"\r.\r", "bare"),
    ("LF.CR", b"\n.\r", "bare"),
    ("CR.LF", b"\r.\n", "bare"),
    ("CRLF.CRCRLF", b"\r\n.\r\r\n", "bare"),
    ("CRLF.CRCRCRLF", b"\r\n.\r\r\r\n", "bare"),
    ("CRLF.LFCRLF", b"\r\n.\n\r\n", "bare"),
    ("CRLF-NUL.CRLF", b"\r\n\x00.\r\n", "nul"),
    ("CRLF.NUL-CRLF", b"\r\n.\x00\r\n", "nul"),
    ("CR-NUL-LF.CRLF", b"\r\x00\n.\r\n", "bare"),
    ("CRLF.CR-NUL-LF", b"\r\n.\r\x00\n", "bare"),
    ("NUL-everywhere", b"\r\x00\n\x00.\x00\r\x00\n", "bare"),
]


REFUSAL = {
    "bare": b"554 5.6.0 The message has lines not ending in CRLF (a bare CR or LF); your mail program sent a "
            b"malformed message",
    "nul": b"554 5.6.0 The message contains NUL bytes; your mail program sent a malformed message",
}


def smuggled_id(msgid: str) -> str:
    """The Message-ID of the message smuggled inside the message ``msgid``."""
    return msgid.replace("<", "<smuggled.", 1)


def smuggling_payload(fake_end: bytes, msgid: str) -> tuple[bytes, int, int]:
    """The DATA bytes (through the real end of data) and where the fake end sits in them."""
    head = (f"From: {PROVIDER_ADDRESS}\r\nTo: {ALTRO}\r\nSubject: smuggling test\r\n"
            f"Message-ID: {msgid}\r\n\r\nciao").encode()
    smuggled = (f"MAIL FROM:<{PROVIDER_ADDRESS}>\r\nRCPT TO:<{EXTERNAL}>\r\nDATA\r\n"
                f"From: {PROVIDER_ADDRESS}\r\nTo: {EXTERNAL}\r\nSubject: smuggled\r\n"
                f"Message-ID: {smuggled_id(msgid)}\r\n\r\nsmuggled\r\n").encode()
    return head + fake_end + smuggled + b".\r\n", len(head), len(head) + len(fake_end)


def split_plans(fake_len: int) -> list[tuple[str, list[int]]]:
    """Write boundaries, as offsets from the start of the fake end of data: none; one at
    every offset from a byte before it to a byte after it; all of those at once (one byte
    per write there)."""
    offsets = list(range(-1, fake_len + 2))
    return [("one write", [])] + [(f"split at {o:+d}", [o]) for o in offsets] + [("byte by byte", offsets)]


def send_data(gw, r: RawSmtp, payload: bytes, start: int, offsets: list[int]):
    """MAIL, RCPT, DATA (pipelined), then ``payload`` written in pieces cut at ``start +
    offset``, each read by pecgate before the next is written."""
    r.send(f"MAIL FROM:<{PROVIDER_ADDRESS}>\r\nRCPT TO:<{ALTRO}>\r\nDATA\r\n".encode())
    assert r.reply().startswith(b"250 2.1.0") and r.reply().startswith(b"250 2.1.5")
    assert r.reply().startswith(b"354")
    cuts = [start + o for o in offsets if 0 < start + o < len(payload)]
    for a, b in zip([0] + cuts, cuts + [len(payload)]):
        r.send(payload[a:b])
        if b < len(payload):
            wait_read_by_pecgate(gw, r.sock)


def noop_after(r: RawSmtp) -> list[bytes]:
    """NOOP, and every reply up to and including NOOP's own: anything before it is an answer
    to commands pecgate read out of the message data."""
    r.send(b"NOOP\r\n")
    replies = []
    while not replies or replies[-1] != b"250 2.0.0 OK":
        replies.append(r.reply())
        assert len(replies) <= 10, replies
    return replies


def tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """(send queue, receive queue) of the IPv4 loopback socket with these ports."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == local_port and int(f[2].split(":")[1], 16) == remote_port:
            tx, rx = f[4].split(":")
            return int(tx, 16), int(rx, 16)
    return None


def wait_read_by_pecgate(gw, sock):
    """Until everything written on ``sock`` has been read by pecgate (its socket's receive
    queue and ours' send queue are empty)."""
    port = sock.getsockname()[1]

    def drained():
        ours = tcp_queues(port, gw.smtp_tls_port)
        theirs = tcp_queues(gw.smtp_tls_port, port)
        return ours is not None and theirs is not None and ours[0] == 0 and theirs[1] == 0

    wait_until(drained, 10, "pecgate to read what was written", interval=0.002)


def raw_login(gw) -> RawSmtp:
    r = RawSmtp(gw)
    r.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assert r.cmd("EHLO raw.client").startswith(b"250-")
    token = base64.b64encode(b"\0mario\0" + gw.password("mario").encode()).decode()
    assert r.cmd(f"AUTH PLAIN {token}").startswith(b"235 2.7.0")
    return r


@pytest.fixture(scope="module")
def lenient_provider(dovecot):
    with PecProvider(dovecot, faults={"lenient_data": True, "strip_nul": True}) as p:
        yield p


@pytest.fixture(scope="module")
def lenient_gw(dovecot, lenient_provider, pecgate_binary):
    with harness.Pecgate(dovecot, binary=pecgate_binary, smtp_url=lenient_provider.smtps_url).set_up() as gw:
        yield gw


def test_the_lenient_provider_is_smuggled_without_pecgate(lenient_provider):
    """The detector works: straight to the lenient provider (no pecgate), a bare-LF and a
    NUL "end of data" each give it a second, smuggled envelope."""
    user = PROVIDER_ADDRESS
    password = lenient_provider.dovecot.users[user]
    for fake in (b"\n.\r\n", b"\r\n\x00.\r\n"):
        mark = lenient_provider.last_connection()
        msgid = make_msgid(domain=PEC_DOMAIN)
        payload, _, _ = smuggling_payload(fake, msgid)
        ctx = harness.tls_context(lenient_provider.dovecot.cert)
        with smtplib.SMTP_SSL(HOST, lenient_provider.tls_port, context=ctx, timeout=30) as c:
            c.login(user, password)
            assert c.mail(user)[0] == 250 and c.rcpt(ALTRO)[0] == 250
            assert c.docmd("DATA")[0] == 354
            c.send(payload)
            assert c.getreply()[0] == 250  # the first message
            assert c.getreply()[0] == 250  # smuggled MAIL
            assert c.getreply()[0] == 250  # smuggled RCPT
            assert c.getreply()[0] == 354  # smuggled DATA
            assert c.getreply()[0] == 250  # the smuggled message
        mails = [cmd for es in lenient_provider.sessions(mark).values() for cmd in commands(es) if cmd == "MAIL"]
        assert len(mails) == 2, (fake, mails)


@pytest.mark.parametrize("name,fake_end,expect", SMUGGLING, ids=[c[0] for c in SMUGGLING])
def test_smuggled_end_of_data(lenient_gw, lenient_provider, name, fake_end, expect):
    failures = []
    r = raw_login(lenient_gw)
    try:
        for plan_name, offsets in split_plans(len(fake_end)):
            msgid = make_msgid(domain=PEC_DOMAIN)
            payload, start, _ = smuggling_payload(fake_end, msgid)
            mark = lenient_provider.last_connection()
            send_data(lenient_gw, r, payload, start, offsets)
            reply = r.reply()
            # Exactly one answer for the whole DATA: the smuggled commands were message data.
            extra = noop_after(r)[:-1]
            problems = []
            if extra:
                problems.append(f"answered {reply!r}, then {extra!r}: pecgate ran the smuggled commands")
            seen = lenient_provider.sessions(mark)
            mails = sum(commands(es).count("MAIL") for es in seen.values())
            if mails > 1:
                # A second envelope: give its message the time to land, to report it.
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: provider_copies(lenient_provider, smuggled_id(msgid)), 5,
                               "the smuggled message")
            copies = provider_copies(lenient_provider, msgid)
            smuggled = provider_copies(lenient_provider, smuggled_id(msgid))
            if smuggled:
                problems.append(f"the smuggled message reached the provider ({smuggled}x)")
            # What the provider received of the message itself: never a NUL or bare CR/LF.
            nuls = sum(e.get("nul_dropped", 0) for es in seen.values() for e in es if e.get("data_end"))
            if nuls:
                problems.append(f"the provider received {nuls} NUL byte(s)")
            for m in accepted_with(lenient_provider, msgid):
                bad = BAD_BYTES.search(m["raw"])
                if bad:
                    problems.append(f"relayed with a bare CR/LF at byte {bad.start()}: "
                                    f"{m['raw'][max(0, bad.start() - 10):bad.start() + 12]!r}")
            if reply != REFUSAL[expect]:
                problems.append(f"expected {REFUSAL[expect]!r}, got {reply!r}")
            if mails or copies:
                problems.append(f"the provider saw {mails} MAIL command(s) and holds {copies} copies of the message")
            if problems:
                failures.append(f"[{plan_name}] " + "; ".join(problems))
        assert spool_is_empty(lenient_gw)
    finally:
        r.close()
    assert not failures, f"{name} ({fake_end!r}):\n" + "\n".join(failures)


def test_smuggling_control_message_is_relayed_once(lenient_gw, lenient_provider):
    """The same message without a fake end of data, split the same ways, is relayed once:
    the refusals above are about the fake terminator, not the message."""
    r = raw_login(lenient_gw)
    try:
        for plan_name, offsets in split_plans(2):
            msgid = make_msgid(domain=PEC_DOMAIN)
            # A plain CRLF where the fake end was: the "commands" are ordinary body lines.
            payload, start, _ = smuggling_payload(b"\r\n", msgid)
            mark = lenient_provider.last_connection()
            send_data(lenient_gw, r, payload, start, offsets)
            reply = r.reply()
            assert reply.startswith(b"250 2.0.0 Ok: queued as"), (plan_name, reply)
            assert noop_after(r) == [b"250 2.0.0 OK"], plan_name
            seen = lenient_provider.sessions(mark)
            assert sum(commands(es).count("MAIL") for es in seen.values()) == 1, (plan_name, seen)
            (got,) = accepted_with(lenient_provider, msgid)
            assert harness.strip_trace_headers(got["raw"]) == payload[:-3], plan_name
    finally:
        r.close()


# ---------------------------------------------------------------------------
# kill -9 while a message is with the provider; the same message after an acceptance
# ---------------------------------------------------------------------------


def test_sigkill_while_the_provider_holds_the_message_leaves_an_unknown_row(faulty, smtp_clients):
    """pecgate is killed (-9) after the message's end went to the provider and before its
    answer (the provider stalls there). After a restart: the ledger row that was ``sending``
    is ``unknown`` and the log says so, the spool is empty, the audit chain verifies, and the
    client's retry of the same message is refused, naming that row."""
    gw, provider = faulty({"data_end": "stall", "connections": 1})
    msgid = make_msgid(domain=PEC_DOMAIN)
    raw = pec_message("Interrotto da kill -9", msgid=msgid)
    c = gw.smtp("mario", timeout=60)
    c.mail(PROVIDER_ADDRESS)
    c.rcpt(ALTRO)
    # DATA's answer will never come: send the message without waiting for it.
    c.putcmd("data")
    assert c.getreply()[0] == 354
    # What smtplib's data() sends, without its wait for the answer.
    wire = re.sub(rb"(?m)^\.", b"..", re.sub(rb"\r\n|\n|\r", b"\r\n", raw))
    c.send(wire + (b"" if wire.endswith(b"\r\n") else b"\r\n") + b".\r\n")
    wait_until(lambda: provider_copies(provider, msgid) == 1, 30, "the provider to hold the message")
    wait_until(lambda: ledger_status(gw, msgid) == ["sending"], 30, "the ledger row to be sending")
    gw.crash()
    with contextlib.suppress(Exception):
        c.close()

    mark = gw.log_mark()
    gw.start()
    assert ledger_status(gw, msgid) == ["unknown"]
    gw.wait_log("their outcome is unknown", since=mark)
    assert spool_is_empty(gw)
    verified = gw.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr

    retry = smtp_clients(gw.smtp("mario"))
    (row,) = gw.ledger_rows("message_id = ?", (msgid,))
    code, text = submit(retry, raw, [ALTRO])
    assert (code, text) == (554, duplicate(msgid, row["submitted_at"], "unknown")), (code, text)
    assert provider_copies(provider, msgid) == 1


def test_a_message_already_accepted_is_not_sent_again(faulty, smtp_clients):
    """The same Message-ID after the provider accepted it (a client that resends after losing
    the connection on its side) is refused, naming the accepted send; a new Message-ID goes."""
    gw, provider = faulty({})
    msgid = make_msgid(domain=PEC_DOMAIN)
    raw = pec_message("Già accettato", msgid=msgid)
    c = smtp_clients(gw.smtp("mario"))
    code, _ = submit(c, raw, [ALTRO])
    assert code == 250
    (row,) = gw.ledger_rows("message_id = ?", (msgid,))
    assert row["status"] == "accepted"
    code, text = submit(c, raw, [ALTRO])
    assert (code, text) == (554, duplicate(msgid, row["submitted_at"], "accepted")), (code, text)
    assert provider_copies(provider, msgid) == 1
    other = make_msgid(domain=PEC_DOMAIN)
    code, _ = submit(c, pec_message("Già accettato", msgid=other), [ALTRO])
    assert code == 250
    assert provider_copies(provider, other) == 1
