"""What pecgate sent to the provider, read back from Dovecot's rawlog, and checked against the
audit log (the relay contract of issue 7).

Dovecot records, per provider connection, the bytes it received (``RawlogConnection.received``)
and sent (``.sent``). ``split_commands`` cuts the received bytes into commands (literals,
synchronising or not, kept whole); ``tagged_results`` reads the tagged answers;
``check_connections`` holds every command of every connection against the audit rows and the
users' policy and returns the violations (strings; empty when everything is right).

The contract checked here:

* upstream tags: pecgate's own commands are ``s<N>`` (CAPABILITY, ``LIST "" ""``, LOGOUT after
  login; STARTTLS and LOGIN come before Dovecot's rawlog starts), the IDLE terminator is a bare
  ``DONE`` sent only while an IDLE runs, and everything else is ``c<N>`` with N unique in the
  pecgate process; no client tag, no client byte;
* every ``c<N>`` command has audit rows whose ``detail`` ends with `` upstream=c<N>``, in the
  session that owns the connection (one session per connection, of the user and mailbox that
  logged in), with the same command name; state-changing commands have a ``sent`` row and then
  the final one; the row's ``folder`` is the folder the command names, or else the folder the
  provider had selected when it ran the command (tracked from the rawlog: SELECT/EXAMINE OK
  selects, a failed SELECT/EXAMINE or CLOSE/UNSELECT deselects);
* a folder name that reaches the provider is either granted to the user or a placeholder
  (every segment ``pecgate-none-<12 hex>``, except a leading ``INBOX`` level, which always
  exists), and placeholders go with outcome ``denied``;
  a client's LIST/LSUB goes up as ``LIST "" "*"`` (``LSUB "" "*"``);
* what reached the provider is permitted to the user: STORE needs ``flag`` (and ``delete`` for
  ``\\Deleted`` or a FLAGS replace), EXPUNGE needs ``delete``, COPY ``move``, MOVE ``move`` and
  ``delete``, APPEND ``append``, folder management ``manage_folders`` (DELETE also ``delete``);
  without ``flag`` FETCH asks only for ``.PEEK`` bodies; without ``delete`` a client's CLOSE
  goes up as UNSELECT; ID and ENABLE never go up.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

PLACEHOLDER_SEGMENT = re.compile(rb"^pecgate-none-[0-9a-f]{12}$")
UPSTREAM_DETAIL = re.compile(r"(?:^|\s)upstream=(c\d+)$")
_LITERAL_AT_END = re.compile(rb"~?\{(\d+)(\+?)\}$")

# Commands that change state: two audit rows (`sent`, then the final outcome).
STATE_CHANGING = {"STORE", "UID STORE", "EXPUNGE", "UID EXPUNGE", "COPY", "UID COPY", "MOVE",
                  "UID MOVE", "APPEND", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE",
                  "CLOSE"}
# Commands the relay forwards (anything else under a c-tag is a violation; ID and ENABLE are
# answered by pecgate itself).
RELAYED = STATE_CHANGING | {"SELECT", "EXAMINE", "FETCH", "UID FETCH", "SEARCH", "UID SEARCH",
                            "STATUS", "LIST", "LSUB", "UNSELECT", "NOOP", "CHECK", "NAMESPACE",
                            "IDLE", "CAPABILITY",
                            # the client's own LOGOUT, relayed and audited like any command (the
                            # contract names pecgate's *final* LOGOUT, which is s<N>, as its own)
                            "LOGOUT"}
# Commands naming a folder, and which argument the audit row's folder is.
NAMING = {"SELECT": 0, "EXAMINE": 0, "STATUS": 0, "CREATE": 0, "DELETE": 0, "RENAME": 0,
          "SUBSCRIBE": 0, "UNSUBSCRIBE": 0, "APPEND": 0, "COPY": 1, "UID COPY": 1, "MOVE": 1,
          "UID MOVE": 1}
# Set-up and teardown, plus the housekeeping of a connection the pool keeps between sessions
# (NOOP before reuse, UNSELECT after a session that had a folder selected).
OWN_COMMANDS = {"CAPABILITY", "LIST", "LOGOUT", "NOOP", "UNSELECT"}
FINAL_OUTCOMES = {"ok", "no", "bad", "denied", "error"}


# ---------------------------------------------------------------------------
# wire parsing
# ---------------------------------------------------------------------------


@dataclass
class Token:
    kind: str  # atom, quoted, literal, open, close
    value: bytes
    sync: bool = False  # literal: synchronising ({n}) rather than LITERAL+ ({n+})


@dataclass
class Wire:
    """One command (or response) as received: its lines and the literals between them."""
    lines: list[bytes]
    literals: list[tuple[bytes, bool]] = field(default_factory=list)  # (data, synchronising)
    complete: bool = True

    @property
    def raw(self) -> bytes:
        out = []
        for i, line in enumerate(self.lines):
            out.append(line + b"\r\n")
            if i < len(self.literals):
                out.append(self.literals[i][0])
        return b"".join(out)

    def tokens(self) -> list[Token]:
        toks: list[Token] = []
        for i, line in enumerate(self.lines):
            m = _LITERAL_AT_END.search(line) if i < len(self.literals) else None
            toks.extend(tokenize(line[: m.start()] if m else line))
            if m:
                data, sync = self.literals[i]
                toks.append(Token("literal", data, sync))
        return toks


def split_wire(data: bytes) -> list[Wire]:
    """Cut a byte stream into commands/responses: lines, with `{n}` / `{n+}` / `~{n}` literals
    taken whole (their bytes are never read as lines). A truncated last one is kept with
    ``complete=False``."""
    out = []
    pos = 0
    while pos < len(data):
        w = Wire([])
        while True:
            end = data.find(b"\r\n", pos)
            if end < 0:
                w.lines.append(data[pos:])
                w.complete = False
                pos = len(data)
                break
            line = data[pos:end]
            pos = end + 2
            w.lines.append(line)
            m = _LITERAL_AT_END.search(line)
            if not m:
                break
            n = int(m.group(1))
            w.literals.append((data[pos:pos + n], m.group(2) != b"+"))
            if pos + n > len(data):
                w.complete = False
                pos = len(data)
                break
            pos += n
        out.append(w)
    return out


def tokenize(text: bytes) -> list[Token]:
    toks = []
    i = 0
    n = len(text)
    while i < n:
        c = text[i:i + 1]
        if c == b" ":
            i += 1
        elif c in (b"(", b")"):
            toks.append(Token("open" if c == b"(" else "close", c))
            i += 1
        elif c == b'"':
            j = i + 1
            val = bytearray()
            while j < n and text[j:j + 1] != b'"':
                if text[j:j + 1] == b"\\" and j + 1 < n:
                    j += 1
                val += text[j:j + 1]
                j += 1
            toks.append(Token("quoted", bytes(val)))
            i = j + 1
        else:
            j = i
            depth = 0
            while j < n:
                ch = text[j:j + 1]
                if ch == b"[":
                    depth += 1
                elif ch == b"]":
                    depth -= 1
                elif depth <= 0 and ch in (b" ", b"(", b")"):
                    break
                j += 1
            toks.append(Token("atom", text[i:j]))
            i = j
    return toks


@dataclass
class Command:
    wire: Wire
    tag: str
    name: str  # "SELECT", "UID FETCH", "DONE"...
    args: list[Token]

    @property
    def line(self) -> bytes:
        return self.wire.lines[0]


def split_commands(received: bytes) -> list[Command]:
    out = []
    for w in split_wire(received):
        toks = w.tokens()
        if w.lines == [b"DONE"]:
            out.append(Command(w, "", "DONE", []))
            continue
        tag = toks[0].value.decode("latin-1") if toks and toks[0].kind == "atom" else ""
        name = toks[1].value.decode("latin-1").upper() if len(toks) > 1 and toks[1].kind == "atom" else ""
        args = toks[2:]
        if name == "UID" and args and args[0].kind == "atom":
            name = "UID " + args[0].value.decode("latin-1").upper()
            args = args[1:]
        out.append(Command(w, tag, name, args))
    return out


def tagged_results(sent: bytes) -> dict[str, str]:
    """{tag: OK/NO/BAD} of the tagged responses in a provider's output."""
    out = {}
    for w in split_wire(sent):
        first = w.lines[0] if w.lines else b""
        m = re.match(rb"^([^ *+][^ ]*) (OK|NO|BAD)\b", first, re.I)
        if m:
            out[m.group(1).decode("latin-1")] = m.group(2).decode().upper()
    return out


# ---------------------------------------------------------------------------
# folder names and policy
# ---------------------------------------------------------------------------


def is_placeholder(name: bytes, separator: str) -> bool:
    """Every (non-empty) segment is ``pecgate-none-<12 hex>``; a first ``INBOX`` level of a
    longer name is kept as is (it always exists, so the provider answers "no such folder"
    rather than "wrong namespace" on an ``INBOX.``-prefixed layout)."""
    segs = [s for s in name.split(separator.encode()) if s]
    if len(segs) > 1 and segs[0] == b"INBOX":
        segs = segs[1:]
    return bool(segs) and all(PLACEHOLDER_SEGMENT.match(s) for s in segs)


def _segments(name, separator) -> int:
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return len([s for s in name.split(separator) if s])


def mutf7_canonical_decode(wire: str) -> str | None:
    """Modified UTF-7 decoding that accepts only the canonical spelling (like pecgate)."""
    out = []
    i = 0
    while i < len(wire):
        ch = wire[i]
        if ch != "&":
            if not 0x20 <= ord(ch) <= 0x7E:
                return None
            out.append(ch)
            i += 1
            continue
        j = wire.find("-", i)
        if j < 0:
            return None
        run = wire[i + 1:j]
        if not run:
            out.append("&")
        else:
            b64 = run.replace(",", "/")
            try:
                raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
                text = raw.decode("utf-16-be")
            except Exception:  # noqa: BLE001 - not canonical
                return None
            if any(0x20 <= ord(c) <= 0x7E for c in text):
                return None
            again = base64.b64encode(text.encode("utf-16-be")).decode().rstrip("=").replace("/", ",")
            if again != run:
                return None
            out.append(text)
        i = j + 1
    return "".join(out)


def match_pattern(pattern, segs) -> bool:
    """A role pattern (split on `/`) against decoded name segments, as policy.rs matches."""
    if not pattern:
        return not segs
    if pattern[0] == "**":
        return match_pattern(pattern[1:], segs) or (bool(segs) and match_pattern(pattern, segs[1:]))
    if not segs:
        return False
    return (pattern[0] == "*" or pattern[0] == segs[0]) and match_pattern(pattern[1:], segs[1:])


def is_granted(patterns, wire_name: bytes, separator: str) -> bool:
    """pecgate's rule (policy.rs): decoded segments, INBOX case-insensitive, unclean never."""
    try:
        text = mutf7_canonical_decode(wire_name.decode("ascii"))
    except UnicodeDecodeError:
        return False
    if not text:
        return False
    segs = text.split(separator)
    if any(s in ("", ".", "..") for s in segs):
        return False
    if segs[0].upper() == "INBOX":
        segs[0] = "INBOX"
        # INBOX.INBOX is INBOX itself on an INBOX.-prefixed provider: never granted.
        if len(segs) > 1 and segs[1].upper() == "INBOX":
            return False
    for p in patterns:
        ps = p.split("/")
        if ps[0].upper() == "INBOX":
            ps[0] = "INBOX"
        if match_pattern(ps, segs):
            return True
    return False


# ---------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------


@dataclass
class Account:
    """Who may log in to a mailbox: name -> (folder patterns, permissions) for that mailbox."""
    mailbox: str
    separator: str
    users: dict[str, tuple[list[str], set[str]]]


def _folder(v) -> str | None:
    if v is None or v == "":
        return None
    return v if isinstance(v, str) else v.decode("utf-8", "replace")


def _same_folder(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.upper() == "INBOX" and b.upper() == "INBOX":
        return True
    return a == b


def _store_needs_delete(cmd: Command) -> bool:
    items = [t for t in cmd.args[1:] if t.kind in ("atom", "quoted")]
    if not items:
        return False
    op = items[0].value.upper()
    if op.startswith(b"FLAGS"):
        return True
    return any(t.value.upper() == b"\\DELETED" for t in items[1:])


def _fetch_sets_seen(cmd: Command) -> bool:
    text = b" ".join(t.value for t in cmd.args[1:] if t.kind == "atom").upper()
    return bool(re.search(rb"(?<![.A-Z0-9])(BODY\[|BINARY\[|RFC822(?![.A-Z]))|RFC822\.TEXT", text))


def check_connections(connections, audit_rows, accounts: dict[str, Account],
                      sessions: set[str] | None = None) -> tuple[list[str], dict]:
    """Hold every command of ``connections`` (RawlogConnection) against ``audit_rows`` (every
    row of the pecgate instance) and the ``accounts`` ({provider login: Account}).

    Returns (violations, stats). ``sessions``: restrict the reverse check (every audited
    upstream tag reached the provider) to these audit sessions; by default the sessions found
    on the connections.
    """
    violations: list[str] = []
    stats = {"connections": 0, "commands": 0, "own": 0, "done": 0, "placeholders": 0, "by_name": {}}
    by_tag: dict[str, list[dict]] = {}
    for row in audit_rows:
        m = UPSTREAM_DETAIL.search(row["detail"] or "")
        if m:
            by_tag.setdefault(m.group(1), []).append(row)
    login_rows = {r["session"]: r for r in audit_rows if r["command"] == "LOGIN" and r["outcome"] == "ok"}
    seen_tags: dict[str, str] = {}
    session_of_conn: dict[str, str] = {}

    for conn in connections:
        stats["connections"] += 1
        acct = accounts.get(conn.user)
        if acct is None:
            violations.append(f"{conn.key}: a connection of an unexpected provider login")
            continue
        sep = acct.separator
        cmds = split_commands(conn.received)
        results = tagged_results(conn.sent)
        where = conn.key
        selected: str | None = None
        session = None
        idle_open = None
        for i, cmd in enumerate(cmds):
            ctx = f"{where} #{i} {cmd.wire.raw[:160]!r}"
            if idle_open is not None:
                if cmd.name != "DONE":
                    violations.append(f"{ctx}: sent while {idle_open} IDLE was running (only DONE may be)")
                idle_open = None
                if cmd.name == "DONE":
                    stats["done"] += 1
                    continue
            if cmd.name == "DONE":
                violations.append(f"{ctx}: DONE without an IDLE running")
                continue
            if re.fullmatch(r"s\d+", cmd.tag):
                stats["own"] += 1
                if cmd.name not in OWN_COMMANDS or (cmd.name == "LIST" and cmd.line != f'{cmd.tag} LIST "" ""'.encode()):
                    violations.append(f"{ctx}: not one of pecgate's own set-up/teardown commands")
                continue
            if not re.fullmatch(r"c\d+", cmd.tag):
                violations.append(f"{ctx}: tag {cmd.tag!r} is neither c<N> nor s<N>")
                continue
            stats["commands"] += 1
            stats["by_name"][cmd.name] = stats["by_name"].get(cmd.name, 0) + 1
            if cmd.tag in seen_tags:
                violations.append(f"{ctx}: upstream tag {cmd.tag} used twice (also on {seen_tags[cmd.tag]})")
            seen_tags[cmd.tag] = where
            result = results.get(cmd.tag)
            if cmd.name == "IDLE":
                idle_open = cmd.tag
            if cmd.name not in RELAYED:
                violations.append(f"{ctx}: {cmd.name or '(no command)'} is not a command pecgate relays")
            if not cmd.wire.complete:
                violations.append(f"{ctx}: incomplete command at the end of the connection")

            rows = by_tag.get(cmd.tag, [])
            if not rows:
                around = "".join(f"\n      {c.wire.raw[:100]!r} -> {results.get(c.tag)}"
                                 for c in cmds[max(0, i - 3):i + 3])
                violations.append(f"{ctx}: no audit row with upstream={cmd.tag}; around it:{around}")
                continue
            sess = {r["session"] for r in rows}
            if len(sess) != 1:
                violations.append(f"{ctx}: audit rows of {cmd.tag} in several sessions {sess}")
            row_session = rows[0]["session"]
            if session is None:
                session = row_session
                other = next((k for k, s in session_of_conn.items() if s == session), None)
                if other:
                    violations.append(f"{ctx}: session {session} also owns connection {other}")
                session_of_conn[where] = session
                login = login_rows.get(session)
                if login is None:
                    violations.append(f"{ctx}: session {session} has no successful LOGIN row")
                else:
                    if login["mailbox"] != acct.mailbox:
                        violations.append(f"{ctx}: session {session} logged in to mailbox {login['mailbox']!r}, "
                                          f"the connection is {acct.mailbox!r}'s")
            elif row_session != session:
                violations.append(f"{ctx}: audit session {row_session}, earlier commands of this connection "
                                  f"were session {session}")
            user = rows[0]["user"]
            login = login_rows.get(row_session)
            if login is not None and any(r["user"] != login["user"] for r in rows):
                violations.append(f"{ctx}: audit user {[r['user'] for r in rows]} differs from the session's "
                                  f"login {login['user']!r}")
            if user not in acct.users:
                violations.append(f"{ctx}: audit user {user!r} may not use mailbox {acct.mailbox}")
                continue
            patterns, perms = acct.users[user]
            audit_names = {r["command"].upper() for r in rows}
            expected_name = cmd.name
            if cmd.name == "UNSELECT" and audit_names == {"CLOSE"} and "delete" not in perms:
                expected_name = "CLOSE"  # README: without delete, CLOSE is sent as UNSELECT
            elif cmd.name == "CLOSE" and "delete" not in perms:
                violations.append(f"{ctx}: CLOSE (expunges) sent for {user} who lacks delete")
            if audit_names != {expected_name}:
                violations.append(f"{ctx}: audit command {sorted(audit_names)} for upstream {cmd.name}")
            outcomes = [r["outcome"] for r in rows]
            if expected_name in STATE_CHANGING:
                if outcomes[0] != "sent" or len(outcomes) != 2 or outcomes[1] not in FINAL_OUTCOMES:
                    violations.append(f"{ctx}: state-changing command with audit outcomes {outcomes} "
                                      "(want sent, then the final one)")
                elif rows[0]["id"] >= rows[1]["id"]:
                    violations.append(f"{ctx}: final row written before the sent row")
            elif len(outcomes) != 1 or outcomes[0] not in FINAL_OUTCOMES:
                violations.append(f"{ctx}: audit outcomes {outcomes} (want one final row)")
            final = outcomes[-1]

            # the folder
            names: list[bytes] = []
            if cmd.name in ("LIST", "LSUB"):
                if cmd.line != f'{cmd.tag} {cmd.name} "" "*"'.encode() or cmd.wire.literals:
                    violations.append(f"{ctx}: a client's {cmd.name} must go up as {cmd.name} \"\" \"*\"")
            idx = NAMING.get(cmd.name)
            if idx is not None:
                if len(cmd.args) <= idx or cmd.args[idx].kind not in ("atom", "quoted", "literal"):
                    violations.append(f"{ctx}: cannot find the folder argument")
                    continue
                names.append(cmd.args[idx].value)
                if cmd.name == "RENAME" and len(cmd.args) > 1:
                    names.append(cmd.args[1].value)
                named = cmd.args[idx].value
                placeholder = [n for n in names if is_placeholder(n, sep)]
                if placeholder:
                    stats["placeholders"] += 1
                    if final != "denied":
                        violations.append(f"{ctx}: placeholder upstream but audit outcome {final!r}")
                    client = _folder(rows[-1]["folder"])
                    if is_placeholder(named, sep):
                        if client is None:
                            violations.append(f"{ctx}: denied row without the client's folder name")
                        elif _segments(client, sep) != _segments(named, sep):
                            violations.append(f"{ctx}: placeholder {named!r} does not replace each segment of "
                                              f"{client!r}")
                    for r in rows:
                        if r["folder"] and "pecgate-none" in r["folder"]:
                            violations.append(f"{ctx}: the audit row names the placeholder, not the client's name")
                else:
                    if final == "denied":
                        violations.append(f"{ctx}: audit outcome denied, yet sent under the real name")
                    for r in rows:
                        if not _same_folder(_folder(r["folder"]), _folder(named)):
                            violations.append(f"{ctx}: audit folder {r['folder']!r}, the command names {named!r}")
                for n in names:
                    if is_placeholder(n, sep):
                        continue
                    check = n
                    if cmd.name == "CREATE" and check.endswith(sep.encode()):
                        check = check[:-len(sep)]
                    if not is_granted(patterns, check, sep):
                        violations.append(f"{ctx}: folder {n!r} reached the provider, but {user} is not granted it")
            else:
                for r in rows:
                    if not _same_folder(_folder(r["folder"]), selected):
                        violations.append(f"{ctx}: audit folder {r['folder']!r}, the provider had "
                                          f"{selected!r} selected")
                        break
            placeholder_cmd = any(is_placeholder(n, sep) for n in names)

            # permissions on what reached the provider
            def need(*wanted):
                missing = [p for p in wanted if p not in perms]
                if missing and not placeholder_cmd:
                    violations.append(f"{ctx}: reached the provider although {user} lacks {missing}")

            base = cmd.name.removeprefix("UID ")
            if base == "STORE":
                need("flag")
                if _store_needs_delete(cmd):
                    need("delete")
            elif base == "EXPUNGE" or cmd.name == "CLOSE":
                need("delete")
            elif base == "COPY":
                need("move")
            elif base == "MOVE":
                need("move", "delete")
            elif base == "APPEND":
                need("append")
            elif cmd.name in ("CREATE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE"):
                need("manage_folders")
            elif cmd.name == "DELETE":
                need("manage_folders", "delete")
            elif base == "FETCH" and "flag" not in perms and _fetch_sets_seen(cmd):
                violations.append(f"{ctx}: FETCH that sets \\Seen sent for {user} who lacks flag")
            if base in ("SELECT", "EXAMINE", "FETCH", "SEARCH", "STATUS") and "read" not in perms:
                need("read")

            # selection state after this command
            if cmd.name in ("SELECT", "EXAMINE"):
                if result == "OK":
                    selected = _folder(cmd.args[0].value)
                elif result == "NO":
                    selected = None
                elif result is None:
                    selected = "<unknown>"
            elif cmd.name in ("CLOSE", "UNSELECT") and result == "OK":
                selected = None
        if session is not None:
            stats.setdefault("sessions", set()).add(session)

    # Reverse: every audited upstream tag of these sessions reached the provider, unless the
    # session ended before (outcome error / no final row).
    wanted_sessions = sessions if sessions is not None else set(session_of_conn.values())
    for tag, rows in by_tag.items():
        if rows[0]["session"] not in wanted_sessions or tag in seen_tags:
            continue
        outcomes = [r["outcome"] for r in rows]
        if outcomes[-1] not in ("error", "sent"):
            violations.append(f"audit rows for upstream={tag} ({rows[0]['command']} {rows[0]['folder']!r}, "
                              f"outcomes {outcomes}) but the provider never received {tag}")
    return violations, stats
