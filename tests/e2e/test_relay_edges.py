"""Relay corner cases found while building the relay: pipelining right after IDLE's DONE,
the provider ending a session, and the synchronising-literal path towards a provider that does
not offer LITERAL+."""

import re
import secrets

from harness import PROVIDER_ADDRESS, Dovecot, Pecgate, make_message


def test_command_pipelined_right_after_done(gateway, clients):
    r = clients(gateway.raw(tls=True))
    r.login("mario", gateway.password("mario"))
    _, tagged = r.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    r.send(b"I1 IDLE\r\n")
    assert r.read_line().startswith(b"+")
    # DONE and the next command in one write, without waiting for IDLE's completion.
    r.send(b"DONE\r\nN1 NOOP\r\n")
    untagged_i, tagged_i = r.read_until_tagged("I1")
    assert tagged_i.startswith(b"I1 OK"), tagged_i
    untagged_n, tagged_n = r.read_until_tagged("N1")
    assert tagged_n.startswith(b"N1 OK"), tagged_n
    assert not any(b"BAD" in line for line in untagged_i + untagged_n), untagged_i + untagged_n


def test_hidden_folder_answer_names_what_the_client_typed(gateway, clients):
    # mario's roles do not grant Riservata: the answer is the provider's nonexistent one,
    # naming the folder as typed, and never the placeholder used towards the provider.
    r = clients(gateway.raw(tls=True))
    r.login("mario", gateway.password("mario"))
    _, hidden = r.command("S1", "SELECT Riservata")
    _, missing = r.command("S2", "SELECT Inesistente")
    assert hidden.startswith(b"S1 NO"), hidden
    assert b"pecgate-none" not in hidden, hidden
    normalise = lambda line, name: re.sub(rb"\(\d+\.\d+( \+ \d+\.\d+)* secs\)", b"(T)", line[3:]).replace(name, b"NAME")
    assert normalise(hidden, b"Riservata") == normalise(missing, b"Inesistente")


class _DovecotWithoutLiteralPlus(Dovecot):
    """A real Dovecot that does not advertise LITERAL+, so pecgate must send synchronising
    literals and wait for the provider's `+` (the path taken with such providers)."""

    def _write_config(self):
        super()._write_config()
        with open(self.conf_path, "a") as conf:
            conf.write("\nimap_capability = IMAP4rev1 IDLE UIDPLUS MOVE UNSELECT NAMESPACE CHILDREN ID\n")


def test_synchronising_literals_towards_a_provider_without_literal_plus(pecgate_binary):
    dovecot = _DovecotWithoutLiteralPlus()
    dovecot.add_user(PROVIDER_ADDRESS, "provider-" + secrets.token_hex(6))
    with dovecot:
        dovecot.create_folders(PROVIDER_ADDRESS, ["Sent"])
        gw = Pecgate(dovecot, binary=pecgate_binary)
        try:
            gw.setup()
            gw.start()
            r = gw.raw(tls=True)
            r.login("mario", gw.password("mario"))
            caps = b" ".join(r.command("C1", "CAPABILITY")[0])
            # pecgate itself still offers LITERAL+ to clients.
            assert b"LITERAL+" in caps, caps
            # A mailbox name as a literal: re-encoded, sent with a synchronising literal.
            r.send(b"S1 SELECT {4+}\r\nSent\r\n")
            _, tagged = r.read_until_tagged("S1")
            assert tagged.startswith(b"S1 OK"), tagged
            # An APPEND with LITERAL+ from the client; pecgate waits for the provider's `+`.
            body = make_message("sync literal path")
            r.send(b"A1 APPEND Sent {%d+}\r\n" % len(body) + body + b"\r\n")
            _, tagged = r.read_until_tagged("A1")
            assert tagged.startswith(b"A1 OK"), tagged
            # And with a synchronising literal from the client.
            r.send(b"A2 APPEND Sent {%d}\r\n" % len(body))
            assert r.read_line().startswith(b"+")
            r.send(body + b"\r\n")
            _, tagged = r.read_until_tagged("A2")
            assert tagged.startswith(b"A2 OK"), tagged
            stored = dovecot.fetch_all(PROVIDER_ADDRESS, "Sent")
            assert stored.count(body) == 2, [len(m) for m in stored]
            r.close()
        finally:
            gw.cleanup()
