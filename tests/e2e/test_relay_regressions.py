"""One test per route of issue 7 (the relay rewrite), each checked where it matters: what the
client receives, what Dovecot received (its rawlog of pecgate's provider connection) and what
the audit log says.

The world: a Dovecot whose provider login is recorded (rawlog) and an alias login for looking
at the mailbox directly, the demo folders, a hidden folder (Riservata) whose messages carry a
marker, and one pecgate with four roles: mario (everything on INBOX, Sent, Ricevute/**), anna
(read+flag on INBOX), lettore (read only on INBOX and Sent), spostatore (read, flag, move, no
delete, on INBOX and Sent).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time

import pytest

from harness import (ALL_PERMISSIONS, PROVIDER_ADDRESS, Dovecot, Pecgate, RawImap, make_message, populate_demo,
                     quote, wait_until)
from test_policy_matrix import TIMING_RE, send_command, status_word
from upstream_log import Account, check_connections, split_commands, tagged_results

ADMIN = "admin-studio@pec.example.test"
HIDDEN = "Riservata"
MARK = "SEGRETO-" + secrets.token_hex(6)
WITHOUT_SEND = [p for p in ALL_PERMISSIONS if p != "send"]
ROLES = {
    "segreteria": {"mailboxes": ["studio"], "folders": ["INBOX", "Sent", "Ricevute/**"], "permissions": WITHOUT_SEND},
    "reception": {"mailboxes": ["studio"], "folders": ["INBOX"], "permissions": ["read", "flag"]},
    "lettura": {"mailboxes": ["studio"], "folders": ["INBOX", "Sent"], "permissions": ["read"]},
    "spostamenti": {"mailboxes": ["studio"], "folders": ["INBOX", "Sent"], "permissions": ["read", "flag", "move"]},
}
USERS = {"mario": "segreteria", "anna": "reception", "lettore": "lettura", "spostatore": "spostamenti"}


class World:
    def __init__(self, binary):
        self.dovecot = d = Dovecot(rawlog=[PROVIDER_ADDRESS])
        d.add_user(PROVIDER_ADDRESS, "provider-" + secrets.token_hex(8))
        d.add_user(ADMIN, "admin-" + secrets.token_hex(8), share_with=PROVIDER_ADDRESS)
        self.binary = binary
        self.gw = None
        d.start()
        try:
            populate_demo(d, ADMIN)
            for i in range(2):
                d.append(ADMIN, HIDDEN, make_message(f"Pratica {MARK} {i}", f"Testo {MARK}"))
            self.passwords = {u: f"{u}-{secrets.token_hex(6)}" for u in USERS}
            self.gw = self.gateway()
            self.gw.start()
        except BaseException:
            self.close()
            raise

    def gateway(self) -> Pecgate:
        users = {u: {"password": self.passwords[u], "roles": [r]} for u, r in USERS.items()}
        gw = Pecgate(self.dovecot, users=users, roles=ROLES, binary=self.binary)
        gw.setup()
        return gw

    def session(self, user: str, gw: Pecgate | None = None, timeout: float = 15) -> RawImap:
        gw = gw or self.gw
        r = gw.raw(tls=True, timeout=timeout)
        r.login(user, self.passwords[user])
        return r

    def accounts(self):
        users = {u: (ROLES[r]["folders"], set(ROLES[r]["permissions"])) for u, r in USERS.items()}
        return {PROVIDER_ADDRESS: Account("studio", "/", users)}

    def mark(self):
        return self.dovecot.rawlog_mark(), max([r["id"] for r in self.gw.audit_rows()] or [0])

    def provider_side(self, mark, gw: Pecgate | None = None):
        """The provider connections opened since ``mark`` (once they have all ended), the
        audit rows written since, and the violations of the relay contract on them."""
        gw = gw or self.gw
        conns = self.dovecot.rawlog_connections(exclude=mark[0])
        self.dovecot.wait_rawlogs_closed(conns)

        def settled():
            rows = gw.audit_rows("id > ?", (mark[1],))
            logins = {r["session"] for r in rows if r["command"] == "LOGIN" and r["outcome"] == "ok"}
            ended = {r["session"] for r in rows if r["command"] in ("logout", "disconnect", "upstream-error")}
            return rows if logins <= ended else None

        rows = wait_until(settled, 20, "the end of every session in the audit log")
        violations, _ = check_connections(conns, gw.audit_rows(), self.accounts())
        return conns, rows, violations

    def flags(self, folder: str, uid: int) -> set[str]:
        with RawImap(self.dovecot.imaps_port, cafile=self.dovecot.cert) as r:
            r.login(ADMIN, self.dovecot.users[ADMIN])
            assert status_word(r.command("e", f"EXAMINE {quote(folder)}")[1]) == "OK"
            untagged, _ = r.command("f", f"UID FETCH {uid} FLAGS")
            r.command("z", "LOGOUT")
        m = re.search(rb"FLAGS \(([^)]*)\)", b" ".join(untagged))
        assert m, untagged
        return {f.decode() for f in m.group(1).split()}

    def append_unseen(self, folder: str, subject: str) -> int:
        """Append a message without \\Seen (directly) and return its UID."""
        msg = make_message(subject)
        with RawImap(self.dovecot.imaps_port, cafile=self.dovecot.cert) as r:
            r.login(ADMIN, self.dovecot.users[ADMIN])
            _, tagged = send_command(r, "a", f"APPEND {quote(folder)} () {{{len(msg)}+}}\r\n".encode() + msg)
            r.command("z", "LOGOUT")
        m = re.search(rb"\[APPENDUID \d+ (\d+)\]", tagged)
        assert m, tagged
        return int(m.group(1))

    def close(self):
        if self.gw is not None:
            self.gw.cleanup()
        self.dovecot.cleanup()


@pytest.fixture(scope="module")
def world(pecgate_binary):
    w = World(pecgate_binary)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def opened(world):
    """Sessions opened by a test; logged out (or dropped) at its end."""
    sessions = []

    def track(r):
        sessions.append(r)
        return r

    yield track
    for r in sessions:
        with contextlib.suppress(Exception):
            r.command("zz", "LOGOUT", timeout=5)
        r.close()


def _logout(r: RawImap):
    _, tagged = r.command("zz", "LOGOUT")
    assert tagged.startswith(b"zz OK"), tagged
    r.close()


def _read_all_until(r: RawImap, tag: str, timeout: float = 15) -> list[bytes]:
    """Every line up to and including ``tag``'s answer."""
    lines = []
    deadline = time.monotonic() + timeout
    while True:
        line = r.read_line(max(0.01, deadline - time.monotonic()))
        lines.append(line)
        if line.startswith(tag.encode() + b" "):
            return lines


def _commands_of(conns):
    return [(c, cmd) for c in conns for cmd in split_commands(c.received)]


# ---------------------------------------------------------------------------
# (a) IDLE + a LITERAL+ whose bytes look like commands
# ---------------------------------------------------------------------------


def test_a_append_literal_during_idle_is_dropped_whole(world, opened):
    """During IDLE the client sends an APPEND whose LITERAL+ message holds command lines: the
    whole command (literal included) is dropped with a BAD for the IDLE; none of the lines in
    the literal runs, nothing hidden comes back, and the provider sees no SELECT at all."""
    mark = world.mark()
    r = opened(world.session("mario"))
    assert r.command("s", "SELECT INBOX")[1].startswith(b"s OK")
    r.send(b"i IDLE\r\n")
    assert r.read_line().startswith(b"+"), "IDLE not started"
    literal = f"c SELECT {HIDDEN}\r\nd UID FETCH 1:* BODY.PEEK[]\r\n".encode()
    r.send(b"a APPEND INBOX {%d+}\r\n" % len(literal) + literal + b"\r\n")
    r.send(b"n NOOP\r\n")
    lines = _read_all_until(r, "n")
    _logout(r)
    received = b"\n".join(lines)
    assert any(line.startswith(b"i BAD") for line in lines), lines
    assert not any(re.match(rb"^[acd] ", line) for line in lines), f"a dropped command or its literal ran: {lines}"
    assert MARK.encode() not in received, lines
    assert lines[-1].startswith(b"n OK"), lines

    conns, rows, violations = world.provider_side(mark)
    assert not violations, "\n".join(violations)
    cmds = _commands_of(conns)
    selects = [cmd.wire.raw for _, cmd in cmds if cmd.name in ("SELECT", "EXAMINE")]
    assert len(selects) == 1 and b"INBOX" in selects[0], f"the provider received {selects}"
    assert not any(cmd.name in ("APPEND", "UID FETCH") for _, cmd in cmds), [c.wire.raw[:80] for _, c in cmds]
    assert not any(r_["command"] in ("SELECT", "EXAMINE") and r_["folder"] == HIDDEN for r_ in rows), rows


# ---------------------------------------------------------------------------
# (b) a reused tag, then an ID whose literal carries a SELECT
# ---------------------------------------------------------------------------


def test_b_reused_tag_idle_is_refused_and_no_literal_runs(world, opened):
    """`a NOOP` and `a IDLE` pipelined under one tag, then `y ID {20+}` whose literal is the
    line `y SELECT <hidden>`: the second `a` gets BAD (its tag is still running) and is not
    sent; the literal stays a literal; the provider sees no IDLE and no SELECT."""
    mark = world.mark()
    r = opened(world.session("mario"))
    literal = f"y SELECT {HIDDEN}\r\n".encode()
    assert len(literal) == 20
    r.send(b"a NOOP\r\na IDLE\r\ny ID {20+}\r\n" + literal + b"\r\nn NOOP\r\n")
    lines = _read_all_until(r, "n")
    _logout(r)
    a_answers = [line for line in lines if line.startswith(b"a ")]
    assert len(a_answers) == 2, lines
    assert sum(line.startswith(b"a OK") for line in a_answers) == 1, a_answers
    assert sum(line.startswith(b"a BAD") for line in a_answers) == 1, a_answers
    assert not any(line.startswith(b"+") for line in lines), f"an IDLE started: {lines}"
    assert len([line for line in lines if line.startswith(b"y ")]) <= 1, lines
    assert MARK.encode() not in b"\n".join(lines)

    conns, rows, violations = world.provider_side(mark)
    assert not violations, "\n".join(violations)
    names = [cmd.name for _, cmd in _commands_of(conns)]
    assert "IDLE" not in names and "SELECT" not in names and "ID" not in names, names
    assert names.count("NOOP") == 2, names


# ---------------------------------------------------------------------------
# (c) a huge LIST pattern does not stall the daemon
# ---------------------------------------------------------------------------


def test_c_huge_list_pattern_does_not_stall_other_sessions(world):
    """`LIST "" "<200 × *>]"` from one user: another user's NOOP is still answered, a new
    login still works, and the LIST itself is answered (or refused) within a generous
    deadline. A fresh pecgate, so a stalled daemon cannot spoil the other tests."""
    gw = world.gateway()
    try:
        gw.start()
        other = world.session("anna", gw)
        heavy = world.session("mario", gw, timeout=60)
        try:
            heavy.send(b'h LIST "" "' + b"*" * 200 + b']"\r\n')
            t0 = time.monotonic()
            _, tagged = other.command("n", "NOOP", timeout=10)
            assert tagged.startswith(b"n OK"), tagged
            third = world.session("lettore", gw, timeout=10)
            assert third.command("m", "NOOP", timeout=10)[1].startswith(b"m OK")
            third.close()
            _, tagged = heavy.read_until_tagged("h", timeout=30)
            assert status_word(tagged) in ("OK", "BAD", "NO"), tagged
            assert time.monotonic() - t0 < 30
        finally:
            other.close()
            heavy.close()
    finally:
        gw.cleanup()


# ---------------------------------------------------------------------------
# (d) CREATE with a trailing delimiter
# ---------------------------------------------------------------------------


def test_d_create_with_trailing_delimiter_is_decided_on_the_name(world, opened):
    """`CREATE Ricevute/2027/` under a `Ricevute/**` grant is allowed (decided on
    `Ricevute/2027`) and the folder exists at Dovecot afterwards."""
    r = opened(world.session("mario"))
    _, tagged = r.command("c", "CREATE Ricevute/2027/")
    assert tagged.startswith(b"c OK"), tagged
    untagged, _ = r.command("l", 'LIST "" "Ricevute/*"')
    assert any(line.endswith(b" Ricevute/2027") for line in untagged), untagged
    with RawImap(world.dovecot.imaps_port, cafile=world.dovecot.cert) as d:
        d.login(ADMIN, world.dovecot.users[ADMIN])
        untagged, _ = d.command("l", 'LIST "" "Ricevute/2027"')
        d.command("x", "DELETE Ricevute/2027")
    assert any(line.endswith(b" Ricevute/2027") for line in untagged), untagged


# ---------------------------------------------------------------------------
# (e) ID with many long fields
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fields,value_len,answer", [(30, 1024, "OK"), (40, 1400, "OK"), (60, 2000, "BAD")],
                         ids=["rfc2971-max", "beyond-rfc2971", "beyond-line-limit"])
def test_e_id_with_many_long_fields_is_answered(world, opened, fields, value_len, answer):
    """ID with 30 fields of the maximum length (RFC 2971: 30 pairs, 30-octet names, 1024-octet
    values), and with more than RFC 2971 allows: answered OK by pecgate. Past the 64 KiB command
    line limit (README, Limits) it is BAD. Never a disconnect, never upstream."""
    mark = world.mark()
    r = opened(world.session("mario"))
    pairs = " ".join(f'"{("campo%02d" % i).ljust(30, "x")}" "{chr(97 + i % 26) * value_len}"' for i in range(fields))
    untagged, tagged = r.command("i", f"ID ({pairs})")
    assert tagged.startswith(f"i {answer}".encode()), tagged
    if answer == "OK":
        assert any(line.startswith(b"* ID ") for line in untagged), untagged
    assert r.command("n", "NOOP")[1].startswith(b"n OK")
    _logout(r)
    conns, _, violations = world.provider_side(mark)
    assert not violations, "\n".join(violations)
    assert not any(cmd.name == "ID" for _, cmd in _commands_of(conns))


# ---------------------------------------------------------------------------
# (f) control characters in names
# ---------------------------------------------------------------------------


def test_f_names_with_control_characters_are_refused(world, opened):
    """A mailbox name with CR LF (raw in a literal, or modified UTF-7 `&AA0ACg-`) gets BAD and
    never reaches the provider."""
    mark = world.mark()
    r = opened(world.session("mario"))
    raw = b"Ricevute/A\r\nB"
    attempts = [
        ("s1", b"SELECT {%d+}\r\n" % len(raw) + raw),
        ("s2", b"CREATE {%d+}\r\n" % len(raw) + raw),
        ("s3", b"SELECT Ricevute/A&AA0ACg-B"),
        ("s4", b"CREATE Ricevute/A&AA0ACg-B"),
        ("s5", b'STATUS "Ricevute/A&AA0ACg-B" (MESSAGES)'),
        ("s6", b"RENAME Ricevute/Consegne Ricevute/A&AA0ACg-B"),
    ]
    for tag, body in attempts:
        _, tagged = send_command(r, tag, body)
        assert tagged.startswith(tag.encode() + b" BAD"), (body, tagged)
    assert r.command("n", "NOOP")[1].startswith(b"n OK")
    _logout(r)
    conns, _, violations = world.provider_side(mark)
    assert not violations, "\n".join(violations)
    upstream = b"".join(c.received for c in conns)
    assert b"&AA0ACg-" not in upstream and b"A\r\nB" not in upstream, upstream[-500:]
    assert not any(cmd.name in ("SELECT", "CREATE", "STATUS", "RENAME") for _, cmd in _commands_of(conns))


# ---------------------------------------------------------------------------
# (g) FETCH of bodies without `flag`
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("item", ["BODY[]", "RFC822", "RFC822.TEXT", "BODY[TEXT]"])
def test_g_fetch_without_flag_leaves_seen_unset(world, opened, item):
    """Without `flag`, FETCH of BODY[...] / RFC822 / RFC822.TEXT is sent as .PEEK: \\Seen stays
    unset at Dovecot. With `flag` the same FETCH sets it (so the check can fail)."""
    mark = world.mark()
    uid_reader = world.append_unseen("INBOX", f"non letto {item}")
    uid_flagger = world.append_unseen("INBOX", f"letto {item}")
    reader = opened(world.session("lettore"))
    assert reader.command("s", "SELECT INBOX")[1].startswith(b"s OK")
    untagged, tagged = reader.command("f", f"UID FETCH {uid_reader} {item}")
    assert tagged.startswith(b"f OK"), tagged
    assert any(re.match(rb"^\* \d+ FETCH \(.*Corpo del messaggio", line, re.S) for line in untagged), untagged
    _logout(reader)
    assert "\\Seen" not in world.flags("INBOX", uid_reader)

    flagger = opened(world.session("mario"))
    assert flagger.command("s", "SELECT INBOX")[1].startswith(b"s OK")
    assert flagger.command("f", f"UID FETCH {uid_flagger} {item}")[1].startswith(b"f OK")
    _logout(flagger)
    assert "\\Seen" in world.flags("INBOX", uid_flagger)
    _, _, violations = world.provider_side(mark)
    assert not violations, "\n".join(violations)


# ---------------------------------------------------------------------------
# (h) MOVE and STORE FLAGS without `delete`
# ---------------------------------------------------------------------------


def test_h_move_and_store_flags_need_delete(world, opened):
    """MOVE needs `move` and `delete`; STORE FLAGS (a replace, even of \\Seen alone) needs
    `delete`: both refused with NO [NOPERM], audited as denied, the message untouched."""
    mark = world.mark()
    uid = world.append_unseen("INBOX", "da non spostare")
    r = opened(world.session("spostatore"))
    assert r.command("s", "SELECT INBOX")[1].startswith(b"s OK")
    for tag, body in (("m1", f"UID MOVE {uid} Sent"), ("m2", "MOVE 1 Sent"),
                      ("f1", f"UID STORE {uid} FLAGS (\\Seen)"), ("f2", "STORE 1 FLAGS.SILENT (\\Seen)")):
        _, tagged = r.command(tag, body)
        assert tagged.startswith(f"{tag} NO [NOPERM]".encode()), (body, tagged)
    # allowed to it: COPY and +FLAGS (\Seen)
    assert r.command("c", f"UID COPY {uid} Sent")[1].startswith(b"c OK")
    assert r.command("p", f"UID STORE {uid} +FLAGS (\\Flagged)")[1].startswith(b"p OK")
    _logout(r)
    assert world.flags("INBOX", uid) == {"\\Flagged"}
    _, rows, violations = world.provider_side(mark)
    assert not violations, "\n".join(violations)
    denied = [(r_["command"], r_["outcome"]) for r_ in rows if r_["user"] == "spostatore" and r_["outcome"] == "denied"]
    assert sorted(c for c, _ in denied) == ["MOVE", "STORE", "UID MOVE", "UID STORE"], denied


# ---------------------------------------------------------------------------
# (i) a command pipelined behind SELECT is audited under the new folder
# ---------------------------------------------------------------------------


def test_i_fetch_pipelined_behind_select_is_audited_under_the_new_folder(world, opened):
    """`SELECT Sent` and `UID FETCH 1 FLAGS` in one write, from INBOX: the UID FETCH's audit row
    says Sent, and the provider received the UID FETCH only after answering the SELECT."""
    mark = world.mark()
    r = opened(world.session("mario"))
    assert r.command("s", "SELECT INBOX")[1].startswith(b"s OK")
    r.send(b"a SELECT Sent\r\nb UID FETCH 1 FLAGS\r\n")
    lines = _read_all_until(r, "b")
    assert any(line.startswith(b"a OK") for line in lines), lines
    assert lines[-1].startswith(b"b OK"), lines
    _logout(r)
    conns, rows, violations = world.provider_side(mark)
    assert not violations, "\n".join(violations)
    fetch = [r_ for r_ in rows if r_["user"] == "mario" and r_["command"] == "UID FETCH"]
    assert [r_["folder"] for r_ in fetch] == ["Sent"], fetch
    tag = re.search(r"upstream=(c\d+)$", fetch[0]["detail"]).group(1)
    (conn,) = [c for c in conns if (tag + " ").encode() in c.received]
    sent_at = next(t for t, line in conn.timed_lines("in") if line.startswith(f"{tag} UID FETCH".encode()))
    select_tag = next(cmd.tag for cmd in split_commands(conn.received) if cmd.wire.raw.startswith(b"c")
                      and cmd.name == "SELECT" and b"Sent" in cmd.wire.raw)
    answered_at = next(t for t, line in conn.timed_lines("out") if line.startswith(f"{select_tag} OK".encode()))
    assert sent_at >= answered_at, f"UID FETCH reached the provider at {sent_at}, before SELECT's answer at {answered_at}"


# ---------------------------------------------------------------------------
# (j) sent row, then the final row, same upstream tag
# ---------------------------------------------------------------------------


def test_j_state_changing_command_has_sent_then_final_row(world, opened):
    """A STORE is audited twice under one upstream tag: `sent` (written before it went up),
    then its final outcome; the tag is the one the provider received."""
    mark = world.mark()
    r = opened(world.session("mario"))
    assert r.command("s", "SELECT INBOX")[1].startswith(b"s OK")
    assert r.command("f", "STORE 1 +FLAGS (\\Flagged)")[1].startswith(b"f OK")
    _logout(r)
    conns, rows, violations = world.provider_side(mark)
    assert not violations, "\n".join(violations)
    stores = [r_ for r_ in rows if r_["command"] == "STORE" and r_["user"] == "mario"]
    assert [r_["outcome"] for r_ in stores] == ["sent", "ok"], stores
    tags = {re.search(r"upstream=(c\d+)$", r_["detail"]).group(1) for r_ in stores}
    assert len(tags) == 1, stores
    (tag,) = tags
    assert stores[0]["id"] < stores[1]["id"]
    results = {}
    for c in conns:
        results.update(tagged_results(c.sent))
    assert results.get(tag) == "OK", (tag, results)


# ---------------------------------------------------------------------------
# (k) beyond the list: the Aruba layout's placeholders
# ---------------------------------------------------------------------------


def test_k_hidden_folder_on_aruba_layout_answers_like_a_nonexistent_one(pecgate_binary):
    """On a provider whose folders all live under `INBOX.` (Aruba), a hidden `INBOX.Sent`
    must answer exactly like a nonexistent `INBOX.Inesistente` (README: a hidden folder is
    indistinguishable from a nonexistent one): the placeholder keeps the `INBOX` level, so
    Dovecot gives its ordinary "doesn't exist" answer for both.

    Also: such a provider reads `INBOX.INBOX` as INBOX itself, so a role granting only the
    folders below INBOX (`INBOX/*`) must not open INBOX through that name."""
    d = Dovecot(layout="aruba")
    d.add_user(PROVIDER_ADDRESS, "provider-" + secrets.token_hex(8))
    with d:
        populate_demo(d)
        password = "anna-" + secrets.token_hex(6)
        gw = Pecgate(d, users={"anna": {"password": password, "roles": ["reception"]}},
                     roles={"reception": ROLES["reception"]}, binary=pecgate_binary)
        try:
            gw.setup()
            gw.start()
            r = gw.raw(tls=True)
            r.login("anna", password)
            problems = []
            for verb in ("SELECT", "EXAMINE", "STATUS", "DELETE", "SUBSCRIBE"):
                suffix = " (MESSAGES)" if verb == "STATUS" else ""
                _, hidden = r.command("h", f"{verb} INBOX.Sent{suffix}")
                _, missing = r.command("h", f"{verb} INBOX.Inesistente{suffix}")
                norm = [TIMING_RE.sub(b"(T)", t).replace(name, b"<NAME>")
                        for t, name in ((hidden, b"INBOX.Sent"), (missing, b"INBOX.Inesistente"))]
                if norm[0] != norm[1]:
                    problems.append(f"{verb}: hidden {hidden!r} vs nonexistent {missing!r}")
                if verb in ("SELECT", "EXAMINE", "STATUS") and b"doesn't exist" not in hidden:
                    problems.append(f"{verb}: not the provider's ordinary answer: {hidden!r}")
            r.close()
            assert not problems, "\n".join(problems)
        finally:
            gw.cleanup()
        below = "below-" + secrets.token_hex(6)
        gw = Pecgate(d, users={"bruno": {"password": below, "roles": ["below"]}},
                     roles={"below": {"mailboxes": list(ROLES["reception"]["mailboxes"]),
                                      "folders": ["INBOX/*"], "permissions": ["read", "flag"]}},
                     binary=pecgate_binary)
        try:
            gw.setup()
            gw.start()
            r = gw.raw(tls=True)
            r.login("bruno", below)
            for name in ("INBOX.INBOX", "inbox.Inbox", "INBOX.INBOX.INBOX"):
                untagged, tagged = r.command("x", f"EXAMINE {name}")
                assert tagged.startswith(b"x NO "), (name, untagged, tagged)
                assert not any(b"EXISTS" in line for line in untagged), (name, untagged)
                untagged, tagged = r.command("y", f"STATUS {name} (MESSAGES)")
                assert not any(line.startswith(b"* STATUS") for line in untagged), (name, untagged)
            r.close()
        finally:
            gw.cleanup()


# ---------------------------------------------------------------------------
# (l) beyond the list: a refused LITERAL+ with the rest of the input already buffered
# ---------------------------------------------------------------------------


def test_l_refused_literal_plus_does_not_stall_the_session(world, opened):
    """A non-message LITERAL+ over the literal limit (`g SELECT {70000+}`) is thrown away and
    refused with BAD, and the commands after it are answered: also when everything after the
    announcement is already in pecgate's buffer (sent in one write behind commands that keep
    it busy, many times over)."""
    r = opened(world.session("mario"))
    big = b"g SELECT {70000+}\r\n" + b"x" * 70000 + b"\r\n"
    assert r.command("s", "SELECT INBOX")[1].startswith(b"s OK")
    for i in range(100):
        head = (b"".join(b"p%d NOOP \r\n" % k for k in range(i % 6)) + b"q " + b"A" * (i * 977 % 20000) + b"\r\n"
                + (b"f FETCH 1:* BODY.PEEK[]\r\n" if i % 2 else b""))
        r.send(head + big + b"z%d NOOP\r\n" % i)
        try:
            lines = _read_all_until(r, f"z{i}", timeout=10)
        except TimeoutError as exc:
            pytest.fail(f"round {i}: no answer after a refused {{70000+}} literal: {exc}")
        assert any(line.startswith(b"g BAD") for line in lines), lines
