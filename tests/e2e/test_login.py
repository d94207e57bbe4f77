"""Logging in to pecgate: listeners, STARTTLS, SASL, failures, capabilities."""

import base64
import imaplib
import time

import pytest

from harness import capabilities_from, quote, wait_until

FORBIDDEN_CAP_PREFIXES = ("COMPRESS", "NOTIFY")


def _assert_no_forbidden(caps):
    bad = sorted(c for c in caps if c.startswith(FORBIDDEN_CAP_PREFIXES))
    assert not bad, f"forbidden capabilities advertised: {bad}"


def test_login_over_implicit_tls(gateway, clients):
    c = clients(gateway.client("mario", tls=True))
    typ, data = c.noop()
    assert typ == "OK"
    assert c.state == "AUTH"


def test_login_over_starttls(gateway, clients):
    c = clients(gateway.client("mario", tls="starttls"))
    assert c._tls_established
    typ, _ = c.noop()
    assert typ == "OK"
    assert c.state == "AUTH"


def test_login_with_mailbox_suffix(gateway, clients):
    c = clients(gateway.client("mario/studio", gateway.password("mario")))
    typ, data = c.select("INBOX", readonly=True)
    assert typ == "OK", data


def test_login_with_unknown_mailbox_suffix_fails(gateway, clients):
    c = clients(gateway.connect(tls=True))
    with pytest.raises(imaplib.IMAP4.error):
        c.login("mario/nonexistent", gateway.password("mario"))


def test_reception_user_can_log_in(gateway, clients):
    c = clients(gateway.client("anna"))
    typ, data = c.select("INBOX", readonly=True)
    assert typ == "OK", data


def test_plain_port_advertises_logindisabled_and_refuses_login(gateway, clients):
    r = clients(gateway.raw(tls=False))
    assert r.greeting.startswith(b"* OK"), r.greeting
    untagged, tagged = r.command("C1", "CAPABILITY")
    assert tagged.startswith(b"C1 OK"), tagged
    caps = capabilities_from(untagged)
    assert "LOGINDISABLED" in caps, caps
    assert "STARTTLS" in caps, caps
    _, tagged = r.command("L1", f"LOGIN mario {quote(gateway.password('mario'))}")
    assert tagged.startswith((b"L1 NO", b"L1 BAD")), f"LOGIN before STARTTLS was not refused: {tagged!r}"
    # The session goes on: after STARTTLS the same connection can log in.
    r.starttls("S1")
    untagged, tagged = r.command("C2", "CAPABILITY")
    caps = capabilities_from(untagged)
    assert "LOGINDISABLED" not in caps, caps
    assert "STARTTLS" not in caps, caps
    r.login("mario", gateway.password("mario"), tag="L2")
    _, tagged = r.command("N1", "NOOP")
    assert tagged.startswith(b"N1 OK"), tagged


def test_authenticate_plain_with_initial_response(gateway, clients):
    r = clients(gateway.raw(tls=True))
    untagged, tagged = r.command("C1", "CAPABILITY")
    caps = capabilities_from(untagged)
    assert "AUTH=PLAIN" in caps, caps
    assert "SASL-IR" in caps, caps
    ir = base64.b64encode(b"\0mario\0" + gateway.password("mario").encode()).decode()
    _, tagged = r.command("A1", f"AUTHENTICATE PLAIN {ir}")
    assert tagged.startswith(b"A1 OK"), tagged
    _, tagged = r.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged


def test_authenticate_plain_with_continuation(gateway, clients):
    c = clients(gateway.connect(tls=True))
    pw = gateway.password("mario")
    typ, data = c.authenticate("PLAIN", lambda _challenge: b"\0mario\0" + pw.encode())
    assert typ == "OK", data
    assert c.state == "AUTH"


def _failed_login_line(gateway, clients, user, password):
    r = clients(gateway.raw(tls=True))
    t0 = time.monotonic()
    _, tagged = r.command("L1", f"LOGIN {quote(user)} {quote(password)}", timeout=20)
    elapsed = time.monotonic() - t0
    return tagged, elapsed


def test_wrong_password_and_unknown_user_get_identical_no(gateway, clients):
    wrong_pw, t_wrong = _failed_login_line(gateway, clients, "mario", "not-the-password")
    unknown, t_unknown = _failed_login_line(gateway, clients, "ghost", "whatever-password")
    assert wrong_pw.startswith(b"L1 NO "), wrong_pw
    assert unknown.startswith(b"L1 NO "), unknown
    assert b"[AUTHENTICATIONFAILED]" in wrong_pw, wrong_pw
    assert wrong_pw == unknown, "failure text must not reveal whether the user exists"
    delay = gateway.login_failure_delay_ms / 1000
    assert t_wrong >= delay * 0.9, f"wrong password answered after {t_wrong:.3f}s < delay {delay}s"
    assert t_unknown >= delay * 0.9, f"unknown user answered after {t_unknown:.3f}s < delay {delay}s"


def test_failed_authenticate_plain_gets_authenticationfailed(gateway, clients):
    r = clients(gateway.raw(tls=True))
    ir = base64.b64encode(b"\0mario\0wrong-password").decode()
    _, tagged = r.command("A1", f"AUTHENTICATE PLAIN {ir}", timeout=20)
    assert tagged.startswith(b"A1 NO"), tagged
    assert b"[AUTHENTICATIONFAILED]" in tagged, tagged


def test_commands_before_login_are_not_served(gateway, clients):
    r = clients(gateway.raw(tls=True))
    for tag, cmd in (("S1", "SELECT INBOX"), ("S2", 'LIST "" "*"')):
        untagged, tagged = r.command(tag, cmd)
        assert tagged.startswith((f"{tag} BAD".encode(), f"{tag} NO".encode())), tagged
        assert not any(l.startswith(b"* LIST") for l in untagged), untagged
    # ID and NOOP are allowed before login.
    _, tagged = r.command("I1", 'ID ("name" "pytest")')
    assert tagged.startswith(b"I1 OK"), tagged
    _, tagged = r.command("N1", "NOOP")
    assert tagged.startswith(b"N1 OK"), tagged


def test_capabilities_allow_list_without_compress(gateway, clients):
    r = clients(gateway.raw(tls=True))
    pre = capabilities_from([r.greeting])
    untagged, tagged = r.command("C1", "CAPABILITY")
    assert tagged.startswith(b"C1 OK"), tagged
    pre |= capabilities_from(untagged)
    assert "IMAP4REV1" in pre, pre
    _assert_no_forbidden(pre)

    login_ok = r.login("mario", gateway.password("mario"))
    post_code = capabilities_from([login_ok])
    untagged, tagged = r.command("C2", "CAPABILITY")
    assert tagged.startswith(b"C2 OK"), tagged
    post = capabilities_from(untagged)
    for required in ("IMAP4REV1", "IDLE", "UIDPLUS", "LITERAL+"):
        assert required in post, f"{required} missing after login: {post}"
    _assert_no_forbidden(post)
    _assert_no_forbidden(post_code)
    # And the command itself is not relayed.
    _, tagged = r.command("Z1", "COMPRESS DEFLATE")
    assert tagged.startswith((b"Z1 BAD", b"Z1 NO")), tagged
    _, tagged = r.command("N1", "NOOP")
    assert tagged.startswith(b"N1 OK"), tagged


def test_before_login_one_summary_row_and_a_cap_on_commands(make_gateway):
    """A client that never logs in cannot fill the audit log (which would close it for
    everyone): its commands leave one `preauth` row, and past 32 commands it is disconnected.
    A login attempt is always recorded on its own."""
    gw = make_gateway()
    r = gw.raw(tls=True)
    r.command("b0", "LOGIN mario wrong-password")
    for i in range(31):
        _, tagged = r.command(f"n{i}", "NOOP")
        assert tagged.startswith(f"n{i} OK".encode()), tagged
    r.send(b"n31 NOOP\r\n")
    line = r.read_line()
    assert line.startswith(b"* BYE Too many commands before login"), line
    with pytest.raises((EOFError, OSError, TimeoutError)):
        r.read_line(timeout=5)
    r.close()

    # (The harness's readiness probe leaves a preauth row of its own: look at this session's.)
    wait_until(lambda: any(row["command"] == "LOGIN" for row in gw.audit_rows()), 10, "the LOGIN row")
    session = next(row["session"] for row in gw.audit_rows() if row["command"] == "LOGIN")

    def rows():
        return [row for row in gw.audit_rows() if row["session"] == session]

    wait_until(lambda: any(row["command"] == "preauth" for row in rows()), 10, "the preauth row")
    got = rows()
    assert [row["command"] for row in got] == ["LOGIN", "preauth"], got
    assert got[0]["outcome"] == "no"
    assert got[1]["outcome"] == "denied"
    assert got[1]["detail"].startswith("commands=33 bytes="), got[1]
    assert "tls=yes ended=too many commands before login" in got[1]["detail"], got[1]

    # A client that logs in leaves the same single row, ended=login, under its user.
    c = gw.client("mario", tls=True)
    c.noop()
    c.logout()

    def logged_in_rows():
        return [row for row in gw.audit_rows()
                if row["command"] == "preauth" and row["detail"].endswith("ended=login")]

    wait_until(logged_in_rows, 10, "the preauth row of the session that logged in")
    [last] = logged_in_rows()
    assert last["user"] == "mario" and last["detail"].endswith("tls=yes ended=login"), last
    assert not [row for row in gw.audit_rows() if row["session"] == last["session"]
                and row["command"] in ("CAPABILITY", "NOOP", "ID")
                and row["id"] < last["id"]], "pre-login commands recorded one by one"
