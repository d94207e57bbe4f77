"""pecgate as a service: reloading the configuration (SIGHUP) while sessions run, systemd's
readiness protocol, the control socket (`pecgate sessions`, `pecgate sessions kick`), the
metrics and health endpoint, and `pecgate client-config`.

Every gateway here is configured with port 0 (pecgate binds free ports and logs them); a
reload writes the configuration back with the same port-0 addresses (``configured_text``), so
the listeners are left as they are unless a test changes them on purpose.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import stat
import tempfile
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

import harness
from harness import (DEFAULT_ROLES, HOST, PEC_DOMAIN, PROVIDER_ADDRESS, PecProvider, RawImap, make_message,
                     provider_mailbox, quote, tracking, wait_until)

ALTRO = f"altro@{PEC_DOMAIN}"
PORT_ATTRS = ("tls_port", "starttls_port", "smtp_tls_port", "smtp_starttls_port")
RELOADED = "configuration reloaded"
REFUSED = "reload refused: still running on the previous configuration"
# How long a revoked session may take to hear its goodbye, from the signal (the promise is
# "within a second"; the rest is slack for a loaded machine).
REVOKE_LIMIT = 1.5

LATENCIES: dict[str, float] = {}


@pytest.fixture(scope="module")
def provider(dovecot):
    with PecProvider(dovecot) as p:
        yield p


@pytest.fixture
def smtps():
    """Collects smtplib clients and closes them after the test."""
    with tracking(lambda c: c.close()) as track:
        yield track


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def configured_text(gw) -> str:
    """The gateway's configuration as it was configured (port 0 listeners), not with the
    ports it learnt: a reload of this text leaves the listeners as they are."""
    saved = {a: getattr(gw, a) for a in PORT_ATTRS}
    try:
        for a in PORT_ATTRS:
            setattr(gw, a, 0)
        return gw.config_text()
    finally:
        for a, v in saved.items():
            setattr(gw, a, v)


def sighup(gw, text: str | None = None) -> tuple[int, float]:
    """Write ``text`` (default: the gateway's current settings) as the configuration and send
    SIGHUP. Returns (log mark before the signal, monotonic time of the signal)."""
    gw.conf_path.write_text(configured_text(gw) if text is None else text)
    mark = gw.log_mark()
    t0 = time.monotonic()
    os.kill(gw.proc.pid, signal.SIGHUP)
    return mark, t0


def reload_ok(gw, text: str | None = None) -> int:
    """Reload and wait for success; returns ``sessions_ended``."""
    mark, _ = sighup(gw, text)
    line = gw.wait_log(RELOADED, mark, timeout=10)
    assert REFUSED not in gw.log_text()[mark:], gw.log_text()[mark:]
    m = re.search(r"sessions_ended=(\d+)", line)
    assert m, line
    return int(m.group(1))


def reload_refused(gw, text: str) -> str:
    """Reload with a broken ``text`` and wait for the refusal; returns the log line."""
    mark, _ = sighup(gw, text)
    line = gw.wait_log(REFUSED, mark, timeout=10)
    assert RELOADED not in gw.log_text()[mark:]
    return line


def logged_in(gw, clients, user: str, select: str | None = "INBOX", password: str | None = None,
              timeout: float = 15) -> RawImap:
    r = clients(gw.raw(timeout=timeout))
    r.login(user, password or gw.password(user.split("/")[0]))
    if select:
        _, tagged = r.command("S1", f"SELECT {select}")
        assert tagged.startswith(b"S1 OK"), tagged
    return r


def start_idle(r: RawImap) -> int:
    """SELECT INBOX, IDLE; returns the message count before."""
    untagged, tagged = r.command("S2", "SELECT INBOX")
    assert tagged.startswith(b"S2 OK"), tagged
    count = max(int(m.group(1)) for l in untagged if (m := re.match(rb"^\* (\d+) EXISTS", l)))
    r.send(b"I1 IDLE\r\n")
    line = r.read_line()
    assert line.startswith(b"+"), line
    return count


def local_port(client) -> int:
    sock = client.sock
    return sock.getsockname()[1]


def imap_goodbye(r: RawImap, timeout: float = 10):
    """Read until ``* BYE``: (lines before it, the BYE line, when it arrived)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        line = r.read_line(max(0.01, deadline - time.monotonic()))
        if line.startswith(b"* BYE"):
            return seen, line, time.monotonic()
        seen.append(line)


def smtp_goodbye(c: smtplib.SMTP, timeout: float = 10):
    """The next reply the server sends unasked: (code, text, when it arrived)."""
    c.sock.settimeout(timeout)
    code, text = c.getreply()
    return code, text, time.monotonic()


def imap_closed(r: RawImap, timeout: float = 5) -> bool:
    """Whether the server closes the connection (sending nothing more) within ``timeout``."""
    try:
        line = r.read_line(timeout)
    except TimeoutError:
        return False
    except (EOFError, OSError):
        return True
    raise AssertionError(f"more data after the goodbye: {line!r}")


def smtp_closed(c: smtplib.SMTP, timeout: float = 5) -> bool:
    c.sock.settimeout(timeout)
    try:
        return c.sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def imap_login_refused(gw, user: str, password: str) -> bytes:
    with gw.raw() as r:
        _, tagged = r.command("L1", f"LOGIN {quote(user)} {quote(password)}")
    return tagged


def smtp_auth_code(gw, user: str, password: str) -> int:
    c = gw.smtp()
    try:
        c.ehlo()
        try:
            code, _ = c.login(user, password)
        except smtplib.SMTPAuthenticationError as exc:
            code = exc.smtp_code
        return code
    finally:
        c.close()


def rows(gw, where: str, params=(), n: int | None = None, timeout: float = 10) -> list[dict]:
    """Audit rows matching ``where``; with ``n``, wait until there are exactly that many."""
    if n is None:
        return gw.audit_rows(where, params)
    try:
        return wait_until(lambda: (r := gw.audit_rows(where, params)) and len(r) == n and r, timeout,
                          f"{n} audit rows where {where} {params}")
    except TimeoutError:
        raise AssertionError(f"expected {n} rows where {where} {params}, got {gw.audit_rows(where, params)}")


def noop_ok(r: RawImap, tag: str = "N1") -> bool:
    _, tagged = r.command(tag, "NOOP")
    return tagged.startswith(f"{tag} OK".encode())


class TlsImapAt(RawImap):
    """A RawImap over implicit TLS to ``address``:``port`` (any loopback address), checking the
    gateway's certificate for ``localhost``."""

    def __init__(self, address: str, port: int, cafile, timeout: float = 10):
        self.host = "localhost"
        self.timeout = timeout
        self.cafile = cafile
        sock = socket.create_connection((address, port), timeout=timeout)
        self.sock = harness.tls_context(cafile).wrap_socket(sock, server_hostname="localhost")
        self.buf = b""
        self.greeting = self.read_line()


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# ---------------------------------------------------------------------------
# reload
# ---------------------------------------------------------------------------


def test_reload_removing_a_user_ends_their_sessions_within_a_second(make_gateway, provider, dovecot, clients,
                                                                    smtps):
    gw = make_gateway(smtp_url=provider.smtps_url)
    # mario: an IMAP session in IDLE, one logged in with nothing selected, one SMTP session
    # between commands. anna: in IDLE.
    m_idle = logged_in(gw, clients, "mario", select=None, timeout=20)
    start_idle(m_idle)
    m_plain = logged_in(gw, clients, "mario", select=None)
    m_smtp = smtps(gw.smtp("mario"))
    anna = logged_in(gw, clients, "anna", select=None, timeout=20)
    before = start_idle(anna)
    mario_ports = {local_port(m_idle), local_port(m_plain), local_port(m_smtp)}
    mario_password = gw.password("mario")

    del gw.users["mario"]
    text = configured_text(gw)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        waits = {
            "imap-idle": pool.submit(imap_goodbye, m_idle),
            "imap": pool.submit(imap_goodbye, m_plain),
            "smtp": pool.submit(smtp_goodbye, m_smtp),
        }
        mark, t0 = sighup(gw, text)
        done = {k: f.result() for k, f in waits.items()}

    for key in ("imap-idle", "imap"):
        seen, bye, at = done[key]
        assert bye == b"* BYE [UNAVAILABLE] Session ended: user removed", (key, seen, bye)
        LATENCIES[f"remove/{key}"] = at - t0
    code, text_, at = done["smtp"]
    assert (code, text_) == (421, b"4.7.0 Session ended: user removed")
    LATENCIES["remove/smtp"] = at - t0
    print("revocation latency (s):", {k: round(v, 3) for k, v in LATENCIES.items() if k.startswith("remove/")})
    for key in ("remove/imap-idle", "remove/imap", "remove/smtp"):
        assert LATENCIES[key] < REVOKE_LIMIT, LATENCIES
    assert imap_closed(m_idle) and imap_closed(m_plain) and smtp_closed(m_smtp)

    line = gw.wait_log(RELOADED, mark)
    assert "sessions_ended=3" in line, line
    reload_rows = rows(gw, "protocol = 'system' AND command = 'reload'", n=1)
    assert (reload_rows[0]["outcome"], reload_rows[0]["detail"]) == ("ok", "sessions_ended=3"), reload_rows
    revoked = rows(gw, "command = 'revoked'", n=3)
    assert {r["user"] for r in revoked} == {"mario"}, revoked
    assert {r["detail"] for r in revoked} == {"user removed"}, revoked
    assert {r["protocol"] for r in revoked} == {"imap", "smtp"}, revoked
    assert {int(r["peer"].rsplit(":", 1)[1]) for r in revoked} == mario_ports, revoked

    # anna's IDLE is still up and still hears of new mail.
    dovecot.deliver(PROVIDER_ADDRESS, make_message("CONSEGNA: dopo il reload"))
    deadline = time.monotonic() + 15
    seen = []
    while True:
        line = anna.read_line(max(0.01, deadline - time.monotonic()))
        seen.append(line)
        assert not line.startswith((b"* BYE", b"I1 ")), seen
        m = re.match(rb"^\* (\d+) EXISTS", line)
        if m and int(m.group(1)) > before:
            assert int(m.group(1)) == before + 1, seen
            break
    anna.send(b"DONE\r\n")
    _, tagged = anna.read_until_tagged("I1")
    assert tagged.startswith(b"I1 OK"), tagged
    assert noop_ok(anna)
    assert not rows(gw, "command = 'revoked' AND user = 'anna'")

    # mario is gone for new logins too, on both protocols.
    assert imap_login_refused(gw, "mario", mario_password).startswith(b"L1 NO [AUTHENTICATIONFAILED]")
    assert smtp_auth_code(gw, "mario", mario_password) == 535


def test_broken_reload_changes_nothing(make_gateway, clients, tmp_path):
    gw = make_gateway()
    mario = logged_in(gw, clients, "mario")
    good = configured_text(gw)

    # Each file is refused whole: the part that would remove mario is not applied either.
    without_mario = good.replace("[users.mario]", "[users.mariox]", 1)
    # (the file, what the refusal must name: the key, as `pecgate check` names it)
    broken = [
        (without_mario.replace('roles = ["reception"]', 'roles = ["portineria"]', 1), ("users.anna", "portineria")),
        (without_mario.replace("[gateway]\n", "[gateway]\nmax_sesions = 3\n", 1), ("[gateway]", "max_sesions")),
        (without_mario.replace(str(gw.cert), str(tmp_path / "missing.crt"), 1), ("tls.cert",)),
        (without_mario.replace(str(gw.state_dir), str(tmp_path / "other-state"), 1), ("state_dir",)),
    ]
    for text, names in broken:
        assert text != without_mario, names
        line = reload_refused(gw, text)
        assert all(n in line for n in names), (names, line)
        row = rows(gw, "protocol = 'system' AND command = 'reload'")[-1]
        assert row["outcome"] == "error" and all(n in row["detail"] for n in names), (names, row)

    errors = rows(gw, "protocol = 'system' AND command = 'reload'")
    assert [r["outcome"] for r in errors] == ["error"] * len(broken), errors
    assert not rows(gw, "command = 'revoked'")
    # The old configuration is in force: mario's session goes on, mario and anna log in.
    assert noop_ok(mario)
    logged_in(gw, clients, "mario")
    logged_in(gw, clients, "anna")
    assert not (tmp_path / "other-state").exists()

    # And the next good file is taken.
    assert reload_ok(gw, good) == 0
    assert noop_ok(mario, "N2")
    assert rows(gw, "protocol = 'system' AND command = 'reload'")[-1]["outcome"] == "ok"


def test_user_added_by_reload_logs_in_without_restart(make_gateway, provider, clients, smtps):
    gw = make_gateway(smtp_url=provider.smtps_url)
    pid = gw.proc.pid
    # Connections accepted before the reload, not logged in yet.
    early_imap = clients(gw.raw())
    early_smtp = smtps(gw.smtp())
    assert early_smtp.ehlo()[0] == 250
    password = "luca-" + secrets.token_hex(6)
    assert imap_login_refused(gw, "luca", password).startswith(b"L1 NO [AUTHENTICATIONFAILED]")

    gw.users["luca"] = {"password": password, "roles": ["segreteria"]}
    assert reload_ok(gw) == 0

    early_imap.login("luca", password)
    _, tagged = early_imap.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    assert early_smtp.login("luca", password)[0] == 235
    fresh = logged_in(gw, clients, "luca")
    assert noop_ok(fresh)
    assert gw.proc.poll() is None and gw.proc.pid == pid
    ok = rows(gw, "user = 'luca' AND command IN ('LOGIN', 'AUTH') AND outcome = 'ok'", n=3)
    assert {r["protocol"] for r in ok} == {"imap", "smtp"}, ok


def test_password_change_ends_sessions_and_only_the_new_password_works(make_gateway, provider, clients, smtps):
    gw = make_gateway(smtp_url=provider.smtps_url)
    old = gw.password("mario")
    m_imap = logged_in(gw, clients, "mario")
    m_smtp = smtps(gw.smtp("mario"))
    anna = logged_in(gw, clients, "anna")

    gw.users["mario"] = {**gw.users["mario"], "password": "mario-nuova-" + secrets.token_hex(6)}
    text = configured_text(gw)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        imap_wait = pool.submit(imap_goodbye, m_imap)
        smtp_wait = pool.submit(smtp_goodbye, m_smtp)
        mark, t0 = sighup(gw, text)
        _, bye, imap_at = imap_wait.result()
        code, text_, smtp_at = smtp_wait.result()
    assert bye == b"* BYE [UNAVAILABLE] Session ended: password changed"
    assert (code, text_) == (421, b"4.7.0 Session ended: password changed")
    LATENCIES["password/imap"], LATENCIES["password/smtp"] = imap_at - t0, smtp_at - t0
    print("password change: goodbye after (s):", round(imap_at - t0, 3), round(smtp_at - t0, 3))
    assert max(imap_at, smtp_at) - t0 < REVOKE_LIMIT, LATENCIES
    assert "sessions_ended=2" in gw.wait_log(RELOADED, mark)
    revoked = rows(gw, "command = 'revoked'", n=2)
    assert {(r["user"], r["detail"]) for r in revoked} == {("mario", "password changed")}, revoked

    assert noop_ok(anna)
    # The old password is refused (no remembered login survives the reload), the new one works.
    assert imap_login_refused(gw, "mario", old).startswith(b"L1 NO [AUTHENTICATIONFAILED]")
    assert smtp_auth_code(gw, "mario", old) == 535
    logged_in(gw, clients, "mario")
    assert smtp_auth_code(gw, "mario", gw.password("mario")) == 235


def test_reload_reasons_for_ending_a_session(make_gateway, dovecot, clients):
    """Each kind of change ends exactly the sessions it concerns, with its reason."""
    roles = copy.deepcopy(DEFAULT_ROLES)
    mailboxes = {"studio": provider_mailbox(dovecot, PROVIDER_ADDRESS),
                 "altro": provider_mailbox(dovecot, ALTRO)}
    gw = make_gateway(roles=roles, mailboxes=mailboxes)
    mario = logged_in(gw, clients, "mario")
    anna = logged_in(gw, clients, "anna")

    def expect_bye(r, reason):
        _, bye, _ = imap_goodbye(r)
        assert bye == f"* BYE [UNAVAILABLE] Session ended: {reason}".encode()
        assert imap_closed(r)

    # anna's folders change: her session ends, mario's (another role) does not.
    roles["reception"]["folders"] = ["INBOX", "Sent"]
    assert reload_ok(gw) == 1
    expect_bye(anna, "folders or permissions changed")
    assert noop_ok(mario)
    # Her permissions change.
    anna = logged_in(gw, clients, "anna")
    roles["reception"]["permissions"] = ["read"]
    assert reload_ok(gw) == 1
    expect_bye(anna, "folders or permissions changed")
    # Her only mailbox becomes another one: she logs in again, on that one.
    anna = logged_in(gw, clients, "anna")
    roles["reception"]["mailboxes"] = ["altro"]
    assert reload_ok(gw) == 1
    expect_bye(anna, "mailbox no longer granted")
    anna = logged_in(gw, clients, "anna")
    # The provider settings of studio change: its sessions end, altro's do not.
    gw.mailboxes["studio"]["max_message_bytes"] = 50 * 1024 * 1024
    assert reload_ok(gw) == 1
    expect_bye(mario, "mailbox settings changed")
    assert noop_ok(anna)
    # mario is disabled.
    mario = logged_in(gw, clients, "mario")
    text = configured_text(gw).replace("[users.mario]\n", "[users.mario]\ndisabled = true\n", 1)
    assert "disabled = true" in text
    assert reload_ok(gw, text) == 1
    expect_bye(mario, "user disabled")
    assert noop_ok(anna)
    assert imap_login_refused(gw, "mario", gw.password("mario")).startswith(b"L1 NO [AUTHENTICATIONFAILED]")

    revoked = rows(gw, "command = 'revoked'", n=5)
    assert [(r["user"], r["mailbox"], r["detail"]) for r in revoked] == [
        ("anna", "studio", "folders or permissions changed"),
        ("anna", "studio", "folders or permissions changed"),
        ("anna", "studio", "mailbox no longer granted"),
        ("mario", "studio", "mailbox settings changed"),
        ("mario", "studio", "user disabled"),
    ], revoked


def test_login_in_flight_during_a_reload_removing_the_user_does_not_survive(make_gateway, clients):
    """A LOGIN whose password check is running when the reload removes the user: either it is
    refused, or the session it opens is ended like the others. Never a live session of a user
    the configuration in force no longer has."""
    gw = make_gateway()
    for attempt in range(3):
        password = "luca-" + secrets.token_hex(6)  # a new hash: the check runs argon2
        gw.users["luca"] = {"password": password, "roles": ["segreteria"]}
        reload_ok(gw)
        del gw.users["luca"]
        text = configured_text(gw)
        r = clients(gw.raw())
        r.send(f"L1 LOGIN luca {quote(password)}\r\n".encode())
        mark, _ = sighup(gw, text)
        gw.wait_log(RELOADED, mark)
        _, tagged = r.read_until_tagged("L1")
        if not tagged.startswith(b"L1 OK"):
            assert tagged.startswith(b"L1 NO [AUTHENTICATIONFAILED]"), tagged
            continue
        try:
            _, bye, _ = imap_goodbye(r, timeout=REVOKE_LIMIT)
        except TimeoutError:
            alive = noop_ok(r)
            listed = [x for x in json.loads(gw.cli("sessions", "--json").stdout) if x["user"] == "luca"]
            pytest.fail(f"attempt {attempt}: luca logged in during the reload that removed him and the "
                        f"session is still up after it (NOOP ok: {alive}; listed: {listed})")
        assert bye == b"* BYE [UNAVAILABLE] Session ended: user removed", bye


def test_reload_adds_and_removes_listeners(make_gateway, clients):
    gw = make_gateway()
    good = configured_text(gw)
    imap_tls = f'[imap]\nlisten_tls = ["{HOST}:0"]'
    assert imap_tls in good
    more = good.replace(imap_tls, f'[imap]\nlisten_tls = ["{HOST}:0", "127.0.0.2:0"]', 1)

    mark, _ = sighup(gw, more)
    line = gw.wait_log("listening address=127.0.0.2:", mark)
    assert "listener=" in line and "imap.listen_tls" in line, line
    port = int(re.search(r"address=127\.0\.0\.2:(\d+)", line).group(1))
    assert "sessions_ended=0" in gw.wait_log(RELOADED, mark)
    added = clients(TlsImapAt("127.0.0.2", port, gw.cert))
    assert added.greeting.startswith(b"* OK"), added.greeting
    added.login("mario", gw.password("mario"))

    mark, _ = sighup(gw, good)
    line = gw.wait_log("listener closed by the reload", mark)
    assert "127.0.0.2:0" in line, line
    wait_until(lambda: refused("127.0.0.2", port), 5, "the removed listener to stop accepting")
    # The session it accepted is not the listener's: it goes on. The others still accept.
    assert noop_ok(added)
    logged_in(gw, clients, "anna", select=None)


def test_reload_moving_an_address_between_listeners_keeps_it_served(make_gateway, clients):
    """Swapping the IMAP TLS and STARTTLS addresses: after the reload each port serves its new
    kind (or, at the very least, the reload is not reported done with the ports dead)."""
    a, b, c, d = (harness.free_port() for _ in range(4))
    gw = make_gateway(tls_port=a, starttls_port=b, smtp_tls_port=c, smtp_starttls_port=d)
    text = gw.config_text()
    old = f'listen_tls = ["{HOST}:{a}"]\nlisten_starttls = ["{HOST}:{b}"]'
    assert old in text
    swapped = text.replace(old, f'listen_tls = ["{HOST}:{b}"]\nlisten_starttls = ["{HOST}:{a}"]', 1)
    mark, _ = sighup(gw, swapped)
    gw.wait_log(RELOADED, mark)

    def greeting(port, tls):
        try:
            with (RawImap(port, tls=True, cafile=gw.cert, timeout=2) if tls
                  else RawImap(port, tls=False, timeout=2)) as r:
                return r.greeting.startswith(b"* OK")
        except (OSError, EOFError) as exc:
            return repr(exc)

    def both():
        return greeting(a, tls=False) is True and greeting(b, tls=True) is True

    try:
        wait_until(both, 5, "the swapped IMAP listeners to serve")
    except TimeoutError:
        pytest.fail(f"after a reload reported done: port {a} (now STARTTLS): {greeting(a, False)}; "
                    f"port {b} (now TLS): {greeting(b, True)}\n{gw.log_text()[mark:]}")
    r = clients(RawImap(b, tls=True, cafile=gw.cert))
    r.login("mario", gw.password("mario"))


# ---------------------------------------------------------------------------
# the control socket
# ---------------------------------------------------------------------------


def test_sessions_listing_and_kick(make_gateway, provider, clients, smtps):
    gw = make_gateway(smtp_url=provider.smtps_url)
    t_start = datetime.now(timezone.utc) - timedelta(seconds=2)
    m_imap = logged_in(gw, clients, "mario")
    m_smtp = smtps(gw.smtp("mario"))
    anna = logged_in(gw, clients, "anna", select=None)

    sock = gw.state_dir / "control.sock"
    mode = sock.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)

    res = gw.cli("sessions", "--json")
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert len(listed) == 3, listed
    for s in listed:
        assert set(s) == {"session", "user", "mailbox", "protocol", "peer", "since", "folder"}, s
        since = datetime.fromisoformat(s["since"].replace("Z", "+00:00"))
        assert t_start <= since <= datetime.now(timezone.utc), s
    assert [s["since"] for s in listed] == sorted(s["since"] for s in listed), "not oldest first"
    by_peer = {s["peer"]: s for s in listed}
    expected = {
        local_port(m_imap): ("mario", "imap", "INBOX"),
        local_port(m_smtp): ("mario", "smtp", None),
        local_port(anna): ("anna", "imap", None),
    }
    assert set(by_peer) == {f"{HOST}:{p}" for p in expected}, listed
    for port, (user, protocol, folder) in expected.items():
        s = by_peer[f"{HOST}:{port}"]
        assert (s["user"], s["mailbox"], s["protocol"], s["folder"]) == (user, "studio", protocol, folder), s
        logins = rows(gw, "session = ? AND command IN ('LOGIN', 'AUTH') AND outcome = 'ok'", (s["session"],))
        assert len(logins) == 1 and logins[0]["user"] == user, (s, logins)

    # The folder follows what the session selects.
    def folder_of(port):
        return next(x["folder"] for x in json.loads(gw.cli("sessions", "--json").stdout)
                    if x["peer"] == f"{HOST}:{port}")

    assert m_imap.command("S3", "SELECT Sent")[1].startswith(b"S3 OK")
    assert folder_of(local_port(m_imap)) == "Sent"
    assert m_imap.command("U1", "UNSELECT")[1].startswith(b"U1 OK")
    assert folder_of(local_port(m_imap)) is None
    assert m_imap.command("S4", "SELECT INBOX")[1].startswith(b"S4 OK")

    table = gw.cli("sessions")
    out = table.stdout.decode()
    assert table.returncode == 0 and out.rstrip().endswith("3 session(s)"), out
    assert all(s["session"] in out for s in listed), out

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        imap_wait = pool.submit(imap_goodbye, m_imap)
        smtp_wait = pool.submit(smtp_goodbye, m_smtp)
        t0 = time.monotonic()
        kick = gw.cli("sessions", "kick", "mario")
        _, bye, imap_at = imap_wait.result()
        code, text, smtp_at = smtp_wait.result()
    assert kick.returncode == 0, kick.stderr
    assert kick.stdout.decode() == "2 session(s) of mario ended\n"
    assert bye == b"* BYE [UNAVAILABLE] Session ended: ended by an administrator"
    assert (code, text) == (421, b"4.7.0 Session ended: ended by an administrator")
    LATENCIES["kick/imap"], LATENCIES["kick/smtp"] = imap_at - t0, smtp_at - t0
    print("kick: goodbye after (s, from starting the CLI):", round(imap_at - t0, 3), round(smtp_at - t0, 3))
    assert max(imap_at, smtp_at) - t0 < REVOKE_LIMIT, LATENCIES
    assert imap_closed(m_imap) and smtp_closed(m_smtp)

    kicks = rows(gw, "protocol = 'system' AND command = 'kick'", n=1)
    assert (kicks[0]["user"], kicks[0]["detail"], kicks[0]["outcome"]) == ("mario", "sessions=2", "ok"), kicks
    revoked = rows(gw, "command = 'revoked'", n=2)
    assert {(r["user"], r["detail"]) for r in revoked} == {("mario", "ended by an administrator")}, revoked
    assert noop_ok(anna)

    def listing():
        return json.loads(gw.cli("sessions", "--json").stdout)

    left = wait_until(lambda: (l := listing()) and len(l) == 1 and l, 5, "mario's sessions to leave the list")
    assert left[0]["user"] == "anna", left
    # A kick is not a ban; and kicking nobody ends nothing.
    logged_in(gw, clients, "mario", select=None)
    nobody = gw.cli("sessions", "kick", "nobody")
    assert nobody.returncode == 0 and nobody.stdout.decode() == "0 session(s) of nobody ended\n", nobody
    assert noop_ok(anna, "N2")


# ---------------------------------------------------------------------------
# systemd notify
# ---------------------------------------------------------------------------


def test_systemd_notify_ready_reloading_stopping(make_gateway):
    directory = tempfile.mkdtemp(prefix="pg-notify-")  # short: AF_UNIX paths are limited
    path = os.path.join(directory, "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(path)
        listener.settimeout(10)
        gw = make_gateway(env={"NOTIFY_SOCKET": path})
        assert listener.recv(4096) == b"READY=1"
        socket.create_connection((HOST, gw.tls_port), timeout=2).close()  # listening by then

        for text, expect in ((configured_text(gw), RELOADED),
                             (configured_text(gw).replace("[gateway]\n", "[gateway]\nbogus = 1\n", 1), REFUSED)):
            before = time.monotonic_ns() // 1000
            mark, _ = sighup(gw, text)
            reloading = listener.recv(4096)
            after = time.monotonic_ns() // 1000
            m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", reloading)
            assert m, reloading
            assert before <= int(m.group(1)) <= after, (before, reloading, after)
            assert listener.recv(4096) == b"READY=1"
            # READY comes when the reload is over, whatever its outcome.
            assert expect in gw.log_text()[mark:], gw.log_text()[mark:]

        gw.proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096) == b"STOPPING=1"
        assert gw.stop(timeout=15) == 0, gw.log_text()
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            extra = listener.recv(4096)
            pytest.fail(f"unexpected notification after STOPPING=1: {extra!r}")
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------
# metrics and health
# ---------------------------------------------------------------------------


def http_get(gw, path: str):
    """(status, content type, body) of GET ``path`` on the metrics endpoint."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{gw.metrics_port}{path}", timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def scrape(gw) -> dict:
    """``/metrics`` parsed with prometheus_client's OpenMetrics parser:
    {(sample name, frozenset(labels)): value}."""
    status, ctype, text = http_get(gw, "/metrics")
    assert status == 200 and ctype.startswith("application/openmetrics-text"), (status, ctype)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels):
    return samples.get((name, frozenset(labels.items())))


def metric_family(samples: dict, name: str) -> dict:
    """{labels: value} of every sample called ``name``."""
    return {k[1]: v for k, v in samples.items() if k[0] == name}


def audit_counts(gw) -> dict:
    counts: dict[tuple[str, str], int] = {}
    for r in gw.audit_rows("protocol IN ('imap', 'smtp')"):
        counts[(r["protocol"], r["outcome"])] = counts.get((r["protocol"], r["outcome"]), 0) + 1
    return counts


def command_counts(samples: dict) -> dict:
    return {(dict(k[1])["protocol"], dict(k[1])["outcome"]): int(v)
            for k, v in samples.items() if k[0] == "pecgate_commands_total" and v}


def test_metrics_and_health(make_gateway, provider, clients, smtps):
    gw = make_gateway(smtp_url=provider.smtps_url, metrics=f"{HOST}:0")
    assert gw.metrics_port, "no `listening ... listener=metrics.listen` line"
    status, _, body = http_get(gw, "/health")
    assert status == 200 and body.startswith("ok"), (status, body)
    assert http_get(gw, "/nothing")[0] == 404

    first = scrape(gw)
    assert metric(first, "pecgate_provider_connections", mailbox="studio") == 0
    assert not metric_family(first, "pecgate_sessions"), first
    assert not metric(first, "pecgate_logins_total", outcome="ok")

    m_imap = logged_in(gw, clients, "mario")
    anna = logged_in(gw, clients, "anna", select=None)
    m_smtp = smtps(gw.smtp("mario"))
    assert imap_login_refused(gw, "anna", "wrong-" + secrets.token_hex(4)).startswith(b"L1 NO")
    assert imap_login_refused(gw, "mario/altro", gw.password("mario")).startswith(b"L1 NO")
    raw = make_message("Metriche", sender=PROVIDER_ADDRESS, to=ALTRO)
    assert m_smtp.sendmail(PROVIDER_ADDRESS, [ALTRO], raw) == {}

    def settled():
        s = scrape(gw)
        return metric(s, "pecgate_audit_queue_depth") == 0 and command_counts(s) == audit_counts(gw) and s

    try:
        s = wait_until(settled, 10, "the metrics to settle")
    except TimeoutError:
        s = scrape(gw)
        pytest.fail(f"commands_total {command_counts(s)} != audit rows {audit_counts(gw)}; "
                    f"queue {metric(s, 'pecgate_audit_queue_depth')}")
    assert metric(s, "pecgate_logins_total", outcome="ok") == 3
    assert metric(s, "pecgate_logins_total", outcome="failed") == 1
    assert metric(s, "pecgate_logins_total", outcome="not_granted") == 1
    assert metric(s, "pecgate_sessions", protocol="imap", mailbox="studio") == 2
    assert metric(s, "pecgate_sessions", protocol="smtp", mailbox="studio") == 1
    assert metric(s, "pecgate_provider_connections", mailbox="studio") == 2
    assert metric(s, "pecgate_smtp_messages_total", status="accepted") == 1
    assert sum(v for k, v in s.items() if k[0] == "pecgate_smtp_messages_total") == 1
    assert not metric(s, "pecgate_reloads_total", outcome="ok")
    assert metric(s, "pecgate_sessions_revoked_total") == 0
    assert sum(command_counts(s).values()) > 0

    # A reload removing anna: one session revoked, the gauges follow, the counters carry on.
    del gw.users["anna"]
    assert reload_ok(gw) == 1
    _, bye, _ = imap_goodbye(anna)
    assert bye.endswith(b"user removed")

    def after_reload():
        s = scrape(gw)
        return metric(s, "pecgate_sessions", protocol="imap", mailbox="studio") == 1 and s

    s = wait_until(after_reload, 5, "the sessions gauge to drop to 1")
    assert metric(s, "pecgate_provider_connections", mailbox="studio") == 1
    assert metric(s, "pecgate_sessions", protocol="smtp", mailbox="studio") == 1
    assert metric(s, "pecgate_reloads_total", outcome="ok") == 1
    assert metric(s, "pecgate_sessions_revoked_total") == 1
    assert metric(s, "pecgate_logins_total", outcome="ok") == 3
    assert metric(s, "pecgate_smtp_messages_total", status="accepted") == 1

    reload_refused(gw, configured_text(gw).replace("[gateway]\n", "[gateway]\nbogus = 1\n", 1))
    s = scrape(gw)
    assert metric(s, "pecgate_reloads_total", outcome="ok") == 1
    refusals = {k: v for k, v in s.items() if k[0] == "pecgate_reloads_total" and ("outcome", "ok") not in k[1]}
    assert list(refusals.values()) == [1], refusals

    # Closing sessions brings the gauges to zero.
    m_imap.command("Z", "LOGOUT")
    m_smtp.quit()
    s = wait_until(lambda: (x := scrape(gw)) and not any(v for k, v in x.items() if k[0] == "pecgate_sessions")
                   and x, 5, "the sessions gauge to drop to 0")
    assert metric(s, "pecgate_provider_connections", mailbox="studio") == 0
    assert http_get(gw, "/health")[0] == 200


# ---------------------------------------------------------------------------
# client-config
# ---------------------------------------------------------------------------


def test_client_config_and_autoconfig(make_gateway, dovecot, provider):
    roles = copy.deepcopy(DEFAULT_ROLES)
    roles["segreteria"]["mailboxes"] = ["studio", "altro"]
    mailboxes = {"studio": provider_mailbox(dovecot, PROVIDER_ADDRESS, smtp=provider.smtps_url),
                 "altro": provider_mailbox(dovecot, ALTRO)}
    gw = make_gateway(start=False, roles=roles, mailboxes=mailboxes, tls_port=10993, starttls_port=10143,
                      smtp_tls_port=10465, smtp_starttls_port=10587)
    host = "posta.example.test"

    def run(*args):
        res = gw.cli("client-config", *args)
        assert res.returncode == 0, res.stderr
        return res.stdout.decode()

    anna = run("--user", "anna", "--host", host)
    assert f"Incoming (IMAP): {host}, port 10993, SSL/TLS" in anna, anna
    assert "Outgoing (SMTP): not allowed for this user" in anna, anna
    assert "User name: anna " in anna and "Mailbox studio (studio@pec.example.test)" in anna, anna
    assert "altro" not in anna, anna

    mario = run("--user", "mario", "--host", host)
    sections = dict(re.findall(r"^Mailbox (\w+) \(.*\)\n((?:  .*\n)+)", mario, re.M))
    assert set(sections) == {"studio", "altro"}, mario
    assert f"Outgoing (SMTP): {host}, port 10465, SSL/TLS" in sections["studio"], mario
    assert "User name: mario/studio " in sections["studio"], mario
    assert "User name: mario/altro " in sections["altro"], mario
    assert f"Outgoing (SMTP): {host}" not in sections["altro"], mario

    xml = run("--user", "mario", "--host", host, "--autoconfig")
    root = ET.fromstring(xml)
    assert root.tag == "clientConfig" and root.get("version") == "1.1", xml
    providers = root.findall("emailProvider")
    assert len(providers) == 2, xml
    seen = {}
    for p in providers:
        assert p.findtext("domain") == PEC_DOMAIN, xml
        servers = {}
        for tag in ("incomingServer", "outgoingServer"):
            for server in p.findall(tag):
                servers[server.get("type")] = {f: server.findtext(f) for f in
                                               ("hostname", "port", "socketType", "username", "authentication")}
        login = servers["imap"]["username"]
        seen[login] = servers
    assert set(seen) == {"mario/studio", "mario/altro"}, xml
    for login, servers in seen.items():
        assert servers["imap"] == {"hostname": host, "port": "10993", "socketType": "SSL", "username": login,
                                   "authentication": "password-cleartext"}, servers
    assert seen["mario/studio"]["smtp"] == {"hostname": host, "port": "10465", "socketType": "SSL",
                                            "username": "mario/studio",
                                            "authentication": "password-cleartext"}, xml
    assert "smtp" not in seen["mario/altro"], xml
    anna_xml = ET.fromstring(run("--user", "anna", "--host", host, "--autoconfig"))
    [p] = anna_xml.findall("emailProvider")
    assert p.find("outgoingServer") is None and p.find("incomingServer/username").text == "anna"

    # Without --host: this machine's name.
    default = run("--user", "anna")
    name = socket.gethostname()
    assert f"Incoming (IMAP): {name}, port 10993" in default or "Incoming (IMAP): localhost," in default, default

    res = gw.cli("client-config", "--user", "nessuno")
    assert res.returncode != 0 and b"users.nessuno" in res.stderr, res
    # No daemon running: `pecgate sessions` says so.
    res = gw.cli("sessions")
    assert res.returncode != 0 and b"control socket" in res.stderr, res
