"""Folder visibility and permissions (issue 3), end to end, as a matrix.

A private Dovecot holds a mailbox with visible, hidden and nested folders; one pecgate in
front of it has four roles with different patterns (`*`, `**`, a deep literal path whose
parents show as `\\Noselect`, non-ASCII and `&` names) and one user per role. The tests:

* the folder tree each user sees (LIST "" "*", LIST "" "%", LSUB both ways) is exactly the
  granted set with the expected attributes, and does not change when hidden folders come and go;
* every command that names a mailbox answers a hidden folder exactly as a nonexistent one
  (tag, Dovecot's timing suffix and the name itself normalised), and nothing changes at Dovecot;
* name tricks (case, non-canonical modified UTF-7, raw UTF-8, delimiters, `..`, wildcards,
  literals, re-rooting LIST references) never reach a hidden folder;
* permissions are refused (`NO [NOPERM]` naming the permission) and allowed per role, and every
  denial is audited as `denied` under the right user;
* two users side by side see different trees.

Every test runs on two provider layouts (the module's `world` fixture, ids `default` and
`aruba`): Dovecot's default one (`/`, folders at the root) and the Aruba PEC one (`.`, every
folder under `INBOX.`). The tables below are written for the default layout in the tests' own
`/`-separated names; `Matrix` translates them for a layout (provider names such as
`INBOX.Ricevute.Consegne`, role patterns such as `INBOX/Ricevute/*`), and the few things that
differ in substance (the trees, where INBOX is the parent of everything; LIST tricks) are
written out for the Aruba layout.

Helpers here (world set-up, raw sessions, Dovecot snapshots, modified UTF-7) are reused by
test_policy_fuzz.py.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import re
import secrets
import threading

import pytest

from harness import PROVIDER_ADDRESS, Dovecot, Pecgate, RawImap, make_message, quote, wait_until

# ---------------------------------------------------------------------------
# modified UTF-7
# ---------------------------------------------------------------------------


def mutf7_encode(text: str) -> str:
    """Canonical modified UTF-7 (RFC 3501 5.1.3)."""
    out, pending = [], []

    def flush():
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


_B64_RUN = re.compile(r"&([A-Za-z0-9+,]*)-")


def mutf7_decode_lenient(text: str) -> str:
    """Decode every `&...-` run, canonical or not (what a lax server would read)."""

    def one(m):
        if not m.group(1):
            return "&"
        b64 = m.group(1).replace(",", "/")
        b64 += "=" * (-len(b64) % 4)
        try:
            raw = base64.b64decode(b64)
        except Exception:  # noqa: BLE001 - not base64: leave as is
            return m.group(0)
        return raw[: len(raw) // 2 * 2].decode("utf-16-be", "replace")

    return _B64_RUN.sub(one, text)


def display(wire: str) -> str:
    """The name as Dovecot prints it in a message (decoded)."""
    return mutf7_decode_lenient(wire)


# ---------------------------------------------------------------------------
# the mailbox and the roles
# ---------------------------------------------------------------------------

# Wire names (modified UTF-7). Archivio and Archivio/2026 exist only as parents.
FOLDERS = [
    "INBOX/Personale", "Sent", "Ricevute", "Ricevute/Consegne", "Ricevute/Consegne/2026",
    "Riservata", "Riservata/Legale", "Archivio/2026/Legale", "Riservat&AOA-", "R&-D",
]
MAILBOXES = ["INBOX"] + FOLDERS
VIRTUAL_PARENTS = ["Archivio", "Archivio/2026"]
EVERY_NAME = MAILBOXES + VIRTUAL_PARENTS
MESSAGES_PER_FOLDER = 2

WITHOUT_SEND = ["read", "flag", "delete", "move", "append", "manage_folders"]
ROLES = {
    "front": {"mailboxes": ["studio"], "folders": ["INBOX", "Ricevute/*"],
              "permissions": ["read", "flag"]},
    "legal": {"mailboxes": ["studio"],
              "folders": ["Riservata/**", "Archivio/2026/Legale", "Riservat\u00e0", "R&D"],
              "permissions": WITHOUT_SEND},
    "ops": {"mailboxes": ["studio"], "folders": ["INBOX", "INBOX/Nuova", "Sent", "*/Consegne/**"],
            "permissions": ["read", "move", "append", "manage_folders"]},
    "upload": {"mailboxes": ["studio"], "folders": ["Sent"], "permissions": ["append"]},
}
USER_ROLE = {"franca": "front", "lucia": "legal", "oscar": "ops", "ugo": "upload"}

# Existing folders each user is granted (everything else that exists is not).
GRANTED = {
    "franca": {"INBOX", "Ricevute/Consegne"},
    "lucia": {"Riservata", "Riservata/Legale", "Archivio/2026/Legale", "Riservat&AOA-", "R&-D"},
    "oscar": {"INBOX", "Sent", "Ricevute/Consegne", "Ricevute/Consegne/2026"},
    "ugo": {"Sent"},
}
# Granted names that do not exist (the provider's own "nonexistent" answer), each with a
# fully granted subtree so DELETE/RENAME reach the provider too.
GRANTED_NONEXISTENT = {
    "franca": ["Ricevute/Inesistente"],
    "lucia": ["Riservata/Inesistente", "Riservata/Legale/Caf&AOk-"],
    "oscar": ["Ricevute/Consegne/Inesistente", "Riservata/Consegne"],
    "ugo": [],
}
# A granted folder with messages (COPY/MOVE source), a granted existing folder with a fully
# granted subtree (RENAME source) and a granted new name (RENAME target).
COPY_SOURCE = {"franca": "INBOX", "lucia": "Riservata/Legale", "oscar": "Ricevute/Consegne/2026",
               "ugo": "Sent"}
RENAME_SOURCE = {"franca": "Ricevute/Consegne", "lucia": "Riservata/Legale",
                 "oscar": "Ricevute/Consegne/2026", "ugo": "Sent"}
RENAME_TARGET = {"franca": "Ricevute/Nuova", "lucia": "Riservata/Nuova",
                 "oscar": "Ricevute/Consegne/Nuova", "ugo": "Sent/Nuova"}

H = "\\HasChildren"
HN = "\\HasNoChildren"
NS = "\\Noselect"

# What each user must see. ops: `*/Consegne/**` may grant something below every top-level
# folder, but only Ricevute really is the parent of a granted folder; INBOX's only child is
# hidden (INBOX/Nuova does not exist), so INBOX has no children as far as oscar can tell.
EXPECTED_TREE = {
    "franca": {
        'LIST "" "*"': {"INBOX": {HN}, "Ricevute": {NS, H}, "Ricevute/Consegne": {HN}},
        'LIST "" "%"': {"INBOX": {HN}, "Ricevute": {NS, H}},
        'LSUB "" "*"': {"INBOX": set(), "Ricevute": {NS}, "Ricevute/Consegne": set()},
        'LSUB "" "%"': {"INBOX": set(), "Ricevute": {NS}},
    },
    "lucia": {
        'LIST "" "*"': {"Riservata": {H}, "Riservata/Legale": {HN}, "Archivio": {NS, H},
                        "Archivio/2026": {NS, H}, "Archivio/2026/Legale": {HN},
                        "Riservat&AOA-": {HN}, "R&-D": {HN}},
        'LIST "" "%"': {"Riservata": {H}, "Archivio": {NS, H}, "Riservat&AOA-": {HN}, "R&-D": {HN}},
        'LSUB "" "*"': {"Riservata": set(), "Riservata/Legale": set(), "Archivio/2026/Legale": set(),
                        "Riservat&AOA-": set(), "R&-D": set()},
        'LSUB "" "%"': {"Riservata": set(), "Archivio": {NS}, "Riservat&AOA-": set(), "R&-D": set()},
    },
    "oscar": {
        'LIST "" "*"': {"INBOX": {HN}, "Sent": {HN, "\\Sent"}, "Ricevute": {NS, H},
                        "Ricevute/Consegne": {H}, "Ricevute/Consegne/2026": {HN}},
        'LIST "" "%"': {"INBOX": {HN}, "Sent": {HN, "\\Sent"}, "Ricevute": {NS, H}},
        'LSUB "" "*"': {"INBOX": set(), "Sent": {"\\Sent"}, "Ricevute": {NS},
                        "Ricevute/Consegne": set(), "Ricevute/Consegne/2026": set()},
        'LSUB "" "%"': {"INBOX": set(), "Sent": {"\\Sent"}, "Ricevute": {NS}},
    },
    "ugo": {
        'LIST "" "*"': {"Sent": {HN, "\\Sent"}},
        'LIST "" "%"': {"Sent": {HN, "\\Sent"}},
        'LSUB "" "*"': {"Sent": {"\\Sent"}},
        'LSUB "" "%"': {"Sent": {"\\Sent"}},
    },
}

# The same on the Aruba layout. INBOX is the parent of every folder: where it is granted it
# has visible children (\HasChildren); where it is not, it is a `\Noselect` parent of the
# granted folders, and as it is subscribed at the provider LSUB lists it too (as the default
# layout's franca sees the subscribed, not granted parent Ricevute). The top level (`%`) is
# INBOX alone, so the level below it (`INBOX.%`) is checked as well: there the answers are
# the default layout's top level, translated.
EXPECTED_TREE_ARUBA = {
    "franca": {
        'LIST "" "*"': {"INBOX": {H}, "INBOX.Ricevute": {NS, H}, "INBOX.Ricevute.Consegne": {HN}},
        'LIST "" "%"': {"INBOX": {H}},
        'LIST "" "INBOX.%"': {"INBOX.Ricevute": {NS, H}},
        'LSUB "" "*"': {"INBOX": set(), "INBOX.Ricevute": {NS}, "INBOX.Ricevute.Consegne": set()},
        'LSUB "" "%"': {"INBOX": set()},
        'LSUB "" "INBOX.%"': {"INBOX.Ricevute": {NS}},
    },
    "lucia": {
        'LIST "" "*"': {"INBOX": {NS, H}, "INBOX.Riservata": {H}, "INBOX.Riservata.Legale": {HN},
                        "INBOX.Archivio": {NS, H}, "INBOX.Archivio.2026": {NS, H},
                        "INBOX.Archivio.2026.Legale": {HN}, "INBOX.Riservat&AOA-": {HN}, "INBOX.R&-D": {HN}},
        'LIST "" "%"': {"INBOX": {NS, H}},
        'LIST "" "INBOX.%"': {"INBOX.Riservata": {H}, "INBOX.Archivio": {NS, H}, "INBOX.Riservat&AOA-": {HN},
                              "INBOX.R&-D": {HN}},
        'LSUB "" "*"': {"INBOX": {NS}, "INBOX.Riservata": set(), "INBOX.Riservata.Legale": set(),
                        "INBOX.Archivio.2026.Legale": set(), "INBOX.Riservat&AOA-": set(),
                        "INBOX.R&-D": set()},
        'LSUB "" "%"': {"INBOX": {NS}},
        'LSUB "" "INBOX.%"': {"INBOX.Riservata": set(), "INBOX.Archivio": {NS}, "INBOX.Riservat&AOA-": set(),
                              "INBOX.R&-D": set()},
    },
    "oscar": {
        'LIST "" "*"': {"INBOX": {H}, "INBOX.Sent": {HN, "\\Sent"}, "INBOX.Ricevute": {NS, H},
                        "INBOX.Ricevute.Consegne": {H}, "INBOX.Ricevute.Consegne.2026": {HN}},
        'LIST "" "%"': {"INBOX": {H}},
        'LIST "" "INBOX.%"': {"INBOX.Sent": {HN, "\\Sent"}, "INBOX.Ricevute": {NS, H}},
        'LSUB "" "*"': {"INBOX": set(), "INBOX.Sent": {"\\Sent"}, "INBOX.Ricevute": {NS},
                        "INBOX.Ricevute.Consegne": set(), "INBOX.Ricevute.Consegne.2026": set()},
        'LSUB "" "%"': {"INBOX": set()},
        'LSUB "" "INBOX.%"': {"INBOX.Sent": {"\\Sent"}, "INBOX.Ricevute": {NS}},
    },
    "ugo": {
        'LIST "" "*"': {"INBOX": {NS, H}, "INBOX.Sent": {HN, "\\Sent"}},
        'LIST "" "%"': {"INBOX": {NS, H}},
        'LIST "" "INBOX.%"': {"INBOX.Sent": {HN, "\\Sent"}},
        'LSUB "" "*"': {"INBOX": {NS}, "INBOX.Sent": {"\\Sent"}},
        'LSUB "" "%"': {"INBOX": {NS}},
        'LSUB "" "INBOX.%"': {"INBOX.Sent": {"\\Sent"}},
    },
}
EXPECTED_TREES = {"default": EXPECTED_TREE, "aruba": EXPECTED_TREE_ARUBA}

# On the Aruba layout a name outside `INBOX.` can never exist: the provider answers for it
# "nonexistent namespace", not "no such mailbox". A hidden INBOX is sent upstream as such a
# name, so lucia is also granted a subtree outside `INBOX.` there: its names give the
# provider's own answer for that shape (nothing can ever be created in it, nothing shows).
ARUBA_EXTRA_PATTERNS = {"legal": ["Esterna/**"]}
ARUBA_EXTRA_GRANTED_NONEXISTENT = {"lucia": ["Esterna", "Esterna.Sotto"]}


class Matrix:
    """The tables above for one provider layout: wire names as the provider (and so the
    client) spells them, and pecgate role patterns."""

    def __init__(self, dovecot: Dovecot):
        self.dovecot = dovecot
        self.layout = dovecot.layout
        self.separator, self.prefix = dovecot.separator, dovecot.prefix
        w = self.wire
        self.folders = [w(f) for f in FOLDERS]
        self.mailboxes = [w(f) for f in MAILBOXES]
        self.every_name = [w(f) for f in EVERY_NAME]
        self.granted = {u: {w(f) for f in fs} for u, fs in GRANTED.items()}
        self.granted_nonexistent = {u: [w(f) for f in fs] for u, fs in GRANTED_NONEXISTENT.items()}
        self.copy_source = {u: w(f) for u, f in COPY_SOURCE.items()}
        self.rename_source = {u: w(f) for u, f in RENAME_SOURCE.items()}
        self.rename_target = {u: w(f) for u, f in RENAME_TARGET.items()}
        self.expected_tree = EXPECTED_TREES[self.layout]
        # Translated names may coincide (INBOX/Zeta and Zeta are both INBOX.Zeta on Aruba).
        self.new_hidden = list(dict.fromkeys(w(f) for f in NEW_HIDDEN))
        self.trick_targets = {u: (w(a), [w(t) for t in ts]) for u, (a, ts) in TRICK_TARGETS.items()}
        # Dovecot's hint for a name in no namespace: the same text whatever the name.
        self.provider_constants = (
            [f"(Mailbox name should probably be prefixed with: {self.prefix})"] if self.prefix else [])
        self.list_tricks = (
            list(dict.fromkeys(LIST_TRICKS_ARUBA + LIST_TRICKS)) if self.prefix else LIST_TRICKS)
        if self.prefix:
            for u, names in ARUBA_EXTRA_GRANTED_NONEXISTENT.items():
                self.granted_nonexistent[u] = self.granted_nonexistent[u] + names

    def wire(self, name: str) -> str:
        """The provider's name of what the tables call ``name``. A child of INBOX
        (``INBOX/Personale``) is ``INBOX.Personale`` on Aruba, like every other folder."""
        if self.prefix and name.upper().startswith("INBOX/"):
            name = name[len("INBOX/"):]
        return self.dovecot.provider_name(name)

    def pattern(self, pattern: str) -> str:
        """The pecgate pattern (always `/`-separated) of a table pattern."""
        if self.prefix and pattern.upper().startswith("INBOX/"):
            pattern = pattern[len("INBOX/"):]
        return self.dovecot.policy_pattern(pattern)

    def roles(self, roles: dict) -> dict:
        out = {}
        for name, role in roles.items():
            folders = [self.pattern(p) for p in role["folders"]]
            if self.prefix:
                folders += ARUBA_EXTRA_PATTERNS.get(name, [])
            out[name] = dict(role, folders=folders)
        return out

    def counterpart(self, wire: str) -> str:
        """A nonexistent, non-granted name of the same shape as ``wire`` (segments, non-ASCII;
        on the Aruba layout in the same namespace: a leading INBOX level stays)."""
        segs = wire.split(self.separator)
        keep = 1 if self.prefix and len(segs) > 1 and segs[0].upper() == "INBOX" else 0
        return self.separator.join(segs[:keep] + ["Zz" + seg for seg in segs[keep:]])

    def shape(self, wire: str) -> str:
        """Which kind of "nonexistent" answer the provider gives for a name: on the Aruba
        layout a name outside `INBOX.` is in no namespace."""
        if self.prefix and not wire.upper().startswith(self.prefix.upper()):
            return "outside the namespace"
        return "in the namespace"


# ---------------------------------------------------------------------------
# wire helpers
# ---------------------------------------------------------------------------

TIMING_RE = re.compile(rb"\(\d+\.\d+(?: \+ \d+\.\d+)* secs\)")
_SYNC_LITERAL = re.compile(rb"\{(\d+)\}\r\n")
_LIST_RE = re.compile(rb'^\* (LIST|LSUB) \(([^)]*)\) (?:"(?:[^"\\]|\\.)*"|NIL) (.*)$', re.S | re.I)


class CapturingImap(RawImap):
    """RawImap that keeps every byte the server sent."""

    def __init__(self, *args, **kwargs):
        self.captured = bytearray()
        super().__init__(*args, **kwargs)

    def _fill(self, deadline):
        before = len(self.buf)
        ok = super()._fill(deadline)
        self.captured += self.buf[before:]
        return ok


def send_command(r: RawImap, tag: str, body: bytes | str):
    """Send ``tag body`` honouring synchronising literals (wait for ``+`` before each
    literal's data). Returns (untagged lines, tagged line); continuation lines are not
    returned (they are in a CapturingImap's capture)."""
    if isinstance(body, str):
        body = body.encode()
    data = tag.encode() + b" " + body + b"\r\n"
    t = tag.encode() + b" "
    untagged = []
    start = search = 0
    while True:
        m = _SYNC_LITERAL.search(data, search)
        if not m:
            break
        r.send(data[start:m.end()])
        while True:
            line = r.read_line()
            if line.startswith(b"+"):
                break
            if line.startswith(t):
                return untagged, line  # the literal was refused: the command is over
            untagged.append(line)
        start = m.end()
        search = m.end() + int(m.group(1))
    r.send(data[start:])
    more, tagged = r.read_until_tagged(tag)
    return untagged + more, tagged


def parse_list_line(line: bytes):
    """(kind, attributes, wire name) of an untagged LIST/LSUB line, else None."""
    m = _LIST_RE.match(line)
    if not m:
        return None
    attrs = {a.decode() for a in m.group(2).split()}
    raw = m.group(3)
    lit = re.match(rb"^\{(\d+)\}\r\n(.*)$", raw, re.S)
    if lit:
        name = lit.group(2)
    elif raw.startswith(b'"'):
        name = re.sub(rb'\\(.)', rb"\1", raw[1:-1])
    else:
        name = raw
    return m.group(1).decode().upper(), attrs, name.decode("utf-8", "replace")


def tree_of(untagged) -> dict:
    """{name: attributes} from untagged LIST/LSUB lines (attributes compared
    case-insensitively, as canonical spellings)."""
    canon = {a.lower(): a for a in ("\\HasChildren", "\\HasNoChildren", "\\Noselect", "\\Sent",
                                    "\\NonExistent", "\\Marked", "\\Unmarked", "\\Subscribed")}
    out = {}
    for line in untagged:
        parsed = parse_list_line(line)
        if parsed is None:
            continue
        _, attrs, name = parsed
        if name in out:
            raise AssertionError(f"{name!r} listed twice")
        out[name] = {canon.get(a.lower(), a) for a in attrs}
    return out


def status_word(tagged: bytes) -> str:
    parts = tagged.split(b" ", 2)
    return parts[1].decode().upper() if len(parts) > 1 else ""


def normalise(lines, tag: str, names, constants=()) -> tuple:
    """Responses with the tag, Dovecot's timing suffix and the given names replaced;
    ``constants``: texts the provider prints whatever the name (left as they are even if a
    name occurs in them)."""
    out = []
    for line in lines:
        if line.startswith(tag.encode() + b" "):
            line = b"<TAG> " + line[len(tag) + 1:]
        line = TIMING_RE.sub(b"(<TIME>)", line)
        text = line.decode("utf-8", "replace")
        for i, c in enumerate(constants):
            text = text.replace(c, f"\0{i}\0")
        for n in sorted(set(names), key=len, reverse=True):
            text = text.replace(n, "<NAME>")
        for i, c in enumerate(constants):
            text = text.replace(f"\0{i}\0", c)
        out.append(text)
    return tuple(out)


# ---------------------------------------------------------------------------
# Dovecot-side view
# ---------------------------------------------------------------------------


def direct(dovecot: Dovecot) -> RawImap:
    r = RawImap(dovecot.imaps_port, cafile=dovecot.cert)
    r.login(PROVIDER_ADDRESS, dovecot.users[PROVIDER_ADDRESS])
    return r


def direct_ok(r: RawImap, tag: str, body: str):
    untagged, tagged = send_command(r, tag, body)
    if status_word(tagged) != "OK":
        raise AssertionError(f"direct Dovecot command {body!r} failed: {tagged!r}")
    return untagged


_FETCH_RE = re.compile(rb"^\* \d+ FETCH \((.*)\)$", re.S)


def snapshot(dovecot: Dovecot) -> dict:
    """Everything a policy test could disturb, read directly at Dovecot: the folders and
    their attributes, the subscriptions, and every message (UID, flags but \\Recent,
    subject)."""
    with direct(dovecot) as r:
        folders = tree_of(direct_ok(r, "s1", 'LIST "" "*"'))
        subscribed = set(tree_of(direct_ok(r, "s2", 'LSUB "" "*"')))
        messages = {}
        for i, (name, attrs) in enumerate(sorted(folders.items())):
            if {"\\Noselect", "\\NonExistent"} & attrs:
                continue
            if status_word(send_command(r, f"e{i}", f"EXAMINE {quote(name)}")[1]) != "OK":
                messages[name] = None  # listed but not selectable (e.g. a deleted parent)
                continue
            msgs = []
            for line in direct_ok(r, f"f{i}", "UID FETCH 1:* (UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"):
                m = _FETCH_RE.match(line)
                if not m:
                    continue
                body = m.group(1)
                uid = int(re.search(rb"UID (\d+)", body).group(1))
                flags = re.search(rb"FLAGS \(([^)]*)\)", body).group(1).split()
                flags = sorted(f.decode() for f in flags if f.lower() != b"\\recent")
                subj = re.search(rb"Subject: ([^\r\n]*)", body)
                msgs.append((uid, tuple(flags), subj.group(1).decode() if subj else ""))
            messages[name] = sorted(msgs)
        send_command(r, "z", "LOGOUT")
    return {"folders": folders, "subscribed": subscribed, "messages": messages}


def diff_snapshots(before: dict, after: dict) -> list[str]:
    out = []
    for name in sorted(set(before["folders"]) | set(after["folders"])):
        if before["folders"].get(name) != after["folders"].get(name):
            out.append(f"folder {name!r}: {before['folders'].get(name)} -> {after['folders'].get(name)}")
    for name in sorted(before["subscribed"] ^ after["subscribed"]):
        out.append(f"subscription of {name!r}: {name in before['subscribed']} -> {name in after['subscribed']}")
    for name in sorted(set(before["messages"]) | set(after["messages"])):
        if before["messages"].get(name) != after["messages"].get(name):
            out.append(f"messages of {name!r}: {before['messages'].get(name)} -> {after['messages'].get(name)}")
    return out


def subject_for(folder_wire: str, i: int) -> str:
    return f"Messaggio {i} di {display(folder_wire)}"


def populate(dovecot: Dovecot, matrix: Matrix | None = None):
    matrix = matrix or Matrix(dovecot)
    with direct(dovecot) as r:
        for i, f in enumerate(matrix.folders):
            direct_ok(r, f"c{i}", f"CREATE {quote(f)}")
        for i, f in enumerate(matrix.mailboxes):
            direct_ok(r, f"u{i}", f"SUBSCRIBE {quote(f)}")
        for f in matrix.mailboxes:
            for i in range(1, MESSAGES_PER_FOLDER + 1):
                msg = make_message(subject_for(f, i))
                direct_ok(r, "a", f"APPEND {quote(f)} {{{len(msg)}+}}\r\n".encode() + msg)
        send_command(r, "z", "LOGOUT")


class World:
    """A private Dovecot with the policy mailbox and one pecgate with the four roles.

    ``layout``: the Dovecot's layout (``Dovecot(layout=...)``); ``matrix`` has the tables
    for it, and ``roles`` (written in the tables' names) are translated with it."""

    def __init__(self, binary, users_roles=USER_ROLE, roles=ROLES, layout: str = "default"):
        self.dovecot = Dovecot(layout=layout)
        self.layout = layout
        self.matrix = Matrix(self.dovecot)
        self.dovecot.add_user(PROVIDER_ADDRESS, "provider-" + secrets.token_hex(8))
        self.passwords = {u: f"{u}-{secrets.token_hex(6)}" for u in users_roles}
        self.gw = None
        self.dovecot.start()
        try:
            populate(self.dovecot, self.matrix)
            users = {u: {"password": self.passwords[u], "roles": [role]} for u, role in users_roles.items()}
            self.gw = Pecgate(self.dovecot, users=users, roles=self.matrix.roles(roles), binary=binary)
            self.gw.setup()
            self.gw.start()
        except BaseException:
            self.close()
            raise

    def wire(self, name: str) -> str:
        """The provider's (and the client's) name of a folder the tables call ``name``."""
        return self.matrix.wire(name)

    def session(self, user: str, timeout: float = 15) -> CapturingImap:
        r = CapturingImap(self.gw.tls_port, tls=True, cafile=self.gw.cert, timeout=timeout)
        r.login(user, self.passwords[user])
        return r

    def snapshot(self) -> dict:
        return snapshot(self.dovecot)

    def denied_rows(self, user: str, after_id: int) -> list[dict]:
        return self.gw.audit_rows("id > ? AND user = ? AND outcome = 'denied'", (after_id, user))

    def audit_mark(self) -> int:
        return max([r["id"] for r in self.gw.audit_rows()] or [0])

    def close(self):
        if self.gw is not None:
            self.gw.cleanup()
        self.dovecot.cleanup()


def wait_for_denials(world: World, user: str, mark: int, expected: list[tuple[str, str | None]]):
    """Wait until the audit log holds a `denied` row under ``user`` for every (command,
    folder) in ``expected`` (as a multiset; folder None: any). Returns the rows."""

    def missing():
        rows = world.denied_rows(user, mark)
        have = collections.Counter((r["command"], r["folder"]) for r in rows)
        miss = []
        for command, folder in expected:
            if folder is None:
                key = next((k for k in have if k[0] == command and have[k] > 0), None)
            else:
                key = (command, folder) if have[(command, folder)] > 0 else None
            if key is None:
                miss.append((command, folder))
            else:
                have[key] -= 1
        return miss, rows

    try:
        wait_until(lambda: not missing()[0], 10, "denied audit rows")
    except TimeoutError:
        miss, rows = missing()
        raise AssertionError(
            f"no `denied` audit row under {user!r} for {miss}; denied rows seen: "
            f"{[(r['command'], r['folder']) for r in rows]}") from None
    return missing()[1]


@contextlib.contextmanager
def unchanged_at_dovecot(world: World, what: str):
    before = world.snapshot()
    yield before
    diff = diff_snapshots(before, world.snapshot())
    assert not diff, f"{what} changed the mailbox at Dovecot:\n  " + "\n  ".join(diff)


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["default", "aruba"])
def world(request, pecgate_binary):
    w = World(pecgate_binary, layout=request.param)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def sessions(world):
    opened = []

    def open_session(user):
        s = world.session(user)
        opened.append(s)
        return s

    yield open_session
    for s in opened:
        with contextlib.suppress(Exception):
            send_command(s, "zz", "LOGOUT")
        s.close()


# ---------------------------------------------------------------------------
# 1. the tree each role sees
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("user", sorted(USER_ROLE))
def test_each_role_sees_exactly_its_tree(world, sessions, user):
    s = sessions(user)
    problems = []
    for i, (command, expected) in enumerate(world.matrix.expected_tree[user].items()):
        untagged, tagged = send_command(s, f"t{i}", command)
        assert status_word(tagged) == "OK", (command, tagged)
        got = tree_of(untagged)
        if got != expected:
            extra = {n: got[n] for n in sorted(set(got) - set(expected))}
            missing = {n: expected[n] for n in sorted(set(expected) - set(got))}
            wrong = {n: (got[n], expected[n]) for n in sorted(set(got) & set(expected)) if got[n] != expected[n]}
            problems.append(f"{command}: shown but hidden={extra} missing={missing} "
                            f"wrong attributes (got, want)={wrong}")
    assert not problems, f"{user} ({USER_ROLE[user]}): " + "\n".join(problems)


# New folders hidden from every user (and their subscriptions): creating them at the
# provider must not change anything any user sees. (On the Aruba layout Zeta and INBOX/Zeta
# are the same folder, INBOX.Zeta.)
NEW_HIDDEN = ["Zeta", "Zeta/Sotto", "INBOX/Zeta", "Sent/Zeta", "Archivio/2025", "Riservat&AOA-/Zeta"]


def _views(world, user, tag):
    s = world.session(user)
    try:
        return {cmd: send_command(s, f"{tag}{i}", cmd)[0]
                for i, cmd in enumerate(world.matrix.expected_tree[user])}
    finally:
        send_command(s, "zz", "LOGOUT")
        s.close()


def test_hidden_folders_coming_and_going_change_no_users_view(world):
    before = {u: _views(world, u, "b") for u in USER_ROLE}
    with direct(world.dovecot) as r:
        for i, f in enumerate(world.matrix.new_hidden):
            direct_ok(r, f"c{i}", f"CREATE {quote(f)}")
            direct_ok(r, f"s{i}", f"SUBSCRIBE {quote(f)}")
    try:
        after = {u: _views(world, u, "a") for u in USER_ROLE}
    finally:
        with direct(world.dovecot) as r:
            for i, f in enumerate(reversed(world.matrix.new_hidden)):
                send_command(r, f"u{i}", f"UNSUBSCRIBE {quote(f)}")
                send_command(r, f"d{i}", f"DELETE {quote(f)}")
    problems = []
    for u in USER_ROLE:
        for cmd in world.matrix.expected_tree[u]:
            b, a = set(before[u][cmd]), set(after[u][cmd])
            if a != b:
                problems.append(f"{u} {cmd}: appeared {sorted(a - b)} vanished {sorted(b - a)}")
    assert not problems, "hidden folders are detectable:\n" + "\n".join(problems)


# (folders unsubscribed besides INBOX, the expected answers whether the hidden child is
# subscribed or not). On the Aruba layout INBOX is also the parent of Ricevute, subscribed
# and visible to franca (so INBOX is listed as a `\Noselect` parent either way); with
# Ricevute's subtree unsubscribed too, INBOX's only subscribed descendant is the hidden one,
# as on the default layout.
LSUB_PERCENT_CASES = {
    "default": [((), {'LSUB "" "%"': {"Ricevute": {NS}}})],
    "aruba": [((), {'LSUB "" "%"': {"INBOX": {NS}}, 'LSUB "" "INBOX.%"': {"INBOX.Ricevute": {NS}}}),
              (("INBOX.Ricevute", "INBOX.Ricevute.Consegne"),
               {'LSUB "" "%"': {}, 'LSUB "" "INBOX.%"': {}})],
}


def test_lsub_percent_does_not_reveal_a_hidden_subscribed_child(world, sessions):
    """INBOX unsubscribed: whether its hidden child INBOX/Personale is subscribed must not
    show in franca's LSUB "" "%" (Dovecot marks such a parent `\\Noselect`)."""
    child = world.wire("INBOX/Personale")
    for also_unsubscribed, expected in LSUB_PERCENT_CASES[world.layout]:
        views = {}
        with direct(world.dovecot) as r:
            direct_ok(r, "u1", "UNSUBSCRIBE INBOX")
            for i, f in enumerate(also_unsubscribed):
                direct_ok(r, f"v{i}", f"UNSUBSCRIBE {quote(f)}")
        try:
            for state in ("child subscribed", "child unsubscribed"):
                if state == "child unsubscribed":
                    with direct(world.dovecot) as r:
                        direct_ok(r, "u2", f"UNSUBSCRIBE {quote(child)}")
                s = sessions("franca")
                views[state] = {cmd: tree_of(send_command(s, f"l{i}", cmd)[0])
                                for i, cmd in enumerate(expected)}
        finally:
            with direct(world.dovecot) as r:
                direct_ok(r, "r1", "SUBSCRIBE INBOX")
                direct_ok(r, "r2", f"SUBSCRIBE {quote(child)}")
                for i, f in enumerate(also_unsubscribed):
                    direct_ok(r, f"w{i}", f"SUBSCRIBE {quote(f)}")
        assert views["child subscribed"] == views["child unsubscribed"], (also_unsubscribed, views)
        assert views["child unsubscribed"] == expected, (also_unsubscribed, views)


# ---------------------------------------------------------------------------
# 2. every command naming a hidden folder answers as for a nonexistent one
# ---------------------------------------------------------------------------


def names_of(wire: str) -> set[str]:
    return {wire, display(wire)}


APPEND_PROBE = make_message("matrix append probe", "non deve arrivare da nessuna parte")


def command_templates(matrix: Matrix, user: str):
    """(label, needs a selected source, may use a granted nonexistent name, builder)."""
    src = matrix.copy_source[user]
    rename_source, rename_target = matrix.rename_source[user], matrix.rename_target[user]
    return [
        ("SELECT", False, True, lambda m: f"SELECT {quote(m)}"),
        ("EXAMINE", False, True, lambda m: f"EXAMINE {quote(m)}"),
        ("STATUS", False, True, lambda m: f"STATUS {quote(m)} (MESSAGES UIDNEXT UNSEEN)"),
        ("CREATE", False, False, lambda m: f"CREATE {quote(m)}"),
        ("DELETE", False, True, lambda m: f"DELETE {quote(m)}"),
        ("RENAME source", False, True, lambda m: f"RENAME {quote(m)} {quote(rename_target)}"),
        ("RENAME target", False, False, lambda m: f"RENAME {quote(rename_source)} {quote(m)}"),
        ("SUBSCRIBE", False, True, lambda m: f"SUBSCRIBE {quote(m)}"),
        ("UNSUBSCRIBE", False, True, lambda m: f"UNSUBSCRIBE {quote(m)}"),
        ("APPEND", False, True,
         lambda m: f"APPEND {quote(m)} (\\Seen) {{{len(APPEND_PROBE)}+}}\r\n".encode() + APPEND_PROBE),
        ("APPEND sync", False, True,
         lambda m: f"APPEND {quote(m)} {{{len(APPEND_PROBE)}}}\r\n".encode() + APPEND_PROBE),
        ("COPY", src, True, lambda m: f"COPY 1 {quote(m)}"),
        ("UID COPY", src, True, lambda m: f"UID COPY 1:* {quote(m)}"),
        ("MOVE", src, True, lambda m: f"MOVE 1 {quote(m)}"),
        ("UID MOVE", src, True, lambda m: f"UID MOVE 1:* {quote(m)}"),
    ]


AUDIT_COMMAND = {"RENAME source": "RENAME", "RENAME target": "RENAME", "APPEND sync": "APPEND"}


@pytest.mark.parametrize("user", sorted(USER_ROLE))
def test_hidden_folder_answers_exactly_like_a_nonexistent_one(world, sessions, user):
    """Per command, every hidden name, its nonexistent counterpart and every granted
    nonexistent name (the provider's own answer) get one answer. On the Aruba layout the
    provider itself has two answers for a nonexistent name, by shape (under `INBOX.`, or in
    no namespace, as INBOX alone is sent when hidden): one answer per shape there. lucia, who
    cannot see INBOX, has granted nonexistent names of both shapes (ARUBA_EXTRA_PATTERNS)."""
    m = world.matrix
    hidden = sorted(set(m.every_name) - m.granted[user])
    mark = world.audit_mark()
    expected_denials = []
    problems = []
    with unchanged_at_dovecot(world, f"commands on hidden/nonexistent folders as {user}"):
        s = sessions(user)
        n = 0
        for label, source, granted_ok, build in command_templates(m, user):
            cases = [(h, "hidden") for h in hidden] + [(m.counterpart(h), "nonexistent") for h in hidden]
            if granted_ok:
                cases += [(g, "granted, nonexistent") for g in m.granted_nonexistent[user]]
            groups = collections.defaultdict(lambda: collections.defaultdict(list))
            for name, kind in cases:
                if source:
                    n += 1
                    send_command(s, f"p{n}", f"SELECT {quote(source)}")
                n += 1
                tag = f"m{n}"
                untagged, tagged = send_command(s, tag, build(name))
                answer = normalise(untagged + [tagged], tag, names_of(name), m.provider_constants)
                groups[m.shape(name)][answer].append(f"{kind} {name}")
                if kind == "hidden":
                    folder = m.rename_source[user] if label == "RENAME target" else name
                    expected_denials.append((AUDIT_COMMAND.get(label, label), folder))
                    if label != "UNSUBSCRIBE" and status_word(tagged) == "OK":
                        problems.append(f"{label} on hidden {name!r} succeeded: {tagged!r}")
            for shape, answers in groups.items():
                if len(answers) != 1:
                    shown = "\n    ".join(f"{resp} <- {who}" for resp, who in answers.items())
                    problems.append(f"{label} ({shape}): {len(answers)} different answers:\n    {shown}")
        send_command(s, "zz", "LOGOUT")
    assert not problems, f"{user} ({USER_ROLE[user]}, {world.layout}):\n" + "\n".join(problems)
    wait_for_denials(world, user, mark, expected_denials)


# ---------------------------------------------------------------------------
# 3. name tricks
# ---------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-16-be")).decode().rstrip("=").replace("/", ",")


def trick_names(target: str, anchor: str, sep: str = "/", prefix: str = "") -> list[bytes]:
    """Mailbox arguments (as sent on the wire) that try to reach hidden ``target`` (wire
    name) from a user who can see ``anchor`` (a granted path). ``sep``: the hierarchy
    delimiter the tricks use; ``prefix``: the provider's namespace prefix (``INBOX.`` on the
    Aruba layout), kept in front of the partial names and also tricked itself."""
    text = display(target)
    anchor_depth = len(anchor.split(sep))
    other = "." if sep == "/" else "/"
    in_prefix = bool(prefix) and target.startswith(prefix)
    head = target[:len(prefix) + 3] if in_prefix else target[:3]
    out = [
        target.lower(), target.upper(), target.swapcase(), quote(target.capitalize()),
        target + sep, sep + target, "." + sep + target, target + sep + ".", target + sep + "." + sep,
        f"{anchor}{sep}..{sep}" + target, f"{anchor}{sep}" + f"..{sep}" * anchor_depth + target,
        f"{anchor}{sep}{sep}" + target, f"INBOX{sep}..{sep}{target}", f"inbox{sep}..{sep}{target}",
        target.replace(sep, sep * 2), target.replace(sep, f"{sep}.{sep}"), target.replace(sep, other),
        target + f"{sep}x{sep}..", "%", "*", head + "*", head + "%", "*" + target[-3:],
    ]
    # Non-canonical modified UTF-7: the first letter in base64, and the whole name.
    out.append("&" + _b64(text[0]) + "-" + mutf7_encode(text[1:]))
    out.append("&" + _b64(text) + "-")
    if prefix:
        # The namespace level repeated (the provider reads `INBOX.INBOX` as INBOX itself).
        out += [prefix + target, prefix.lower() + target, prefix + target.lower()]
    if in_prefix:
        # The same, on the name below the prefix.
        rest = text[len(prefix):]
        out.append(prefix + "&" + _b64(rest[0]) + "-" + mutf7_encode(rest[1:]))
        out.append(prefix + "&" + _b64(rest) + "-")
    if any(ord(c) > 0x7E for c in text):
        # Non-canonical runs: stray zero bits (decodes with a NUL), no closing `-`.
        out.append(target.replace("&AOA-", "&AOAAAA-"))
        out.append(target.replace("&AOA-", "&AOA"))
    quoted = [quote(x).encode() for x in out]
    # Raw UTF-8 (quoted, atom, literal) and literals of the canonical name.
    raw = text.encode()
    quoted += [
        target.encode(),  # atom
        b'"' + raw + b'"',
        raw,
        b"{%d}\r\n" % len(raw) + raw,
        b"{%d+}\r\n" % len(raw) + raw,
        b"{%d}\r\n" % len(target) + target.encode(),
        b"{%d+}\r\n" % len(target.lower()) + target.lower().encode(),
    ]
    return list(dict.fromkeys(quoted))


TRICK_TARGETS = {
    # user: (anchor, hidden targets)
    "franca": ("Ricevute/Consegne", ["Riservata", "Riservata/Legale", "INBOX/Personale",
                                     "Ricevute/Consegne/2026", "Riservat&AOA-", "R&-D", "Sent"]),
    "lucia": ("Riservata/Legale", ["INBOX", "Ricevute", "Ricevute/Consegne", "Sent", "INBOX/Personale"]),
}


def tricks_for(matrix: Matrix, target: str, anchor: str) -> list[bytes]:
    """``trick_names`` for the layout: on the Aruba one, with its own delimiter and prefix
    and with the default layout's `/` (the wrong delimiter there)."""
    if not matrix.prefix:
        return trick_names(target, anchor)
    return list(dict.fromkeys(trick_names(target, anchor, matrix.separator, matrix.prefix)
                              + trick_names(target, anchor)))


def _hidden_subjects(matrix: Matrix, user):
    hidden = set(matrix.mailboxes) - matrix.granted[user]
    return {subject_for(f, i).encode() for f in hidden for i in range(1, MESSAGES_PER_FOLDER + 1)}


@pytest.mark.parametrize("user", sorted(TRICK_TARGETS))
def test_name_tricks_never_open_a_hidden_folder(world, sessions, user):
    anchor, targets = world.matrix.trick_targets[user]
    secrets_ = _hidden_subjects(world.matrix, user)
    preso = quote(world.wire("Riservata/Preso")).encode()
    problems = []
    with unchanged_at_dovecot(world, f"name tricks as {user}"):
        s = sessions(user)
        n = 0
        for target in targets:
            for name in tricks_for(world.matrix, target, anchor):
                for verb in ("SELECT", "EXAMINE"):
                    n += 1
                    untagged, tagged = send_command(s, f"s{n}", verb.encode() + b" " + name)
                    if status_word(tagged) == "OK":
                        problems.append(f"{verb} {name!r} opened something: {tagged!r}")
                    # Not peeking: had a hidden folder been opened read-write, \Seen would
                    # be set on its messages, which the snapshot would show.
                    n += 1
                    fu, ft = send_command(s, f"f{n}", "FETCH 1:* (FLAGS BODY[])")
                    if status_word(ft) == "OK" or any(b"FETCH" in line for line in fu):
                        problems.append(f"FETCH after {verb} {name!r} answered {ft!r} {fu[:2]!r}")
                n += 1
                untagged, tagged = send_command(s, f"t{n}", b"STATUS " + name + b" (MESSAGES UNSEEN)")
                if status_word(tagged) == "OK" or untagged:
                    problems.append(f"STATUS {name!r}: {untagged!r} {tagged!r}")
                if USER_ROLE[user] == "legal":
                    # Every folder-changing command too: nothing may change at Dovecot.
                    for body in (b"DELETE " + name, b"RENAME " + name + b" " + preso,
                                 b"SUBSCRIBE " + name, b"UNSUBSCRIBE " + name,
                                 b"CREATE " + name):
                        n += 1
                        _, tagged = send_command(s, f"w{n}", body)
                        if status_word(tagged) == "OK" and not body.startswith(b"UNSUBSCRIBE"):
                            problems.append(f"{body!r} succeeded: {tagged!r}")
                    n += 1
                    _, tagged = send_command(
                        s, f"a{n}", b"APPEND " + name + b" {%d+}\r\n" % len(APPEND_PROBE) + APPEND_PROBE)
                    if status_word(tagged) == "OK":
                        problems.append(f"APPEND {name!r} succeeded: {tagged!r}")
                    for verb in (b"COPY 1 ", b"UID MOVE 1:* "):
                        n += 1
                        send_command(s, f"p{n}", f"SELECT {quote(anchor)}")
                        n += 1
                        _, tagged = send_command(s, f"c{n}", verb + name)
                        if status_word(tagged) == "OK":
                            problems.append(f"{verb + name!r} succeeded: {tagged!r}")
                    n += 1
                    send_command(s, f"u{n}", "UNSELECT")
        leaked = [x for x in secrets_ if x in s.captured]
        send_command(s, "zz", "LOGOUT")
    assert not leaked, f"hidden messages reached {user}: {leaked}"
    assert not problems, f"{user}:\n" + "\n".join(problems)


LIST_TRICKS = [
    '"Riservata/" "*"', '"" "Riservata/*"', '"Ricevute" "../Riservata"', '"Ricevute/" "../Riservata"',
    '"" "Ricevute/../Riservata"', '"Riservata" "/Legale"', '"Riservata" "*"', '"Riservata/Legale" ""',
    '"Archivio/2026" ""', '"Riservata" ""', '"" "*Legale"', '"" "%/%"', '"" "%/%/%"', '"" "R*"',
    '"" "riservata"', '"" "RISERVATA*"', '"" "&AFI-iservata"', '"" "Riservat&AOA-"', '"" "Riservat&AOA-*"',
    '"" "R&-D"', '"" "INBOX/*"', '"" "inbox/%"', '"INBOX/" "*"', '"INBOX" "/*"', '"" "Sent"', '"" "*/Legale"',
    '"Ricevute/Consegne" "/2026"', '"Ricevute/Consegne/" "*"', '"Ricevute//" "*"', '"" "/*"',
    '"/" "*"', '"." "*"', '"" "./Riservata"', '"~" "*"', '"#mh/" "*"', '"" "Riservata/%"',
    '{0}\r\n "*"', '"" {9}\r\nRiservata', '"" {1}\r\n*', '{10}\r\nRiservata/ {1+}\r\n*',
]
# The same on the Aruba layout, one for one (a `..` segment is `..` between two `.`
# delimiters), then a few of its own (the INBOX level repeated or tricked; one level deeper).
# LIST_TRICKS run there too (no prefix, the wrong delimiter).
LIST_TRICKS_ARUBA = [
    '"INBOX.Riservata." "*"', '"" "INBOX.Riservata.*"', '"INBOX.Ricevute" "...Riservata"',
    '"INBOX.Ricevute." "...Riservata"', '"" "INBOX.Ricevute....Riservata"', '"INBOX.Riservata" ".Legale"',
    '"INBOX.Riservata" "*"', '"INBOX.Riservata.Legale" ""', '"INBOX.Archivio.2026" ""', '"INBOX.Riservata" ""',
    '"" "*Legale"', '"" "%.%"', '"" "%.%.%"', '"" "INBOX.R*"', '"" "INBOX.riservata"', '"" "INBOX.RISERVATA*"',
    '"" "INBOX.&AFI-iservata"', '"" "INBOX.Riservat&AOA-"', '"" "INBOX.Riservat&AOA-*"', '"" "INBOX.R&-D"',
    '"" "INBOX.*"', '"" "inbox.%"', '"INBOX." "*"', '"INBOX" ".*"', '"" "INBOX.Sent"', '"" "*.Legale"',
    '"INBOX.Ricevute.Consegne" ".2026"', '"INBOX.Ricevute.Consegne." "*"', '"INBOX.Ricevute.." "*"', '"" ".*"',
    '"." "*"', '"/" "*"', '"" "..INBOX.Riservata"', '"~" "*"', '"#mh." "*"', '"" "INBOX.Riservata.%"',
    '{0}\r\n "*"', '"" {15}\r\nINBOX.Riservata', '"" {1}\r\n*', '{16}\r\nINBOX.Riservata. {1+}\r\n*',
    '"" "%.%.%.%"', '"" "INBOX.INBOX.*"', '"INBOX.INBOX." "*"', '"" "INBOX.INBOX"', '"" "&AEk-NBOX.*"',
    '"" "inbox.Riservata*"', '"INBOX.Sent" ""', '"" "INBOX%"', '"" "INBOX.%.%"', '"" "INBOX..*"',
]


@pytest.mark.parametrize("command", ["LIST", "LSUB"])
def test_list_tricks_show_only_granted_names(world, sessions, command):
    """franca may see INBOX, Ricevute/Consegne and the parent Ricevute: nothing else may ever
    be listed, whatever reference, pattern or literal form is used."""
    visible = set(world.matrix.expected_tree["franca"]['LIST "" "*"'])
    s = sessions("franca")
    problems = []
    for i, args in enumerate(world.matrix.list_tricks):
        untagged, tagged = send_command(s, f"l{i}", f"{command} {args}")
        for line in untagged:
            parsed = parse_list_line(line)
            if parsed is None:
                problems.append(f"{command} {args!r}: unexpected line {line!r}")
            elif parsed[2] not in visible and parsed[2] != "":
                problems.append(f"{command} {args!r}: listed {parsed[2]!r} ({line!r})")
    # Every listed line was checked above; this catches any other untagged line.
    untagged_bytes = _untagged_only(bytes(s.captured))
    for secret in (b"Riservat", b"Legale", b"Archivio", b"Personale", b"Sent", b"R&-D", b"2026"):
        assert secret not in untagged_bytes, (secret, untagged_bytes)
    assert not problems, "\n".join(problems)


def _untagged_only(captured: bytes) -> bytes:
    """The untagged response lines of a capture (tagged lines echo no names for LIST)."""
    return b"\r\n".join(line for line in captured.split(b"\r\n") if line.startswith(b"* "))


# ---------------------------------------------------------------------------
# 4. permissions allowed and refused, with audit rows
# ---------------------------------------------------------------------------


def nope(tagged: bytes, permission: str, what: str):
    assert re.match(rb"^\S+ NO \[NOPERM\] ", tagged), f"{what}: {tagged!r}"
    assert f'"{permission}"'.encode() in tagged, f"{what}: the refusal does not name {permission!r}: {tagged!r}"


def ok(tagged: bytes, what: str):
    assert status_word(tagged) == "OK", f"{what}: {tagged!r}"


def test_front_desk_reads_and_flags_but_nothing_else(world, sessions):
    mark = world.audit_mark()
    denials = []
    consegne, nuova, altro = (world.wire(f) for f in
                              ("Ricevute/Consegne", "Ricevute/Nuova", "Ricevute/Altro"))
    with unchanged_at_dovecot(world, "franca's refused commands"):
        s = sessions("franca")
        ok(send_command(s, "a1", "SELECT INBOX")[1], "SELECT INBOX")
        untagged, tagged = send_command(s, "a2", "FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        ok(tagged, "FETCH")
        assert sum(b" FETCH " in line for line in untagged) == MESSAGES_PER_FOLDER, untagged
        ok(send_command(s, "a3", "UID SEARCH ALL")[1], "SEARCH")
        ok(send_command(s, "a4", "STORE 1 +FLAGS (\\Flagged)")[1], "STORE \\Flagged")
        ok(send_command(s, "a5", "STORE 1 -FLAGS (\\Flagged)")[1], "STORE -\\Flagged")
        for tag, cmd, perm, audit in [
            ("d1", "STORE 1 +FLAGS (\\Deleted)", "delete", "STORE"),
            ("d2", "UID STORE 1:* +FLAGS.SILENT (\\Seen \\Deleted)", "delete", "UID STORE"),
            ("d3", "EXPUNGE", "delete", "EXPUNGE"),
            ("d4", "UID EXPUNGE 1:*", "delete", "UID EXPUNGE"),
            ("d5", f"COPY 1 {consegne}", "move", "COPY"),
            ("d6", f"UID COPY 1:* {consegne}", "move", "UID COPY"),
            ("d7", f"MOVE 1 {consegne}", "move", "MOVE"),
            ("d8", f"UID MOVE 1:* {consegne}", "move", "UID MOVE"),
            ("d9", f"CREATE {nuova}", "manage_folders", "CREATE"),
            ("d10", f"DELETE {consegne}", "manage_folders", "DELETE"),
            ("d11", f"RENAME {consegne} {altro}", "manage_folders", "RENAME"),
            ("d12", f"SUBSCRIBE {consegne}", "manage_folders", "SUBSCRIBE"),
            ("d13", "UNSUBSCRIBE INBOX", "manage_folders", "UNSUBSCRIBE"),
            ("d14", f"APPEND INBOX {{{len(APPEND_PROBE)}+}}\r\n".encode() + APPEND_PROBE, "append", "APPEND"),
            ("d15", f"APPEND INBOX {{{len(APPEND_PROBE)}}}\r\n".encode() + APPEND_PROBE, "append", "APPEND"),
        ]:
            nope(send_command(s, tag, cmd)[1], perm, repr(cmd))
            denials.append((audit, None))
        # The session is still usable and still has INBOX selected.
        ok(send_command(s, "e1", "FETCH 1 (FLAGS)")[1], "FETCH after denials")
    wait_for_denials(world, "franca", mark, denials)
    allowed = [r for r in world.gw.audit_rows("id > ? AND user = 'franca' AND command IN "
                                              "('SELECT', 'FETCH', 'STORE') AND outcome = 'ok'", (mark,))]
    assert allowed, "allowed commands were not audited as ok"


def test_close_without_delete_does_not_expunge(world, sessions):
    with direct(world.dovecot) as r:
        direct_ok(r, "s", "SELECT INBOX")
        direct_ok(r, "d", "UID STORE 1 +FLAGS.SILENT (\\Deleted)")
        direct_ok(r, "z", "UNSELECT")
    try:
        before = world.snapshot()["messages"]["INBOX"]
        assert any("\\Deleted" in flags for _, flags, _ in before), before
        s = sessions("franca")
        ok(send_command(s, "c1", "SELECT INBOX")[1], "SELECT INBOX")
        ok(send_command(s, "c2", "CLOSE")[1], "CLOSE")
        # CLOSE left the selected state: a FETCH now has no mailbox.
        assert status_word(send_command(s, "c3", "FETCH 1 (FLAGS)")[1]) == "BAD"
        after = world.snapshot()["messages"]["INBOX"]
        assert after == before, f"CLOSE without delete permission changed INBOX: {before} -> {after}"
        # EXPUNGE by franca is refused too, and the message is still there.
        ok(send_command(s, "c4", "SELECT INBOX")[1], "SELECT INBOX again")
        nope(send_command(s, "c5", "EXPUNGE")[1], "delete", "EXPUNGE")
        assert world.snapshot()["messages"]["INBOX"] == before
    finally:
        with direct(world.dovecot) as r:
            direct_ok(r, "s", "SELECT INBOX")
            direct_ok(r, "d", "UID STORE 1:* -FLAGS.SILENT (\\Deleted)")
            direct_ok(r, "z", "UNSELECT")


def test_close_with_delete_expunges(world, sessions):
    legale = world.wire("Riservata/Legale")
    s = sessions("lucia")
    msg = make_message("da cancellare con CLOSE")
    ok(send_command(s, "a1", f"APPEND {legale} (\\Deleted) {{{len(msg)}+}}\r\n".encode() + msg)[1],
       "APPEND")
    count = len(world.snapshot()["messages"][legale])
    ok(send_command(s, "a2", f"SELECT {legale}")[1], "SELECT")
    ok(send_command(s, "a3", "CLOSE")[1], "CLOSE")
    after = world.snapshot()["messages"][legale]
    assert len(after) == count - 1 and not any("\\Deleted" in f for _, f, _ in after), after


def test_legal_manages_its_folders_but_not_subtrees_it_cannot_see_whole(world, sessions):
    w = world.wire
    # Atoms, as on the default layout (every name here is one).
    q = {f: w(f) for f in ("Riservata/Nuova", "Riservata/Rinominata", "Riservat&AOA-", "R&-D",
                           "Archivio/2026/Legale", "Riservata/Spostata", "Archivio/2026/Altro",
                           "Archivio", "Riservata/Legale")}
    # An empty segment and a `..` segment (on the Aruba layout `..` between two `.` is two
    # empty segments: the same refusal by name).
    sep = world.matrix.separator
    doppia = w("Riservata") + sep + sep + "Doppia"
    fuori = w("Riservata") + sep + ".." + sep + "Fuori"
    mark = world.audit_mark()
    s = sessions("lucia")
    ok(send_command(s, "b1", f"CREATE {q['Riservata/Nuova']}")[1], "CREATE Riservata/Nuova")
    ok(send_command(s, "b2", f"RENAME {q['Riservata/Nuova']} {q['Riservata/Rinominata']}")[1], "RENAME")
    ok(send_command(s, "b3", f"SUBSCRIBE {q['Riservata/Rinominata']}")[1], "SUBSCRIBE")
    ok(send_command(s, "b4", f"UNSUBSCRIBE {q['Riservata/Rinominata']}")[1], "UNSUBSCRIBE")
    msg = make_message("pratica legale nuova")
    ok(send_command(s, "b5", f"APPEND {q['Riservata/Rinominata']} {{{len(msg)}+}}\r\n".encode() + msg)[1],
       "APPEND")
    ok(send_command(s, "b6", f"SELECT {q['Riservata/Rinominata']}")[1], "SELECT")
    ok(send_command(s, "b7", f"COPY 1 {q['Riservat&AOA-']}")[1], "COPY to Riservatà")
    ok(send_command(s, "b8", f"UID MOVE 1:* {q['R&-D']}")[1], "MOVE to R&D")
    snap = world.snapshot()["messages"]
    assert snap[w("Riservata/Rinominata")] == []
    assert sum("pratica legale nuova" in subj for _, _, subj in snap[w("Riservat&AOA-")]) == 1
    assert sum("pratica legale nuova" in subj for _, _, subj in snap[w("R&-D")]) == 1
    ok(send_command(s, "b9", "UNSELECT")[1], "UNSELECT")
    ok(send_command(s, "b10", f"DELETE {q['Riservata/Rinominata']}")[1], "DELETE")
    assert w("Riservata/Rinominata") not in world.snapshot()["folders"]
    # Remove the copies again (lucia has delete).
    for i, folder in enumerate((w("Riservat&AOA-"), w("R&-D"))):
        ok(send_command(s, f"x{i}a", f"SELECT {quote(folder)}")[1], "SELECT")
        found, tagged = send_command(s, f"x{i}b", 'UID SEARCH SUBJECT "pratica legale nuova"')
        ok(tagged, "SEARCH")
        uids = re.findall(rb"\d+", b" ".join(found).split(b"SEARCH", 1)[1])
        assert len(uids) == 1, found
        ok(send_command(s, f"x{i}d", f"UID STORE {uids[0].decode()} +FLAGS (\\Deleted)")[1], "STORE \\Deleted")
        ok(send_command(s, f"x{i}e", f"UID EXPUNGE {uids[0].decode()}")[1], "UID EXPUNGE")
    ok(send_command(s, "x9", "UNSELECT")[1], "UNSELECT")
    # Folders whose sub-folders lucia could not all see: never deleted or renamed.
    with unchanged_at_dovecot(world, "refused DELETE/RENAME/CREATE"):
        for tag, cmd in [("n1", f"DELETE {q['R&-D']}"), ("n2", f"DELETE {q['Archivio/2026/Legale']}"),
                         ("n3", f"RENAME {q['Riservat&AOA-']} {q['Riservata/Spostata']}"),
                         ("n4", f"RENAME {q['Archivio/2026/Legale']} {q['Riservata/Spostata']}")]:
            _, tagged = send_command(s, tag, cmd)
            assert re.match(rb"^\S+ NO \[NOPERM\] .*sub-folders", tagged), (cmd, tagged)
        for tag, cmd in [("n5", f"CREATE {q['Archivio/2026/Altro']}"), ("n6", f"CREATE {q['Archivio']}"),
                         ("n7", f"RENAME {q['Riservata/Legale']} {q['Archivio/2026/Altro']}"),
                         ("n8", f"CREATE {doppia}"), ("n9", f"CREATE {fuori}")]:
            _, tagged = send_command(s, tag, cmd)
            assert re.match(rb"^\S+ NO \[NOPERM\] ", tagged), (cmd, tagged)
    wait_for_denials(world, "lucia", mark, [
        ("DELETE", w("R&-D")), ("DELETE", w("Archivio/2026/Legale")), ("RENAME", w("Riservat&AOA-")),
        ("RENAME", w("Archivio/2026/Legale")), ("CREATE", w("Archivio/2026/Altro")), ("CREATE", w("Archivio")),
        ("RENAME", w("Riservata/Legale")), ("CREATE", doppia), ("CREATE", fuori)])


def test_ops_moves_and_appends_but_cannot_flag_or_delete(world, sessions):
    w = world.wire
    consegne, c2026 = w("Ricevute/Consegne"), w("Ricevute/Consegne/2026")
    sent, nuova = w("Sent"), w("INBOX/Nuova")
    mark = world.audit_mark()
    s = sessions("oscar")
    base = world.snapshot()["messages"]
    ok(send_command(s, "o1", f"SELECT {consegne}")[1], "SELECT")
    nope(send_command(s, "o2", "STORE 1 +FLAGS (\\Seen)")[1], "flag", "STORE \\Seen")
    nope(send_command(s, "o3", "UID STORE 1:* +FLAGS (\\Flagged)")[1], "flag", "UID STORE \\Flagged")
    nope(send_command(s, "o4", "STORE 1 +FLAGS (\\Deleted)")[1], "delete", "STORE \\Deleted")
    nope(send_command(s, "o5", "EXPUNGE")[1], "delete", "EXPUNGE")
    ok(send_command(s, "o6", f"COPY 1 {c2026}")[1], "COPY")
    msg = make_message("bozza inviata da oscar")
    ok(send_command(s, "o7", f"APPEND {sent} {{{len(msg)}}}\r\n".encode() + msg)[1], "APPEND (sync literal)")
    with unchanged_at_dovecot(world, "oscar's refused DELETE/RENAME of Sent"):
        # Deleting a folder destroys its messages: without `delete` it is refused for that
        # alone; RENAME keeps them, and is refused for the hidden sub-folders it would move.
        for tag, cmd in [("o8", f"DELETE {sent}"), ("o10", f"DELETE {nuova}")]:
            nope(send_command(s, tag, cmd)[1], "delete", cmd)
        _, tagged = send_command(s, "o9", f"RENAME {sent} {w('Ricevute/Consegne/Sent')}")
        assert re.match(rb"^\S+ NO \[NOPERM\] .*sub-folders", tagged), tagged
    after = world.snapshot()["messages"]
    assert len(after[c2026]) == len(base[c2026]) + 1
    assert len(after[sent]) == len(base[sent]) + 1
    assert after[consegne] == base[consegne]
    wait_for_denials(world, "oscar", mark, [("STORE", None), ("UID STORE", None), ("STORE", None),
                                            ("EXPUNGE", None), ("DELETE", sent), ("RENAME", sent),
                                            ("DELETE", nuova)])
    # Undo (directly at Dovecot: oscar cannot delete): the new messages are the new UIDs.
    with direct(world.dovecot) as r:
        for folder in (c2026, sent):
            new = {m[0] for m in after[folder]} - {m[0] for m in base[folder]}
            assert len(new) == 1, (folder, new)
            uid = new.pop()
            direct_ok(r, "s", f"SELECT {quote(folder)}")
            direct_ok(r, "d", f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)")
            direct_ok(r, "e", f"UID EXPUNGE {uid}")
    after = world.snapshot()["messages"]
    assert after[sent] == base[sent] and after[c2026] == base[c2026]


def test_append_only_role_cannot_read(world, sessions):
    sent, sotto = world.wire("Sent"), world.wire("Sent/Sotto")
    mark = world.audit_mark()
    s = sessions("ugo")
    for tag, cmd in [("u1", f"SELECT {sent}"), ("u2", f"EXAMINE {sent}"), ("u3", f"STATUS {sent} (MESSAGES)"),
                     ("u4", "FETCH 1 (FLAGS)"), ("u5", "UID SEARCH ALL")]:
        untagged, tagged = send_command(s, tag, cmd)
        nope(tagged, "read", cmd)
        assert not untagged, (cmd, untagged)
    nope(send_command(s, "u6", f"COPY 1 {sent}")[1], "move", "COPY")
    nope(send_command(s, "u7", f"CREATE {sotto}")[1], "manage_folders", "CREATE")
    msg = make_message("caricata da ugo")
    count = len(world.snapshot()["messages"][sent])
    ok(send_command(s, "u8", f"APPEND {sent} (\\Seen) {{{len(msg)}+}}\r\n".encode() + msg)[1], "APPEND")
    snap = world.snapshot()["messages"][sent]
    assert len(snap) == count + 1 and any(s_ == "caricata da ugo" for _, _, s_ in snap), snap
    wait_for_denials(world, "ugo", mark, [("SELECT", sent), ("EXAMINE", sent), ("STATUS", sent),
                                          ("FETCH", None), ("UID SEARCH", None), ("COPY", sent),
                                          ("CREATE", sotto)])
    with direct(world.dovecot) as r:
        direct_ok(r, "s", f"SELECT {sent}")
        direct_ok(r, "d", f"STORE {count + 1} +FLAGS.SILENT (\\Deleted)")
        direct_ok(r, "e", "EXPUNGE")


# ---------------------------------------------------------------------------
# 5. two users side by side
# ---------------------------------------------------------------------------


def test_two_users_side_by_side_see_different_trees(world, sessions):
    riservata = world.wire("Riservata")
    franca, lucia = sessions("franca"), sessions("lucia")
    results = {}
    barrier = threading.Barrier(2, timeout=30)

    def work(user, s):
        try:
            barrier.wait()
            views = []
            for i in range(5):
                views.append(tree_of(send_command(s, f"x{i}", 'LIST "" "*"')[0]))
            selected = send_command(s, "sel", f"EXAMINE {riservata}")[1]
            results[user] = (views, selected)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[user] = exc

    threads = [threading.Thread(target=work, args=a) for a in (("franca", franca), ("lucia", lucia))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for user in ("franca", "lucia"):
        assert not isinstance(results.get(user), Exception), results
        views, selected = results[user]
        for v in views:
            assert v == world.matrix.expected_tree[user]['LIST "" "*"'], (user, v)
    assert results["franca"][0][0] != results["lucia"][0][0]
    # While lucia has Riservata open, franca still cannot open it.
    assert status_word(results["lucia"][1]) == "OK", results["lucia"][1]
    assert status_word(results["franca"][1]) == "NO", results["franca"][1]
    assert status_word(send_command(franca, "y1", f"SELECT {riservata}")[1]) == "NO"
    assert status_word(send_command(lucia, "y2", f"SELECT {riservata}")[1]) == "OK"
    # And neither's capture holds the other's folder names.
    assert b"Riservata" not in _untagged_only(bytes(franca.captured))
    assert b"Ricevute" not in _untagged_only(bytes(lucia.captured))
