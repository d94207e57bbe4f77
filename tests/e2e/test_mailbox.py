"""Mailbox operations relayed through pecgate: LIST, SELECT, APPEND, FETCH,
literals, pipelining, IDLE, unparseable commands."""

import re
import time

from harness import PROVIDER_ADDRESS, make_big_message, make_message, message_id_of, quote


def _direct_find(dovecot, folder, msgid):
    """(uid, raw) of the message with ``msgid`` in ``folder``, read directly from Dovecot."""
    c = dovecot.imap_direct(PROVIDER_ADDRESS)
    try:
        typ, _ = c.select(quote(folder), readonly=True)
        assert typ == "OK"
        typ, data = c.uid("SEARCH", None, "HEADER", "Message-ID", quote(msgid))
        assert typ == "OK", data
        uids = data[0].split()
        if not uids:
            return None, None
        assert len(uids) == 1, f"{msgid} found {len(uids)} times"
        typ, data = c.uid("FETCH", uids[0], "(BODY.PEEK[])")
        assert typ == "OK", data
        return uids[0], data[0][1]
    finally:
        c.logout()


def _direct_exists(dovecot, folder):
    c = dovecot.imap_direct(PROVIDER_ADDRESS)
    try:
        typ, data = c.select(quote(folder), readonly=True)
        assert typ == "OK"
        return int(data[0])
    finally:
        c.logout()


def test_list_shows_allowed_folders(mario):
    typ, data = mario.list()
    assert typ == "OK", data
    names = set()
    for line in data:
        m = re.match(rb'^\(([^)]*)\) (?:"(?:[^"\\]|\\.)"|NIL) (.*)$', line)
        assert m, f"unexpected LIST line {line!r}"
        names.add(m.group(2).strip(b'"').decode())
    for expected in ("INBOX", "Sent", "Ricevute/Consegne"):
        assert expected in names, f"{expected} missing from LIST: {names}"


def test_select_reports_exists_and_uidvalidity(mario, dovecot):
    expected = _direct_exists(dovecot, "INBOX")
    typ, data = mario.select("INBOX")
    assert typ == "OK", data
    assert int(data[0]) == expected
    typ, uidvalidity = mario.response("UIDVALIDITY")
    assert uidvalidity and uidvalidity[0] and int(uidvalidity[0]) > 0, uidvalidity
    typ, data = mario.select("Ricevute/Consegne", readonly=True)
    assert typ == "OK", data
    assert int(data[0]) == _direct_exists(dovecot, "Ricevute/Consegne")


def test_append_10mb_and_fetch_back_identical(gateway, dovecot, clients):
    raw = make_big_message(10 * 1024 * 1024, subject="allegato grande")
    msgid = message_id_of(raw)
    c = clients(gateway.client("mario", timeout=120))
    typ, data = c.append("INBOX", None, None, raw)
    assert typ == "OK", data
    typ, data = c.select("INBOX", readonly=True)
    assert typ == "OK"
    typ, data = c.uid("SEARCH", None, "HEADER", "Message-ID", quote(msgid))
    assert typ == "OK", data
    uids = data[0].split()
    assert len(uids) == 1, data
    typ, data = c.uid("FETCH", uids[0], "(BODY.PEEK[])")
    assert typ == "OK", data
    via_gateway = data[0][1]
    assert len(via_gateway) == len(raw)
    assert via_gateway == raw
    direct_uid, direct = _direct_find(dovecot, "INBOX", msgid)
    assert direct_uid == uids[0]
    assert direct == raw


def test_append_with_synchronising_literal(gateway, dovecot, clients):
    raw = make_message("literal sincronizzante")
    r = clients(gateway.raw(tls=True))
    r.login("mario", gateway.password("mario"))
    r.send(b"A1 APPEND INBOX (\\Seen) {%d}\r\n" % len(raw))
    line = r.read_line()
    assert line.startswith(b"+"), f"expected a continuation request, got {line!r}"
    r.send(raw + b"\r\n")
    _, tagged = r.read_until_tagged("A1")
    assert tagged.startswith(b"A1 OK"), tagged
    _, direct = _direct_find(dovecot, "INBOX", message_id_of(raw))
    assert direct == raw


def test_append_with_literal_plus_in_one_write(gateway, dovecot, clients):
    raw = make_message("literal non sincronizzante", "riga\n" * 500)
    r = clients(gateway.raw(tls=True))
    r.login("mario", gateway.password("mario"))
    r.send(b"A2 APPEND INBOX {%d+}\r\n" % len(raw) + raw + b"\r\n")
    untagged, tagged = r.read_until_tagged("A2")
    assert not any(l.startswith(b"+") for l in untagged), f"LITERAL+ got a continuation: {untagged!r}"
    assert tagged.startswith(b"A2 OK"), tagged
    _, direct = _direct_find(dovecot, "INBOX", message_id_of(raw))
    assert direct == raw


def test_pipelined_commands_in_one_write(gateway, clients):
    r = clients(gateway.raw(tls=True))
    r.login("mario", gateway.password("mario"))
    r.send(
        b"P1 NOOP\r\n"
        b"P2 SELECT INBOX\r\n"
        b"P3 UID FETCH 1:* (FLAGS)\r\n"
        b"P4 CAPABILITY\r\n"
        b'P5 LIST "" "*"\r\n'
        b"P6 NOOP\r\n"
    )
    tags = []
    untagged_all = []
    deadline = time.monotonic() + 20
    while len(tags) < 6:
        line = r.read_line(max(0.01, deadline - time.monotonic()))
        m = re.match(rb"^(P\d) (OK|NO|BAD)", line)
        if m:
            tags.append((m.group(1).decode(), m.group(2).decode(), line))
        else:
            untagged_all.append(line)
    # RFC 3501 5.5: a server may complete pipelined commands out of order
    assert sorted(t for t, _, _ in tags) == ["P1", "P2", "P3", "P4", "P5", "P6"], tags
    assert all(status == "OK" for _, status, _ in tags), tags
    assert any(re.match(rb"^\* \d+ EXISTS", l) for l in untagged_all)
    assert any(l.startswith(b"* LIST") for l in untagged_all)


def test_pipelined_login_and_select_in_one_write(gateway, clients):
    r = clients(gateway.raw(tls=True))
    pw = gateway.password("mario")
    r.send(f"Q1 LOGIN mario {quote(pw)}\r\nQ2 SELECT INBOX\r\nQ3 NOOP\r\n".encode())
    untagged1, t1 = r.read_until_tagged("Q1", timeout=20)
    untagged2, t2 = r.read_until_tagged("Q2")
    untagged3, t3 = r.read_until_tagged("Q3")
    assert t1.startswith(b"Q1 OK"), t1
    assert t2.startswith(b"Q2 OK"), t2
    assert t3.startswith(b"Q3 OK"), t3
    assert any(re.match(rb"^\* \d+ EXISTS", l) for l in untagged2), untagged2


def test_idle_sees_new_delivery(gateway, dovecot, clients):
    r = clients(gateway.raw(tls=True, timeout=20))
    r.login("mario", gateway.password("mario"))
    untagged, tagged = r.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    before = max(int(m.group(1)) for l in untagged if (m := re.match(rb"^\* (\d+) EXISTS", l)))
    r.send(b"I1 IDLE\r\n")
    line = r.read_line()
    assert line.startswith(b"+"), f"IDLE not accepted: {line!r}"

    dovecot.deliver(PROVIDER_ADDRESS, make_message("CONSEGNA: durante IDLE"))

    deadline = time.monotonic() + 20
    seen = []
    exists = None
    while exists is None:
        line = r.read_line(max(0.01, deadline - time.monotonic()))
        seen.append(line)
        m = re.match(rb"^\* (\d+) EXISTS", line)
        if m and int(m.group(1)) > before:
            exists = int(m.group(1))
        assert not line.startswith(b"I1 "), f"IDLE ended early: {seen!r}"
    assert exists == before + 1, seen
    r.send(b"DONE\r\n")
    _, tagged = r.read_until_tagged("I1")
    assert tagged.startswith(b"I1 OK"), tagged
    _, tagged = r.command("N1", "NOOP")
    assert tagged.startswith(b"N1 OK"), tagged


def test_unparseable_command_gets_bad_and_session_continues(gateway, clients):
    r = clients(gateway.raw(tls=True))
    # before login
    _, tagged = r.command("X0", "FROBNICATE ((((")
    assert tagged.startswith(b"X0 BAD"), tagged
    r.login("mario", gateway.password("mario"))
    for tag, garbage in (("X1", "FROBNICATE ((("), ("X2", "FETCH 1 (BODY["), ("X3", "SELECT")):
        untagged, tagged = r.command(tag, garbage)
        assert tagged.startswith(f"{tag} BAD".encode()), f"{garbage!r} -> {tagged!r}"
    # an untagged garbage line gets an untagged (or tagged) BAD and nothing else breaks
    r.send(b"\r\n")
    _, tagged = r.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    _, tagged = r.command("N1", "NOOP")
    assert tagged.startswith(b"N1 OK"), tagged
