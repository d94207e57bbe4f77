"""TLS and STARTTLS on both legs, both protocols, with the real binary.

Provider side: a provider whose certificate comes from a CA pecgate does not trust, or from
the trusted CA but for another host name, is refused before pecgate's provider login leaves
(imaps, imap+STARTTLS, smtps, smtp+STARTTLS); a provider that appends clear text to its
STARTTLS answer (response injection, the provider-side twin of CVE-2011-0411) is refused too.
Client side: clear text a client pipelines behind STARTTLS is discarded, never executed
after the handshake.

No real server presents a wrong certificate or injects on purpose, so the provider here is a
small recording server (``RecordingProvider``): it speaks just enough IMAP or SMTP, plays the
server side of the TLS handshake through memory BIOs and keeps every byte it receives off the
wire, the clear text before TLS and, when a handshake succeeds, the decrypted text after it.
The same server with the trusted certificate is the control: there pecgate logs in and the
password does reach it, so its absence in the fault cases means something.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_smtp import RawSmtp

from harness import (HOST, PEC_DOMAIN, PROVIDER_ADDRESS, Pecgate, RawImap, make_cert, make_message,
                     message_id_of, quote, tls_context, wait_until)

ALTRO = f"altro@{PEC_DOMAIN}"
WRONG_HOST = "wrong-host.example.test"

SCHEMES = {
    # scheme: (protocol, security)
    "imaps": ("imap", "implicit"),
    "imap": ("imap", "starttls"),
    "smtps": ("smtp", "implicit"),
    "smtp": ("smtp", "starttls"),
}
FAULTS = ["wrong CA", "wrong host name"]

INJECTIONS = {
    "imap": b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected before the handshake\r\n",
    "smtp": b"250-injected.example.test\r\n250 AUTH PLAIN LOGIN\r\n",
}


# ---------------------------------------------------------------------------
# certificates
# ---------------------------------------------------------------------------


@dataclass
class Certs:
    ca_file: Path  # what pecgate trusts for the mailbox
    presented: dict  # "good" / fault name -> (cert, key) the provider presents


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    d = tmp_path_factory.mktemp("tls-certs")
    good = make_cert(d / "trusted", "localhost")
    # Valid for the right host, but from an issuer (here: self-signed) pecgate does not trust.
    untrusted = make_cert(d / "untrusted", "untrusted-ca.example.test")
    # A CA pecgate trusts, but a certificate for another host than the one it connects to.
    wrong_host = make_cert(d / "wrong-host", WRONG_HOST, san=f"DNS:{WRONG_HOST}")
    ca_file = d / "ca-bundle.pem"
    ca_file.write_bytes(good[0].read_bytes() + wrong_host[0].read_bytes())
    return Certs(ca_file, {"good": good, "wrong CA": untrusted, "wrong host name": wrong_host})


# ---------------------------------------------------------------------------
# the recording provider
# ---------------------------------------------------------------------------


@dataclass
class Recorded:
    """One connection pecgate made to the provider."""
    raw: bytearray = field(default_factory=bytearray)  # every byte off the wire
    plain: bytearray = field(default_factory=bytearray)  # clear text, and decrypted text after TLS
    handshake: str | None = None  # None: never attempted; "ok"; or why it failed
    done: threading.Event = field(default_factory=threading.Event)


class _Channel:
    """The server end of one connection: clear text, then TLS through memory BIOs so that
    every byte received is recorded whatever the handshake's fate."""

    def __init__(self, sock: socket.socket, rec: Recorded):
        self.sock = sock
        self.rec = rec
        self.tls: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.pending = b""

    def _recv_raw(self) -> bytes:
        data = self.sock.recv(65536)
        self.rec.raw += data
        return data

    def _flush(self):
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def start_tls(self, ctx: ssl.SSLContext) -> bool:
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        if self.pending:  # bytes the peer sent right behind its STARTTLS
            self.incoming.write(self.pending)
            self.pending = b""
        while True:
            try:
                self.tls.do_handshake()
                self._flush()
                self.rec.handshake = "ok"
                return True
            except ssl.SSLWantReadError:
                self._flush()
                data = self._recv_raw()
                if not data:
                    self.rec.handshake = "closed by pecgate during the handshake"
                    return False
                self.incoming.write(data)
            except (ssl.SSLError, OSError) as exc:
                with contextlib.suppress(OSError):
                    self._flush()
                self.rec.handshake = f"failed: {exc}"
                return False

    def send(self, data: bytes):
        if self.tls is not None:
            self.tls.write(data)
            self._flush()
        else:
            self.sock.sendall(data)

    def _recv(self) -> bytes:
        if self.tls is None:
            data = self._recv_raw()
            self.rec.plain += data
            return data
        while True:
            try:
                data = self.tls.read(65536)
                self.rec.plain += data
                return data
            except ssl.SSLWantReadError:
                raw = self._recv_raw()
                if not raw:
                    return b""
                self.incoming.write(raw)
            except ssl.SSLZeroReturnError:
                return b""

    def readline(self) -> bytes | None:
        while b"\n" not in self.pending:
            data = self._recv()
            if not data:
                return None
            self.pending += data
        line, _, self.pending = self.pending.partition(b"\n")
        return line + b"\n"

    def drain(self):
        """Keep recording whatever still comes until pecgate closes the connection."""
        with contextlib.suppress(OSError):
            while self._recv_raw():
                pass


class RecordingProvider:
    """An IMAP or SMTP provider on a loopback port (bound to port 0) presenting ``cert``.
    ``inject``: bytes appended to the STARTTLS answer, in the same write. ``refuse_starttls``:
    STARTTLS is neither offered nor accepted (a stripping man in the middle)."""

    def __init__(self, scheme: str, cert_key, inject: bytes = b"", refuse_starttls: bool = False):
        self.scheme = scheme
        self.protocol, self.security = SCHEMES[scheme]
        self.inject = inject
        self.refuse_starttls = refuse_starttls
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*cert_key)
        self.connections: list[Recorded] = []
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{HOST}:{self.port}"

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            rec = Recorded()
            self.connections.append(rec)
            t = threading.Thread(target=self._serve, args=(sock, rec), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, rec: Recorded):
        sock.settimeout(30)
        ch = _Channel(sock, rec)
        try:
            if self.security == "implicit" and not ch.start_tls(self.ctx):
                ch.drain()
                return
            (self._imap if self.protocol == "imap" else self._smtp)(ch)
            ch.drain()
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            rec.done.set()

    def _imap(self, ch: _Channel):
        before_tls = b"IMAP4rev1 AUTH=PLAIN" if self.refuse_starttls else b"IMAP4rev1 STARTTLS LOGINDISABLED"
        after_tls = b"IMAP4rev1 LITERAL+ IDLE UIDPLUS"
        ch.send(b"* OK [CAPABILITY " + (after_tls if ch.tls else before_tls) + b"] recording provider ready\r\n")
        while (line := ch.readline()) is not None:
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            verb = rest.split(b" ", 1)[0].upper()
            if verb == b"STARTTLS" and self.refuse_starttls:
                ch.send(tag + b" NO STARTTLS is not available\r\n")
            elif verb == b"STARTTLS" and ch.tls is None:
                ch.send(tag + b" OK Begin TLS negotiation now\r\n" + self.inject)
                if not ch.start_tls(self.ctx):
                    return
            elif verb == b"CAPABILITY":
                caps = after_tls if ch.tls else before_tls
                ch.send(b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK Capability completed\r\n")
            elif verb == b"LOGIN":
                ch.send(tag + b" OK [CAPABILITY " + after_tls + b"] Logged in\r\n")
            elif verb == b"LIST":
                ch.send(b'* LIST (\\Noselect) "/" ""\r\n' + tag + b" OK List completed\r\n")
            elif verb == b"LOGOUT":
                ch.send(b"* BYE Logging out\r\n" + tag + b" OK Logout completed\r\n")
                return
            else:
                ch.send(tag + b" OK " + verb + b" completed\r\n")

    def _smtp(self, ch: _Channel):
        ch.send(b"220 provider.example.test ESMTP recording provider\r\n")
        while (line := ch.readline()) is not None:
            verb = line.rstrip(b"\r\n").split(b" ", 1)[0].upper()
            if verb in (b"EHLO", b"HELO"):
                # AUTH is offered in clear too: a careless client would take the bait.
                ext = [b"PIPELINING", b"8BITMIME", b"AUTH PLAIN LOGIN"]
                if ch.tls is None and not self.refuse_starttls:
                    ext.insert(0, b"STARTTLS")
                lines = [b"provider.example.test"] + ext
                ch.send(b"".join(b"250" + (b" " if i == len(lines) - 1 else b"-") + x + b"\r\n"
                                 for i, x in enumerate(lines)))
            elif verb == b"STARTTLS" and self.refuse_starttls:
                ch.send(b"454 4.7.0 TLS not available\r\n")
            elif verb == b"STARTTLS" and ch.tls is None:
                ch.send(b"220 2.0.0 Ready to start TLS\r\n" + self.inject)
                if not ch.start_tls(self.ctx):
                    return
            elif verb == b"AUTH":
                ch.send(b"235 2.7.0 Authentication successful\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                ch.send(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                ch.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                while (data := ch.readline()) not in (None, b".\r\n"):
                    pass
                ch.send(b"250 2.0.0 Ok: queued as RECORDED1\r\n")
            elif verb == b"QUIT":
                ch.send(b"221 2.0.0 Bye\r\n")
                return
            else:
                ch.send(b"502 5.5.1 Not implemented\r\n")

    def wait_ended(self, count: int = 1, timeout: float = 40) -> list[Recorded]:
        """The connections pecgate made, once ``count`` of them exist and all have ended."""
        wait_until(lambda: len(self.connections) >= count and all(c.done.is_set() for c in self.connections),
                   timeout, f"{count} provider connection(s) to end")
        return list(self.connections)

    def close(self):
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self.accepter.join(timeout=10)
        for t in self.threads:
            t.join(timeout=10)


# ---------------------------------------------------------------------------
# pecgate in front of it
# ---------------------------------------------------------------------------


def password_forms(login: str, password: str) -> list[bytes]:
    """How the provider password could show on the wire: as is (IMAP LOGIN), base64 alone
    (AUTH LOGIN) or in a SASL PLAIN token (AUTH PLAIN)."""
    pw = password.encode()
    return [pw, base64.b64encode(pw), base64.b64encode(b"\0" + login.encode() + b"\0" + pw)]


@pytest.fixture
def behind(tmp_path, certs, pecgate_binary):
    """behind(scheme, presented, **options) -> (provider, gw): a RecordingProvider presenting
    ``certs.presented[presented]`` and a fresh pecgate whose mailbox uses it (IMAP or SMTP
    after the scheme), trusting ``certs.ca_file``."""
    made = []

    def start(scheme: str, presented: str, **options):
        provider = RecordingProvider(scheme, certs.presented[presented], **options)
        mailbox = {
            "address": PROVIDER_ADDRESS,
            "login": PROVIDER_ADDRESS,
            # An SMTP session never opens the IMAP side: for SMTP cases it points here too.
            "imap": provider.url if provider.protocol == "imap" else f"imaps://{HOST}:{provider.port}",
            "ca_file": str(certs.ca_file),
            "max_connections": 4,
            "_password": "vaulted-" + secrets.token_hex(12),
        }
        if provider.protocol == "smtp":
            mailbox["smtp"] = provider.url
        gw = Pecgate(None, binary=pecgate_binary, base_dir=tmp_path / f"gw{len(made)}",
                     mailboxes={"studio": mailbox})
        made.append((provider, gw))
        gw.setup()
        gw.start()
        return provider, gw

    yield start
    for provider, gw in made:
        gw.cleanup()
        provider.close()


def imap_login(gw) -> bytes:
    """mario's LOGIN through pecgate (implicit TLS); the tagged answer."""
    with RawImap(gw.tls_port, tls=True, cafile=gw.cert, timeout=60) as r:
        _, tagged = r.command("L1", f"LOGIN mario {quote(gw.password('mario'))}", timeout=60)
        if tagged.startswith(b"L1 OK"):
            r.command("Z1", "LOGOUT")
        return tagged


def smtp_send(gw) -> tuple[int, bytes, str]:
    """mario sends one valid PEC message through pecgate (implicit TLS); (code, text, msgid)
    of the answer to the first refused command, or to DATA."""
    raw = make_message("Prova TLS", sender=PROVIDER_ADDRESS, to=ALTRO)
    c = gw.smtp("mario", timeout=60)
    try:
        code, text = c.mail(PROVIDER_ADDRESS)
        if code == 250:
            code, text = c.rcpt(ALTRO)
        if code == 250:
            code, text = c.data(raw)
        with contextlib.suppress(Exception):
            c.quit()
        return code, text, message_id_of(raw)
    finally:
        c.close()


def pecgate_login_attempt(gw, provider) -> tuple[bytes, int, bytes, str | None]:
    """Drive one provider connection through pecgate with the client protocol matching the
    provider's; returns (answer, code, text, msgid)."""
    if provider.protocol == "imap":
        tagged = imap_login(gw)
        return tagged, 0, b"", None
    code, text, msgid = smtp_send(gw)
    return b"", code, text, msgid


def assert_password_never_sent(gw, conn: Recorded):
    mb = gw.mailboxes["studio"]
    for form in password_forms(mb["login"], mb["_password"]):
        assert form not in conn.raw, f"the provider password reached the provider: {conn.raw[:400]!r}"
        assert form not in conn.plain, f"the provider password reached the provider: {conn.plain!r}"
    commands = [line.split(b" ", 2)[:2] for line in bytes(conn.plain).split(b"\r\n")]
    verbs = {w.upper() for parts in commands for w in parts}
    assert not verbs & {b"LOGIN", b"AUTH", b"AUTHENTICATE", b"MAIL", b"RCPT", b"DATA"}, conn.plain


def assert_clear_refusal(gw, provider, result, reason: str):
    """The client was refused in its protocol's words, and the log and the audit name why."""
    tagged, code, text, msgid = result
    if provider.protocol == "imap":
        assert tagged.startswith(b"L1 NO [UNAVAILABLE]"), tagged
        wait_until(lambda: [r for r in gw.audit_rows() if r["command"] == "upstream-error"], 10,
                   "the upstream-error event")
        [err] = [r for r in gw.audit_rows() if r["command"] == "upstream-error"]
        assert reason in err["detail"], err
        logins = [r for r in gw.audit_rows() if r["command"] == "LOGIN"]
        assert [r["outcome"] for r in logins] == ["no"], logins
    else:
        assert 400 <= code < 600, (code, text)
        assert b"nothing was sent" in text, (code, text)
        rows = gw.ledger_rows("message_id = ?", (msgid,))
        assert [r["status"] for r in rows] == ["failed"], rows
        data = [r for r in gw.audit_rows() if r["command"] == "DATA"]
        assert len(data) == 1 and data[0]["outcome"] == "error", data
        assert reason in data[0]["detail"], data
    assert reason in gw.log_text(), gw.log_text()[-3000:]


# ---------------------------------------------------------------------------
# 1. a provider with a bad certificate: refused before the password leaves
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_control_a_trusted_provider_gets_the_login(behind, scheme):
    """The control of the fault cases: with the trusted certificate the same recording
    provider completes TLS, and pecgate's login, password included, does reach it."""
    provider, gw = behind(scheme, "good")
    tagged, code, text, _ = pecgate_login_attempt(gw, provider)
    if provider.protocol == "imap":
        assert tagged.startswith(b"L1 OK"), tagged
    else:
        assert (code, text) == (250, b"2.0.0 Ok: queued as RECORDED1"), (code, text)
    [conn] = provider.wait_ended()
    assert conn.handshake == "ok", conn.handshake
    mb = gw.mailboxes["studio"]
    assert any(form in conn.plain for form in password_forms(mb["login"], mb["_password"])), conn.plain
    # In clear text, before TLS, nothing but the STARTTLS dance.
    if provider.security == "starttls":
        clear = bytes(conn.raw[:conn.raw.find(b"\x16\x03")])
        assert clear.upper().endswith(b"STARTTLS\r\n"), clear


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_bad_provider_certificate_fails_closed_before_the_password(behind, scheme, fault):
    provider, gw = behind(scheme, fault)
    result = pecgate_login_attempt(gw, provider)
    [conn] = provider.wait_ended()
    # pecgate did reach the provider and tried TLS, and the handshake did not complete.
    assert conn.handshake is not None and conn.handshake != "ok", conn.handshake
    assert b"\x16\x03" in conn.raw, f"no TLS ClientHello from pecgate: {conn.raw[:200]!r}"
    if provider.security == "starttls":
        assert bytes(conn.plain).upper().rstrip().endswith(b"STARTTLS"), conn.plain
    assert_password_never_sent(gw, conn)
    assert_clear_refusal(gw, provider, result, "certificate")


# ---------------------------------------------------------------------------
# 3. a provider that injects clear text behind its STARTTLS answer
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["imap", "smtp"])
def test_provider_plaintext_injected_after_starttls_fails_closed(behind, scheme):
    """The provider's STARTTLS answer carries extra clear text in the same segment (response
    injection by a man in the middle). Its certificate is the trusted one, so the only thing
    between the password and the provider is pecgate noticing the injection."""
    provider, gw = behind(scheme, "good", inject=INJECTIONS[scheme])
    result = pecgate_login_attempt(gw, provider)
    [conn] = provider.wait_ended()
    assert conn.handshake != "ok", conn.handshake
    assert_password_never_sent(gw, conn)
    assert_clear_refusal(gw, provider, result, "STARTTLS")
    assert "data after the STARTTLS answer" in gw.log_text(), gw.log_text()[-3000:]


@pytest.mark.parametrize("scheme", ["imap", "smtp"])
def test_provider_without_starttls_is_not_logged_in_to_in_clear(behind, scheme):
    """The stripping variant: the provider (or a man in the middle) neither offers nor
    accepts STARTTLS, and offers a clear-text login instead. An imap:// or smtp:// URL means
    STARTTLS is mandatory: pecgate gives up rather than log in in clear."""
    provider, gw = behind(scheme, "good", refuse_starttls=True)
    result = pecgate_login_attempt(gw, provider)
    [conn] = provider.wait_ended()
    assert conn.handshake is None, conn.handshake
    assert_password_never_sent(gw, conn)
    assert_clear_refusal(gw, provider, result, "STARTTLS")


# ---------------------------------------------------------------------------
# 2. a client that pipelines clear text behind STARTTLS
# ---------------------------------------------------------------------------


def peer_rows(gw, port: int) -> list[dict]:
    return [r for r in gw.audit_rows() if r["peer"] == f"{HOST}:{port}"]


def test_imap_commands_pipelined_after_starttls_are_discarded(gateway):
    r = RawImap(gateway.starttls_port, tls=False, cafile=gateway.cert)
    port = r.sock.getsockname()[1]
    try:
        # Valid credentials: had pecgate executed the LOGIN, mario would be logged in.
        r.send(f"a STARTTLS\r\nb LOGIN mario {quote(gateway.password('mario'))}\r\n")
        _, tagged = r.read_until_tagged("a")
        assert tagged.startswith(b"a OK"), tagged
        assert r.buf == b"", f"pecgate said more in clear text: {r.buf!r}"
        r.sock = tls_context(gateway.cert).wrap_socket(r.sock, server_hostname=HOST)

        untagged, tagged = r.command("c", "SELECT INBOX")
        assert not [line for line in untagged if line.startswith(b"b ")], untagged
        assert tagged.startswith((b"c BAD", b"c NO")), f"SELECT before login was served: {tagged!r}"
        untagged, tagged = r.command("d", "CAPABILITY")
        assert not [line for line in untagged if line.startswith(b"b ")], untagged
        assert "AUTH=PLAIN" in " ".join(line.decode() for line in untagged), untagged  # still not logged in

        # The credentials were good: a LOGIN sent over TLS works.
        _, tagged = r.command("e", f"LOGIN mario {quote(gateway.password('mario'))}")
        assert tagged.startswith(b"e OK"), tagged
        r.command("z", "LOGOUT")
    finally:
        r.close()
    wait_until(lambda: [x for x in peer_rows(gateway, port) if x["command"] == "logout"], 10,
               "the session's logout row")
    rows = peer_rows(gateway, port)
    logins = [x for x in rows if x["command"] in ("LOGIN", "AUTHENTICATE")]
    assert len(logins) == 1 and logins[0]["outcome"] == "ok", rows
    # a STARTTLS, c SELECT, d CAPABILITY, e LOGIN: the pipelined b was never even counted.
    [preauth] = [x for x in rows if x["command"] == "preauth"]
    assert preauth["detail"].startswith("commands=4 ") and preauth["detail"].endswith("tls=yes ended=login"), preauth


class PlainSmtp(RawSmtp):
    """Line-level SMTP on pecgate's STARTTLS port, for the tests that must control the bytes."""

    def __init__(self, gw, timeout: float = 30):  # noqa: super().__init__ would start with TLS
        self.gw = gw
        self.sock = socket.create_connection((HOST, gw.smtp_starttls_port), timeout=timeout)
        self.port = self.sock.getsockname()[1]
        self.buf = b""
        self.greeting = self.reply()

    def starttls(self):
        self.sock = tls_context(self.gw.cert).wrap_socket(self.sock, server_hostname=HOST)


@pytest.mark.parametrize("pipelined", ["AUTH", "MAIL"])
def test_smtp_commands_pipelined_after_starttls_are_discarded(gateway, pipelined):
    token = base64.b64encode(b"\0mario\0" + gateway.password("mario").encode()).decode()
    behind_starttls = {"AUTH": f"AUTH PLAIN {token}", "MAIL": f"MAIL FROM:<{PROVIDER_ADDRESS}>"}[pipelined]
    s = PlainSmtp(gateway)
    try:
        assert s.greeting.startswith(b"220"), s.greeting
        assert b"STARTTLS" in s.cmd("EHLO client.example").upper()
        s.send(f"STARTTLS\r\n{behind_starttls}\r\n".encode())
        reply = s.reply()
        assert reply.startswith(b"220"), reply
        assert s.buf == b"", f"pecgate said more in clear text: {s.buf!r}"
        s.starttls()
        # The first answer after the handshake is the one to this EHLO: nothing was executed.
        reply = s.cmd("EHLO client.example")
        assert reply.startswith(b"250-") and b"AUTH" in reply, reply
        reply = s.cmd(f"MAIL FROM:<{PROVIDER_ADDRESS}>")
        assert reply.startswith(b"530"), f"MAIL before AUTH was accepted: {reply!r}"
        # The credentials were good: AUTH sent over TLS works.
        reply = s.cmd(f"AUTH PLAIN {token}")
        assert reply.startswith(b"235"), reply
        assert s.cmd("QUIT").startswith(b"221")
    finally:
        s.close()
    wait_until(lambda: [x for x in peer_rows(gateway, s.port) if x["command"] == "logout"], 10,
               "the session's logout row")
    # Every SMTP command is audited: the pipelined one is not among them.
    rows = [(x["command"], x["outcome"]) for x in peer_rows(gateway, s.port)]
    assert rows == [("EHLO", "ok"), ("STARTTLS", "ok"), ("EHLO", "ok"), ("MAIL", "denied"), ("AUTH", "ok"),
                    ("QUIT", "ok"), ("logout", "ok")], rows
