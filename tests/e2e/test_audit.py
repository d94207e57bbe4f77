"""The per-user audit log (state_dir/audit.sqlite) and its hash chain."""

import os
import sqlite3
import time

import pytest

from harness import quote, wait_until

EXPECTED_COLUMNS = {"id", "ts", "session", "user", "mailbox", "peer", "protocol", "command",
                    "folder", "detail", "outcome", "prev_hash", "hash"}
OUTCOMES = {"ok", "no", "bad", "denied", "error"}


def _max_id(gw):
    rows = gw.audit_rows()
    return rows[-1]["id"] if rows else 0


def test_audit_rows_record_user_command_and_outcome(gateway, clients):
    mark = _max_id(gateway)

    # a failed login with a wrong password, then one with an unknown user
    for user, pw in (("mario", "wrong-password"), ("ghost", "whatever")):
        r = clients(gateway.raw(tls=True))
        _, tagged = r.command("L1", f"LOGIN {user} {quote(pw)}", timeout=20)
        assert tagged.startswith(b"L1 NO"), tagged
        r.command("Z1", "LOGOUT")
        r.close()

    c = gateway.client("mario")
    assert c.select("INBOX")[0] == "OK"
    assert c.fetch("1", "(FLAGS)")[0] == "OK"
    assert c.uid("FETCH", "1:*", "(UID)")[0] == "OK"
    c.logout()

    # a client that simply drops the connection
    r = clients(gateway.raw(tls=True))
    r.login("anna", gateway.password("anna"))
    r.close()

    def rows_complete():
        rows = gateway.audit_rows("id > ?", (mark,))
        have = {(r["user"], r["command"], r["outcome"]) for r in rows}
        needed = [("mario", "LOGIN", "ok"), ("mario", "SELECT", "ok"), ("mario", "FETCH", "ok"),
                  ("mario", "UID FETCH", "ok"), ("anna", "LOGIN", "ok")]
        if not all(n in have for n in needed):
            return None
        if not any(r["command"] == "logout" and r["user"] == "mario" for r in rows):
            return None
        if not any(r["command"] == "disconnect" and r["user"] == "anna" for r in rows):
            return None
        failed = [r for r in rows if r["command"] == "LOGIN" and r["outcome"] in ("no", "denied")]
        if len(failed) < 2:
            return None
        return rows

    try:
        rows = wait_until(rows_complete, 10, "the audit rows of this test")
    except TimeoutError:
        got = [(r["user"], r["command"], r["outcome"], r["folder"]) for r in gateway.audit_rows("id > ?", (mark,))]
        pytest.fail(f"audit rows incomplete; got {got}")

    assert EXPECTED_COLUMNS <= set(rows[0]), set(rows[0])
    assert all(r["outcome"] in OUTCOMES for r in rows), {r["outcome"] for r in rows}

    failed = [r for r in rows if r["command"] == "LOGIN" and r["outcome"] in ("no", "denied")]
    assert failed[0]["user"] in (None, "mario"), failed[0]
    assert failed[1]["user"] in (None, "ghost"), failed[1]
    assert not any(r["outcome"] == "ok" and r["user"] == "ghost" for r in rows)

    select = next(r for r in rows if r["command"] == "SELECT" and r["user"] == "mario")
    assert select["folder"] == "INBOX", select
    assert select["mailbox"] == "studio", select
    assert select["peer"] and select["peer"].startswith("127.0.0.1"), select
    assert select["ts"], select

    # every command of mario's session carries the same session id
    login = next(r for r in rows if r["command"] == "LOGIN" and r["user"] == "mario" and r["outcome"] == "ok")
    assert login["session"] and login["session"] == select["session"]


def test_audit_hash_chain_links_rows(gateway, clients):
    c = clients(gateway.client("mario"))
    assert c.select("INBOX", readonly=True)[0] == "OK"
    rows = wait_until(lambda: len(gateway.audit_rows()) >= 2 and gateway.audit_rows(), 10, "audit rows")
    for prev, row in zip(rows, rows[1:]):
        assert row["hash"] and row["hash"] != prev["hash"]
        assert row["prev_hash"] == prev["hash"], (prev["id"], row["id"])


def test_audit_verify_succeeds(gateway, clients):
    c = clients(gateway.client("mario"))
    assert c.noop()[0] == "OK"
    res = gateway.cli("audit", "verify")
    assert res.returncode == 0, (res.stdout, res.stderr)


def test_audit_verify_detects_tampering(make_gateway, clients):
    gw = make_gateway()
    c = gw.client("mario")
    assert c.select("INBOX", readonly=True)[0] == "OK"
    c.logout()
    wait_until(lambda: any(r["command"] == "logout" for r in gw.audit_rows()), 10, "logout audit row")
    assert gw.stop() == 0, gw.log_text()

    res = gw.cli("audit", "verify")
    assert res.returncode == 0, (res.stdout, res.stderr)

    db = sqlite3.connect(gw.audit_path)
    try:
        target = db.execute("SELECT id FROM events WHERE command IN ('SELECT', 'EXAMINE') ORDER BY id LIMIT 1").fetchone()
        assert target, "no SELECT row to tamper with"
        db.execute("UPDATE events SET folder = 'Riservata' WHERE id = ?", target)
        db.commit()
    finally:
        db.close()
    res = gw.cli("audit", "verify")
    assert res.returncode != 0, "audit verify accepted a tampered log"


def test_failed_audit_store_stops_the_work(make_gateway, clients):
    """If the audit store fails, pecgate refuses further commands rather than work
    unrecorded: here the database file is replaced under the running daemon."""
    gw = make_gateway()
    r = clients(gw.raw(tls=True))
    r.login("mario", gw.password("mario"))
    _, tagged = r.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged

    path = gw.audit_path
    os.replace(path, path.with_suffix(".moved"))
    path.write_bytes(b"")  # another file at the same path: the writer must notice

    # Commands already queued may still be answered; within a bounded number of further
    # commands the session must be closed with an explanation, and never answer OK again.
    deadline = time.monotonic() + 20
    closing = None
    n = 0
    while closing is None:
        assert time.monotonic() < deadline, "pecgate kept working without its audit log"
        n += 1
        r.send(f"N{n} NOOP\r\n".encode())
        try:
            while True:
                line = r.read_line(5)
                if line.startswith(b"* BYE"):
                    closing = line
                    break
                if line.startswith(f"N{n} ".encode()):
                    break
        except EOFError:
            pytest.fail("connection closed without a BYE")
    assert b"Audit log unavailable" in closing, closing
    with pytest.raises((EOFError, OSError)):
        r.command("N0", "NOOP", timeout=5)

    # A new login is refused as well.
    r2 = clients(gw.raw(tls=True))
    r2.send(b"L1 LOGIN mario " + quote(gw.password("mario")).encode() + b"\r\n")
    lines = []
    with pytest.raises((EOFError, OSError)):
        while True:
            lines.append(r2.read_line(20))
    assert not any(l.startswith(b"L1 OK") for l in lines), lines
    assert any(b"Audit log unavailable" in l for l in lines), lines
    assert "AUDIT LOG WRITE FAILED" in gw.log_text()
