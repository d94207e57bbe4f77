"""Abuse limits: pre-login places (per address and in total), the login deadline, sessions per
user, the brute-force lockout, SUBSCRIBE of hidden folders, and `pecgate check`'s warning about
a vault key kept next to the vault.

Linux routes all of 127.0.0.0/8 to loopback: clients bind 127.0.0.2, 127.0.0.3, ... as their
source address to act as different client addresses (the harness's own probes and clients come
from 127.0.0.1).
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import re
import secrets
import shutil
import time

import pytest

from harness import (PROVIDER_ADDRESS, Dovecot, Pecgate, RawImap, populate_demo, quote, read_until_closed,
                     run_cli, tracking, wait_until)

WRONG_PASSWORD_IMAP = b"L1 NO [AUTHENTICATIONFAILED] Authentication failed"
WRONG_PASSWORD_SMTP = (535, b"5.7.8 Authentication failed: wrong user name or password")
# pecgate holds back the answer to a locked attempt this long (guard::MAX_FAILURE_DELAY)
LOCKED_DELAY = 30


@pytest.fixture
def smtps():
    """Collects smtplib clients and closes them after the test."""
    with tracking(lambda c: c.close()) as track:
        yield track


def peer_ip(row) -> str:
    return row["peer"].rsplit(":", 1)[0]


def auth_plain(c, login: str, password: str):
    """AUTH PLAIN with an initial response: one attempt, (code, text) as the server said it
    (smtplib's ``login`` would try other mechanisms after a refusal)."""
    token = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode()).decode()
    return c.docmd("AUTH", "PLAIN " + token)


def imap_login(gw, source, login, password, timeout=15):
    """One LOGIN (tag L1) on a fresh implicit-TLS connection from ``source``:
    (untagged, tagged, seconds the answer took)."""
    with gw.raw(tls=True, source=source, timeout=timeout) as r:
        t0 = time.monotonic()
        untagged, tagged = r.command("L1", f"LOGIN {quote(login)} {quote(password)}", timeout=timeout)
        return untagged, tagged, time.monotonic() - t0


def smtp_auth(gw, source, login, password, timeout=15):
    """One AUTH PLAIN on a fresh implicit-TLS connection from ``source``:
    (code, text, seconds the answer took)."""
    c = gw.smtp(tls=True, source=source, timeout=timeout)
    try:
        assert c.ehlo()[0] == 250
        t0 = time.monotonic()
        code, text = auth_plain(c, login, password)
        return code, text, time.monotonic() - t0
    finally:
        c.close()


def admitted_imap(gw, source, tls=False):
    """A RawImap from ``source`` that got pecgate's greeting, or None if it was turned away."""
    try:
        r = gw.raw(tls=tls, source=source, timeout=10)
    except (OSError, EOFError):
        return None
    if r.greeting.startswith(b"* OK"):
        return r
    r.close()
    return None


# ---------------------------------------------------------------------------
# pre-login places
# ---------------------------------------------------------------------------


def test_preauth_places_per_address(make_gateway, clients, smtps):
    gw = make_gateway(gateway_options={"max_preauth_per_address": 3})
    src = "127.0.0.2"
    # Three connections from one address, none logged in, over three listeners.
    first = clients(gw.raw(tls=True, source=src))
    plain = clients(gw.raw(tls=False, source=src))
    assert first.greeting.startswith(b"* OK") and plain.greeting.startswith(b"* OK"), (first.greeting,
                                                                                       plain.greeting)
    smtps(gw.smtp(tls=True, source=src))

    # A fourth is turned away, with a word on the STARTTLS ports and silently on TLS ports.
    assert read_until_closed(gw.starttls_port, src) == \
        b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
    assert read_until_closed(gw.smtp_starttls_port, src) == \
        b"421 4.7.0 Too many connections from your address, try again later\r\n"
    assert read_until_closed(gw.tls_port, src) == b""
    assert read_until_closed(gw.smtp_tls_port, src) == b""

    # Other addresses are not affected.
    other = clients(gw.raw(tls=True, source="127.0.0.3"))
    assert other.greeting.startswith(b"* OK"), other.greeting

    # Logging in gives the pre-login place back at once (the OK comes after the promotion)...
    first.login("mario", gw.password("mario"))
    again = clients(gw.raw(tls=True, source=src))
    assert again.greeting.startswith(b"* OK"), again.greeting
    # ...and the place it gave back is taken again.
    assert read_until_closed(gw.starttls_port, src) == \
        b"* BYE [UNAVAILABLE] Too many connections from your address\r\n"
    _, tagged = first.command("N1", "NOOP")
    assert tagged.startswith(b"N1 OK"), tagged

    # A connection that goes away gives its place back too.
    plain.close()
    clients(wait_until(lambda: admitted_imap(gw, src), 15, "the closed connection's place to be free"))


def test_preauth_places_in_total(make_gateway, clients, smtps):
    gw = make_gateway(gateway_options={"max_preauth_connections": 3})
    # Three addresses, one connection each. (The harness's readiness probes held places for a
    # moment: a refusal until they are gone is retried.)
    held = [clients(wait_until(lambda: admitted_imap(gw, "127.0.0.2"), 15, "a place")),
            clients(wait_until(lambda: admitted_imap(gw, "127.0.0.3"), 15, "a place"))]
    smtps(wait_until(lambda: gw.smtp(tls=False, source="127.0.0.4", timeout=10), 15, "a place"))

    src = "127.0.0.5"
    assert read_until_closed(gw.starttls_port, src) == b"* BYE [UNAVAILABLE] Too many connections to pecgate\r\n"
    assert read_until_closed(gw.smtp_starttls_port, src) == \
        b"421 4.3.2 Too many connections to pecgate, try again later\r\n"
    assert read_until_closed(gw.tls_port, src) == b""

    # A login frees a pre-login place; logged-in sessions do not count against this limit.
    held[0].starttls()
    held[0].login("mario", gw.password("mario"))
    newcomer = clients(gw.raw(tls=True, source=src))
    assert newcomer.greeting.startswith(b"* OK"), newcomer.greeting
    assert read_until_closed(gw.smtp_starttls_port, "127.0.0.6") == \
        b"421 4.3.2 Too many connections to pecgate, try again later\r\n"
    _, tagged = held[0].command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged


# ---------------------------------------------------------------------------
# login deadline
# ---------------------------------------------------------------------------

LOGIN_TIMEOUT = 4


def test_login_timeout_counts_from_connect(make_gateway, clients, smtps):
    gw = make_gateway(gateway_options={"login_timeout_secs": LOGIN_TIMEOUT})
    t0 = time.monotonic()
    r = clients(gw.raw(tls=True, timeout=20))
    s = smtps(gw.smtp(tls=True, timeout=20))
    assert s.ehlo()[0] == 250
    # Logged in in time: not affected.
    logged_in = clients(gw.client("mario"))
    logged_in_smtp = smtps(gw.smtp("mario"))

    # Keep the IMAP connection busy: the deadline runs from the connection, not from the last
    # command. (At most 30 NOOPs: below the 32 commands allowed before login.)
    bye = None
    for i in range(30):
        r.send(f"n{i} NOOP\r\n")
        line = r.read_line(timeout=10)
        if line.startswith(b"* BYE"):
            bye = line
            break
        assert line.startswith(f"n{i} OK".encode()), line
        try:
            bye = r.read_line(timeout=0.5)
            break
        except TimeoutError:
            continue
    elapsed = time.monotonic() - t0
    assert bye == b"* BYE Autologout: no login in time", (bye, elapsed)
    assert LOGIN_TIMEOUT * 0.9 <= elapsed < LOGIN_TIMEOUT + 12, elapsed
    with pytest.raises((EOFError, OSError)):
        r.read_line(timeout=10)

    s.sock.settimeout(20)
    assert s.getreply() == (421, b"4.4.2 Timeout: closing the connection")
    assert time.monotonic() - t0 >= LOGIN_TIMEOUT * 0.9

    # The sessions that logged in, older than the deadline by now, go on.
    assert logged_in.noop()[0] == "OK"
    assert logged_in_smtp.noop()[0] == 250

    def ended_rows():
        rows = gw.audit_rows()
        imap = [x for x in rows if x["command"] == "preauth" and x["detail"].endswith("ended=timeout")]
        smtp = [x for x in rows if x["protocol"] == "smtp" and x["command"] == "disconnect"
                and x["detail"] == "timeout"]
        return imap and smtp and (imap, smtp)

    imap_rows, smtp_rows = wait_until(ended_rows, 10, "the audit rows of the timed-out connections")
    assert len(imap_rows) == 1 and len(smtp_rows) == 1, (imap_rows, smtp_rows)


# ---------------------------------------------------------------------------
# sessions per user
# ---------------------------------------------------------------------------


def test_sessions_per_user_over_imap_and_smtp(make_gateway, clients, smtps):
    gw = make_gateway(gateway_options={"max_sessions_per_user": 2})
    pw = gw.password("mario")
    imap_session = clients(gw.raw(tls=True))
    imap_session.login("mario", pw)
    smtp_session = smtps(gw.smtp("mario"))

    limit_no = b"L1 NO [LIMIT] Too many sessions open for mario (at most 2); close one"
    for login in ("mario", "mario/studio"):
        r = clients(gw.raw(tls=True))
        t0 = time.monotonic()
        _, tagged = r.command("L1", f"LOGIN {quote(login)} {quote(pw)}")
        assert tagged == limit_no, tagged
        assert time.monotonic() - t0 < 10, "the refusal should be prompt"
    code, text, _ = smtp_auth(gw, None, "mario", pw)
    assert (code, text) == (454, b"4.7.0 Too many sessions open for mario (at most 2)")

    # Per user: anna is not affected.
    clients(gw.raw(tls=True)).login("anna", gw.password("anna"))

    # Closing a session frees a place (once pecgate has noticed: wait for it).
    _, tagged = imap_session.command("Z1", "LOGOUT")
    assert tagged.startswith(b"Z1 OK"), tagged

    def imap_login_ok():
        r = gw.raw(tls=True)
        _, tagged = r.command("L1", f"LOGIN mario {quote(pw)}")
        if tagged.startswith(b"L1 OK"):
            return clients(r)
        r.close()
        assert tagged == limit_no, tagged
        return None

    replacement = wait_until(imap_login_ok, 15, "the IMAP session's place to be free")
    _, tagged = replacement.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    # Full again (the SMTP session and the new IMAP one).
    _, tagged, _ = imap_login(gw, None, "mario", pw)
    assert tagged == limit_no, tagged

    smtp_session.quit()

    def smtp_auth_ok():
        c = gw.smtp(tls=True)
        c.ehlo()
        code, text = auth_plain(c, "mario", pw)
        if code == 235:
            return smtps(c)
        c.close()
        assert code == 454, (code, text)
        return None

    wait_until(smtp_auth_ok, 15, "the SMTP session's place to be free")

    def refusals():
        rows = [x for x in gw.audit_rows() if x["command"] in ("LOGIN", "AUTH") and x["outcome"] == "no"]
        return {x["protocol"] for x in rows} == {"imap", "smtp"} and rows

    rows = wait_until(refusals, 10, "the audit rows of the refused logins")
    assert all("max_sessions_per_user reached" in x["detail"] for x in rows), rows


# ---------------------------------------------------------------------------
# brute force
# ---------------------------------------------------------------------------


def test_brute_force_locks_the_address_and_the_user(make_gateway, clients):
    base_ms = 200
    gw = make_gateway(login_failure_delay_ms=base_ms, gateway_options={
        "lockout_address_failures": 6,
        "lockout_user_failures": 4,
        "lockout_window_secs": 900,
        "lockout_secs": 900,
    })
    base = base_ms / 1000
    mario_pw, anna_pw = gw.password("mario"), gw.password("anna")
    attacker = "127.0.0.2"

    # mario works at 127.0.0.1: that address becomes trusted for mario.
    clients(gw.client("mario")).noop()

    # One address guessing (unknown names, so only the address adds up): three failures at the
    # base delay, then each answer twice as slow; the sixth locks the address.
    delays = []
    for i in range(6):
        untagged, tagged, elapsed = imap_login(gw, attacker, f"ghost{i}", "guess-" + secrets.token_hex(3))
        assert (untagged, tagged) == ([], WRONG_PASSWORD_IMAP), (i, untagged, tagged)
        delays.append(elapsed)

    # One user guessed at from four addresses (one failure each): the fourth locks mario.
    for i in range(4):
        untagged, tagged, _ = imap_login(gw, f"127.0.0.{3 + i}", "mario", "guess-" + secrets.token_hex(3))
        assert (untagged, tagged) == ([], WRONG_PASSWORD_IMAP), (i, untagged, tagged)

    smtp_wrong = smtp_auth(gw, "127.0.0.8", "anna", "not-annas-password")
    assert smtp_wrong[:2] == WRONG_PASSWORD_SMTP, smtp_wrong

    # Locked attempts are answered only after 30 s: run them side by side.
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        t0 = time.monotonic()
        # the right password from the locked address
        address_locked = pool.submit(imap_login, gw, attacker, "anna", anna_pw, 60)
        smtp_address_locked = pool.submit(smtp_auth, gw, attacker, "anna", anna_pw, 60)
        # the right password for the locked user, from an address that never failed
        user_locked = pool.submit(imap_login, gw, "127.0.0.7", "mario", mario_pw, 60)

        # Meanwhile: mario still logs in from his trusted address, and anna from elsewhere.
        trusted = clients(gw.client("mario"))
        assert trusted.select("INBOX", readonly=True)[0] == "OK"
        _, tagged, _ = imap_login(gw, "127.0.0.8", "anna", anna_pw)
        assert tagged.startswith(b"L1 OK"), tagged
        assert time.monotonic() - t0 < LOCKED_DELAY - 5, "logins that are not locked must not wait"

        untagged, tagged, elapsed = address_locked.result(timeout=90)
        assert (untagged, tagged) == ([], WRONG_PASSWORD_IMAP), (untagged, tagged)
        assert elapsed >= LOCKED_DELAY - 1, elapsed
        untagged, tagged, elapsed = user_locked.result(timeout=90)
        assert (untagged, tagged) == ([], WRONG_PASSWORD_IMAP), (untagged, tagged)
        assert elapsed >= LOCKED_DELAY - 1, elapsed
        code, text, elapsed = smtp_address_locked.result(timeout=90)
        assert (code, text) == WRONG_PASSWORD_SMTP, (code, text)
        assert elapsed >= LOCKED_DELAY - 1, elapsed

    # The audit log says what the client was not told.
    def locked_rows():
        rows = gw.audit_rows()
        by_address = [x for x in rows if "reason=locked (address)" in (x["detail"] or "")]
        by_user = [x for x in rows if "reason=locked (user)" in (x["detail"] or "")]
        return len(by_address) >= 2 and by_user and (rows, by_address, by_user)

    try:
        rows, by_address, by_user = wait_until(locked_rows, 10, "the audit rows of the locked attempts")
    except TimeoutError:
        pytest.fail("no `locked` audit rows; the refused logins were recorded as: "
                    + repr([(x["protocol"], x["command"], x["user"], x["peer"], x["detail"])
                            for x in gw.audit_rows() if x["command"] in ("LOGIN", "AUTH")]))
    assert sorted((x["protocol"], x["command"]) for x in by_address) == [("imap", "LOGIN"), ("smtp", "AUTH")], \
        by_address
    assert all(peer_ip(x) == attacker and x["user"] == "anna" and x["outcome"] == "no" for x in by_address), \
        by_address
    assert [(x["command"], x["user"], peer_ip(x), x["outcome"]) for x in by_user] == \
        [("LOGIN", "mario", "127.0.0.7", "no")], by_user
    wrong = [x for x in rows if x["command"] == "LOGIN" and x["outcome"] == "no"
             and "reason=locked" not in x["detail"]]
    assert len(wrong) == 10, wrong
    log = gw.log_text()
    assert "login locked" in log, log[-3000:]
    assert log.count("login locked") >= 5, log[-3000:]  # two locks, three refused attempts

    # (Checked last, so that the rest is checked whatever the delays were.)
    for i, expected in enumerate([base, base, base, 2 * base, 4 * base, 8 * base]):
        assert delays[i] >= expected * 0.9, f"failure {i + 1} answered after {delays[i]:.2f}s: {delays}"


# ---------------------------------------------------------------------------
# SUBSCRIBE of hidden folders
# ---------------------------------------------------------------------------

ADMIN = "admin-studio@pec.example.test"
TIMING_RE = re.compile(rb" \(\d+\.\d+(?: \+ \d+\.\d+)* secs\)\.?$")
SUBSCRIPTION_RE = re.compile(rb"^\S+ (?:UN)?SUBSCRIBE ", re.I)


@pytest.fixture(scope="module")
def recorded(pecgate_binary):
    """A Dovecot recording pecgate's provider connections (rawlog), an alias login to look at
    the mailbox directly, the demo folders (all subscribed), and a pecgate."""
    d = Dovecot(rawlog=[PROVIDER_ADDRESS])
    d.add_user(PROVIDER_ADDRESS, "provider-" + secrets.token_hex(8))
    d.add_user(ADMIN, "admin-" + secrets.token_hex(8), share_with=PROVIDER_ADDRESS)
    with d:
        populate_demo(d, ADMIN)
        with Pecgate(d, binary=pecgate_binary).set_up() as gw:
            yield d, gw


def provider_subscriptions(d) -> list[bytes]:
    with RawImap(d.imaps_port, cafile=d.cert) as r:
        r.login(ADMIN, d.users[ADMIN])
        untagged, tagged = r.command("a", 'LSUB "" "*"')
        assert tagged.startswith(b"a OK"), tagged
        r.command("z", "LOGOUT")
    return sorted(untagged)


def test_subscribing_to_a_hidden_folder_never_changes_the_providers_subscriptions(recorded):
    """A hidden name goes up as a placeholder (so the client gets the provider's own answer for
    a missing folder, see the next test), and pecgate follows every SUBSCRIBE of a placeholder
    with its own UNSUBSCRIBE of it in the same write: whatever the provider does with names that
    do not exist, its subscriptions end up as they were, and no hidden name ever reaches it."""
    d, gw = recorded
    before = provider_subscriptions(d)
    assert any(line.endswith(b" Riservata") for line in before), before
    mark = d.rawlog_mark()
    audit_mark = max([x["id"] for x in gw.audit_rows()] or [0])

    with gw.raw(tls=True) as r:
        r.login("mario", gw.password("mario"))
        for tag, command, name in [
            ("s1", "SUBSCRIBE Riservata", "Riservata"),
            ("s2", "UNSUBSCRIBE Riservata", "Riservata"),
            ("s3", 'UNSUBSCRIBE "Riservata"', "Riservata"),
            ("s4", "SUBSCRIBE Segreta/Nuova", "Segreta/Nuova"),
            ("s5", "SUBSCRIBE Riservata/Sotto", "Riservata/Sotto"),
        ]:
            untagged, tagged = r.command(tag, command)
            # Dovecot's answers for a folder that does not exist, with the client's name.
            expected = (f"{tag} OK Unsubscribe completed" if command.startswith("UNSUBSCRIBE")
                        else f"{tag} NO Mailbox doesn't exist: {name}")
            assert untagged == [] and tagged.startswith(expected.encode()), (command, untagged, tagged)
            assert b"pecgate-none" not in tagged
        # A visible folder's subscription is relayed (and shows in the provider's log).
        for tag, command in (("v1", "UNSUBSCRIBE Ricevute"), ("v2", "SUBSCRIBE Ricevute")):
            _, tagged = r.command(tag, command)
            assert tagged.startswith(f"{tag} OK".encode()), tagged
        _, tagged = r.command("z", "LOGOUT")
        assert tagged.startswith(b"z OK"), tagged

    conns = d.rawlog_connections(exclude=mark)
    assert conns, "pecgate's provider connection was not recorded"
    d.wait_rawlogs_closed(conns)
    received = b"".join(c.received for c in conns)
    assert b"Riservata" not in received and b"Segreta" not in received, received
    subscriptions = [line.strip() for line in received.split(b"\n") if SUBSCRIPTION_RE.match(line)]
    visible = [line for line in subscriptions if b"Ricevute" in line]
    assert len(visible) == 2, subscriptions
    hidden = [line.split(b" ", 1)[1] for line in subscriptions if b"pecgate-none-" in line]
    assert len(hidden) == 5 + 3, subscriptions
    # Every SUBSCRIBE of a placeholder is followed by pecgate's UNSUBSCRIBE of the same name.
    for i, line in enumerate(hidden):
        if line.upper().startswith(b"SUBSCRIBE "):
            assert hidden[i + 1] == b"UNSUBSCRIBE " + line.split(b" ", 1)[1], hidden
    assert provider_subscriptions(d) == before

    def rows():
        found = [x for x in gw.audit_rows("id > ?", (audit_mark,))
                 if x["command"] in ("SUBSCRIBE", "UNSUBSCRIBE")]
        done = [x for x in found if x["outcome"] != "sent"]
        return len(done) == 5 + 3 + 2 and found
    found = wait_until(rows, 10, "the audit rows of the subscriptions")
    client_rows = [x for x in found if "Ricevute" not in (x["folder"] or "")
                   and "by pecgate" not in x["detail"] and x["outcome"] != "sent"]
    assert [x["outcome"] for x in client_rows] == ["denied"] * 5, client_rows
    undo_rows = [x for x in found if "by pecgate" in x["detail"]]
    assert sorted(x["outcome"] for x in undo_rows) == ["denied"] * 3 + ["sent"] * 3, undo_rows


def test_hidden_subscription_answer_is_the_providers_answer_for_a_missing_folder(recorded):
    """README: a hidden folder is indistinguishable from a nonexistent one. Compare pecgate's
    answer for a hidden name with the provider's own answer (relayed by pecgate) for a visible
    name that does not exist, timings and names aside."""
    d, gw = recorded

    def shape(tagged: bytes, name: str) -> bytes:
        # Dovecot prints "(T secs)." after its text, or just "." when timing is off.
        return TIMING_RE.sub(b"", tagged).rstrip(b".").replace(name.encode(), b"NAME")

    with gw.raw(tls=True) as r:
        r.login("mario", gw.password("mario"))
        for command in ("SUBSCRIBE", "UNSUBSCRIBE"):
            _, missing = r.command("a", f"{command} Ricevute/Mancante")
            _, hidden = r.command("a", f"{command} Riservata/Mancante")
            assert shape(hidden, "Riservata/Mancante") == shape(missing, "Ricevute/Mancante"), (hidden, missing)


# ---------------------------------------------------------------------------
# `pecgate check` and the vault key
# ---------------------------------------------------------------------------


def test_check_warns_when_the_vault_key_is_inside_state_dir(make_gateway):
    gw = make_gateway(start=False)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}

    def check(extra_env=None):
        res = run_cli([gw.bin, "check", "-c", gw.conf_path], env={**env, **(extra_env or {})})
        err = res.stderr.decode(errors="replace")
        assert res.returncode == 0, (res.stdout, err)
        assert b"configuration OK" in res.stdout, res.stdout
        return [line for line in err.splitlines() if line.startswith("warning: gateway.vault_key")]

    key = gw.state_dir / "vault.key"
    assert key.exists()
    [warning] = check()
    assert "inside state_dir" in warning and str(key) in warning, warning
    assert "LoadCredential=vault-key:" in warning, warning

    # As a systemd credential: the key is read from there (the vault opens), no warning.
    creds = gw.dir / "credentials"
    creds.mkdir(mode=0o700)
    shutil.copy(key, creds / "vault-key")
    (creds / "vault-key").chmod(0o600)
    assert check({"CREDENTIALS_DIRECTORY": str(creds)}) == []
    # ...and it is really that key that is used: a wrong one is a problem.
    (creds / "vault-key").write_bytes(secrets.token_bytes(len(key.read_bytes())))
    res = run_cli([gw.bin, "check", "-c", gw.conf_path], env={**env, "CREDENTIALS_DIRECTORY": str(creds)})
    assert res.returncode != 0, res.stderr

    # An explicit vault_key outside state_dir: no warning; inside it: the warning again.
    outside = gw.dir / "keys" / "vault.key"
    outside.parent.mkdir()
    shutil.copy(key, outside)
    outside.chmod(0o600)
    gw.gateway_options["vault_key"] = str(outside)
    gw.write_config()
    assert check() == []
    gw.gateway_options["vault_key"] = str(key)
    gw.write_config()
    [warning] = check()
    assert "inside state_dir" in warning, warning
