"""A session between two commands holds its provider connection only until another session
waits for one: then it lends it, and its own next command waits for a pooled connection,
selects the folder again and goes on in the client's numbering. Messages expunged meanwhile
are held back until the client may hear them (RFC 3501 §7.4.1): FETCH, STORE and SEARCH by
sequence number are translated, and the EXPUNGEs come at the next command that allows them.

Against a real Dovecot capped at a few connections per login, with raw clients that keep the
model a client builds (message n is uids[n - 1]) and check every answer against it, and a
direct connection playing the colleague on webmail."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import threading
import time

import pytest

import harness
from harness import PROVIDER_ADDRESS, Dovecot, wait_until
from harness import folder_truth as truth, pool_metric as metric, small_message as message

# Statuses that are answers, not news.
NUMBERED = re.compile(rb"\* (\d+) (EXISTS|EXPUNGE|FETCH|RECENT)\b")
# Non-UID commands during which an EXPUNGE must never be told.
NO_EXPUNGE = re.compile(rb"^(FETCH|STORE|SEARCH) ", re.I)


@contextlib.contextmanager
def office(pecgate_binary, *, pool: int, cap: int, seed: int = 5, keep_idle: int = 0,
           idle_timeout: int = 1800, lend_after_quiet: int = 60):
    """A provider of this test's own that takes ``cap`` connections per login, ``seed``
    messages in INBOX, pecgate with a pool of ``pool`` that lends quiet connections (with
    ``keep_idle``, idle connections are kept: then a session lends its connection as soon as
    it is quiet while every place is taken), and a direct connection to the provider."""
    d = Dovecot(max_userip_connections=cap, rawlog=[PROVIDER_ADDRESS])
    d.add_user(PROVIDER_ADDRESS, "provider-" + harness.secrets.token_hex(8))
    with d:
        for i in range(seed):
            d.append(PROVIDER_ADDRESS, "INBOX", message(f"seed {i}"))
        d.create_folders(PROVIDER_ADDRESS, ["Ricevute"])
        with harness.gateways(d, binary=pecgate_binary, metrics="127.0.0.1:0",
                              max_connections=pool,
                              gateway_options={"connection_wait_secs": 20,
                                               "max_sessions_per_user": 100,
                                               "provider_idle_keep_secs": keep_idle,
                                               "idle_timeout_secs": idle_timeout},
                              imap_options={"lend_between_commands": True,
                                            "lend_after_quiet_secs": lend_after_quiet}) as make:
            gw = make()
            direct = harness.RawImap(d.imaps_port, cafile=d.cert)
            direct.login(PROVIDER_ADDRESS, d.users[PROVIDER_ADDRESS])
            try:
                yield d, gw, direct
            finally:
                direct.close()


@pytest.fixture
def small_office(pecgate_binary):
    """One pooled connection; the provider takes three (pecgate's, the direct one and the
    harness's own for APPEND)."""
    with office(pecgate_binary, pool=1, cap=3) as running:
        yield running


def expunge_uids(direct, uids: list[int]):
    _, tagged = direct.command("X0", "SELECT INBOX")
    assert tagged.startswith(b"X0 OK"), tagged
    uid_set = ",".join(map(str, uids))
    _, tagged = direct.command("X1", f"UID STORE {uid_set} +FLAGS.SILENT (\\Deleted)")
    assert tagged.startswith(b"X1 OK"), tagged
    _, tagged = direct.command("X2", f"UID EXPUNGE {uid_set}")
    assert tagged.startswith(b"X2 OK"), tagged
    _, tagged = direct.command("X3", "UNSELECT")


class Client:
    """A client session keeping the model a client builds from what it is told, and
    checking the RFC rules on every answer."""

    def __init__(self, gw, clients, user: str, folder: str | None = "INBOX"):
        self.r = clients(gw.raw(tls=True, timeout=40))
        self.r.login(user, gw.password(user))
        self.uids: list[int | None] = []
        # UIDs the session was told are gone (a UID is never used again: none may come back).
        self.expunged: set[int] = set()
        self.expunges_heard = 0
        self.n = 0
        if folder:
            untagged, tagged = self.run(f"SELECT {folder}")
            assert tagged.split()[1] == b"OK", tagged
            self.run("UID SEARCH ALL")

    def run(self, text: str) -> tuple[list[bytes], bytes]:
        self.n += 1
        tag = f"q{self.n}"
        untagged, tagged = self.r.command(tag, text)
        no_expunge = bool(NO_EXPUNGE.match(text.encode()))
        whole_list = text.upper() == "UID SEARCH ALL" and tagged.startswith(f"{tag} OK".encode())
        for line in untagged:
            if whole_list and line.startswith(b"* SEARCH"):
                # The folder as the session numbers it at this point of the answer (news
                # told after it describes later changes).
                found = [int(u) for u in line.split()[2:]]
                assert found == sorted(found)
                assert len(found) == len(self.uids), (found, self.uids)
                self.uids = list(found)
            else:
                self.follow(line, no_expunge, text)
        return untagged, tagged

    def follow(self, line: bytes, no_expunge: bool, during: str):
        m = NUMBERED.match(line)
        if m:
            n, what = int(m.group(1)), m.group(2)
            if what == b"EXISTS":
                assert n >= len(self.uids), f"EXISTS went down: {n} < {len(self.uids)}"
                self.uids.extend([None] * (n - len(self.uids)))
            elif what == b"EXPUNGE":
                assert not no_expunge, f"EXPUNGE during {during!r}"
                assert 1 <= n <= len(self.uids), f"EXPUNGE {n} of {len(self.uids)}"
                gone = self.uids.pop(n - 1)
                self.expunges_heard += 1
                if gone is not None:
                    self.expunged.add(gone)
            elif what == b"FETCH":
                assert 1 <= n <= len(self.uids), f"FETCH {n} of {len(self.uids)} during {during!r}"
                uid = re.search(rb"\bUID (\d+)", line)
                if uid:
                    known = self.uids[n - 1]
                    assert known in (None, int(uid.group(1))), \
                        f"message {n} is UID {known}, told {uid.group(1)} during {during!r}"
                    self.uids[n - 1] = int(uid.group(1))
        elif line.startswith(b"* SEARCH") and not during.upper().startswith("UID "):
            for number in line.split()[2:]:
                assert 1 <= int(number) <= len(self.uids), (line, len(self.uids))

    def fetched(self, untagged) -> dict[int, int]:
        return {int(m.group(1)): int(m.group(2)) for line in untagged
                if (m := re.match(rb"\* (\d+) FETCH \(UID (\d+)", line))}

    def check_against(self, uids: list[int]):
        """After a command that allows EXPUNGE: numbering and count are the provider's."""
        untagged, tagged = self.run("NOOP")
        assert tagged.split()[1] == b"OK", tagged
        if uids:
            untagged, tagged = self.run("FETCH 1:* (UID)")
            assert tagged.split()[1] == b"OK", tagged
            told = self.fetched(untagged)
            assert [told[n] for n in sorted(told)] == uids
        assert self.uids == uids, (self.uids, uids)
        assert not self.expunged & set(uids), f"told EXPUNGE for {self.expunged & set(uids)}"


def test_a_quiet_session_lends_its_connection_to_a_waiting_login(small_office, clients):
    dovecot, gw, direct = small_office
    mario = Client(gw, clients, "mario")
    uids, _ = truth(direct)
    assert mario.uids == uids
    # The only connection is mario's, and mario is between commands: anna's login gets it.
    anna = Client(gw, clients, "anna")
    assert anna.uids == uids
    assert metric(gw, "pecgate_provider_connections") == 1
    # mario's next command waits for anna to be quiet, then runs where mario was.
    untagged, tagged = mario.run("FETCH 2:3 (UID FLAGS)")
    assert tagged.split()[1] == b"OK", tagged
    assert mario.fetched(untagged) == {2: uids[1], 3: uids[2]}
    untagged, tagged = anna.run("UID FETCH 1:* (UID)")
    assert tagged.split()[1] == b"OK", tagged
    assert sorted(anna.fetched(untagged).values()) == uids
    # Handed over between sessions of INBOX, the connection kept the folder selected: pecgate
    # never selected it again (its own commands have tags s<N>); only anna's login got it
    # unselected.
    sent = b"".join(c.received for c in dovecot.rawlog_connections())
    assert b"s7 UID SEARCH ALL" in sent
    assert not re.search(rb"^s\d+ (SELECT|EXAMINE)", sent, re.M), sent
    assert len(re.findall(rb"^s\d+ UNSELECT", sent, re.M)) == 1, sent
    # A session with no folder selected lends too, and LISTs afterwards; the connection it
    # gets comes unselected, and the one it lends needs selecting again.
    carla = Client(gw, clients, "mario", folder=None)
    untagged, tagged = mario.run("NOOP")
    assert tagged.split()[1] == b"OK", tagged
    untagged, tagged = carla.run('LIST "" "*"')
    assert tagged.split()[1] == b"OK", tagged
    assert any(b"INBOX" in line for line in untagged), untagged
    assert metric(gw, "pecgate_provider_connections") == 1
    assert metric(gw, "pecgate_provider_lends_total") == 6
    sent = b"".join(c.received for c in dovecot.rawlog_connections())
    assert re.search(rb"^s\d+ UNSELECT", sent, re.M) and b's7 SELECT "INBOX"' in sent
    # Each command is audited under its own user, on its own folder.
    rows = wait_until(lambda: (rows := [r for r in gw.audit_rows() if r["command"] == "FETCH"])
                      and rows, 10, "mario's FETCH in the audit log")
    assert [(r["user"], r["folder"], r["outcome"]) for r in rows] == [("mario", "INBOX", "ok")]


def test_expunges_made_while_lent_wait_until_the_client_may_hear_them(small_office, clients):
    dovecot, gw, direct = small_office
    mario = Client(gw, clients, "mario")
    uids, _ = truth(direct)
    assert len(uids) == 5
    anna = Client(gw, clients, "anna")        # mario lends
    # A colleague on webmail removes messages 2 and 4; new mail arrives.
    expunge_uids(direct, [uids[1], uids[3]])
    dovecot.deliver(PROVIDER_ADDRESS, message("nuova PEC"))
    now, _ = truth(direct)

    # mario still counts five messages, and hears of the sixth at once. A FETCH by
    # sequence number answers in mario's numbers, skips the gone ones, tells no EXPUNGE.
    untagged, tagged = mario.run("FETCH 1:* (UID FLAGS)")
    assert tagged.endswith(b"OK [EXPUNGEISSUED] Some messages were already expunged."), tagged
    assert b"* 6 EXISTS" in untagged, untagged
    assert mario.fetched(untagged) == {1: uids[0], 3: uids[2], 5: uids[4], 6: now[-1]}
    assert len(mario.uids) == 6

    # STORE by sequence number flags the message the client means.
    anna.run("NOOP")                          # anna takes the connection; mario lends
    untagged, tagged = mario.run("STORE 3 +FLAGS ($Pratica)")
    assert tagged.split()[1] == b"OK", tagged
    assert [line for line in untagged if b"FETCH" in line] == [b"* 3 FETCH (FLAGS ($Pratica))"]
    _, flags = truth(direct)
    assert [u for u in now if "$Pratica" in flags[u]] == [uids[2]]
    # SEARCH answers in the client's numbers.
    untagged, tagged = mario.run("SEARCH KEYWORD $Pratica")
    assert tagged.split()[1] == b"OK", tagged
    assert b"* SEARCH 3" in untagged, untagged
    untagged, tagged = mario.run("SEARCH 2:4")
    assert b"* SEARCH 3" in untagged, untagged
    # Only gone messages: nothing to ask the provider, answered as Dovecot does.
    _, tagged = mario.run("FETCH 4 (UID)")
    assert tagged.endswith(b"OK [EXPUNGEISSUED] Some messages were already expunged."), tagged

    # NOOP may carry EXPUNGE: both are told, highest first, and the numberings are one.
    untagged, tagged = mario.run("NOOP")
    assert [line for line in untagged if b"EXPUNGE" in line] == [b"* 4 EXPUNGE", b"* 2 EXPUNGE"]
    mario.check_against(now)
    anna.check_against(now)


def test_a_folder_replaced_while_lent_ends_only_that_session(small_office, clients):
    dovecot, gw, direct = small_office
    dovecot.append(PROVIDER_ADDRESS, "Ricevute", message("archiviata"))
    mario = Client(gw, clients, "mario", folder="Ricevute")
    anna = Client(gw, clients, "anna")        # mario lends
    for step, text in enumerate(["DELETE Ricevute", "CREATE Ricevute"]):
        _, tagged = direct.command(f"R{step}", text)
        assert tagged.startswith(f"R{step} OK".encode()), tagged
    dovecot.append(PROVIDER_ADDRESS, "Ricevute", message("nuova"))
    mario.r.send(b"n1 NOOP\r\n")
    line = mario.r.read_line(20)
    assert line.startswith(b"* BYE [UNAVAILABLE]") and b"UIDVALIDITY" in line, line
    untagged, tagged = anna.run("FETCH 1 (UID)")
    assert tagged.split()[1] == b"OK", tagged


SESSIONS = 12
POOL = 2
STEPS = 100
# Another seed for a different run: PECGATE_LENDING_SEED=n.
SEED = int(os.environ.get("PECGATE_LENDING_SEED", "0"))


@pytest.mark.parametrize("keep_idle", [0, 60], ids=["lent-when-asked", "lent-when-crowded"])
def test_many_sessions_on_two_connections_agree_with_the_provider(pecgate_binary, clients, keep_idle):
    """The model-based check: twelve sessions run random command streams over a pool of two
    while a direct connection delivers and expunges. Every answer is checked against the
    client's model (sequence/UID mapping, EXISTS never down, no EXPUNGE during FETCH, STORE or
    SEARCH); every STORE must land on the message the client meant; at the end each session's
    numbering is the provider's. Run with connections lent only when a waiter asks, and with
    idle connections kept (lent as soon as a session is quiet while every place is taken,
    handed on with their folder selected)."""
    with office(pecgate_binary, pool=POOL, cap=POOL + 1, seed=30, keep_idle=keep_idle) as running:
        run_office(*running, clients)


def run_office(dovecot, gw, direct, clients):
    sessions = [Client(gw, clients, ["mario", "anna"][i % 2]) for i in range(SESSIONS)]
    stored: dict[int, set[int]] = {i: set() for i in range(SESSIONS)}
    failures: list[BaseException] = []
    stop = threading.Event()

    expunged = [0]

    def colleague():
        rng = random.Random(99 + SEED)
        try:
            while not stop.is_set():
                if rng.random() < 0.5:
                    dovecot.deliver(PROVIDER_ADDRESS, message("nuova"))
                else:
                    uids, _ = truth(direct)
                    if len(uids) > 10:
                        expunge_uids(direct, rng.sample(uids, 2))
                        expunged[0] += 2
                stop.wait(0.05)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    def employee(first: int, seed: int):
        rng = random.Random(seed)
        mine = list(range(first, SESSIONS, 4))
        try:
            for _ in range(STEPS):
                i = rng.choice(mine)
                step(sessions[i], i, rng, stored[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    webmail = threading.Thread(target=colleague)
    workers = [threading.Thread(target=employee, args=(k, k + 1 + 10 * SEED)) for k in range(4)]
    webmail.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    stop.set()
    webmail.join(60)
    assert not failures, failures[0]

    uids, flags = truth(direct)
    for i, s in enumerate(sessions):
        s.check_against(uids)
        # A session hears of each message gone at most once, and of no other: more EXPUNGEs
        # than the colleague made means a message was told gone that was not.
        assert s.expunges_heard <= expunged[0], (i, s.expunges_heard, expunged[0])
        keyword = f"$s{i}"
        assert {u for u in uids if keyword in flags[u]} == stored[i] & set(uids), i
    assert metric(gw, "pecgate_provider_connections") <= POOL
    # Nearly every command found its session's connection lent to another.
    lends = metric(gw, "pecgate_provider_lends_total")
    assert lends > STEPS * 4 / 2
    sent = b"".join(c.received for c in dovecot.rawlog_connections())
    selects = len(re.findall(rb"^s\d+ (SELECT|EXAMINE)", sent, re.M))
    # Handed on with INBOX still selected: pecgate hardly ever had to select it again.
    assert selects < lends / 10, (selects, lends)
    rows = gw.audit_rows()
    assert not [r for r in rows if r["outcome"] in ("bad", "error")], \
        [r for r in rows if r["outcome"] in ("bad", "error")][:3]


def step(s: Client, i: int, rng: random.Random, stored: set[int]):
    """One random command of session ``i``, checked against its model."""
    count = len(s.uids)
    choice = rng.random()
    if count == 0 or choice < 0.15:
        _, tagged = s.run("NOOP")
    elif choice < 0.45:
        a, b = sorted(rng.randint(1, count) for _ in range(2))
        untagged, tagged = s.run(f"FETCH {a}:{b} (UID FLAGS)")
    elif choice < 0.65:
        # STORE on a message whose UID the client knows (told by an earlier FETCH).
        known = [n for n, u in enumerate(s.uids, 1) if u is not None]
        if not known:
            _, tagged = s.run("NOOP")
        else:
            n = rng.choice(known)
            uid = s.uids[n - 1]
            untagged, tagged = s.run(f"STORE {n} +FLAGS ($s{i})")
            if b"EXPUNGEISSUED" not in tagged:
                stored.add(uid)
    elif choice < 0.8:
        a, b = sorted(rng.randint(1, count) for _ in range(2))
        _, tagged = s.run(f"SEARCH {a}:{b} NOT DELETED")
    elif choice < 0.9:
        _, tagged = s.run("UID FETCH 1:* (UID)")
    else:
        _, tagged = s.run("UID SEARCH ALL")
    # A message the provider's connection saw expunged meanwhile is refused as Dovecot does.
    assert tagged.split()[1] == b"OK" or b"[EXPUNGEISSUED]" in tagged, (i, tagged)


def test_quiet_sessions_go_on_when_their_provider_connections_die(pecgate_binary, clients):
    """With idle connections kept and every place taken, a session lends its connection as
    soon as it is quiet: it holds none between commands. Killing the provider's side of every
    pecgate connection then costs the sessions nothing: the dead idle connection is noticed
    when taken (it spoke: the end of its stream) and replaced, the folder selected again, and
    the session goes on in its own numbering, hearing of mail that came meanwhile."""
    with office(pecgate_binary, pool=1, cap=3, keep_idle=60) as (d, gw, direct):
        sessions = []
        for user in ("mario", "anna"):
            sessions.append(Client(gw, clients, user))
            wait_until(lambda: metric(gw, "pecgate_provider_idle") == 1, 10,
                       f"{user}'s connection to wait idle in the pool")
        killed = 0
        for c in d.rawlog_connections():
            if re.search(rb"^[cs]\d+ ", c.received, re.M):
                try:
                    os.kill(c.pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        assert killed >= 1
        d.deliver(PROVIDER_ADDRESS, message("durante il guasto"))
        uids, _ = truth(direct)
        for s in sessions:
            untagged, tagged = s.run("FETCH 1:* (UID)")
            assert tagged.split()[1] == b"OK", tagged
            assert f"* {len(uids)} EXISTS".encode() in untagged, untagged
            s.check_against(uids)


def test_a_connection_handed_over_with_an_older_list_is_read_again(pecgate_binary, clients):
    """Two connections wait idle with INBOX selected; one was left before new mail came. A
    session that already knows the new mail and takes that one must not take the older list
    for the folder's state (it would tell the new message gone): pecgate reads it again."""
    with office(pecgate_binary, pool=2, cap=4, keep_idle=60) as (d, gw, direct):
        def idle(n: int, what: str):
            wait_until(lambda: metric(gw, "pecgate_provider_idle") == n, 10, what)

        mario = Client(gw, clients, "mario")
        anna = Client(gw, clients, "anna")
        idle(1, "anna to lend her connection (every place taken)")
        mario.run("NOOP")
        idle(2, "mario to lend his")
        d.deliver(PROVIDER_ADDRESS, message("nuova"))
        uids, _ = truth(direct)
        # anna takes the newest (mario's, read before the mail), learns the new message's UID
        # and lends it back, read after the mail.
        anna.run("NOOP")
        anna.run("UID FETCH 1:* (UID)")
        assert anna.uids == uids
        idle(2, "anna to lend again")
        # A login takes the newest; what is left for anna is the one read before the mail.
        carla = clients(gw.raw(tls=True))
        carla.login("mario", gw.password("mario"))
        untagged, tagged = anna.run("FETCH 1:* (UID)")
        assert tagged.split()[1] == b"OK" and b"EXPUNGEISSUED" not in tagged, tagged
        assert anna.fetched(untagged) == {n: u for n, u in enumerate(uids, 1)}
        anna.check_against(uids)
        assert anna.expunges_heard == 0


def test_a_lent_session_is_still_logged_out_when_idle_for_too_long(pecgate_binary, clients):
    """The idle timeout counts from the client's last byte, lent or not: a session whose
    connection was lent the moment it went quiet gets its autologout when it is due, not a
    whole timeout after the lend."""
    with office(pecgate_binary, pool=1, cap=3, keep_idle=60, idle_timeout=4) as (d, gw, direct):
        mario = Client(gw, clients, "mario")
        wait_until(lambda: metric(gw, "pecgate_provider_idle") == 1, 10,
                   "mario's connection to be lent as he goes quiet")
        started = time.monotonic()
        line = mario.r.read_line(30)
        assert line == b"* BYE Autologout: idle for too long", line
        # Due 4 s after mario's last command: well before a second full timeout.
        assert time.monotonic() - started < 7


def test_a_session_quiet_for_a_while_holds_no_connection(pecgate_binary, clients):
    """With room in the pool nobody asks for a connection, yet a session quiet for
    `lend_after_quiet_secs` gives its connection back to the pool (folder still selected): a
    provider that drops connections idle too long, or restarts, costs it nothing."""
    with office(pecgate_binary, pool=4, cap=6, keep_idle=60, lend_after_quiet=1) as (d, gw, direct):
        mario = Client(gw, clients, "mario")
        wait_until(lambda: metric(gw, "pecgate_provider_idle") == 1, 10,
                   "mario's connection back in the pool after a quiet second")
        assert metric(gw, "pecgate_provider_waiting") == 0
        for c in d.rawlog_connections():
            if re.search(rb"^[cs]\d+ ", c.received, re.M):
                try:
                    os.kill(c.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        d.deliver(PROVIDER_ADDRESS, message("dopo il riavvio"))
        uids, _ = truth(direct)
        untagged, tagged = mario.run("FETCH 1:* (UID)")
        assert tagged.split()[1] == b"OK", tagged
        assert f"* {len(uids)} EXISTS".encode() in untagged, untagged
        mario.check_against(uids)
