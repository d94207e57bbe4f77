"""A provider that says what pecgate did not ask for (issue 7): the session ends, nothing of it
reaches the client.

No real server misbehaves on purpose, so this is the one place with a scripted provider: a
TLS IMAP server on loopback that greets, accepts pecgate's LOGIN and `LIST "" ""` as an
RFC 3501 server does, and then answers the first relayed command with one misbehaviour:
a tagged response for a tag pecgate never sent, the client's own tag, a continuation nobody
asked for, an untagged response no IMAP server sends, a folder listing outside a LIST, a line
that is not IMAP. pecgate must end the session with `* BYE`, relay none of it, and record the
reason (`upstream-error`). A well-behaved answer from the same script is the control: it must
reach the client under the client's tag.
"""

from __future__ import annotations

import socket
import ssl
import threading

import pytest

from harness import HOST, Pecgate, RawImap, make_cert, wait_until

SPOOF = b"SPOOFED-BY-PROVIDER"

# Each scenario: (name, what the provider answers to the first relayed command, given its tag).
SCENARIOS = {
    "foreign tag": lambda tag: b"c999999999 OK " + SPOOF + b"\r\n",
    "client tag": lambda tag: b"n1 OK " + SPOOF + b"\r\n",
    "unasked continuation": lambda tag: b"+ " + SPOOF + b"\r\n",
    "unknown untagged": lambda tag: b"* XYZZY " + SPOOF + b"\r\n",
    "listing outside LIST": lambda tag: b'* LIST () "/" ' + SPOOF + b"\r\n",
    "not IMAP": lambda tag: SPOOF + b"\r\n",
    "PREAUTH": lambda tag: b"* PREAUTH " + SPOOF + b"\r\n",
}


class ScriptedProvider:
    """One-connection-at-a-time TLS IMAP server playing a provider, on a free loopback port."""

    def __init__(self, directory, misbehaviour):
        self.cert, self.key = make_cert(directory / "provider-tls", "localhost")
        self.misbehaviour = misbehaviour
        self.received: list[bytes] = []
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(self.cert, self.key)
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.listener.settimeout(30)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"imaps://{HOST}:{self.port}"

    def _serve(self):
        try:
            raw, _ = self.listener.accept()
        except OSError:
            return
        with self.ctx.wrap_socket(raw, server_side=True) as conn:
            conn.settimeout(30)
            reader = conn.makefile("rb")
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE UIDPLUS] scripted provider ready\r\n")
            try:
                while True:
                    line = reader.readline()
                    if not line:
                        return
                    self.received.append(line)
                    tag, _, rest = line.partition(b" ")
                    verb = rest.split(b" ", 1)[0].strip().upper()
                    if verb == b"LOGIN":
                        conn.sendall(tag + b" OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE UIDPLUS] Logged in\r\n")
                    elif verb == b"LIST" and tag.startswith(b"s"):
                        conn.sendall(b'* LIST (\\Noselect) "/" ""\r\n' + tag + b" OK List completed\r\n")
                    elif verb == b"LOGOUT":
                        conn.sendall(b"* BYE Logging out\r\n" + tag + b" OK Logout completed\r\n")
                        return
                    elif self.misbehaviour is None:
                        conn.sendall(tag + b" OK " + verb + b" completed\r\n")
                    else:
                        conn.sendall(self.misbehaviour(tag))
            except (OSError, ValueError):
                return

    def close(self):
        self.listener.close()
        self.thread.join(timeout=10)


@pytest.fixture
def scripted(tmp_path, pecgate_binary):
    made = []

    def start(misbehaviour):
        provider = ScriptedProvider(tmp_path, misbehaviour)
        gw = Pecgate(None, binary=pecgate_binary, mailboxes={"studio": {
            "address": "studio@pec.example.test",
            "login": "studio@pec.example.test",
            "imap": provider.url,
            "ca_file": str(provider.cert),
            "max_connections": 4,
            "_password": "scripted-provider-password",
        }})
        made.append((provider, gw))
        gw.setup()
        gw.start()
        return provider, gw

    yield start
    for provider, gw in made:
        gw.cleanup()
        provider.close()


def _session(gw) -> RawImap:
    r = gw.raw(tls=True)
    r.login("mario", gw.password("mario"))
    return r


def _read_to_end(r: RawImap) -> bytes:
    """Everything the client gets until pecgate closes the connection."""
    out = b""
    while True:
        try:
            out += r.read_line() + b"\n"
        except (EOFError, OSError, TimeoutError):
            return out


def test_a_well_behaved_answer_reaches_the_client_under_its_own_tag(scripted):
    provider, gw = scripted(None)
    r = _session(gw)
    untagged, tagged = r.command("n1", "NOOP")
    assert tagged.startswith(b"n1 OK NOOP completed"), tagged
    relayed = [line for line in provider.received if line.startswith(b"c")]
    assert relayed and relayed[0].endswith(b" NOOP\r\n"), provider.received
    r.close()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_what_pecgate_cannot_attribute_ends_the_session(scripted, scenario):
    provider, gw = scripted(SCENARIOS[scenario])
    r = _session(gw)
    r.send(b"n1 NOOP\r\n")
    seen = _read_to_end(r)
    assert SPOOF not in seen, (scenario, seen)
    assert b"* BYE [UNAVAILABLE] The PEC provider sent something pecgate cannot attribute" in seen, seen
    assert b"n1 OK" not in seen, seen
    wait_until(lambda: any(row["command"] == "upstream-error" for row in gw.audit_rows()),
               10, "the upstream-error event")
    [row] = [row for row in gw.audit_rows() if row["command"] == "upstream-error"]
    assert row["user"] == "mario" and row["outcome"] == "error", row
    assert "providerviolation" in row["detail"], row
    # The NOOP itself is on record, as a command the provider never completed.
    noop = [row for row in gw.audit_rows() if row["command"] == "NOOP"]
    assert noop and noop[-1]["outcome"] == "error" and "upstream=c" in noop[-1]["detail"], noop
