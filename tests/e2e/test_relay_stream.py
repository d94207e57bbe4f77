"""The proof that the class of relay bugs of issue 7 is gone: seeded random command streams.

Issue 7 was a class, not a bug: client bytes reaching the provider in ways the relay did not
mean (a literal read as commands after an IDLE, a reused tag, a command pipelined behind a
SELECT audited under the wrong folder). Fixing instances one by one proves nothing, so this
test drives every role with thousands of commands drawn at random (valid commands of every
kind, hidden folder names, tag reuse, IDLE/DONE at the wrong time, synchronising and
non-synchronising literals in every position, APPEND messages whose lines look like commands,
pipelining, garbage) over raw TLS sockets, and then checks *what actually reached the provider*
against *what the audit log says*, using Dovecot's own record of every provider connection
(rawlog):

* every command line Dovecot received is pecgate's own set-up/teardown (``s<N>``, ``DONE``) or
  a ``c<N>`` command with audit rows of the same session, user, command and folder
  (``upstream_log.check_connections`` has the full list), and every audited upstream tag
  reached Dovecot;
* no hidden folder's content (a marker only its messages carry) and no hidden folder's name
  reaches the client (a name may come back only in a tagged answer, to a client that typed it);
* no answer comes under a tag the client never sent (it would mean bytes of a literal, or the
  rest of a dropped line, were read as a command), a line sent during IDLE is dropped whole
  (BAD for the IDLE, never answered itself), and no session stalls: every batch ends with a
  NOOP under a fresh tag that must be answered within READ_DEADLINE.

It runs on the default layout (``/``, folders at the root) and on an Aruba-like one (``.``,
everything under ``INBOX.``), with a user who has two mailboxes (two provider logins on the
same Dovecot). The seed is printed and in every assertion message: PECGATE_STREAM_SEED replays
a run, PECGATE_STREAM_COMMANDS sets the commands per user and layout.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import re
import secrets
import threading
import time

import pytest

from harness import (ALL_PERMISSIONS, PROVIDER_ADDRESS, Dovecot, HarnessError, Pecgate, make_message,
                     populate_demo, provider_mailbox, wait_until)
from test_policy_matrix import CapturingImap
from upstream_log import Account, check_connections, is_granted, split_wire

SEED = int(os.environ.get("PECGATE_STREAM_SEED") or secrets.randbelow(10**9))
COMMANDS = int(os.environ.get("PECGATE_STREAM_COMMANDS", "2500"))
READ_DEADLINE = 20.0

ALTRO = "altro@pec.example.test"
# Inspection logins sharing the mail homes: the harness's own connections stay out of the rawlog.
ADMIN = {PROVIDER_ADDRESS: "admin-studio@pec.example.test", ALTRO: "admin-altro@pec.example.test"}
MAILBOX_OF = {PROVIDER_ADDRESS: "studio", ALTRO: "altro"}

# Markers only the messages of hidden folders carry: any of them at a client is a leak.
HIDDEN_MARK = "CONTENUTO-NASCOSTO-" + secrets.token_hex(6)
HIDDEN_FOLDERS = ["Riservata", "Riservata/Legale"]
EXISTING = ["INBOX", "Sent", "Ricevute", "Ricevute/Consegne"] + HIDDEN_FOLDERS

WITHOUT_SEND = [p for p in ALL_PERMISSIONS if p != "send"]
# (logical folder patterns, permissions, mailboxes); mario has two mailboxes.
ROLES = {
    "completo": (["INBOX", "Sent", "Ricevute/**"], WITHOUT_SEND, ["studio", "altro"]),
    "reception": (["INBOX"], ["read", "flag"], ["studio"]),
    "archivio": (["INBOX", "Sent", "Ricevute/**"], ["read", "flag", "append"], ["studio"]),
}
USERS = {"mario": "completo", "anna": "reception", "piero": "archivio"}
LOGINS = {"mario": ["mario/studio", "mario/altro"], "anna": ["anna"], "piero": ["piero"]}


# ---------------------------------------------------------------------------
# the world
# ---------------------------------------------------------------------------


class StreamWorld:
    """A Dovecot (rawlog on the two provider logins) with the demo folders plus marked hidden
    ones in both mailboxes, and one pecgate with the three roles."""

    def __init__(self, binary, layout: str):
        self.layout = layout
        self.dovecot = d = Dovecot(layout=layout, rawlog=[PROVIDER_ADDRESS, ALTRO])
        for login in (PROVIDER_ADDRESS, ALTRO):
            d.add_user(login, "provider-" + secrets.token_hex(8))
            d.add_user(ADMIN[login], "admin-" + secrets.token_hex(8), share_with=login)
        self.gw = None
        d.start()
        try:
            for login in (PROVIDER_ADDRESS, ALTRO):
                populate_demo(d, ADMIN[login])
                d.create_folders(ADMIN[login], [d.provider_name("Riservata/Legale")])
                for folder in HIDDEN_FOLDERS:
                    for i in range(2):
                        d.append(ADMIN[login], d.provider_name(folder),
                                 make_message(f"Pratica {i} {HIDDEN_MARK}", f"Testo {HIDDEN_MARK} n. {i}"))
            self.passwords = {u: f"{u}-{secrets.token_hex(6)}" for u in USERS}
            roles = {}
            for name, (patterns, perms, mailboxes) in ROLES.items():
                roles[name] = {"mailboxes": mailboxes, "folders": [d.policy_pattern(p) for p in patterns],
                               "permissions": perms}
            users = {u: {"password": self.passwords[u], "roles": [r]} for u, r in USERS.items()}
            mailboxes = {MAILBOX_OF[login]: provider_mailbox(d, login, max_connections=20)
                         for login in (PROVIDER_ADDRESS, ALTRO)}
            self.gw = Pecgate(d, users=users, roles=roles, mailboxes=mailboxes, binary=binary)
            self.gw.setup()
            self.gw.start()
        except BaseException:
            self.close()
            raise

    def accounts(self) -> dict[str, Account]:
        out = {}
        for login, mailbox in MAILBOX_OF.items():
            users = {}
            for u, role in USERS.items():
                patterns, perms, mailboxes = ROLES[role]
                if mailbox in mailboxes:
                    users[u] = ([self.dovecot.policy_pattern(p) for p in patterns], set(perms))
            out[login] = Account(mailbox, self.dovecot.separator, users)
        return out

    def close(self):
        if self.gw is not None:
            self.gw.cleanup()
        self.dovecot.cleanup()


@pytest.fixture(scope="module", params=["default", "aruba"])
def world(request, pecgate_binary):
    w = StreamWorld(pecgate_binary, request.param)
    try:
        yield w
    finally:
        w.close()


# ---------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------


def injection_lines(d: Dovecot, logical_names) -> list[str]:
    """Lines put in APPEND messages that look like commands on hidden folders. Messages
    carrying them may legitimately be fetched back, so the leak scan masks them."""
    return [f"inj1 SELECT {d.provider_name(n)}\r\ninj2 UID FETCH 1:* BODY.PEEK[]" for n in logical_names]


class Chunked:
    """A command as chunks; after each chunk but the last the client waits for the server's
    ``+`` (a synchronising literal follows)."""

    def __init__(self, tag: str, chunks: list[bytes], kind: str, names=()):
        self.tag = tag
        self.chunks = chunks
        self.kind = kind
        self.names = list(names)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Generator:
    """Draws stream items for one user on one layout; deterministic for a seed."""

    TAGS = ["a", "b", "A1", "x", "t.1", "0"]

    def __init__(self, rng: random.Random, world: StreamWorld, user: str):
        self.rng = rng
        d = world.dovecot
        self.d = d
        patterns, _, _ = ROLES[USERS[user]]
        visible = [n for n in EXISTING if is_granted(patterns, n.encode(), "/")]
        hidden = [n for n in EXISTING if n not in visible]
        P = d.provider_name
        self.visible = [P(n) for n in visible]
        self.hidden = [P(n) for n in hidden]
        self.missing = [P("Ricevute/Inesistente"), P("Nessuna"), P("Ricevute/Consegne/2031")]
        self.scratch = [P(f"Ricevute/Tmp{i}") for i in range(3)]
        sep = d.separator
        self.weird = ["inbox", "Inbox", P("Ricevute") + sep, P("Ricevute/Consegne") + sep + sep,
                      P("Ricevute") + sep + ".." + sep + P("Riservata").split(sep)[-1], P("Ri*"), "%",
                      P("Ricevute") + "&AA0ACg-", P("Sent") + "&AAo-"]
        self.sep = sep
        self.injections = injection_lines(d, hidden)
        self.counter = 0
        self.fresh = 0

    # -- pieces --------------------------------------------------------------
    def tag(self) -> str:
        if self.rng.random() < 0.7:
            return self.rng.choice(self.TAGS)
        self.counter += 1
        return f"g{self.counter}"

    def fresh_tag(self) -> str:
        self.fresh += 1
        return f"L{self.fresh}"

    def name(self) -> str:
        r = self.rng.random()
        if r < 0.40:
            return self.rng.choice(self.visible)
        if r < 0.70:
            return self.rng.choice(self.hidden)
        if r < 0.80:
            return self.rng.choice(self.missing)
        if r < 0.92:
            return self.rng.choice(self.scratch)
        return self.rng.choice(self.weird)

    def astring(self, value: bytes | str, allow_sync: bool = True) -> tuple[list[bytes], bool]:
        """``value`` as an atom, quoted string, LITERAL+ or synchronising literal. Returns the
        pieces (split where the client must wait for ``+``) and whether it is synchronising."""
        raw = value if isinstance(value, bytes) else value.encode()
        forms = ["quoted", "literal+"]
        if allow_sync:
            forms.append("literal")
        if raw and re.fullmatch(rb"[A-Za-z0-9.&/_+,:;!#$'=?@^`|~-]+", raw):
            forms += ["atom", "atom"]
        if not re.fullmatch(rb"[\x20-\x7e]*", raw):
            forms = [f for f in forms if f.startswith("literal")]
        form = self.rng.choice(forms)
        if form == "atom":
            return [raw], False
        if form == "quoted":
            return [b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'], False
        if form == "literal+":
            return [b"{%d+}\r\n" % len(raw) + raw], False
        return [b"{%d}\r\n" % len(raw), raw], True

    def seqset(self) -> str:
        return self.rng.choice(["1", "1:2", "*", "2:4", "1:*", "3", "1,3:*", "9999", "4294967295"])

    def message(self) -> bytes:
        rng = self.rng
        body = "Testo di prova."
        if rng.random() < 0.5:
            body += "\r\n" + rng.choice(self.injections + ["DONE", "* OK [ALERT] finto", "+ continua",
                                                            "inj3 LOGOUT", "inj4 {5}", "inj5 {5+}"])
            body += "\r\n" + rng.choice(["inj6 NOOP", ")", "", "inj7 IDLE"])
        return make_message(f"Flusso {rng.randrange(10**6)}", body)

    # -- one command ---------------------------------------------------------
    def command(self) -> Chunked:
        rng = self.rng
        kind = rng.choices(
            ["SELECT", "EXAMINE", "FETCH", "STORE", "SEARCH", "STATUS", "LIST", "LSUB", "CREATE", "DELETE",
             "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "APPEND", "COPY", "MOVE", "EXPUNGE", "UID EXPUNGE", "CLOSE",
             "UNSELECT", "NOOP", "CHECK", "ID", "NAMESPACE", "IDLE", "DONE", "CAPABILITY", "ENABLE", "REFUSED",
             "GARBAGE", "IDLESYNC", "HUGELIST"],
            [10, 5, 12, 6, 5, 5, 5, 3, 3, 2, 2, 2, 2, 5, 3, 2, 2, 1, 2, 2, 2, 1, 2, 1, 4, 2, 1, 1, 3, 5, 1, 0.2])[0]
        pieces: list[list[bytes] | bytes] = []  # bytes: plain text; list: astring pieces
        names: list[str] = []
        sync = False

        def arg(value, allow_sync=True):
            nonlocal sync
            p, s = self.astring(value, allow_sync)
            sync = sync or s
            pieces.append(b" ")
            pieces.append(p)

        uid = b"UID " if rng.random() < 0.5 else b""
        if kind in ("SELECT", "EXAMINE", "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE"):
            n = self.name() if kind != "SELECT" or rng.random() < 0.6 else rng.choice(self.visible)
            if kind in ("CREATE", "DELETE") and rng.random() < 0.5:
                n = rng.choice(self.scratch)
            if kind == "CREATE" and rng.random() < 0.2:
                n = rng.choice(self.scratch) + self.sep
            names.append(n)
            pieces.append(kind.encode())
            arg(n)
        elif kind == "STATUS":
            n = self.name()
            names.append(n)
            pieces.append(b"STATUS")
            arg(n)
            pieces.append(b" " + rng.choice([b"(MESSAGES UIDNEXT UNSEEN)", b"(RECENT UIDVALIDITY)", b"(MESSAGES)"]))
        elif kind == "FETCH":
            items = rng.choice([b"(FLAGS)", b"(UID FLAGS ENVELOPE)", b"BODY.PEEK[]", b"BODY[]", b"RFC822",
                                b"(RFC822.TEXT FLAGS)", b"(INTERNALDATE RFC822.SIZE)", b"BODY.PEEK[HEADER]",
                                b"BODYSTRUCTURE", b"(BODY[TEXT] UID)", b"FAST", b"ALL",
                                b"(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])"])
            pieces.append(uid + b"FETCH " + self.seqset().encode() + b" " + items)
        elif kind == "STORE":
            op = rng.choice([b"+FLAGS", b"-FLAGS", b"+FLAGS.SILENT", b"FLAGS", b"-FLAGS.SILENT", b"FLAGS.SILENT"])
            flags = rng.choice([b"(\\Seen)", b"(\\Flagged)", b"(\\Deleted)", b"\\Answered", b"(\\Seen \\Deleted)",
                                b"()", b"($Etichetta)"])
            pieces.append(uid + b"STORE " + self.seqset().encode() + b" " + op + b" " + flags)
        elif kind == "SEARCH":
            pieces.append(uid + b"SEARCH")
            crit = rng.choice(["ALL", "UNSEEN", "SUBJECT", "TEXT", "FROM", "UID", "OR", "CHARSET"])
            if crit in ("SUBJECT", "TEXT", "FROM"):
                pieces.append(b" " + crit.encode())
                arg(rng.choice(["Flusso", "POSTA CERTIFICATA", "pec.example.test", "Testo"]))
            elif crit == "CHARSET":
                pieces.append(b" CHARSET UTF-8 SUBJECT")
                arg("Fattura")
            elif crit == "UID":
                pieces.append(b" UID " + rng.choice([b"1:*", b"6:4294967295", b"2,4"]))
            elif crit == "OR":
                pieces.append(b" OR SEEN FLAGGED NOT DELETED")
            else:
                pieces.append(b" " + crit.encode())
        elif kind in ("LIST", "LSUB"):
            pieces.append(kind.encode())
            ref = rng.choice(["", "", "", self.name(), rng.choice(self.hidden) + self.sep])
            pat = rng.choice(["*", "%", "%" + self.sep + "%", self.name(), self.name() + self.sep + "*",
                              rng.choice(self.hidden) + "*"])
            arg(ref)
            arg(pat)
        elif kind == "RENAME":
            a = rng.choice(self.scratch + [self.name()])
            b = rng.choice(self.scratch + [self.name()])
            names += [a, b]
            pieces.append(b"RENAME")
            arg(a)
            arg(b)
        elif kind == "APPEND":
            n = self.name() if rng.random() < 0.6 else rng.choice(self.visible)
            names.append(n)
            pieces.append(b"APPEND")
            arg(n)
            pieces.append(rng.choice([b"", b" (\\Seen)", b" (\\Flagged \\Deleted)", b' "01-Jan-2026 10:00:00 +0100"']))
            msg = self.message()
            if rng.random() < 0.5:
                pieces.append(b" ")
                pieces.append([b"{%d+}\r\n" % len(msg) + msg])
            else:
                pieces.append(b" ")
                pieces.append([b"{%d}\r\n" % len(msg), msg])
                sync = True
        elif kind in ("COPY", "MOVE"):
            n = self.name()
            names.append(n)
            pieces.append(uid + kind.encode() + b" " + self.seqset().encode())
            arg(n)
        elif kind == "UID EXPUNGE":
            pieces.append(b"UID EXPUNGE " + self.seqset().encode())
        elif kind == "ID":
            if rng.random() < 0.3:
                pieces.append(b"ID NIL")
            else:
                pieces.append(b'ID ("name" "flusso" "version"')
                arg(f"1.{rng.randrange(100)}")
                pieces.append(b")")
        elif kind == "DONE":
            return Chunked("", [b"DONE\r\n"], "DONE")
        elif kind == "IDLE":
            tag = self.fresh_tag() if rng.random() < 0.5 else self.tag()
            return Chunked(tag, [tag.encode() + b" IDLE\r\n"], "IDLE")
        elif kind == "IDLESYNC":
            # IDLE, then (once it runs) a line with a synchronising literal: the line must be
            # dropped with a BAD for the IDLE, and no `+` may come for its literal.
            idle = self.fresh_tag()
            other = self.command_with_sync_literal()
            item = Chunked(idle, [idle.encode() + b" IDLE\r\n", other.chunks[0]], "IDLESYNC", other.names)
            item.inner_tag = other.tag
            item.inner_chunks = other.chunks
            return item
        elif kind == "ENABLE":
            pieces.append(rng.choice([b"ENABLE CONDSTORE", b"ENABLE QRESYNC", b"ENABLE UTF8=ACCEPT"]))
        elif kind == "REFUSED":
            pieces.append(rng.choice([b"COMPRESS DEFLATE", b"GETQUOTAROOT INBOX", b"SORT (DATE) UTF-8 ALL",
                                      b"THREAD REFERENCES UTF-8 ALL", b"STARTTLS", b"LOGIN mario segreto",
                                      b"AUTHENTICATE PLAIN", b'XLIST "" "*"', b"NOTIFY NONE", b"GETACL INBOX",
                                      b"select inbox", b"Fetch 1 (flags)", b"SELECT", b"FETCH", b"STORE 1"]))
        elif kind == "HUGELIST":  # contract 8: answered or refused promptly, never a stall
            pieces.append(b'LIST "" "' + b"*" * 200 + b']"')
        elif kind == "GARBAGE":
            return Chunked("", [self.garbage()], "GARBAGE")
        else:
            pieces.append(kind.encode())

        tag = self.fresh_tag() if sync else self.tag()
        chunks = [tag.encode() + b" "]
        for p in pieces:
            if isinstance(p, bytes):
                chunks[-1] += p
            else:
                chunks[-1] += p[0]
                for more in p[1:]:
                    chunks.append(more)
        chunks[-1] += b"\r\n"
        return Chunked(tag, chunks, kind, names)

    def command_with_sync_literal(self) -> Chunked:
        while True:
            c = self.command()
            if len(c.chunks) > 1 and c.kind not in ("IDLESYNC",):
                return c

    def garbage(self) -> bytes:
        rng = self.rng
        choice = rng.randrange(9)
        if choice == 0:
            return bytes(rng.choice([b for b in range(256) if b not in (10, 13)])
                         for _ in range(rng.randint(1, 40))) + b"\r\n"
        if choice == 1:
            return b"\r\n"
        if choice == 2:
            return rng.choice([b"* NOOP\r\n", b"+ x\r\n", b"+\r\n", b")\r\n", b"a\r\n", b"DONE DONE\r\n"])
        if choice == 3:
            return b'g SELECT "INBOX\r\n'
        if choice == 4:
            return b"g SELECT {5\r\n"
        if choice == 5:
            return b"g NOOP \x00\x01\r\n"
        if choice == 6:
            return b"g SELECT {70000+}\r\n" + b"x" * 70000 + b"\r\n"
        if choice == 7:
            return b"g FETCH 1 (BODY[]\xff\xfe)\r\n"
        return b"g " + b"A" * rng.randint(100, 3000) + b"\r\n"


# ---------------------------------------------------------------------------
# one client stream
# ---------------------------------------------------------------------------


class Stream:
    """Sends one user's stream, reopening closed sessions, and scans every byte received."""

    def __init__(self, world: StreamWorld, user: str, seed: int, count: int, label: str):
        self.world = world
        self.user = user
        self.rng = random.Random(seed)
        self.gen = Generator(self.rng, world, user)
        self.count = count
        self.label = label
        self.violations: list[str] = []
        self.stats = collections.Counter()
        self.recent = collections.deque(maxlen=12)  # (time, bytes sent) for failure messages
        self.received = collections.deque(maxlen=12)  # (time, line received)
        self.forbidden: set[bytes] = set()  # tags of dropped commands: never answered
        self.tags_used: set[bytes] = {b"zz"}  # every tag (first token of a line) the client sent
        self.session = None
        self.typed: set[bytes] = set()
        self.sync_n = 0
        hidden = self.gen.hidden
        segs = {s for h in hidden for s in h.split(world.dovecot.separator)} - {"INBOX"}
        visible_segs = {s for v in self.gen.visible for s in v.split(world.dovecot.separator)}
        self.tokens = sorted(set(hidden) | (segs - visible_segs), key=len, reverse=True)
        self.token_res = [(t, re.compile(rb"(?<![A-Za-z0-9])" + re.escape(t.encode()) + rb"(?![A-Za-z0-9])"))
                          for t in self.tokens]
        self.masks = sorted({i.encode() for i in injection_lines(world.dovecot, EXISTING)}, key=len, reverse=True)

    # -- leak scan -------------------------------------------------------------
    def scan(self, line: bytes, where: str):
        if HIDDEN_MARK.encode() in line:
            self.violations.append(f"{where}: hidden content marker in {line[:300]!r}")
        for m in self.masks:
            line = line.replace(m, b"<INJ>")
        if b"pecgate-none" in line:
            self.violations.append(f"{where}: placeholder reached the client: {line[:300]!r}")
        first = line.split(b" ", 1)[0]
        tagged = first not in (b"*", b"+") and not first.startswith(b"+")
        for tok, rx in self.token_res:
            if rx.search(line) and not (tagged and tok.encode() in self.typed):
                self.violations.append(f"{where}: hidden name {tok!r} in {line[:300]!r}")

    def read_line(self) -> bytes:
        line = self.session.read_line(READ_DEADLINE)
        self.received.append((round(time.monotonic(), 2), line[:160]))
        self.stats["lines"] += 1
        self.scan(line, f"{self.label} {self.user}")
        first = line.split(b" ", 1)[0]
        if first not in (b"*", b"+") and not first.startswith(b"+") and first not in self.tags_used:
            self.violations.append(f"{self.label} {self.user}: answer for a tag the client never sent (bytes of "
                                   f"a literal or of a dropped line read as a command?): {line[:200]!r}")
        if any(line.startswith(t) for t in self.forbidden):
            self.violations.append(f"{self.label} {self.user}: a command dropped during IDLE was answered: "
                                   f"{line[:200]!r}")
        return line

    # -- sessions --------------------------------------------------------------
    def open(self):
        login = self.rng.choice(LOGINS[self.user])
        deadline = time.monotonic() + 30
        while True:
            s = None
            try:
                s = CapturingImap(self.world.gw.tls_port, tls=True, cafile=self.world.gw.cert,
                                  timeout=READ_DEADLINE)
                s.login(login, self.world.passwords[self.user])
                break
            except (HarnessError, OSError, EOFError, TimeoutError) as exc:
                if s is not None:
                    s.close()
                if time.monotonic() > deadline:
                    raise HarnessError(f"{self.user} cannot log in again: {exc}") from exc
        self.session = s
        self.typed = set()
        self.forbidden = set()
        self.stats["sessions"] += 1

    def drop(self, why: str):
        if self.session is not None:
            rest = self.session.buf
            if rest:
                self.scan(rest, f"{self.label} {self.user} (unread at close)")
            self.session.close()
        self.session = None
        self.stats["closed: " + why] += 1

    # -- sending ---------------------------------------------------------------
    def wait_continuation(self, tag: str, idle_tag: str | None = None) -> str:
        """After a line announcing a synchronising literal (or an IDLE): read until the
        server's `+` ("plus"), this tag's answer ("answered") or, when ``idle_tag`` runs, that
        IDLE's answer ("idle-ended")."""
        t = tag.encode() + b" "
        it = idle_tag.encode() + b" " if idle_tag else None
        while True:
            line = self.read_line()
            if line.startswith(b"+"):
                return "plus"
            if line.startswith(t):
                return "answered"
            if it and line.startswith(it):
                if not line.startswith(it + b"BAD"):
                    self.violations.append(f"{self.label} {self.user}: a line during IDLE ended it with {line!r}, "
                                           "not BAD")
                return "idle-ended"
            if line.startswith(b"* BYE"):
                raise EOFError("BYE while waiting for a continuation")

    def send_item(self, item: Chunked, state: dict):
        """Send one command. ``state["idle"]``: an IDLE may be running (sent since the last
        sync); a command with a synchronising literal is then sent only after a sync, since
        whether its line is dropped (inside IDLE) or gets a `+` would be unknown."""
        s = self.session
        self.recent.append((round(time.monotonic(), 2), item.data[:160]))
        if item.kind in ("GARBAGE", "DONE"):
            for w in split_wire(item.data):
                self.tags_used.add(w.lines[0].split(b" ", 1)[0])
        self.tags_used.add(item.tag.encode())
        if item.kind == "IDLESYNC":
            self.tags_used.add(item.inner_tag.encode())
        for name in item.names:
            self.typed.add(name.encode())
        for tok in self.tokens:
            if tok.encode() in item.data:
                self.typed.add(tok.encode())
        if item.kind == "IDLESYNC":
            if state["idle"]:
                self.sync(state)
            s.send(item.chunks[0])
            if self.wait_continuation(item.tag) != "plus":
                return  # IDLE refused: nothing runs, the scenario does not apply
            # The command is dropped: it must never be answered under its own tag.
            self.forbidden.add(item.inner_tag.encode() + b" ")
            s.send(item.chunks[1])
            end = self.wait_continuation(item.inner_tag, idle_tag=item.tag)
            if end == "idle-ended":
                self.stats["literal line dropped in IDLE"] += 1
                return
            # A `+` here means the command was not dropped whole: typically the bytes after a
            # LITERAL+ in it were read as a new command, whose literal gets the `+`.
            self.violations.append(f"{self.label} {self.user}: {item.chunks[1][:160]!r} sent during IDLE got "
                                   f"{end!r} instead of the IDLE's BAD (the command was not dropped whole)")
            raise EOFError("session state unknown after a wrong answer: start over")
        if len(item.chunks) > 1 and state["idle"]:
            self.sync(state)
        if item.kind == "IDLE":
            s.send(item.chunks[0])
            # With a fresh tag and no IDLE possibly running, behave like a client: wait for
            # `+` (or the refusal). Otherwise the IDLE line may itself be dropped: no wait.
            if item.tag.startswith("L") and not state["idle"]:
                self.wait_continuation(item.tag)
            state["idle"] = True
            return
        self.send_rest(item.chunks, item.tag)

    def send_rest(self, chunks, tag: str, idle_tag: str | None = None):
        """Send chunks, waiting for `+` between them; stop if the command is answered (or,
        with ``idle_tag``, if that IDLE ends: the command was dropped)."""
        for i, chunk in enumerate(chunks):
            self.session.send(chunk)
            if i == len(chunks) - 1:
                break
            end = self.wait_continuation(tag, idle_tag)
            if end != "plus":
                self.stats["literal refused" if end == "answered" else "literal dropped in IDLE"] += 1
                return

    def sync(self, state: dict):
        """End any IDLE, then a NOOP with a unique tag; read up to its answer."""
        self.sync_n += 1
        tag = f"z{self.sync_n}"
        self.tags_used.add(tag.encode())
        if state["idle"] or self.rng.random() < 0.05:
            self.session.send(b"DONE\r\n")
        state["idle"] = False
        self.session.send(f"{tag} NOOP\r\n".encode())
        t = tag.encode() + b" "
        while True:
            line = self.read_line()
            if line.startswith(t):
                if not line.startswith(t + b"OK"):
                    self.violations.append(f"{self.label} {self.user}: sync NOOP answered {line!r}")
                return

    def run(self):
        sent = 0
        self.open()
        while sent < self.count:
            if self.session is None:
                self.open()
            batch = [self.gen.command() for _ in range(self.rng.choice([1, 1, 2, 3, 5, 8]))]
            state = {"idle": False}
            try:
                for item in batch:
                    self.send_item(item, state)
                    sent += 1
                    self.stats[item.kind] += 1
                self.sync(state)
                if self.rng.random() < 0.01:
                    self.session.send(b"zz LOGOUT\r\n")
                    while not self.read_line().startswith(b"zz "):
                        pass
                    self.drop("logout")
            except (EOFError, ConnectionError, OSError) as exc:
                if isinstance(exc, TimeoutError) or "deadline" in str(exc):
                    self.violations.append(
                        f"{self.label} {self.user}: no answer within {READ_DEADLINE}s; last sent:"
                        + "".join(f"\n      {t} {b!r}" for t, b in self.recent)
                        + "\n    last received:" + "".join(f"\n      {t} {b!r}" for t, b in self.received))
                self.drop(type(exc).__name__)
        if self.session is not None:
            with contextlib.suppress(EOFError, OSError):
                self.session.send(b"zz LOGOUT\r\n")
                while not self.read_line().startswith(b"zz "):
                    pass
            self.drop("end")




# ---------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------


def test_random_streams_reach_the_provider_only_as_audited(world):
    """The three users' streams run at once (mario alternating between his two mailboxes);
    then every provider connection they caused is held against the audit log."""
    layout = world.layout
    seed = SEED + (0 if layout == "default" else 1)
    print(f"stream seed {SEED} (PECGATE_STREAM_SEED={SEED}), layout {layout}, {COMMANDS} commands per user")
    d = world.dovecot
    mark = d.rawlog_mark()
    audit_mark = max([r["id"] for r in world.gw.audit_rows()] or [0])

    streams = [Stream(world, user, seed * 100 + i, COMMANDS, f"[seed {SEED} {layout}]")
               for i, user in enumerate(sorted(USERS))]
    errors: list[str] = []

    def run(stream):
        try:
            stream.run()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"{stream.user}: {exc!r} at {round(time.monotonic(), 2)}; last sent "
                          + "".join(f"\n    {t} {b!r}" for t, b in stream.recent))

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in streams]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), f"seed {SEED}: a stream did not finish"
    for s in streams:
        print(f"{s.user}: {dict(sorted(s.stats.items()))}")
    print(f"streams took {elapsed:.1f}s")
    assert not errors, f"seed {SEED} {layout}:\n" + "\n".join(errors)

    conns = d.rawlog_connections(exclude=mark)
    d.wait_rawlogs_closed(conns)
    accounts = world.accounts()

    def audit_settled():
        rows = world.gw.audit_rows("id > ?", (audit_mark,))
        sessions = {r["session"] for r in rows if r["command"] == "LOGIN" and r["outcome"] == "ok"}
        ended = {r["session"] for r in rows if r["command"] in ("logout", "disconnect", "upstream-error")}
        return rows if sessions <= ended else None

    rows = wait_until(audit_settled, 30, "every session's end in the audit log")
    sessions = {r["session"] for r in rows if r["command"] == "LOGIN" and r["outcome"] == "ok"}
    violations, stats = check_connections(conns, world.gw.audit_rows(), accounts, sessions)
    print(f"provider side: {len(conns)} connections, {stats['commands']} relayed commands, "
          f"{stats['own']} own, {stats['done']} DONE, {stats['placeholders']} placeholders; "
          f"{dict(sorted(stats['by_name'].items()))}")

    client_violations = [v for s in streams for v in s.violations]
    all_v = client_violations + violations
    assert not all_v, (
        f"seed {SEED} (PECGATE_STREAM_SEED={SEED}) layout {layout}: {len(all_v)} violations "
        f"({len(client_violations)} client-side, {len(violations)} provider-side; at most 15 of each):\n  "
        + "\n  ".join(client_violations[:15] + violations[:15]))

    # The run did exercise the relay (so a silent relay cannot pass).
    assert len(conns) >= len(USERS), conns
    assert stats["commands"] >= COMMANDS, stats
    for name in ("SELECT", "UID FETCH", "APPEND", "IDLE", "STATUS", "LIST"):
        assert stats["by_name"].get(name, 0) > 0, (name, stats["by_name"])
    assert stats["placeholders"] > 0 and stats["done"] > 0, stats
    mailboxes = {accounts[c.user].mailbox for c in conns}
    assert mailboxes == {"studio", "altro"}, mailboxes
