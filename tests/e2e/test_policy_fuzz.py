"""Property test (issue 3): random command sequences with tricky folder names never reveal a
hidden folder.

A seeded generator draws commands (SELECT/EXAMINE/STATUS/LIST/LSUB/CREATE/DELETE/RENAME/
SUBSCRIBE/UNSUBSCRIBE/APPEND/COPY/MOVE/FETCH/SEARCH...) whose mailbox arguments come from a
grammar of tricky names: case variants, canonical and non-canonical modified UTF-7, raw UTF-8,
trailing/leading/doubled delimiters, `.` and `..` segments, wildcards, the wrong delimiter, and
atoms vs quoted strings vs (non-)synchronising literals, plus LIST reference arguments. They run
over a raw socket as a restricted user, and every byte the client receives is kept.

Properties:
* no hidden folder's name (raw, modified UTF-7 canonical or not, UTF-8; case-insensitively) is
  in any byte sent to the client, except the name the client itself typed, echoed back in the
  tagged answer to that very command (the provider does that for any nonexistent name);
* no placeholder (``pecgate-none-...``) ever reaches the client;
* at the end, at Dovecot, every hidden folder still exists with the same messages (UIDs, flags,
  subjects) and subscription, and every folder that appeared is one the user's roles grant.

Set PECGATE_FUZZ_SEED to replay a run; PECGATE_FUZZ_COMMANDS to change its length.
"""

from __future__ import annotations

import contextlib
import os
import random

import pytest

from harness import make_message, quote
from upstream_log import match_pattern
from test_policy_matrix import (
    ROLES, WITHOUT_SEND, World, _b64, display, mutf7_decode_lenient, mutf7_encode,
    send_command, snapshot, status_word,
)

SEED = int(os.environ.get("PECGATE_FUZZ_SEED", "20260322"))
COMMANDS = int(os.environ.get("PECGATE_FUZZ_COMMANDS", "300"))

FUZZ_ROLES = dict(ROLES)
FUZZ_ROLES["segreteria"] = {"mailboxes": ["studio"], "folders": ["INBOX", "Sent", "Ricevute/**"],
                            "permissions": WITHOUT_SEND}
FUZZ_USERS = {"sara": "segreteria", "franca": "front", "oscar": "ops"}

# Names the generator may create or rename to, per user: granted, and free of any hidden
# folder's name (so that a legitimately visible new folder never looks like a leak).
NEW_NAMES = {
    "sara": ["Ricevute/Nuova", "Ricevute/Bozze", "Ricevute/Consegne/Pratiche", "Ricevute/Caf&AOk-",
             "Ricevute/Ev&AOg-nti/Sotto"],
    "franca": ["Ricevute/Nuova", "Ricevute/Caf&AOk-"],
    "oscar": ["Ricevute/Consegne/Nuova", "Ricevute/Consegne/Caf&AOk-", "INBOX/Nuova"],
}
# Segments too generic to flag on their own (dates carry the year); their full paths still are.
GENERIC = {"2026", "INBOX"}

# ---------------------------------------------------------------------------
# the user's policy, in Python (to classify folders at Dovecot)
# ---------------------------------------------------------------------------


def is_granted(patterns, wire: str) -> bool:
    segs = display(wire).split("/")
    if segs[0].upper() == "INBOX":
        segs[0] = "INBOX"
    return any(match_pattern([("INBOX" if i == 0 and s.upper() == "INBOX" else s)
                       for i, s in enumerate(p.split("/"))], segs) for p in patterns)


def classify(patterns, folders):
    """(visible, hidden) wire names: visible = granted + ancestors of granted."""
    granted = {f for f in folders if is_granted(patterns, f)}
    visible = set(granted)
    for f in granted:
        parts = f.split("/")
        visible.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return visible, set(folders) - visible


# ---------------------------------------------------------------------------
# the grammar
# ---------------------------------------------------------------------------

ATOM_SPECIALS = set('(){ %*"\\]') | {chr(c) for c in range(0x20)} | {"\x7f"}


class Grammar:
    def __init__(self, rng: random.Random, hidden, visible, new_names):
        self.rng = rng
        self.hidden = sorted(hidden)
        self.visible = sorted(visible)
        self.new_names = new_names

    def base(self) -> str:
        r = self.rng.random()
        if r < 0.55:
            return self.rng.choice(self.hidden)
        if r < 0.85:
            return self.rng.choice(self.visible)
        return self.rng.choice(self.new_names)

    def mutate(self, wire: str) -> str | bytes:
        """A tricky spelling of ``wire``; bytes when it is raw UTF-8 (not modified UTF-7)."""
        rng = self.rng
        text = display(wire)
        segs = wire.split("/")
        choice = rng.randrange(22)
        if choice == 0:
            return wire.lower()
        if choice == 1:
            return wire.upper()
        if choice == 2:
            return "".join(c.swapcase() if rng.random() < 0.3 else c for c in wire)
        if choice == 3:  # one ASCII letter in base64: not canonical
            idx = [i for i, c in enumerate(text) if c.isascii() and c.isalpha()]
            if idx:
                i = rng.choice(idx)
                return mutf7_encode(text[:i]) + "&" + _b64(text[i]) + "-" + mutf7_encode(text[i + 1:])
            return wire
        if choice == 4:  # the whole name in base64
            return "&" + _b64(text) + "-"
        if choice == 5:  # raw UTF-8
            return text.encode()
        if choice == 6:
            return wire + "/"
        if choice == 7:
            return "/" + wire
        if choice == 8:
            i = rng.randrange(len(segs))
            return "/".join(segs[:i] + [""] + segs[i:]) if i else "//" + wire
        if choice == 9:
            i = rng.randrange(len(segs) + 1)
            return "/".join(segs[:i] + [rng.choice([".", ".."])] + segs[i:])
        if choice == 10:
            return rng.choice(self.visible + ["INBOX", "inbox"]) + "/" + "../" * rng.randint(1, 3) + wire
        if choice == 11:
            return wire.replace("/", ".")
        if choice == 12:
            cut = rng.randint(1, max(1, len(wire) - 1))
            return wire[:cut] + rng.choice(["*", "%"])
        if choice == 13:
            return rng.choice(["*", "%", "%/%", "*/" + segs[-1], "%/" + segs[-1]])
        if choice == 14:
            return wire + "/x/.."
        if choice == 15 and "&" in wire and wire != "R&-D":  # split / padded base64 runs
            return wire.replace("&AOA-", rng.choice(["&AOAAAA-", "&AOA", "&AOA-&-", "&-AOA-"]))
        if choice == 16 and wire == "R&-D":
            return rng.choice(["R&D", "r&-d", "R&-d", "R&AC8-D", "R&ACY-D"])
        if choice == 17:
            return wire.replace("/", "\\")
        return wire

    def name(self) -> str | bytes:
        b = self.base()
        return b if self.rng.random() < 0.25 else self.mutate(b)

    def encode_arg(self, name: str | bytes) -> bytes:
        """The name as an atom, a quoted string or a literal."""
        raw = name if isinstance(name, bytes) else name.encode()
        forms = ["literal", "literal+"]
        if all(0x20 <= b < 0x7F for b in raw) and b'"' not in raw and b"\\" not in raw:
            forms += ["quoted", "quoted"]
        if raw and all(chr(b) not in ATOM_SPECIALS and b < 0x7F for b in raw):
            forms += ["atom", "atom"]
        if not all(b < 0x80 for b in raw) and self.rng.random() < 0.3:
            forms.append("quoted")  # raw 8-bit in a quoted string: must be refused
        form = self.rng.choice(forms)
        if form == "atom":
            return raw
        if form == "quoted":
            return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        plus = b"+" if form == "literal+" else b""
        return b"{%d%s}\r\n" % (len(raw), plus) + raw

    def list_args(self) -> tuple[bytes, list]:
        rng = self.rng
        ref = rng.choice(["", "", "", self.base() + "/", self.base(), "..", "/", "Ricevute/..",
                          self.mutate(self.base())])
        pat = rng.choice(["*", "%", "%/%", "*", self.name(), "../" + self.base(), "*" + self.base()[-4:],
                          self.base()[:3] + "*", self.base() + "/*", "/" + self.base()])
        return self.encode_arg(ref) + b" " + self.encode_arg(pat), []

    def seqset(self) -> str:
        return self.rng.choice(["1", "1:*", "2", "*", "1,3", "1:2"])

    def command(self) -> tuple[bytes, list]:
        """(command body, names typed that the tagged answer may echo)."""
        rng = self.rng
        kind = rng.choices(
            ["SELECT", "SELECTV", "EXAMINE", "STATUS", "LIST", "LSUB", "CREATE", "DELETE", "RENAME",
             "SUBSCRIBE", "UNSUBSCRIBE", "APPEND", "COPY", "MOVE", "FETCH", "SEARCH", "NOOP", "UNSELECT"],
            [8, 8, 5, 6, 10, 6, 4, 4, 4, 3, 3, 4, 5, 4, 8, 5, 1, 2])[0]
        if kind == "SELECTV":  # a visible folder, so FETCH/COPY/MOVE/SEARCH have something
            name = rng.choice(self.visible)
            return f"SELECT {quote(name)}".encode(), [name]
        if kind in ("SELECT", "EXAMINE", "CREATE", "DELETE", "SUBSCRIBE", "UNSUBSCRIBE"):
            name = self.name()
            return kind.encode() + b" " + self.encode_arg(name), [name]
        if kind == "STATUS":
            name = self.name()
            return b"STATUS " + self.encode_arg(name) + b" (MESSAGES UIDNEXT UNSEEN)", [name]
        if kind in ("LIST", "LSUB"):
            args, typed = self.list_args()
            return kind.encode() + b" " + args, typed
        if kind == "RENAME":
            a = self.name()
            b = rng.choice(self.new_names) if rng.random() < 0.5 else self.name()
            return b"RENAME " + self.encode_arg(a) + b" " + self.encode_arg(b), [a, b]
        if kind == "APPEND":
            name = self.name()
            msg = make_message(f"fuzz {rng.randrange(10**6)}", "contenuto neutro")
            lit = b"{%d+}\r\n" % len(msg) if rng.random() < 0.5 else b"{%d}\r\n" % len(msg)
            flags = rng.choice([b"", b"(\\Seen) ", b"(\\Deleted) "])
            return b"APPEND " + self.encode_arg(name) + b" " + flags + lit + msg, [name]
        if kind in ("COPY", "MOVE"):
            name = self.name()
            uid = b"UID " if rng.random() < 0.5 else b""
            return uid + kind.encode() + b" " + self.seqset().encode() + b" " + self.encode_arg(name), [name]
        if kind == "FETCH":
            items = rng.choice(["(FLAGS)", "(UID FLAGS ENVELOPE)", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
                                "(BODY.PEEK[])", "(INTERNALDATE RFC822.SIZE)", "BODY[TEXT]"])
            uid = "UID " if rng.random() < 0.5 else ""
            return f"{uid}FETCH {self.seqset()} {items}".encode(), []
        if kind == "SEARCH":
            crit = rng.choice(["ALL", "UNSEEN", 'SUBJECT "Messaggio"', "TEXT " + quote(display(self.base())),
                               "SUBJECT " + quote(display(self.base()))])
            uid = "UID " if rng.random() < 0.5 else ""
            return f"{uid}SEARCH {crit}".encode(), []
        if kind == "UNSELECT":
            return b"UNSELECT", []
        return b"NOOP", []


# ---------------------------------------------------------------------------
# leak detection
# ---------------------------------------------------------------------------


def tokens_for(hidden, visible):
    """What must never be seen: every segment of a hidden folder that no visible folder
    has, and every hidden full path, decoded (compared case-insensitively)."""
    visible_segs = {s for v in visible for s in display(v).split("/")}
    toks = set()
    for h in hidden:
        d = display(h)
        toks.add(d)
        toks.update(s for s in d.split("/") if s not in visible_segs and s not in GENERIC)
    return sorted(toks, key=len, reverse=True)


def echo_forms(typed) -> list[bytes]:
    """How the answer may echo the names the client typed: as typed, or decoded when typed in
    canonical modified UTF-7 (what the provider prints). Longest first."""
    forms = set()
    for name in typed:
        raw = name if isinstance(name, bytes) else name.encode()
        forms.add(raw)
        text = raw.decode("utf-8", "replace")
        decoded = mutf7_decode_lenient(text)
        if mutf7_encode(decoded) == text:
            forms.add(decoded.encode())
    # The provider prints a leading INBOX level as `INBOX`, whatever the case typed (as it does
    # for a name that does not exist).
    for form in list(forms):
        if form[:6].lower() == b"inbox/":
            forms.add(b"INBOX" + form[5:])
    return sorted(forms, key=len, reverse=True)


def find_leaks(data: bytes, toks) -> list[str]:
    text = data.decode("utf-8", "replace")
    views = [text.casefold(), mutf7_decode_lenient(text).casefold()]
    found = []
    for t in toks:
        for v in views:
            if t.casefold() in v:
                found.append(t)
                break
    if "pecgate-none" in views[0]:
        found.append("pecgate-none (placeholder)")
    return found


# ---------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_world(pecgate_binary):
    w = World(pecgate_binary, users_roles=FUZZ_USERS, roles=FUZZ_ROLES)
    try:
        yield w
    finally:
        w.close()


def _content(snap, name):
    return snap["messages"].get(name), name in snap["folders"], name in snap["subscribed"]


@pytest.mark.parametrize("user", sorted(FUZZ_USERS))
def test_random_commands_never_reveal_hidden_folders(fuzz_world, user):
    seed = SEED + sorted(FUZZ_USERS).index(user)
    rng = random.Random(seed)
    patterns = FUZZ_ROLES[FUZZ_USERS[user]]["folders"]
    before = snapshot(fuzz_world.dovecot)
    visible, hidden = classify(patterns, before["folders"])
    toks = tokens_for(hidden, visible)
    grammar = Grammar(rng, hidden, visible, NEW_NAMES[user])
    print(f"fuzz seed {seed} (PECGATE_FUZZ_SEED={SEED}), user {user}, hidden {sorted(hidden)}, "
          f"tokens {toks}")

    violations = []
    transcript = []

    def scan(tag, body, received: bytes, typed):
        for line in received.split(b"\r\n"):
            check = line
            if tag and line.startswith(tag.encode() + b" "):
                for form in echo_forms(typed):
                    check = check.replace(form, b"<typed>")
            for leak in find_leaks(check, toks):
                violations.append(f"{tag} {body[:200]!r}: {leak!r} in {line[:300]!r}")

    def connect():
        s = fuzz_world.session(user)
        scan(None, b"(greeting and login)", bytes(s.captured), [])
        return s

    s = connect()
    reconnects = 0
    try:
        for i in range(COMMANDS):
            tag = f"f{i}"
            body, typed = grammar.command()
            start = len(s.captured)
            try:
                _, tagged = send_command(s, tag, body)
            except (TimeoutError, EOFError, OSError) as exc:
                received = bytes(s.captured[start:])
                scan(tag, body, received, typed)
                s.close()
                # Dovecot disconnects when the selected folder is deleted or renamed away,
                # with a BYE that must have reached the client.
                if b"* BYE " not in received:
                    violations.append(f"{tag} {body[:200]!r}: connection lost without BYE ({exc}); "
                                      f"received {received[-300:]!r}")
                    break
                transcript.append((tag, body[:160], received[-200:]))
                reconnects += 1
                s = connect()
                continue
            transcript.append((tag, body[:160], tagged[:200]))
            scan(tag, body, bytes(s.captured[start:]), typed)
        with contextlib.suppress(Exception):
            send_command(s, "zz", "LOGOUT")
    finally:
        s.close()
    print(f"{len(transcript)} commands, {reconnects} reconnections after a provider BYE")

    after = snapshot(fuzz_world.dovecot)
    for name in sorted(hidden):
        if _content(before, name) != _content(after, name):
            violations.append(f"hidden {name!r} changed at Dovecot: {_content(before, name)} -> "
                              f"{_content(after, name)}")
    for name in sorted(set(after["folders"]) - set(before["folders"])):
        if not is_granted(patterns, name):
            violations.append(f"a folder {name!r} outside {user}'s roles appeared at Dovecot")
    tail = "\n  ".join(f"{t} {b!r} -> {a!r}" for t, b, a in transcript[-8:])
    assert not violations, (
        f"seed {seed} (PECGATE_FUZZ_SEED={SEED}) user {user}: {len(violations)} violations:\n  "
        + "\n  ".join(violations[:15]) + f"\nlast commands:\n  {tail}")
    # The run did exercise the relay: most answers came from the provider or the policy.
    answered = [a for _, _, a in transcript]
    assert sum(status_word(a) == "OK" for a in answered) >= COMMANDS // 10, answered[:20]
    assert sum(status_word(a) == "NO" for a in answered) >= COMMANDS // 10, answered[:20]
