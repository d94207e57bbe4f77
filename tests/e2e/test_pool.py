"""A mailbox's provider connections as one pool: a login that finds every connection busy
waits for one (fairly between users) instead of failing; a provider that refuses logins for
its own connection limit (Dovecot's ``mail_max_userip_connections``, set low here) makes the
pool shrink and the client wait, never see the refusal; only a wait that runs out gets
``NO [UNAVAILABLE]``, saying which limit it was."""

from __future__ import annotations

import os
import re
import select
import signal
import time

import pytest

import harness
from harness import PROVIDER_ADDRESS, Dovecot, quote, wait_until
from harness import pool_metric as metric

OK_LOGIN = b"L1 OK"


def last_login_row(gw, user: str) -> dict:
    """The newest LOGIN audit row of ``user``, once written (the writer commits in groups)."""
    def found():
        rows = [r for r in gw.audit_rows() if r["command"] == "LOGIN" and r["user"] == user]
        return rows[-1] if rows and rows[-1]["outcome"] != "ok" else None
    return wait_until(found, 10, f"the refused LOGIN of {user} in the audit log")


def waiting(gw) -> int | None:
    return metric(gw, "pecgate_provider_waiting")


def held(gw, clients, user: str):
    """A logged-in session with INBOX open: it holds one provider connection."""
    r = clients(gw.raw(tls=True, timeout=30))
    r.login(user, gw.password(user))
    _, tagged = r.command("S1", "EXAMINE INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    return r


def start_login(gw, clients, user: str, queued_before: int | None = None):
    """Send a LOGIN without waiting for its answer. ``queued_before``: the waiters counted
    before it; the call returns once this login is counted too (so the queue order is the
    call order)."""
    r = clients(gw.raw(tls=True, timeout=60))
    r.send(f"L1 LOGIN {user} {quote(gw.password(user))}\r\n")
    if queued_before is not None:
        wait_until(lambda: waiting(gw) == queued_before + 1, 20,
                   f"login {queued_before + 1} of {user} to queue for a provider connection")
    return r


def logout(r):
    _, tagged = r.command("O1", "LOGOUT")
    assert tagged.startswith(b"O1 OK"), tagged


def logged_in(r, timeout: float = 30) -> list[bytes]:
    untagged, tagged = r.read_until_tagged("L1", timeout)
    assert tagged.startswith(OK_LOGIN), (untagged, tagged)
    _, selected = r.command("S2", "SELECT INBOX")
    assert selected.startswith(b"S2 OK"), selected
    return untagged


def nothing_yet(r) -> bool:
    """No byte from the server has arrived for ``r`` (checked without waiting)."""
    pending = r.sock.pending() if hasattr(r.sock, "pending") else 0
    return not r.buf and not pending and not select.select([r.sock], [], [], 0)[0]


@pytest.fixture
def make_gw(dovecot, pecgate_binary):
    with harness.gateways(dovecot, binary=pecgate_binary, metrics="127.0.0.1:0") as make:
        yield make


@pytest.fixture
def capped(pecgate_binary):
    """A provider that accepts two IMAP connections per login and address, and pecgate
    configured for four: the provider's limit is the real one."""
    d = Dovecot(max_userip_connections=2)
    d.add_user(PROVIDER_ADDRESS, "provider-" + harness.secrets.token_hex(8))
    with d:
        with harness.gateways(d, binary=pecgate_binary, metrics="127.0.0.1:0",
                              max_connections=4) as make:
            yield d, make


def test_a_login_waits_for_a_busy_connection_and_gets_it(make_gw, clients):
    gw = make_gw(max_connections=2, gateway_options={"connection_wait_secs": 60})
    first = held(gw, clients, "mario")
    held(gw, clients, "anna")
    third = start_login(gw, clients, "mario", queued_before=0)
    assert nothing_yet(third), "the waiting login was answered before a connection was free"

    logout(first)
    logged_in(third)
    assert waiting(gw) == 0
    assert metric(gw, "pecgate_provider_connections") == 2
    logins = wait_until(lambda: (rows := [r for r in gw.audit_rows() if r["command"] == "LOGIN"])
                        and len(rows) == 3 and rows, 10, "three LOGIN rows")
    assert [r["outcome"] for r in logins] == ["ok", "ok", "ok"], logins


def test_a_wait_that_runs_out_is_told_while_waiting_and_then_refused(make_gw, clients):
    wait = 3
    gw = make_gw(max_connections=1, gateway_options={"connection_wait_secs": wait})
    holder = held(gw, clients, "anna")
    started = time.monotonic()
    late = start_login(gw, clients, "mario")
    untagged, tagged = late.read_until_tagged("L1", 30)
    elapsed = time.monotonic() - started
    assert tagged.startswith(b"L1 NO [UNAVAILABLE] Every connection to the PEC provider for this mailbox (1 at most) stayed busy for 3 seconds"), tagged
    assert elapsed >= wait - 0.2, f"refused after {elapsed:.1f}s, before the wait ran out"
    # Told it is waiting (every wait/3 s here), so neither the user nor the client's own
    # timer takes it for a hang.
    assert untagged and all(line == b"* OK Waiting for a free connection to the PEC provider for this mailbox"
                            for line in untagged), untagged
    row = last_login_row(gw, "mario")
    assert row["outcome"] == "no" and "max_connections=1 busy for 3s" in row["detail"], row
    assert "every provider connection of this mailbox stayed busy" in gw.log_text()
    # The waiter left the queue and the holder's session is untouched.
    assert waiting(gw) == 0
    _, tagged = holder.command("N1", "NOOP")
    assert tagged.startswith(b"N1 OK"), tagged


def test_waiting_logins_are_served_in_turn_between_users(make_gw, clients):
    gw = make_gw(max_connections=1, gateway_options={"connection_wait_secs": 120})
    holder = held(gw, clients, "anna")
    marios = [start_login(gw, clients, "mario", queued_before=i) for i in range(3)]
    anna = start_login(gw, clients, "anna", queued_before=3)

    logout(holder)
    logged_in(marios[0])
    # Mario's first is in; the next place is Anna's turn, not Mario's second.
    logout(marios[0])
    logged_in(anna)
    assert waiting(gw) == 2
    assert nothing_yet(marios[1]) and nothing_yet(marios[2])
    logout(anna)
    logged_in(marios[1])
    logout(marios[1])
    logged_in(marios[2])
    assert waiting(gw) == 0


def test_the_providers_own_limit_shrinks_the_pool_and_the_client_only_waits(capped, clients):
    dovecot, make = capped
    gw = make(gateway_options={"connection_wait_secs": 60})
    first = held(gw, clients, "mario")
    held(gw, clients, "anna")
    assert metric(gw, "pecgate_provider_connection_cap") == 4

    third = start_login(gw, clients, "mario")
    wait_until(lambda: metric(gw, "pecgate_provider_limit_refusals_total") == 1
               and metric(gw, "pecgate_provider_connection_cap") == 2 and waiting(gw) == 1,
               20, "the provider's refusal to lower the pool's cap, with the login waiting")
    assert nothing_yet(third), "the provider's refusal reached the client"

    logout(first)
    logged_in(third)
    log = gw.log_text()
    assert "refused a connection for its own connection limit" in log, log[-2000:]
    assert "mail_max_userip_connections=2" in log, "the provider's words are logged"
    # One refused attempt, a retry once a connection closed: not a login storm.
    refusals = dovecot.log_text().count("Maximum number of connections")
    assert 1 <= refusals <= 3, refusals
    assert metric(gw, "pecgate_provider_limit_refusals_total") == refusals
    rows = wait_until(lambda: (rows := [r for r in gw.audit_rows() if r["command"] in ("LOGIN", "upstream-error")])
                      and len(rows) >= 3 and rows, 10, "three LOGIN rows")
    assert [r["outcome"] for r in rows] == ["ok", "ok", "ok"], rows


def test_a_wait_on_the_providers_limit_names_that_limit(capped, clients):
    dovecot, make = capped
    gw = make(gateway_options={"connection_wait_secs": 3})
    held(gw, clients, "mario")
    held(gw, clients, "anna")
    late = start_login(gw, clients, "mario")
    _, tagged = late.read_until_tagged("L1", 30)
    assert tagged.startswith(b"L1 NO [UNAVAILABLE] The PEC provider accepts no more connections for this mailbox right now (its own limit"), tagged
    assert b"cannot be reached" not in tagged
    row = last_login_row(gw, "mario")
    assert row["outcome"] == "no", row
    assert "its own limit" in row["detail"] and "pecgate uses 2 of max_connections=4" in row["detail"], row
    assert "login refused: the provider's connection limit" in gw.log_text()


# ---------------------------------------------------------------------------
# Connections outlive their sessions: the next login reuses one
# ---------------------------------------------------------------------------


@pytest.fixture
def own_provider(pecgate_binary):
    """A provider of this test's own (its log counts only this test's logins), recording the
    raw IMAP of pecgate's connections."""
    d = Dovecot(rawlog=[PROVIDER_ADDRESS])
    d.add_user(PROVIDER_ADDRESS, "provider-" + harness.secrets.token_hex(8))
    with d:
        with harness.gateways(d, binary=pecgate_binary, metrics="127.0.0.1:0") as make:
            yield d, make


def provider_logins(dovecot) -> int:
    return len(re.findall(r"imap-login: .*Login: user=<" + re.escape(PROVIDER_ADDRESS), dovecot.log_text()))


def test_the_next_login_reuses_the_connection_a_session_gave_back(own_provider, clients):
    dovecot, make = own_provider
    gw = make(gateway_options={"provider_idle_keep_secs": 60})
    first = held(gw, clients, "mario")
    logout(first)
    wait_until(lambda: metric(gw, "pecgate_provider_idle") == 1, 10, "the connection to wait idle")
    assert metric(gw, "pecgate_provider_connections") == 1

    second = clients(gw.raw(tls=True, timeout=30))
    second.login("anna", gw.password("anna"))
    # It starts where a fresh connection would: nothing selected (pecgate unselected it).
    _, tagged = second.command("F1", "FETCH 1 (FLAGS)")
    assert tagged.startswith((b"F1 BAD", b"F1 NO")), tagged
    _, tagged = second.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    _, tagged = second.command("F2", "UID FETCH 1:* (FLAGS)")
    assert tagged.startswith(b"F2 OK"), tagged
    assert (metric(gw, "pecgate_provider_idle"), metric(gw, "pecgate_provider_connections")) == (0, 1)
    assert provider_logins(dovecot) == 1, "the second session logged in to the provider again"
    (conn,) = dovecot.rawlog_connections()
    commands = [line.split(b" ", 2)[1].upper() for line in conn.received.splitlines() if b" " in line]
    # The first session's EXAMINE, pecgate's UNSELECT and NOOP, the second's commands.
    assert b"UNSELECT" in commands and b"NOOP" in commands, commands
    assert b"LOGOUT" not in commands and b"CLOSE" not in commands, commands
    # A client that just goes away (no LOGOUT) gives its connection back too.
    second.close()
    wait_until(lambda: metric(gw, "pecgate_provider_idle") == 1, 10,
               "the connection of a client that closed to wait idle")
    assert provider_logins(dovecot) == 1


def test_an_idle_connection_the_provider_dropped_is_replaced_unseen(own_provider, clients):
    dovecot, make = own_provider
    gw = make(gateway_options={"provider_idle_keep_secs": 60})
    logout(held(gw, clients, "mario"))
    wait_until(lambda: metric(gw, "pecgate_provider_idle") == 1, 10, "the connection to wait idle")
    (conn,) = dovecot.rawlog_connections()
    os.kill(conn.pid, signal.SIGKILL)

    again = held(gw, clients, "anna")
    _, tagged = again.command("N1", "NOOP")
    assert tagged.startswith(b"N1 OK"), tagged
    assert provider_logins(dovecot) == 2
    assert metric(gw, "pecgate_provider_connections") == 1


def test_idle_connections_are_logged_out_after_their_time(own_provider, clients):
    dovecot, make = own_provider
    gw = make(gateway_options={"provider_idle_keep_secs": 1})
    logout(held(gw, clients, "mario"))
    wait_until(lambda: metric(gw, "pecgate_provider_connections") == 0, 15,
               "the idle connection to be closed after provider_idle_keep_secs")
    (conn,) = dovecot.rawlog_connections()
    dovecot.wait_rawlogs_closed([conn])
    assert conn.received.rstrip().endswith(b"s9 LOGOUT"), conn.received[-200:]


def test_a_session_ending_mid_command_does_not_hand_on_its_connection(own_provider, clients):
    dovecot, make = own_provider
    gw = make(gateway_options={"provider_idle_keep_secs": 60})
    r = held(gw, clients, "mario")
    r.send(b"I1 IDLE\r\n")
    assert r.read_line().startswith(b"+"), "no IDLE continuation"
    r.close()
    wait_until(lambda: metric(gw, "pecgate_provider_connections") == 0, 15,
               "the connection of a session that ended in IDLE to be closed")
    assert metric(gw, "pecgate_provider_idle") == 0
