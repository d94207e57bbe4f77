"""Sessions in IDLE hold no provider connection: pecgate parks them, one folder watcher per
folder keeps every parked session told (EXISTS, EXPUNGE, FETCH FLAGS in each session's own
numbering), and DONE brings the session back on a pooled connection whose numbering is the
session's. Against a real Dovecot, with imaplib-free raw clients so every byte is checked,
and a direct connection playing the colleague on webmail."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

import harness
from harness import PROVIDER_ADDRESS, Dovecot, wait_until
from harness import folder_truth as truth, pool_metric as metric, small_message as message

SESSIONS = 12
POOL = 3


@pytest.fixture
def office(pecgate_binary):
    """A provider of this test's own (its log and processes are this test's), pecgate with a
    pool of three connections that keeps idle ones, and a direct connection to the provider."""
    d = Dovecot(rawlog=[PROVIDER_ADDRESS])
    d.add_user(PROVIDER_ADDRESS, "provider-" + harness.secrets.token_hex(8))
    with d:
        for i in range(5):
            d.append(PROVIDER_ADDRESS, "INBOX", message(f"seed {i}"))
        d.create_folders(PROVIDER_ADDRESS, ["Ricevute"])
        d.append(PROVIDER_ADDRESS, "Ricevute", message("ricevuta"))
        with harness.gateways(d, binary=pecgate_binary, metrics="127.0.0.1:0",
                              max_connections=POOL,
                              gateway_options={"provider_idle_keep_secs": 60,
                                               "max_sessions_per_user": 100},
                              imap_options={"park_idle": True}) as make:
            direct = harness.RawImap(d.imaps_port, cafile=d.cert)
            direct.login(PROVIDER_ADDRESS, d.users[PROVIDER_ADDRESS])
            try:
                yield d, make(), direct
            finally:
                direct.close()


class Idler:
    """A client session that SELECTs a folder and IDLEs, keeping the model a client builds
    from what it is told (message n is uids[n - 1]) and checking the RFC rules as it goes."""

    def __init__(self, gw, clients, user: str, folder: str = "INBOX"):
        self.r = clients(gw.raw(tls=True, timeout=30))
        self.r.login(user, gw.password(user))
        untagged, tagged = self.r.command("S1", f"SELECT {folder}")
        assert tagged.startswith(b"S1 OK"), tagged
        count = next(int(m.group(1)) for line in untagged if (m := re.match(rb"\* (\d+) EXISTS", line)))
        untagged, tagged = self.r.command("S2", "UID SEARCH ALL")
        assert tagged.startswith(b"S2 OK"), tagged
        self.uids: list[int | None] = [int(u) for line in untagged if line.startswith(b"* SEARCH")
                                       for u in line.split()[2:]]
        assert len(self.uids) == count
        self.flags: dict[int, str] = {}
        self.r.send(b"I1 IDLE\r\n")
        assert self.r.read_line().startswith(b"+"), "no IDLE continuation"

    def hear(self, timeout: float = 10) -> bytes:
        line = self.r.read_line(timeout)
        self.follow(line)
        return line

    def follow(self, line: bytes):
        """What a client does with an untagged line: its model follows, within the rules."""
        m = re.match(rb"\* (\d+) (EXISTS|EXPUNGE|FETCH)", line)
        if not m:
            return
        n, what = int(m.group(1)), m.group(2)
        if what == b"EXISTS":
            assert n >= len(self.uids), f"EXISTS went down: {n} < {len(self.uids)}"
            self.uids.extend([None] * (n - len(self.uids)))
        elif what == b"EXPUNGE":
            assert 1 <= n <= len(self.uids), f"EXPUNGE {n} of {len(self.uids)}"
            del self.uids[n - 1]
        else:
            assert 1 <= n <= len(self.uids), f"FETCH {n} of {len(self.uids)}"
            self.flags[n] = line.decode()

    def done(self) -> list[bytes]:
        """DONE; what is told before the IDLE ends is followed like any news."""
        self.r.send(b"DONE\r\n")
        untagged, tagged = self.r.read_until_tagged("I1", 30)
        assert tagged == b"I1 OK IDLE terminated", tagged
        for line in untagged:
            self.follow(line)
        return untagged

    def idle_again(self):
        """Back to IDLE, as Thunderbird does two seconds after its sync."""
        self.r.send(b"I1 IDLE\r\n")
        line = self.r.read_line()
        while not line.startswith(b"+"):
            self.follow(line)
            line = self.r.read_line()

    def check_against(self, uids: list[int]):
        """After DONE: the session's numbering is the provider's, message by message."""
        untagged, tagged = self.r.command("C1", "FETCH 1:* (UID)") if uids else ([], b"C1 OK")
        assert tagged.startswith(b"C1 OK"), tagged
        told = {int(m.group(1)): int(m.group(2)) for line in untagged
                if (m := re.match(rb"\* (\d+) FETCH \(UID (\d+)\)", line))}
        assert [told[n] for n in sorted(told)] == uids
        assert len(self.uids) == len(uids), "the client's count differs from the folder's"
        for known, real in zip(self.uids, uids):
            assert known is None or known == real, (self.uids, uids)


def test_idle_sessions_share_one_watcher_and_hear_every_change(office, clients):
    dovecot, gw, direct = office
    users = ["mario", "anna"]
    idlers = [Idler(gw, clients, users[i % 2]) for i in range(SESSIONS)]
    # Every session is parked: the provider sees the watcher and at most the pool's ceiling.
    wait_until(lambda: metric(gw, "pecgate_provider_connections") <= POOL, 10, "parked sessions to release their connections")
    assert metric(gw, "pecgate_provider_waiting") == 0
    assert (metric(gw, "pecgate_folder_watchers"), metric(gw, "pecgate_parked_sessions")) == (1, SESSIONS)
    uids, _ = truth(direct)

    # New mail (LMTP): every session hears EXISTS with the new count.
    dovecot.deliver(PROVIDER_ADDRESS, message("nuova PEC"))
    for idler in idlers:
        assert idler.hear() == f"* {len(uids) + 1} EXISTS".encode()
    uids, _ = truth(direct)

    # A colleague on webmail deletes message 2: every session hears EXPUNGE 2.
    _, tagged = direct.command("D1", "SELECT INBOX")
    _, tagged = direct.command("D2", f"UID STORE {uids[1]} +FLAGS.SILENT (\\Deleted)")
    assert tagged.startswith(b"D2 OK"), tagged
    # The \Deleted flag is news too; then the expunge.
    for idler in idlers:
        assert re.fullmatch(rb"\* 2 FETCH \(FLAGS \(.*\\Deleted.*\)\)", idler.hear()), idler.flags
    _, tagged = direct.command("D3", f"UID EXPUNGE {uids[1]}")
    assert tagged.startswith(b"D3 OK"), tagged
    for idler in idlers:
        assert idler.hear() == b"* 2 EXPUNGE"
    uids, _ = truth(direct)

    # DONE: each session is back on a pooled connection numbered as it was told, syncs,
    # and idles again (leaving the connection to the next): twelve sessions through a pool
    # of three, one of them the watcher's.
    for idler in idlers:
        idler.done()
        idler.check_against(uids)
        idler.idle_again()
    assert metric(gw, "pecgate_provider_connections") <= POOL

    # The provider never saw a session's IDLE: only the watcher's (tags w<N>).
    rawlog = b"".join(c.received for c in dovecot.rawlog_connections())
    idles = re.findall(rb"^(\S+) IDLE", rawlog, re.M)
    assert idles and all(tag.startswith(b"w") for tag in idles), idles
    rows = wait_until(lambda: (rows := [r for r in gw.audit_rows() if r["command"] == "IDLE"])
                      and len(rows) == SESSIONS and rows, 10, "an IDLE row per session")
    assert all(r["outcome"] == "ok" and "parked" in r["detail"] for r in rows), rows


def test_done_tells_what_changed_while_nothing_was_heard(office, clients):
    """Changes the watcher reports after the client sent DONE are told before the IDLE ends,
    and the session's numbering then matches the provider's."""
    dovecot, gw, direct = office
    idler = Idler(gw, clients, "mario")
    uids, _ = truth(direct)
    dovecot.deliver(PROVIDER_ADDRESS, message("uno"))
    dovecot.deliver(PROVIDER_ADDRESS, message("due"))
    # However much of it was heard before DONE, the rest is told before the IDLE ends.
    idler.done()
    uids, _ = truth(direct)
    assert len(uids) == len(idler.uids)
    idler.check_against(uids)


def test_a_watcher_whose_connection_dies_is_replaced_and_sessions_go_on(office, clients):
    dovecot, gw, direct = office
    idlers = [Idler(gw, clients, "mario") for _ in range(3)]
    rawlog = dovecot.rawlog_connections()
    watcher = [c for c in rawlog if re.search(rb"^w\d+ IDLE", c.received, re.M)]
    assert len(watcher) == 1, [c.key for c in rawlog]
    os.kill(watcher[0].pid, signal.SIGKILL)
    uids, _ = truth(direct)
    dovecot.deliver(PROVIDER_ADDRESS, message("dopo"))
    for idler in idlers:
        assert idler.hear(30) == f"* {len(uids) + 1} EXISTS".encode()
    for idler in idlers:
        idler.done()
        idler.check_against(truth(direct)[0])
        idler.idle_again()


def test_a_folder_replaced_on_the_provider_ends_only_its_sessions(office, clients):
    dovecot, gw, direct = office
    on_ricevute = Idler(gw, clients, "mario", folder="Ricevute")
    on_inbox = Idler(gw, clients, "mario")
    _, tagged = direct.command("X1", "DELETE Ricevute")
    assert tagged.startswith(b"X1 OK"), tagged
    _, tagged = direct.command("X2", "CREATE Ricevute")
    assert tagged.startswith(b"X2 OK"), tagged
    line = on_ricevute.r.read_line(30)
    while not line.startswith(b"* BYE"):
        line = on_ricevute.r.read_line(30)
    assert line.startswith(b"* BYE [UNAVAILABLE]"), line
    # INBOX's sessions are untouched.
    dovecot.deliver(PROVIDER_ADDRESS, message("ancora"))
    assert re.fullmatch(rb"\* \d+ EXISTS", on_inbox.hear())
    on_inbox.done()
    on_inbox.check_against(truth(direct)[0])


def test_an_idle_client_is_kept_alive_and_a_stop_reaches_it(office, clients):
    """A parked session still ends like an attached one when pecgate is asked to end it."""
    dovecot, gw, direct = office
    idler = Idler(gw, clients, "anna")
    done = gw.cli("sessions", "kick", "anna")
    assert done.returncode == 0, done.stderr
    line = idler.r.read_line(15)
    assert line.startswith(b"* BYE"), line
    row = wait_until(lambda: [r for r in gw.audit_rows() if r["command"] == "IDLE"], 10, "the IDLE row")
    assert "parked" in row[-1]["detail"], row


def test_an_idle_with_no_folder_selected_holds_no_connection_either(office, clients):
    """Outlook sometimes idles before selecting anything: nothing to watch, only DONE to wait
    for; the connection goes back to the pool meanwhile."""
    dovecot, gw, direct = office
    r = clients(gw.raw(tls=True, timeout=30))
    r.login("mario", gw.password("mario"))
    r.send(b"I1 IDLE\r\n")
    assert r.read_line() == b"+ idling"
    wait_until(lambda: metric(gw, "pecgate_provider_idle") == 1, 10,
               "the idling session's connection to wait in the pool")
    r.send(b"DONE\r\n")
    _, tagged = r.read_until_tagged("I1", 30)
    assert tagged == b"I1 OK IDLE terminated", tagged
    _, tagged = r.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    rawlog = b"".join(c.received for c in dovecot.rawlog_connections())
    assert not re.search(rb"^\S+ IDLE", rawlog, re.M), "an IDLE reached the provider"
