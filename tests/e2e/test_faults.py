"""Faults: a provider that stops answering or dies, a full disk under state_dir, pecgate killed.

The provider is a private Dovecot with its raw protocol log on (``rawlog``): every provider
connection pecgate opens is recorded with the pid of the ``imap`` process that serves it (one
per connection), so a test can stop (SIGSTOP), resume or kill exactly the process behind one
pecgate session. The harness's own inspection logins go through an alias of the same mail home
and stay out of the rawlog.

* A stalled provider (``provider_timeout_secs``): the client gets
  ``* BYE [UNAVAILABLE] The PEC provider has not answered for N seconds`` within the timeout
  (plus a margin for a loaded machine), the audit has ``upstream-error`` (``providerstalled``)
  and the unanswered command as ``error``; the time is the provider's time to answer a command,
  not the session's quiet before it; IDLE is excepted: a silent provider in IDLE is not cut,
  and DONE still works once it runs again.
* A provider connection killed mid-FETCH of a large message, mid-APPEND, mid-IDLE: the client
  gets a BYE or the connection closes; the audit has ``upstream-error``; an APPEND the client
  was told OK is in Dovecot, and one that cannot be there was not told OK.
* state_dir on a 2 MiB tmpfs (root only), filled up: the audit log fails closed (the session
  gets BYE, a new login is refused, the log says why), and once the space is freed pecgate
  recovers by itself; afterwards ``audit verify`` passes and every command a client was told
  succeeded is on record, and none refused was carried out; the outage itself (the session it
  cut, the login it refused) is on record too.
* pecgate SIGKILLed in the middle of a burst of state-changing commands from several sessions:
  after a restart ``audit verify`` passes and every state-changing command that reached
  Dovecot (its rawlog) has its audit row (``sent`` at least), matched on ``upstream=c<N>``.

Synchronisation is by conditions with deadlines; the only waits that run to their end are the
ones asserting that nothing happens within them (a session that must not be cut).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import threading
import time

import pytest

import harness
from harness import (PROVIDER_ADDRESS, Dovecot, HarnessError, Pecgate, fill_disk, make_big_message,
                     make_message, populate_demo, quote, tmpfs_mounted, wait_until)
from upstream_log import STATE_CHANGING, UPSTREAM_DETAIL, split_commands

ADMIN = "admin-studio@pec.example.test"  # same mail home, not recorded
TIMEOUT = 3  # provider_timeout_secs of these tests
# The watchdog looks every timeout/4 (at most 1 s); a loaded 2-core machine adds its own delay.
MARGIN = 12.0
BYE_STALLED = b"* BYE [UNAVAILABLE] The PEC provider has not answered for"


# ---------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def provider():
    d = Dovecot(rawlog=[PROVIDER_ADDRESS])
    d.add_user(PROVIDER_ADDRESS, "provider-" + secrets.token_hex(8))
    d.add_user(ADMIN, "admin-" + secrets.token_hex(8), share_with=PROVIDER_ADDRESS)
    with d:
        populate_demo(d, ADMIN)
        yield d


@pytest.fixture
def make_gw(provider, pecgate_binary):
    """Fresh pecgate instances on this module's Dovecot, cleaned up after the test."""
    with harness.gateways(provider, binary=pecgate_binary) as make:
        yield make


def logged_in(provider: Dovecot, gw: Pecgate, clients, user: str = "mario"):
    """A raw session of ``user`` and the provider connection (rawlog, with the imap pid)
    pecgate opened for it."""
    mark = provider.rawlog_mark()
    r = clients(gw.raw(tls=True, timeout=30))
    r.login(user, gw.password(user))
    return r, provider.wait_new_connection(mark, users=[PROVIDER_ADDRESS])


@contextlib.contextmanager
def stopped(provider: Dovecot, pid: int):
    """The provider's imap process ``pid`` stopped (SIGSTOP) for the ``with``, resumed after."""
    provider.signal_imap(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            provider.signal_imap(pid, signal.SIGCONT)


def read_to_end(r, timeout: float):
    """Lines from the server until it closes the connection or ``timeout`` passes.
    Returns (lines with their arrival time, "closed" | "open")."""
    deadline = time.monotonic() + timeout
    lines = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return lines, "open"
        try:
            line = r.read_line(remaining)
        except TimeoutError:
            return lines, "open"
        except (EOFError, OSError):
            return lines, "closed"
        lines.append((time.monotonic(), line))


def ok(tagged: bytes, tag: str) -> bool:
    return tagged.startswith(f"{tag} OK".encode())


def audit_row(gw: Pecgate, predicate, what: str, timeout: float = 20):
    """The first audit row matching ``predicate``, waiting for it."""
    try:
        return wait_until(lambda: next((r for r in gw.audit_rows() if predicate(r)), None), timeout, what)
    except TimeoutError:
        rows = [(r["command"], r["outcome"], r["detail"]) for r in gw.audit_rows()]
        pytest.fail(f"no audit row for {what}; rows: {rows}")


def upstream_error(gw: Pecgate, what: str) -> dict:
    return audit_row(gw, lambda r: r["command"] == "upstream-error" and r["user"] == "mario", what)


def rows_of_tag(gw: Pecgate) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in gw.audit_rows():
        m = UPSTREAM_DETAIL.search(row["detail"] or "")
        if m:
            out.setdefault(m.group(1), []).append(row)
    return out


def folder_flags(provider: Dovecot, folder: str) -> dict[int, str]:
    """{UID: FLAGS text} of every message in ``folder``, read directly from Dovecot."""
    c = provider.imap_direct(ADMIN)
    try:
        assert c.select(quote(folder), readonly=True)[0] == "OK"
        typ, data = c.uid("FETCH", "1:*", "(FLAGS)")
        out = {}
        for item in data or []:
            if not item:
                continue
            text = item.decode() if isinstance(item, bytes) else item[0].decode()
            m = re.search(r"UID (\d+)", text)
            f = re.search(r"FLAGS \(([^)]*)\)", text)
            if m:
                out[int(m.group(1))] = f.group(1) if f else ""
        return out
    finally:
        c.logout()


def subjects_in(provider: Dovecot, folder: str) -> list[str]:
    c = provider.imap_direct(ADMIN)
    try:
        assert c.select(quote(folder), readonly=True)[0] == "OK"
        typ, data = c.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        return [part[1].decode(errors="replace").strip() for part in data or [] if isinstance(part, tuple)]
    finally:
        c.logout()


# ---------------------------------------------------------------------------
# 1. a provider that stops answering
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["NOOP", "UID FETCH 1:* (FLAGS)"])
def test_a_stalled_provider_ends_the_session_with_bye(provider, make_gw, clients, command):
    gw = make_gw(gateway_options={"provider_timeout_secs": TIMEOUT}, max_connections=1)
    r, conn = logged_in(provider, gw, clients)
    _, tagged = r.command("s1", "SELECT INBOX")
    assert ok(tagged, "s1"), tagged

    with stopped(provider, conn.pid):
        sent_at = time.monotonic()
        r.send(f"n1 {command}\r\n".encode())
        lines, state = read_to_end(r, TIMEOUT + MARGIN)
        byes = [(t, line) for t, line in lines if line.startswith(b"* BYE")]
        assert byes, f"no BYE within {TIMEOUT + MARGIN}s of a command the provider never answered: {lines}"
        bye_at, bye = byes[0]
        print(f"{command}: BYE {bye_at - sent_at:.2f}s after the command (timeout {TIMEOUT}s): {bye!r}")
        assert bye.startswith(BYE_STALLED), bye
        assert int(re.search(rb"for (\d+) seconds", bye).group(1)) >= TIMEOUT, bye
        assert bye_at - sent_at <= TIMEOUT + MARGIN
        assert bye_at - sent_at >= TIMEOUT - 1.0, "the session was cut before the provider's time was up"
        assert not any(line.startswith(b"n1 ") for _, line in lines), lines
        assert state == "closed", f"the connection stayed open after the BYE: {lines}"

    row = upstream_error(gw, "the stalled provider")
    assert "providerstalled" in row["detail"] and row["outcome"] == "error", row
    name = "UID FETCH" if command.startswith("UID FETCH") else "NOOP"
    unanswered = audit_row(gw, lambda row: row["command"] == name and row["outcome"] == "error",
                           f"the unanswered {name} as an error")
    assert UPSTREAM_DETAIL.search(unanswered["detail"]), unanswered
    assert "the provider stopped answering" in gw.log_text()

    # Resumed, Dovecot finds its connection gone; the connection's permit is back
    # (max_connections = 1): a new session works.
    provider.wait_rawlogs_closed([conn])
    r2, _ = logged_in(provider, gw, clients)
    _, tagged = r2.command("s2", "SELECT INBOX")
    assert ok(tagged, "s2"), tagged
    _, tagged = r2.command("n2", "NOOP")
    assert ok(tagged, "n2"), tagged


def test_the_provider_is_given_its_full_time_after_a_quiet_spell(provider, make_gw, clients):
    """The watchdog times the provider's answer to a command. A session that has been quiet
    (nothing owed, so nothing to time) for longer than the timeout must not be cut at the
    next command before the provider has had the whole timeout to answer it: the BYE says
    "has not answered for N seconds", and a client pausing between commands is the common case
    (with a real provider's latency, an early watchdog would cut such commands at random)."""
    gw = make_gw(gateway_options={"provider_timeout_secs": TIMEOUT})
    r, conn = logged_in(provider, gw, clients)
    _, tagged = r.command("s1", "SELECT INBOX")
    assert ok(tagged, "s1"), tagged

    # Nothing owed: nothing may happen, however long the quiet (bounded wait, by design).
    with pytest.raises(TimeoutError):
        line = r.read_line(2 * TIMEOUT)
        pytest.fail(f"a quiet session got {line!r}")

    with stopped(provider, conn.pid):
        sent_at = time.monotonic()
        r.send(b"n1 NOOP\r\n")
        lines, _ = read_to_end(r, TIMEOUT + MARGIN)
    byes = [(t, line) for t, line in lines if line.startswith(b"* BYE")]
    assert byes, lines
    after = byes[0][0] - sent_at
    print(f"BYE {after:.2f}s after the command, sent after {2 * TIMEOUT}s of quiet: {byes[0][1]!r}")
    assert after >= TIMEOUT - 1.0, (
        f"the BYE came {after:.2f}s after the command, although the provider had {TIMEOUT}s to answer: "
        f"the quiet spell before the command was counted ({byes[0][1]!r})")


def test_a_silent_provider_during_idle_is_not_cut(provider, make_gw, clients):
    gw = make_gw(gateway_options={"provider_timeout_secs": TIMEOUT})
    r, conn = logged_in(provider, gw, clients)
    _, tagged = r.command("s1", "SELECT INBOX")
    assert ok(tagged, "s1"), tagged
    r.send(b"i1 IDLE\r\n")
    assert r.read_line(20).startswith(b"+"), "IDLE did not start"

    with stopped(provider, conn.pid):
        # The provider moves no byte for twice the timeout: IDLE owes nothing, nothing may
        # happen (a bounded wait that must run to its end).
        quiet = 2 * TIMEOUT + 2
        with pytest.raises(TimeoutError):
            line = r.read_line(quiet)
            pytest.fail(f"the session was cut during IDLE: {line!r}")
    r.send(b"DONE\r\n")
    untagged, tagged = r.read_until_tagged("i1", 30)
    assert ok(tagged, "i1"), (untagged, tagged)
    _, tagged = r.command("n1", "NOOP", timeout=30)
    assert ok(tagged, "n1"), tagged
    rows = gw.audit_rows()
    assert not any(row["command"] == "upstream-error" for row in rows), rows
    audit_row(gw, lambda row: row["command"] == "IDLE" and row["outcome"] == "ok", "the IDLE")


# ---------------------------------------------------------------------------
# 2. a provider connection that dies
# ---------------------------------------------------------------------------


BIG = 20 * 1024 * 1024  # more than every socket buffer between Dovecot and the client holds


@pytest.fixture(scope="module")
def big_folder(provider):
    folder = "Ricevute/Grande"
    provider.create_folders(ADMIN, [folder])
    provider.append(ADMIN, folder, make_big_message(BIG, "messaggio molto grande"))
    return folder


def test_provider_killed_mid_fetch(provider, make_gw, clients, big_folder):
    gw = make_gw()
    r, conn = logged_in(provider, gw, clients)
    _, tagged = r.command("s1", f"SELECT {quote(big_folder)}")
    assert ok(tagged, "s1"), tagged

    r.send(b"f1 UID FETCH 1 BODY.PEEK[]\r\n")
    # Read up to the literal's announcement, then stop reading: the stream backs up to Dovecot.
    deadline = time.monotonic() + 60
    m = None
    while m is None:
        assert r._fill(deadline), "connection closed before the FETCH answer"
        m = re.search(rb"BODY\[\] \{(\d+)\}\r\n", r.buf)
    length = int(m.group(1))
    assert length >= BIG
    provider.signal_imap(conn.pid, signal.SIGKILL)

    # Then read to the end, counting the literal's bytes (not keeping them).
    got = len(r.buf) - m.end()
    tail = r.buf[-300:]
    closed = False
    while not closed and got <= length + 4096:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the connection neither closed nor finished ({got} of {length} bytes)"
        r.sock.settimeout(remaining)
        try:
            chunk = r.sock.recv(1 << 20)
        except TimeoutError:
            continue
        except OSError:
            chunk = b""
        closed = not chunk
        got += len(chunk)
        tail = (tail + chunk)[-300:]
    print(f"FETCH of {length} bytes: {min(got, length)} reached the client, then the connection "
          f"{'closed' if closed else 'went on'}; last bytes {tail[-80:]!r}")
    assert closed, "the connection stayed open after the provider died"
    assert got < length, "the whole message came through: the kill did not land mid-FETCH"
    assert b"f1 OK" not in tail

    row = upstream_error(gw, "the killed provider")
    assert row["outcome"] == "error", row
    audit_row(gw, lambda row: row["command"] == "UID FETCH" and row["outcome"] == "error",
              "the interrupted UID FETCH as an error")


@pytest.mark.parametrize("when", ["mid-literal", "after-literal"])
def test_provider_killed_mid_append(provider, make_gw, clients, when):
    """Killed while the client streams the message (it cannot have been stored: the client
    must not get OK), or just after Dovecot received all of it (either way: OK only if it is
    in Dovecot)."""
    gw = make_gw()
    folder = "Ricevute"
    subject = f"append interrotto {secrets.token_hex(6)}"
    msg = make_big_message(4 * 1024 * 1024, subject)
    r, conn = logged_in(provider, gw, clients)
    r.send(f"a1 APPEND {quote(folder)} {{{len(msg)}}}\r\n".encode())
    assert r.read_line(30).startswith(b"+"), "no continuation for the APPEND literal"

    sent = {"bytes": 0, "error": None}

    def upload(data: bytes):
        try:
            for i in range(0, len(data), 64 * 1024):
                r.send(data[i:i + 64 * 1024])
                sent["bytes"] += len(data[i:i + 64 * 1024])
        except OSError as exc:
            sent["error"] = exc

    if when == "mid-literal":
        first = len(msg) // 4
        upload(msg[:first])
        # Dovecot has the APPEND and part of the message; the rest is still with the client.
        wait_until(lambda: b" APPEND " in conn.received and len(conn.received) > 64 * 1024, 60,
                   "the APPEND to reach Dovecot", interval=0.2)
        provider.signal_imap(conn.pid, signal.SIGKILL)
        rest = threading.Thread(target=upload, args=(msg[first:] + b"\r\n",), daemon=True)
        rest.start()
    else:
        upload(msg + b"\r\n")
        wait_until(lambda: len(conn.received) >= len(msg), 60, "the whole message to reach Dovecot",
                   interval=0.2)
        provider.signal_imap(conn.pid, signal.SIGKILL)
        rest = None

    lines, state = read_to_end(r, 60)
    if rest is not None:
        rest.join(60)
    texts = [line for _, line in lines]
    told_ok = any(line.startswith(b"a1 OK") for line in texts)
    stored = any(subject in s for s in subjects_in(provider, folder))
    print(f"{when}: client sent {sent['bytes']} of {len(msg) + 2} bytes ({sent['error']!r}); got {texts}; "
          f"connection {state}; told OK: {told_ok}; in Dovecot: {stored}")
    assert state == "closed" or any(t.startswith(b"* BYE") for t in texts), texts
    if told_ok:
        assert stored, "the client was told OK but the message is not in Dovecot"
    if when == "mid-literal":
        assert not told_ok, texts
        assert not stored, "a message Dovecot never fully received was stored"
    row = upstream_error(gw, "the killed provider")
    assert row["outcome"] == "error", row
    # The APPEND went up durably recorded (`sent`) and ends with its outcome or `error`.
    by_tag = rows_of_tag(gw)
    appends = [rows for rows in by_tag.values() if rows[0]["command"] == "APPEND"]
    assert len(appends) == 1, appends
    outcomes = [row["outcome"] for row in appends[0]]
    assert outcomes[0] == "sent", outcomes
    wait_until(lambda: len([x for x in rows_of_tag(gw).values() if x[0]["command"] == "APPEND"][0]) == 2,
               20, "the APPEND's final row")
    final = [x for x in rows_of_tag(gw).values() if x[0]["command"] == "APPEND"][0][-1]["outcome"]
    assert final == ("ok" if told_ok else "error"), (final, told_ok)


def test_provider_killed_mid_idle(provider, make_gw, clients):
    gw = make_gw()
    r, conn = logged_in(provider, gw, clients)
    _, tagged = r.command("s1", "SELECT INBOX")
    assert ok(tagged, "s1"), tagged
    r.send(b"i1 IDLE\r\n")
    assert r.read_line(20).startswith(b"+"), "IDLE did not start"
    killed_at = time.monotonic()
    provider.signal_imap(conn.pid, signal.SIGKILL)
    lines, state = read_to_end(r, 30)
    texts = [line for _, line in lines]
    print(f"IDLE: {texts} then {state}, {(lines[-1][0] - killed_at) if lines else 0:.2f}s after the kill")
    assert state == "closed", texts
    assert any(t.startswith(b"* BYE") and b"PEC provider" in t for t in texts), texts
    row = upstream_error(gw, "the killed provider")
    assert row["outcome"] == "error", row
    audit_row(gw, lambda row: row["command"] == "IDLE" and row["outcome"] == "error", "the IDLE as an error")


# ---------------------------------------------------------------------------
# 3. a full disk under state_dir
# ---------------------------------------------------------------------------


def health(gw: Pecgate) -> tuple[int, bytes]:
    """pecgate's /health: (status, body)."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/health", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def tmpfs_gateway(provider, pecgate_binary):
    """``start(**gateway_options)``: a running pecgate whose state_dir is a 2 MiB tmpfs (the
    test is skipped when one cannot be mounted). Stopped and unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs as pecgate's state_dir")
    with contextlib.ExitStack() as stack:

        def start(**options):
            gw = Pecgate(provider, binary=pecgate_binary, gateway_options=options,
                         metrics="127.0.0.1:0")
            stack.callback(gw.cleanup)
            try:
                stack.enter_context(tmpfs_mounted(gw.state_dir, "2m"))
            except HarnessError as exc:
                pytest.skip(f"cannot put state_dir on a tmpfs: {exc}")
            stack.callback(gw.kill)  # before the unmount
            gw.setup()
            gw.start()
            return gw

        yield start


@pytest.fixture
def disk_folder(provider):
    """A folder of 40 fresh messages for the STOREs of a disk test; returns (name, UIDs)."""
    folder = f"Ricevute/Disco{secrets.token_hex(3)}"
    provider.create_folders(ADMIN, [folder])
    provider.append_many(ADMIN, folder, [make_message(f"disco {i}") for i in range(40)])
    uids = sorted(folder_flags(provider, folder))
    assert len(uids) == 40
    return folder, uids


def stores_until_bye(r, uids, told_ok) -> tuple[bytes, int]:
    """``UID STORE uid +FLAGS (\\Flagged)`` for each of ``uids`` until a BYE; the UIDs told OK
    are added to ``told_ok``. Returns the BYE and the number of STOREs sent."""
    for n, uid in enumerate(uids, 1):
        r.send(f"t{n} UID STORE {uid} +FLAGS (\\Flagged)\r\n".encode())
        try:
            while True:
                line = r.read_line(30)
                if line.startswith(b"* BYE"):
                    return line, n
                if line.startswith(f"t{n} ".encode()):
                    if ok(line, f"t{n}"):
                        told_ok.append(("UID STORE", str(uid)))
                    break
        except EOFError:
            pytest.fail(f"the session closed without a BYE after t{n}")
    pytest.fail(f"pecgate went on working with a full state_dir (no BYE after {len(uids)} STOREs)")


def refused_login(gw: Pecgate, clients) -> tuple[list[bytes], int]:
    """A LOGIN while the audit log is down: what the client got, and its local port."""
    r2 = clients(gw.raw(tls=True, timeout=30))
    port = r2.sock.getsockname()[1]
    r2.send(b"L1 LOGIN mario " + quote(gw.password("mario")).encode() + b"\r\n")
    lines, _ = read_to_end(r2, 30)
    return [line for _, line in lines], port


def test_full_state_dir_fails_closed_and_recovers(provider, tmpfs_gateway, disk_folder, clients):
    folder, uids = disk_folder
    # min_free_space_mb above the tmpfs's size: the warning is due at start.
    gw = tmpfs_gateway(min_free_space_mb=4)
    told_ok: list[tuple[str, str]] = []  # (command, its argument) the client got OK for
    gw.wait_log("state_dir is running out of space", timeout=30)

    r = clients(gw.raw(tls=True, timeout=30))
    r.login("mario", gw.password("mario"))
    told_ok.append(("LOGIN", "mario"))
    _, tagged = r.command("s1", f"SELECT {quote(folder)}")
    assert ok(tagged, "s1"), tagged
    _, tagged = r.command("t0", f"UID STORE {uids[0]} +FLAGS (\\Flagged)")
    assert ok(tagged, "t0"), tagged
    told_ok.append(("UID STORE", str(uids[0])))

    filler = gw.state_dir / "filler"
    filled = fill_disk(filler)
    mark = gw.log_mark()
    bye, n = stores_until_bye(r, uids[1:30], told_ok)
    print(f"state_dir filled with {filled} bytes; BYE after {n} STOREs: {bye!r}")
    assert b"[UNAVAILABLE]" in bye and b"Audit log unavailable" in bye, bye
    reason = gw.wait_log("AUDIT LOG WRITE FAILED", since=mark)
    assert "disk is full" in reason, f"the log does not say the disk is full: {reason}"
    # Monitoring sees it: /health answers 503 while the audit log cannot be written.
    assert health(gw)[0] == 503

    # A new login is refused, with the reason.
    texts, port = refused_login(gw, clients)
    print(f"login during the outage: {texts}")
    assert not any(t.startswith(b"L1 OK") for t in texts), texts
    assert any(b"Audit log unavailable" in t for t in texts), texts
    why = wait_until(lambda: [line for line in gw.log_text().splitlines()
                              if f"127.0.0.1:{port}" in line and "audit log unavailable" in line],
                     20, "the log's reason for the refused login")
    print(f"log: {why[0][-200:]}")

    # Space back: pecgate recovers by itself (the writer retries every 2 s).
    filler.unlink()
    freed_at = time.monotonic()
    gw.wait_log("audit log writable again", since=mark, timeout=30)
    print(f"recovered {time.monotonic() - freed_at:.2f}s after the space was freed")
    assert health(gw) == (200, b"ok: audit log writable\n")
    r3 = clients(gw.raw(tls=True, timeout=30))
    r3.login("mario", gw.password("mario"))
    told_ok.append(("LOGIN", "mario"))
    _, tagged = r3.command("s1", f"SELECT {quote(folder)}")
    assert ok(tagged, "s1"), tagged
    _, tagged = r3.command("t1", f"UID STORE {uids[-1]} +FLAGS (\\Flagged)")
    assert ok(tagged, "t1"), tagged
    told_ok.append(("UID STORE", str(uids[-1])))
    _, tagged = r3.command("z1", "LOGOUT")
    assert ok(tagged, "z1"), tagged

    assert gw.stop() == 0, gw.log_text()[-3000:]
    res = gw.cli("audit", "verify")
    assert res.returncode == 0, (res.stdout, res.stderr)

    rows = gw.audit_rows()
    flagged = {uid for uid, f in folder_flags(provider, folder).items() if "\\Flagged" in f}

    def store_rows(uid):
        return [row for row in rows if row["command"] == "UID STORE"
                and re.match(rf"{uid} \+FLAGS", row["detail"] or "")]

    for command, arg in told_ok:
        if command == "LOGIN":
            continue
        outcomes = [row["outcome"] for row in store_rows(arg)]
        assert "sent" in outcomes and "ok" in outcomes, (
            f"UID STORE {arg} was answered OK but its audit rows are {outcomes}")
        assert int(arg) in flagged
    logins = [row for row in rows if row["command"] == "LOGIN" and row["outcome"] == "ok"]
    assert len(logins) == sum(1 for c, _ in told_ok if c == "LOGIN"), logins
    # What Dovecot carried out is on record; what was refused was not carried out.
    for uid in flagged:
        assert "sent" in [row["outcome"] for row in store_rows(uid)], (uid, store_rows(uid))
    refused = [row for row in rows if (row["detail"] or "").endswith("; refused: audit log unavailable")]
    print(f"written after the recovery as refused: {[(x['command'], x['detail']) for x in refused]}")
    assert refused and all(row["outcome"] == "error" for row in refused), refused
    for row in refused:
        m = re.match(r"(\d+) \+FLAGS", row["detail"] or "")
        if row["command"] == "UID STORE" and m:
            assert int(m.group(1)) not in flagged, ("a refused STORE was carried out", row)


def test_an_audit_outage_is_itself_on_record(provider, tmpfs_gateway, disk_folder, clients):
    """What happens while the audit log is down is written once it is back: the end of the
    session the outage cut (README: one row per session event) and the login attempt it refused
    (README: every login attempt has its own row), like the refused command is."""
    folder, uids = disk_folder
    gw = tmpfs_gateway()
    r = clients(gw.raw(tls=True, timeout=30))
    r.login("mario", gw.password("mario"))
    _, tagged = r.command("s1", f"SELECT {quote(folder)}")
    assert ok(tagged, "s1"), tagged
    filler = gw.state_dir / "filler"
    fill_disk(filler)
    mark = gw.log_mark()
    stores_until_bye(r, uids, [])
    before = provider.rawlog_mark()
    texts, port = refused_login(gw, clients)
    assert not any(t.startswith(b"L1 OK") for t in texts), texts
    opened = provider.rawlog_connections(users=[PROVIDER_ADDRESS], exclude=before)
    print(f"provider connections opened by the refused login: {opened}")
    filler.unlink()
    gw.wait_log("audit log writable again", since=mark, timeout=30)
    assert gw.stop() == 0, gw.log_text()[-3000:]

    rows = gw.audit_rows()
    session = next(row["session"] for row in rows if row["command"] == "LOGIN" and row["outcome"] == "ok")
    ends = [row for row in rows if row["session"] == session
            and row["command"] in ("disconnect", "logout", "upstream-error")]
    attempts = [row for row in rows if row["command"] == "LOGIN" and (row["peer"] or "").endswith(f":{port}")]
    problems = []
    if not ends:
        problems.append(f"the session {session} cut by the outage has no end row (disconnect)")
    if not attempts:
        problems.append(f"the LOGIN refused during the outage (from port {port}) has no row")
    elif any(row["outcome"] == "ok" for row in attempts):
        problems.append(f"the refused LOGIN is on record as ok: {attempts}")
    assert not problems, "; ".join(problems)


# ---------------------------------------------------------------------------
# 4. pecgate killed with SIGKILL mid-burst
# ---------------------------------------------------------------------------


class Burst(threading.Thread):
    """One session sending state-changing commands until the connection breaks or ``stop``:
    STORE/COPY pipelined four at a time, CREATE/DELETE, or APPENDs (LITERAL+, every third one
    of 3 MB, so that one is likely streaming when pecgate dies)."""

    def __init__(self, gw: Pecgate, kind: str, stop: threading.Event):
        super().__init__(daemon=True)
        self.gw, self.kind, self.stop = gw, kind, stop
        self.answers: list[bytes] = []
        self.ended: str | None = None

    def pipelined(self, r, texts):
        tags = {}
        for text in texts:
            self.n += 1
            tag = f"{self.kind[0]}{self.n}"
            tags[tag.encode() + b" "] = text
            r.send(f"{tag} {text}\r\n".encode())
        while tags:
            line = r.read_line()
            done = next((t for t in tags if line.startswith(t)), None)
            if done:
                del tags[done]
                self.answers.append(line)

    def run(self):
        self.n = 0
        r = None
        try:
            r = self.gw.raw(tls=True, timeout=60)
            r.login("mario", self.gw.password("mario"))
            r.command("s0", "SELECT INBOX")
            while not self.stop.is_set():
                if self.kind == "flags":
                    k = self.n
                    self.pipelined(r, [f"UID STORE 1:* +FLAGS ($Burst{k % 3})", 'UID COPY 1:2 "Ricevute/Burst"',
                                       f"UID STORE 1:* -FLAGS ($Burst{k % 3})", "STORE 2 +FLAGS (\\Flagged)"])
                elif self.kind == "folders":
                    name = quote(f"Ricevute/Tmp{self.n}")
                    self.pipelined(r, [f"CREATE {name}"])
                    self.pipelined(r, [f"DELETE {name}"])
                else:
                    size = 3 * 1024 * 1024 if self.n % 3 == 2 else 0
                    msg = make_big_message(size, f"burst {self.n}") if size else make_message(f"burst {self.n}")
                    self.n += 1
                    tag = f"a{self.n}"
                    r.send(f'{tag} APPEND "Ricevute/Burst" {{{len(msg)}+}}\r\n'.encode() + msg + b"\r\n")
                    self.answers.append(r.read_until_tagged(tag)[1])
            self.ended = "stopped"
        except (EOFError, OSError, HarnessError) as exc:
            self.ended = f"{type(exc).__name__}: {str(exc)[:80]}"
        finally:
            if r is not None:
                r.close()


def test_sigkill_mid_burst_leaves_a_verifiable_complete_audit(provider, make_gw):
    provider.create_folders(ADMIN, ["Ricevute/Burst"])
    gw = make_gw()
    mark = provider.rawlog_mark()
    stop = threading.Event()
    threads = [Burst(gw, kind, stop) for kind in ("flags", "folders", "append", "flags")]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: sum(1 for row in gw.audit_rows() if row["outcome"] == "sent") >= 60, 120,
                   "a burst of state-changing commands", interval=0.1)
        assert all(t.ended is None for t in threads), [t.ended for t in threads]
        code = gw.crash()
    finally:
        stop.set()
    for t in threads:
        t.join(60)
    print(f"pecgate killed (exit {code}); answers per session: {[(t.kind, len(t.answers)) for t in threads]}; "
          f"ended: {[t.ended for t in threads]}")
    assert code == -signal.SIGKILL
    assert any(t.ended != "stopped" for t in threads), "no session was interrupted by the crash"

    conns = provider.rawlog_connections(users=[PROVIDER_ADDRESS], exclude=mark)
    provider.wait_rawlogs_closed(conns)
    assert len(conns) == len(threads), conns

    # The log as the crash left it verifies...
    res = gw.cli("audit", "verify")
    assert res.returncode == 0, ("after the crash", res.stdout, res.stderr)
    # ...and so after a restart on the same state_dir, which serves again.
    gw.start()
    with contextlib.closing(gw.raw(tls=True, timeout=30)) as r:
        r.login("mario", gw.password("mario"))
        _, tagged = r.command("n1", "NOOP")
        assert ok(tagged, "n1"), tagged
        r.command("z1", "LOGOUT")
    assert gw.stop() == 0, gw.log_text()[-3000:]
    res = gw.cli("audit", "verify")
    assert res.returncode == 0, ("after the restart", res.stdout, res.stderr)

    by_tag = rows_of_tag(gw)
    reached = missing = only_sent = 0
    problems = []
    for conn in conns:
        for cmd in split_commands(conn.received):
            if not re.fullmatch(r"c\d+", cmd.tag) or cmd.name not in STATE_CHANGING:
                continue
            reached += 1
            rows = by_tag.get(cmd.tag, [])
            outcomes = [row["outcome"] for row in rows]
            if not rows:
                missing += 1
                problems.append(f"{conn.key}: {cmd.wire.raw[:100]!r} reached Dovecot with no audit row")
            elif outcomes[0] != "sent" or rows[0]["command"] != cmd.name:
                problems.append(f"{conn.key}: {cmd.wire.raw[:100]!r}: audit {rows[0]['command']} {outcomes}")
            elif len(outcomes) == 1:
                only_sent += 1
    print(f"{reached} state-changing commands reached Dovecot; {only_sent} recorded only as sent "
          f"(the crash came before their answer was recorded); {missing} without a row")
    assert reached >= 50, reached
    assert not problems, "\n".join(problems[:20])
