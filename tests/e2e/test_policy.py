"""Folder and permission policy (roles) enforced by pecgate."""

import re

from harness import make_message, wait_until


def _names(list_data):
    out = set()
    for line in list_data:
        m = re.match(rb'^\([^)]*\) (?:"(?:[^"\\]|\\.)"|NIL) (.*)$', line)
        assert m, line
        out.add(m.group(1).strip(b'"').decode())
    return out


def test_folder_outside_role_is_hidden_and_refused(mario, gateway):
    typ, data = mario.list()
    assert typ == "OK"
    names = _names(data)
    assert "Riservata" not in names, names
    typ, data = mario.select("Riservata")
    assert typ == "NO", data
    typ, data = mario.select("INBOX")
    assert typ == "OK", data


def test_reception_sees_only_inbox(gateway, clients):
    anna = clients(gateway.client("anna"))
    typ, data = anna.list()
    assert typ == "OK"
    assert _names(data) == {"INBOX"}, data
    assert anna.select("Sent", readonly=True)[0] == "NO"


def test_reception_without_append_permission_cannot_append(gateway, dovecot, clients):
    anna = clients(gateway.client("anna"))
    raw = make_message("tentativo di append non permesso")
    typ, data = anna.append("INBOX", None, None, raw)
    assert typ == "NO", data
    for msg in dovecot.fetch_all("studio@pec.example.test", "INBOX"):
        assert b"tentativo di append non permesso" not in msg


def test_reception_can_flag(gateway, clients):
    anna = clients(gateway.client("anna"))
    assert anna.select("INBOX")[0] == "OK"
    typ, data = anna.store("1", "+FLAGS", "(\\Flagged)")
    assert typ == "OK", data
    typ, data = anna.store("1", "-FLAGS", "(\\Flagged)")
    assert typ == "OK", data


def test_denied_command_is_audited_as_denied(gateway, clients):
    mark = max([r["id"] for r in gateway.audit_rows()] or [0])
    anna = clients(gateway.client("anna"))
    assert anna.select("Sent", readonly=True)[0] == "NO"
    rows = wait_until(
        lambda: [r for r in gateway.audit_rows("id > ?", (mark,))
                 if r["user"] == "anna" and r["command"] in ("SELECT", "EXAMINE") and r["outcome"] == "denied"],
        10, "a denied SELECT audit row")
    assert rows[0]["folder"] == "Sent", rows[0]
