"""Differential test of the relay (issue 7): pecgate must answer like the provider itself.

Two Dovecot users, A and B, get identical mailboxes (same folders, same message bytes, same
internal dates and flags, created in the same order). The same script of commands, covering
every state after login (authenticated; selected read-write; read-only via EXAMINE; after
CLOSE/UNSELECT), literals of both kinds, UID variants, error cases (nonexistent folders, bad
syntax, sequence numbers out of range, ``UID SEARCH UID 6:4294967295`` next to ``6:*``), runs
on A directly and through pecgate on B (a user with every permission on every folder), in
lockstep. After normalising what must differ between two mailboxes (tags, Dovecot's timing
suffix, UIDVALIDITY values, INTERNALDATEs of messages appended during the test), every
answer must be the same, line for line: a relay that loses, adds, reorders or rewrites a byte
of the provider's answers shows up here.

The differences pecgate has on purpose are listed in ``DOCUMENTED`` (each with where it is
documented) and asserted on their own: capability lists are filtered, ID and ENABLE are
answered by pecgate, commands pecgate does not relay get BAD, and LIST/LSUB answers are built
by pecgate (the same lines, in pecgate's order).
"""

from __future__ import annotations

import collections
import re
import secrets

import pytest

from harness import Dovecot, Pecgate, RawImap, capabilities_from, make_message, provider_mailbox, quote
from test_policy_matrix import TIMING_RE, send_command, status_word

USER_A = "diretto@pec.example.test"
USER_B = "tramite@pec.example.test"
FOLDERS = ["Sent", "Ricevute", "Ricevute/Consegne", "Archivio", "Archivio/2025", "Archivio/2026"]
SUBSCRIBED = ["INBOX", "Sent", "Ricevute", "Archivio/2026"]
DATE = '"21-Nov-2026 10:00:00 +0100"'


def _lit(text: str, plus: bool) -> str:
    return "{%d%s}\r\n%s" % (len(text.encode()), "+" if plus else "", text)


def _messages():
    """(folder, flags, raw) in the order they are appended to both users."""
    out = []
    for i in range(1, 6):
        out.append(("INBOX", "(\\Seen)" if i % 2 else "()", make_message(
            f"POSTA CERTIFICATA: Fattura n. {i}", f"Fattura elettronica n. {i} in allegato.",
            sender="comune@pec.example.test", extra_headers={"X-Trasporto": "posta-certificata"})))
    out.append(("INBOX", "(\\Flagged)", make_message("Convocazione assemblea", "Ordine del giorno.")))
    for i in range(1, 3):
        out.append(("Sent", "(\\Seen)", make_message(f"Richiesta documenti {i}", "Buongiorno.",
                                                     sender="tramite@pec.example.test")))
    out.append(("Ricevute", "()", make_message("ACCETTAZIONE: Richiesta documenti", "Ricevuta.")))
    out.append(("Ricevute/Consegne", "()", make_message("CONSEGNA: Richiesta documenti", "Consegnata.")))
    out.append(("Archivio/2026", "(\\Seen \\Answered)", make_message("Pratica archiviata", "Archivio.")))
    return out


APPENDED = make_message("Messaggio aggiunto nel test", "Aggiunto.\r\nx SELECT Sent\r\ny FETCH 1:* BODY[]")

# ---------------------------------------------------------------------------
# the script: every entry is a command body (the tag is added), or (body, kind) for
# commands that are not plain request/answer ("idle") or that differ on purpose.
# ---------------------------------------------------------------------------

AUTHENTICATED = [
    "NOOP", "CHECK", "NAMESPACE",
    'LIST "" ""', 'LIST "" "*"', 'LIST "" "%"', 'LIST "" "%/%"', 'LIST "" "Ricevute/*"',
    'LIST "" "Ricevute/%"', 'LIST "Ricevute/" "*"', 'LIST "Ricevute" "*"', 'LIST "" "INBOX"',
    'LIST "" "inbox"', 'LIST "" "Ri*"', 'LIST "" "*Consegne"', 'LIST "" "Inesistente"',
    'LIST "" Archivio/%', "LIST " + _lit("", False) + " " + _lit("*", False),
    "LIST " + _lit("", True) + " " + _lit("Ar%/%", True), 'LIST "Archivio/" "%"',
    'LSUB "" "*"', 'LSUB "" "%"', 'LSUB "Archivio/" "%"', 'LSUB "" "Sent"', 'LSUB "" "Archivio"',
    "STATUS INBOX (MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)", "STATUS Sent (MESSAGES)",
    "STATUS " + _lit("Sent", False) + " (UNSEEN)", "STATUS " + _lit("Ricevute/Consegne", True) + " (MESSAGES UIDNEXT)",
    "STATUS Inesistente (MESSAGES)", "STATUS INBOX (BOGUS)", "STATUS INBOX", 'STATUS "Archivio/2026" (MESSAGES UNSEEN)',
    "CREATE Prova", "CREATE Prova/Sotto", "CREATE Prova/Barra/", "CREATE INBOX", "CREATE Sent",
    "CREATE " + _lit("Prova/Letterale", False), "SUBSCRIBE Prova", 'LSUB "" "Prova*"', 'LIST "" "Prova/*"',
    "UNSUBSCRIBE Prova", "UNSUBSCRIBE Inesistente", "RENAME Prova Prova2", "RENAME Inesistente Altro",
    "RENAME " + _lit("Prova2/Sotto", True) + " " + _lit("Prova2/Sopra", False),
    "DELETE Prova2/Sopra", "DELETE Prova2/Barra", "DELETE Prova2/Letterale", "DELETE Prova2", "DELETE Inesistente",
    "DELETE INBOX", 'LIST "" "Prova*"',
    "APPEND Sent " + _lit(APPENDED.decode(), True),
    f"APPEND Sent (\\Seen) {DATE} " + _lit(APPENDED.decode(), False),
    "APPEND Inesistente " + _lit(APPENDED.decode(), True),
    f"APPEND INBOX (\\Flagged) {DATE} " + _lit(APPENDED.decode(), True),
    "FETCH 1 FLAGS", "SEARCH ALL", "EXPUNGE", "CLOSE", "UNSELECT", "STORE 1 +FLAGS (\\Seen)", "COPY 1 Sent",
    "UID FETCH 1 FLAGS",
    "SELECT Inesistente", "EXAMINE Inesistente",
    ("IDLE", "idle"),
]

SELECTED = [
    "SELECT INBOX",
    "FETCH 1 FLAGS", "FETCH 1:* (FLAGS UID)", "FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])",
    "FETCH 2 BODY.PEEK[]", "FETCH 1 ENVELOPE", "FETCH 1 BODYSTRUCTURE", "FETCH 1 (INTERNALDATE RFC822.SIZE)",
    "FETCH 1:2 FAST", "FETCH 1 ALL", "FETCH 3 FULL", "FETCH 1 BODY.PEEK[TEXT]<0.20>",
    "FETCH 1 BODY.PEEK[HEADER.FIELDS.NOT (DATE MESSAGE-ID)]", "FETCH 1 RFC822.HEADER",
    "FETCH 2 BODY[]", "FETCH 2 FLAGS", "FETCH 4 RFC822", "FETCH 1 RFC822.TEXT",
    "FETCH 3 (BODY.PEEK[HEADER.FIELDS (" + _lit("SUBJECT", False) + ")])",
    "FETCH 99 FLAGS", "FETCH 0 FLAGS", "FETCH 1:99 FLAGS", "FETCH * FLAGS", "FETCH 1 (BOGUS)", "FETCH 1 (BODY[)",
    "UID FETCH 1:* FLAGS", "UID FETCH 2 BODY.PEEK[HEADER]", "UID FETCH 99 FLAGS", "UID FETCH 1:4294967295 UID",
    "UID FETCH 3:* UID", "UID FETCH 4294967296 UID",
    "SEARCH ALL", "SEARCH UNSEEN", "SEARCH SEEN", 'SEARCH SUBJECT "Fattura"', "SEARCH SUBJECT " + _lit("Fattura", False),
    "SEARCH SUBJECT " + _lit("Fattura", True), 'SEARCH FROM "comune"', 'SEARCH TEXT "allegato"',
    "SEARCH OR FLAGGED SEEN", "SEARCH NOT DELETED", "SEARCH 1:2", "SEARCH UID 1:2", "SEARCH LARGER 100",
    "SEARCH BEFORE 1-Jan-2030", 'SEARCH CHARSET UTF-8 SUBJECT "Fattura"', "SEARCH CHARSET BOGUS ALL", "SEARCH FOO",
    "UID SEARCH ALL", "UID SEARCH UID 6:4294967295", "UID SEARCH UID 6:*", "UID SEARCH UID 2:*",
    "UID SEARCH UID 60:4294967295", "UID SEARCH UID 60:*", "SEARCH HEADER X-Trasporto posta-certificata", "SEARCH 99",
    "STORE 1 +FLAGS (\\Flagged)", "STORE 1 -FLAGS (\\Flagged)", "STORE 1:2 +FLAGS.SILENT (\\Answered)",
    "STORE 2 FLAGS (\\Seen)", "UID STORE 1 +FLAGS ($Etichetta)", "UID STORE 99 +FLAGS (\\Seen)",
    "STORE 99 +FLAGS (\\Seen)", "STORE 1 BOGUS (\\Seen)", "STORE 1 +FLAGS (\\Recent)",
    "COPY 1 Sent", "COPY 1:2 " + _lit("Sent", False), "COPY 1 Inesistente", "UID COPY 1 Ricevute", "UID COPY 99 Sent",
    "COPY 99 Sent",
    "APPEND INBOX " + _lit(APPENDED.decode(), True),
    "STATUS INBOX (MESSAGES)", "NOOP", "CHECK",
    "STORE 3 +FLAGS (\\Deleted)", "EXPUNGE", "UID STORE 5 +FLAGS.SILENT (\\Deleted)", "UID EXPUNGE 1:4",
    "UID EXPUNGE 5", "MOVE 1 Ricevute/Consegne", "UID MOVE 2 Archivio", "MOVE 99 Sent", "UID MOVE 99 Sent",
    "MOVE 1 Inesistente",
    ("IDLE", "idle"),
    "SELECT INBOX", "SELECT " + _lit("INBOX", False), "SELECT " + _lit("Ricevute/Consegne", True),
    "STORE 1 +FLAGS (\\Deleted)", "CLOSE",
]

AFTER_CLOSE = [
    "FETCH 1 FLAGS", "SEARCH ALL", "NOOP", "STATUS Ricevute/Consegne (MESSAGES)", "EXPUNGE", "CLOSE",
]

READ_ONLY = [
    "EXAMINE Sent", "FETCH 1 BODY[]", "FETCH 1 FLAGS", "STORE 1 +FLAGS (\\Seen)", "EXPUNGE",
    "COPY 1 INBOX", "MOVE 1 INBOX", "UID FETCH 1:* FLAGS", "SEARCH ALL", "UID SEARCH UNSEEN",
    "EXAMINE " + _lit("Archivio/2026", True), "FETCH 1 (FLAGS RFC822.TEXT)", "UNSELECT",
    "FETCH 1 FLAGS", "UNSELECT", "SELECT Archivio", "UNSELECT",
]

SYNTAX = [
    "SELECT", "FETCH", 'LIST ""', "UID BOGUS 1", "BOGUS", "STORE 1 +FLAGS", "CREATE", "RENAME a", "SEARCH",
    "LSUB", "STATUS", "EXAMINE", 'SELECT "INBOX',
]

FINAL = [
    'LIST "" "*"', 'LSUB "" "*"', "STATUS INBOX (MESSAGES UNSEEN UIDNEXT)", "STATUS Sent (MESSAGES UNSEEN UIDNEXT)",
    "STATUS Ricevute/Consegne (MESSAGES UIDNEXT)", "STATUS Archivio (MESSAGES UIDNEXT)",
    "EXAMINE INBOX", "FETCH 1:* (FLAGS UID RFC822.SIZE)",
]

SCRIPT = AUTHENTICATED + SELECTED + AFTER_CLOSE + READ_ONLY + SYNTAX + FINAL

# ---------------------------------------------------------------------------
# documented differences, asserted on their own
# ---------------------------------------------------------------------------

# Extensions pecgate must never offer (README "What clients can use").
NEVER_OFFERED = {"COMPRESS=DEFLATE", "NOTIFY", "SORT", "THREAD=REFERENCES", "QUOTA", "METADATA", "CATENATE",
                 "URLAUTH", "URL-PARTIAL", "CONTEXT=SEARCH", "STARTTLS", "LOGINDISABLED"}

DOCUMENTED = [
    # README, "What clients can use": pecgate offers only what it relays end to end.
    ("CAPABILITY", "capability"),
    # Contract 7 / README: ID after login is answered by pecgate, never sent upstream.
    ('ID ("name" "differenziale" "version" "1")', "id"),
    ("ID NIL", "id"),
    # ENABLE is answered by pecgate (nothing that changes the provider's responses is enabled).
    ("ENABLE CONDSTORE", "enable"),
    # README: extensions pecgate does not relay end to end get BAD and are never forwarded.
    ("COMPRESS DEFLATE", "refused"), ("GETQUOTAROOT INBOX", "refused"), ("SORT (DATE) UTF-8 ALL", "refused"),
    ("THREAD REFERENCES UTF-8 ALL", "refused"), ("NOTIFY NONE", "refused"), ("GETMETADATA \"\" /shared", "refused"),
    # ARCHITECTURE, relay invariants: nothing reaches the provider that imap-codec did not parse;
    # unparseable input gets BAD, even where Dovecot is lenient (it ignores extra arguments).
    ("SELECT INBOX extra", "refused"), ("NOOP extra", "refused"),
]
# A normalisation, for the same reason: when the provider answers BAD (syntax or state), pecgate
# may refuse the command itself with its own BAD text; BAD against BAD with the same untagged
# lines (none) counts as the same answer.

# ---------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------

_UIDVALIDITY = re.compile(rb"(UIDVALIDITY |\[APPENDUID |\[COPYUID )\d+")
_INTERNALDATE = re.compile(rb'INTERNALDATE "[^"]*"')
_LIST = re.compile(rb"^\* (LIST|LSUB) \(([^)]*)\) (.*)$", re.S)


def normalise(tag: str, untagged, tagged) -> list[bytes]:
    """Tag, timing suffix, UIDVALIDITY and INTERNALDATE replaced; LIST/LSUB lines (built by
    pecgate, in its own order) sorted, with their attributes sorted."""
    out, lists = [], []

    def norm(line: bytes) -> bytes:
        line = TIMING_RE.sub(b"(T)", line)
        line = _UIDVALIDITY.sub(rb"\1<V>", line)
        return _INTERNALDATE.sub(b'INTERNALDATE "<D>"', line)

    for line in untagged:
        m = _LIST.match(line)
        if m:
            attrs = b" ".join(sorted(m.group(2).split(), key=bytes.lower))
            lists.append(b"* " + m.group(1) + b" (" + attrs + b") " + m.group(3))
        else:
            out.append(norm(line))
    t = tagged
    if t.startswith(tag.encode() + b" "):
        t = b"<TAG>" + t[len(tag):]
    return sorted(lists) + out + [norm(t)]


# ---------------------------------------------------------------------------
# the two worlds
# ---------------------------------------------------------------------------


def _populate(dovecot: Dovecot, user: str, messages):
    with RawImap(dovecot.imaps_port, cafile=dovecot.cert) as r:
        r.login(user, dovecot.users[user])
        for i, f in enumerate(FOLDERS):
            _ok(r, f"c{i}", f"CREATE {quote(f)}")
        for i, f in enumerate(SUBSCRIBED):
            _ok(r, f"s{i}", f"SUBSCRIBE {quote(f)}")
        for i, (folder, flags, raw) in enumerate(messages):
            _ok(r, f"a{i}", f"APPEND {quote(folder)} {flags} {DATE} ".encode() + b"{%d+}\r\n" % len(raw) + raw)
        r.command("z", "LOGOUT")


def _ok(r, tag, body):
    _, tagged = send_command(r, tag, body)
    assert status_word(tagged) == "OK", (body[:80], tagged)


@pytest.fixture(scope="module")
def pair(pecgate_binary):
    dovecot = Dovecot()
    for u in (USER_A, USER_B):
        dovecot.add_user(u, "pw-" + secrets.token_hex(8))
    gw = None
    with dovecot:
        messages = _messages()
        for u in (USER_A, USER_B):
            _populate(dovecot, u, messages)
        password = "tutti-" + secrets.token_hex(6)
        gw = Pecgate(dovecot, users={"tutti": {"password": password, "roles": ["tutto"]}},
                     roles={"tutto": {"mailboxes": ["diff"], "folders": ["**"],
                                      "permissions": ["read", "flag", "delete", "move", "append", "manage_folders"]}},
                     mailboxes={"diff": provider_mailbox(dovecot, USER_B)}, binary=pecgate_binary)
        try:
            gw.setup()
            gw.start()
            direct = RawImap(dovecot.imaps_port, cafile=dovecot.cert)
            direct.login(USER_A, dovecot.users[USER_A])
            relay = gw.raw(tls=True)
            relay.login("tutti", password)
            yield direct, relay
            direct.close()
            relay.close()
        finally:
            gw.cleanup()


def _exchange(r: RawImap, tag: str, body, kind=None):
    if kind == "idle":
        r.send(f"{tag} IDLE\r\n".encode())
        first = r.read_line()
        if not first.startswith(b"+"):
            return [first], b""
        r.send(b"DONE\r\n")
        untagged, tagged = r.read_until_tagged(tag)
        return [b"+"] + untagged, tagged
    return send_command(r, tag, body)


# ---------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------


def test_every_answer_is_the_providers(pair):
    """The script on A directly and on B through pecgate: every normalised answer equal."""
    direct, relay = pair
    assert len(SCRIPT) >= 150, len(SCRIPT)
    mismatches = []
    statuses = collections.Counter()
    for i, entry in enumerate(SCRIPT):
        body, kind = (entry if isinstance(entry, tuple) else (entry, None))
        tag = f"d{i}"
        want = normalise(tag, *_exchange(direct, tag, body, kind))
        got = normalise(tag, *_exchange(relay, tag, body, kind))
        statuses[status_word(want[-1].replace(b"<TAG>", b"t"))] += 1
        both_bad = want[-1].startswith(b"<TAG> BAD") and got[-1].startswith(b"<TAG> BAD")
        if want != got and not (both_bad and want[:-1] == got[:-1]):
            mismatches.append(f"#{i} {body[:100]!r}\n      provider: {want}\n      pecgate:  {got}")
    # The script does reach every kind of answer (a relay answering BAD to everything fails).
    assert statuses["OK"] > 80 and statuses["NO"] > 10 and statuses["BAD"] > 15, statuses
    assert not mismatches, f"{len(mismatches)} of {len(SCRIPT)} answers differ:\n  " + "\n  ".join(mismatches)


def test_documented_differences(pair):
    """What pecgate answers itself, or refuses, on purpose (the list in ``DOCUMENTED``)."""
    direct, relay = pair
    problems = []
    for i, (body, kind) in enumerate(DOCUMENTED):
        tag = f"e{i}"
        untagged, tagged = send_command(relay, tag, body)
        if kind == "capability":
            provider_caps = capabilities_from(send_command(direct, tag, body)[0])
            caps = capabilities_from(untagged)
            if status_word(tagged) != "OK" or "IMAP4REV1" not in caps:
                problems.append(f"CAPABILITY: {untagged} {tagged!r}")
            # pecgate offers LITERAL+ itself (it re-encodes literals for the provider).
            extra = caps - provider_caps - {"LITERAL+"}
            if extra:
                problems.append(f"CAPABILITY offers what the provider does not: {sorted(extra)}")
            if caps & NEVER_OFFERED:
                problems.append(f"CAPABILITY offers {sorted(caps & NEVER_OFFERED)}")
        elif kind == "id":
            if status_word(tagged) != "OK" or not any(re.match(rb'^\* ID \(.*"name" "pecgate"', line, re.I)
                                                      for line in untagged):
                problems.append(f"{body}: {untagged} {tagged!r} (want pecgate's own * ID and OK)")
        elif kind == "enable":
            if status_word(tagged) != "OK" or any(b"CONDSTORE" in line for line in untagged):
                problems.append(f"{body}: {untagged} {tagged!r} (want OK, nothing enabled)")
        elif kind == "refused":
            if status_word(tagged) != "BAD" or untagged:
                problems.append(f"{body}: {untagged} {tagged!r} (want BAD only)")
    # After all that, pecgate still relays normally (ENABLE CONDSTORE changed nothing).
    want = normalise("n", *send_command(direct, "n", "SELECT INBOX"))
    got = normalise("n", *send_command(relay, "n", "SELECT INBOX"))
    if want != got:
        problems.append(f"SELECT INBOX after the documented differences:\n  provider {want}\n  pecgate  {got}")
    assert not problems, "\n".join(problems)
