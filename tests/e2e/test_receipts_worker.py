"""The receipts worker end to end: messages sent through pecgate's SMTP to the sandbox PEC
provider, whose receipts land in a real Dovecot INBOX; pecgate archives them byte for byte,
reconciles them per recipient with the sent ledger, files them in the receipts folder, alerts
failures and late deliveries, and survives being killed in the middle. Read back with the
real CLI (`pecgate receipts show|pending|unmatched|export --json`)."""

from __future__ import annotations

import hashlib
import json
import re
import smtplib
import sqlite3
from email.utils import make_msgid
from pathlib import Path

import pytest

import harness
from harness import PEC_DOMAIN, PROVIDER_ADDRESS, Dovecot, PecProvider, make_message, wait_until

ALTRO = f"altro@{PEC_DOMAIN}"
NOUSER = "nouser@pec.ente.test"
EXTERNAL = "external@gmail.test"
SILENT = "silent@pec.ente.test"
TIMEOUT = "timeout@pec.ente.test"
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "receipts"


@pytest.fixture(scope="module")
def dove():
    """A Dovecot of this module's own: its INBOX holds only what these tests put there."""
    d = Dovecot()
    d.add_user(PROVIDER_ADDRESS, "provider-" + harness.secrets.token_hex(8))
    d.add_user(ALTRO, "altro-" + harness.secrets.token_hex(8))
    with d:
        yield d


@pytest.fixture(scope="module")
def provider(dove):
    with PecProvider(dove) as p:
        yield p


@pytest.fixture
def make_gw(dove, provider, pecgate_binary):
    """Fresh pecgate instances with the receipts worker on (rescanning every second) and
    receipts filed in Ricevute, unless the test says otherwise."""
    with harness.gateways(dove, binary=pecgate_binary, smtp_url=provider.smtps_url,
                          mailbox_options={"receipts_folder": "Ricevute"}) as make:
        yield lambda receipts=None, **options: make(
            receipts={"poll_secs": 1, **(receipts or {})}, **options)


def send(gw, subject: str, to, cc=()) -> str:
    msgid = make_msgid(domain=PEC_DOMAIN)
    extra = {"Cc": ", ".join(cc)} if cc else {}
    raw = make_message(subject, "Testo.\n", sender=PROVIDER_ADDRESS, to=", ".join(to),
                       extra_headers=extra, msgid=msgid)
    c = gw.smtp("mario")
    try:
        c.sendmail(PROVIDER_ADDRESS, list(to) + list(cc), raw)
    finally:
        c.quit()
    return msgid


def cli_json(gw, *args):
    done = gw.cli(*args, "--json")
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def show(gw, msgid):
    done = gw.cli("receipts", "show", "--message-id", msgid, "--json")
    return json.loads(done.stdout) if done.returncode == 0 else None


def settled(gw, msgid, states: dict):
    """Wait until each recipient of `msgid` is in the given state; the report."""

    def check():
        report = show(gw, msgid)
        if report is None:
            return None
        got = {r["address"]: r["state"] for r in report["recipients"]}
        return report if got == states else None

    return wait_until(check, 30, f"recipients of {msgid} to become {states}")


def folder_messages(dove, folder: str) -> list[bytes]:
    return dove.fetch_all(PROVIDER_ADDRESS, dove.provider_name(folder))


def pec_kind(raw: bytes) -> str | None:
    for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() in (b"x-ricevuta", b"x-trasporto"):
            return value.strip().decode()
    return None


def receipts_about(messages, msgid):
    return [m for m in messages if pec_kind(m) and msgid.encode() in m]


def test_receipts_reconciled_archived_filed_and_alerted(make_gw, dove):
    gw = make_gw()
    msgid = send(gw, "Fattura 7", to=(ALTRO, NOUSER, EXTERNAL))
    report = settled(gw, msgid, {ALTRO: "delivered", NOUSER: "failed", EXTERNAL: "external"})

    # The JSON shape the issue specifies.
    assert report["message_id"] == msgid and report["user"] == "mario"
    assert report["mailbox"] == "studio"
    assert report["identificativo"].startswith("opec")
    by_address = {r["address"]: r for r in report["recipients"]}
    failed = by_address[NOUSER]
    assert failed["error"].startswith("5.1.1") and failed["at"]
    assert [k["kind"] for k in failed["receipts"]] == ["accettazione", "errore-consegna"]
    assert by_address[ALTRO]["error"] is None and by_address[ALTRO]["at"]
    assert {k["kind"] for k in by_address[ALTRO]["receipts"]} == {"accettazione", "avvenuta-consegna"}
    assert [k["kind"] for k in by_address[EXTERNAL]["receipts"]] == ["accettazione"]

    # Filed: out of INBOX, into Ricevute, byte for byte what the archive holds.
    def filed():
        moved = receipts_about(folder_messages(dove, "Ricevute"), msgid)
        return moved if len(moved) == 3 else None

    moved = wait_until(filed, 30, "the three receipts in Ricevute")
    assert receipts_about(folder_messages(dove, "INBOX"), msgid) == []
    hashes = {hashlib.sha256(m).hexdigest() for m in moved}
    reported = {k["sha256"] for r in report["recipients"] for k in r["receipts"]}
    assert hashes == reported
    for sha in hashes:
        stored = (gw.state_dir / "archive" / sha[:2] / f"{sha}.eml").read_bytes()
        assert hashlib.sha256(stored).hexdigest() == sha

    # The failure is alerted: a warn line and a system audit event, once.
    gw.wait_log("PEC not delivered")
    alerts = gw.audit_rows("command = ?", ("receipt-alert",))
    assert [(a["protocol"], a["outcome"]) for a in alerts] == [("system", "error")]
    assert NOUSER in alerts[0]["detail"] and "sent-by=mario" in alerts[0]["detail"]
    # What the worker did to the mailbox is on the trail too.
    files = gw.audit_rows("command = ?", ("receipts-file",))
    assert {f["outcome"] for f in files} >= {"sent", "ok"}
    archived = gw.audit_rows("command = ?", ("receipt-archived",))
    assert sum(msgid.strip("<>") in a["detail"] for a in archived) == 3
    assert gw.cli("audit", "verify").returncode == 0


def test_incoming_pec_stays_in_inbox_and_is_archived(make_gw, dove):
    gw = make_gw()
    envelope = (FIXTURES / "fattura-busta-posta-certificata.eml").read_bytes()
    ordinary = make_message("Newsletter", "Non PEC.\n", sender="news@example.test")
    marker = gw.log_mark()
    # APPEND keeps the bytes exactly (LMTP would add trace headers).
    dove.append(PROVIDER_ADDRESS, "INBOX", envelope)
    dove.append(PROVIDER_ADDRESS, "INBOX", ordinary)
    sha = hashlib.sha256(envelope).hexdigest()
    path = gw.state_dir / "archive" / sha[:2] / f"{sha}.eml"
    wait_until(path.exists, 30, "the incoming PEC envelope archived")
    assert path.read_bytes() == envelope
    inbox = folder_messages(dove, "INBOX")
    assert envelope in inbox and ordinary in inbox, "envelopes and ordinary mail stay in INBOX"
    index = sqlite3.connect(gw.state_dir / "archive" / "index.sqlite")
    kinds = [row[0] for row in index.execute("SELECT kind FROM archived WHERE sha256 = ?", (sha,))]
    assert kinds == ["posta-certificata"]
    # Ordinary mail is never archived.
    assert index.execute("SELECT count(*) FROM archived WHERE sha256 = ?",
                         (hashlib.sha256(ordinary).hexdigest(),)).fetchone()[0] == 0
    assert "could not be classified" not in gw.log_text()[marker:]


def test_unclassifiable_pec_is_kept_in_place_and_listed(make_gw, dove):
    gw = make_gw()
    raw = make_message("ACCETTAZIONE: strana", "?\n", sender=f"posta-certificata@{PEC_DOMAIN}",
                       extra_headers={"X-Ricevuta": "ricevuta-del-futuro"})
    dove.append(PROVIDER_ADDRESS, "INBOX", raw)
    sha = hashlib.sha256(raw).hexdigest()

    def listed():
        return [a for a in cli_json(gw, "receipts", "unclassified") if a["sha256"] == sha] or None

    [row] = wait_until(listed, 30, "the unclassifiable message listed")
    assert row["folder"] == "INBOX" and "ricevuta-del-futuro" in row["note"]
    gw.wait_log("could not be classified")
    assert raw in folder_messages(dove, "INBOX"), "kept where it was, never filed or dropped"
    stored = gw.state_dir / "archive" / sha[:2] / f"{sha}.eml"
    assert stored.read_bytes() == raw


def test_unmatched_receipts_are_kept_and_listed(make_gw, dove):
    gw = make_gw()
    raw = (FIXTURES / "fattura-3-consegna-completa.eml").read_bytes()
    dove.append(PROVIDER_ADDRESS, "INBOX", raw)
    sha = hashlib.sha256(raw).hexdigest()

    def listed():
        found = cli_json(gw, "receipts", "unmatched")
        return [r for r in found if r["sha256"] == sha] or None

    [row] = wait_until(listed, 30, "the receipt listed as unmatched")
    assert row["user"] is None and row["kind"] == "avvenuta-consegna"
    report = show(gw, row["message_id"])
    assert report["user"] is None
    assert [r["state"] for r in report["recipients"]] == ["delivered"]


def test_pending_and_late_delivery_alert(make_gw):
    gw = make_gw(receipts={"alert_after": "1s"})
    msgid = send(gw, "Sollecito", to=(ALTRO, SILENT, TIMEOUT))
    settled(gw, msgid, {ALTRO: "delivered", SILENT: "accepted", TIMEOUT: "failed"})

    def pending():
        found = cli_json(gw, "receipts", "pending", "--older-than", "1s")
        return [m for m in found if m["message_id"] == msgid] or None

    [mine] = wait_until(pending, 30, "the message pending after a second")
    assert {r["address"]: r["state"] for r in mine["recipients"]}[SILENT] == "accepted"
    # Not pending yet by a day's measure.
    assert not [m for m in cli_json(gw, "receipts", "pending", "--older-than", "1d")
                if m["message_id"] == msgid]

    def alerted():
        rows = gw.audit_rows("command = ? AND detail LIKE ?", ("receipt-alert", "%undelivered%"))
        return [r for r in rows if msgid.strip("<>") in r["detail"]] or None

    [alert] = wait_until(alerted, 30, "the late-delivery alert")
    assert SILENT in alert["detail"] and alert["protocol"] == "system"
    gw.wait_log("PEC still not delivered")


def test_restart_in_the_middle_loses_and_duplicates_nothing(make_gw, dove):
    gw = make_gw()
    first = send(gw, "Primo", to=(ALTRO, NOUSER))
    # Killed as soon as the worker has filed something: receipts of the later messages are
    # then still arriving, some archived and not yet filed, some not yet fetched.
    mark = gw.log_mark()
    later = [send(gw, f"Messaggio {i}", to=(ALTRO, TIMEOUT)) for i in range(3)]
    gw.wait_log("receipts filed", since=mark)
    gw.crash()
    gw.start()
    settled(gw, first, {ALTRO: "delivered", NOUSER: "failed"})
    for msgid in later:
        settled(gw, msgid, {ALTRO: "delivered", TIMEOUT: "failed"})

    expected = {first: 3}  # acceptance, delivery, failure
    expected.update({m: 4 for m in later})  # acceptance, delivery, two timeout notices

    def all_filed():
        ricevute = folder_messages(dove, "Ricevute")
        counts = {m: len(receipts_about(ricevute, m)) for m in expected}
        return counts if counts == expected else None

    wait_until(all_filed, 30, f"exactly {expected} receipts in Ricevute")
    for msgid in expected:
        assert receipts_about(folder_messages(dove, "INBOX"), msgid) == []
        report = show(gw, msgid)
        links = [k["sha256"] for r in report["recipients"] for k in r["receipts"]]
        assert len(set(links)) == expected[msgid]
    ledger = sqlite3.connect(gw.state_dir / "ledger.sqlite")
    dupes = ledger.execute("SELECT sha256, count(*) FROM receipt GROUP BY mailbox, sha256 "
                           "HAVING count(*) > 1").fetchall()
    assert dupes == []
    # Every failure alerted, however often its receipts were seen; a second alert only if the
    # kill fell between an alert and its mark in the ledger (alerted again, never lost).
    alerts = gw.audit_rows("command = ? AND detail LIKE ?", ("receipt-alert", "%failed%"))
    alerted = {re.search(r"message=(\S+)", a["detail"]).group(1) for a in alerts}
    assert alerted == set(expected)
    assert len(alerted) <= len(alerts) <= len(alerted) + 1


def test_export_for_preservation(make_gw, tmp_path):
    gw = make_gw()
    msgid = send(gw, "Da conservare", to=(ALTRO,))
    report = settled(gw, msgid, {ALTRO: "delivered"})
    out = tmp_path / "export"
    done = gw.cli("receipts", "export", "--since", "2000-01-01", "--out", str(out))
    assert done.returncode == 0, done.stderr.decode()
    manifest = json.loads((out / "manifest.json").read_text())
    mine = [m for m in manifest if m["message_id"] == msgid]
    assert sorted(m["kind"] for m in mine) == ["accettazione", "avvenuta-consegna"]
    assert {m["sha256"] for m in mine} == {k["sha256"] for k in report["recipients"][0]["receipts"]}
    for m in manifest:
        data = (out / f"{m['sha256']}.eml").read_bytes()
        assert hashlib.sha256(data).hexdigest() == m["sha256"]
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == len(manifest)
    # Nothing archived after a date in the future.
    empty = tmp_path / "none"
    assert gw.cli("receipts", "export", "--since", "2999-01-01", "--out", str(empty)).returncode == 0
    assert json.loads((empty / "manifest.json").read_text()) == []
    bad = gw.cli("receipts", "export", "--since", "yesterday", "--out", str(empty))
    assert bad.returncode != 0 and b"--since" in bad.stderr


def test_a_version_1_ledger_is_migrated_in_place(dove, provider, pecgate_binary):
    gw = harness.Pecgate(dove, binary=pecgate_binary, smtp_url=provider.smtps_url, receipts={})
    try:
        gw.setup()
        old = sqlite3.connect(gw.state_dir / "ledger.sqlite")
        old.executescript("""
            CREATE TABLE sent (id INTEGER PRIMARY KEY, message_id TEXT NOT NULL,
              generated_id INTEGER NOT NULL, session TEXT NOT NULL, user TEXT NOT NULL,
              mailbox TEXT NOT NULL, sender TEXT NOT NULL, recipients TEXT NOT NULL, subject TEXT,
              size INTEGER NOT NULL, submitted_at TEXT NOT NULL, answered_at TEXT,
              status TEXT NOT NULL, provider_reply TEXT);
            INSERT INTO sent VALUES (1, '<old@studio.test>', 0, 's', 'anna', 'studio',
              'studio@pec.example.test', '["a@pec.ente.test"]', 'Vecchio', 10,
              '2026-01-01T00:00:00.000000Z', '2026-01-01T00:00:01.000000Z', 'accepted', '250 ok');
            PRAGMA user_version = 1;
        """)
        old.commit()
        old.close()
        gw.start()
        gw.wait_log("migrated to schema version 2")
        report = show(gw, "old@studio.test")
        assert report["user"] == "anna"
        assert report["recipients"] == [{"address": "a@pec.ente.test", "state": "pending", "at": None,
                                         "error": None, "receipts": []}]
        assert b"<old@studio.test>" in gw.cli("ledger", "show").stdout
        # And it is pending by any measure: sent months ago, never receipted.
        assert [m["message_id"] for m in cli_json(gw, "receipts", "pending")] == ["<old@studio.test>"]
    finally:
        gw.cleanup()


def test_max_connections_must_leave_room_for_the_worker(dove, pecgate_binary):
    gw = harness.Pecgate(dove, binary=pecgate_binary, receipts={}, max_connections=1)
    try:
        gw.write_config()
        done = gw.cli("check")
        assert done.returncode == 1
        assert b"mailboxes.studio.max_connections" in done.stdout + done.stderr
    finally:
        gw.cleanup()


def test_message_timeline_for_auditors(make_gw, dove):
    """`pecgate audit message`: the ledger's send and receipts, and every user's reads, flags,
    copies, deletions and appends through pecgate, followed across folders by UID."""
    dove.create_folders(PROVIDER_ADDRESS, [dove.provider_name("Sent")])
    gw = make_gw()
    sent = send(gw, "Con cronologia", to=(ALTRO,))
    settled(gw, sent, {ALTRO: "delivered"})

    incoming = make_msgid(domain="pec.ente.test")
    dove.append(PROVIDER_ADDRESS, "INBOX",
                make_message("Richiesta", "Testo.\n", sender="ente@pec.ente.test", msgid=incoming))
    anna = gw.client("anna")
    mario = gw.client("mario")
    try:
        anna.select("INBOX")
        typ, data = anna.uid("SEARCH", None, "HEADER", "Message-ID", harness.quote(incoming))
        [uid] = data[0].split()
        assert anna.uid("FETCH", uid, "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT)])")[0] == "OK"
        assert anna.uid("FETCH", uid, "(BODY.PEEK[])")[0] == "OK"
        assert anna.uid("STORE", uid, "+FLAGS", "(\\Flagged)")[0] == "OK"
        # A flag on another message is not this one's history.
        mario.select("INBOX")
        assert mario.uid("FETCH", uid, "(BODY.PEEK[HEADER])")[0] == "OK"
        typ, data = mario.uid("COPY", uid, "Sent")
        assert typ == "OK"
        mario.select("Sent")
        typ, data = mario.uid("SEARCH", None, "HEADER", "Message-ID", harness.quote(incoming))
        [copy_uid] = data[0].split()
        assert mario.uid("STORE", copy_uid, "+FLAGS", "(\\Deleted)")[0] == "OK"
        assert mario.uid("EXPUNGE", copy_uid)[0] == "OK"
        # An APPEND is identified by the Message-ID of what was stored.
        stored = make_msgid(domain=PEC_DOMAIN)
        assert mario.append("Sent", None, None,
                            make_message("Bozza", "x\n", sender=PROVIDER_ADDRESS, msgid=stored))[0] == "OK"
    finally:
        for c in (anna, mario):
            c.logout()

    timeline = cli_json(gw, "audit", "message", "--message-id", incoming.strip("<>"))
    assert timeline["message_id"] == incoming
    got = [(e["user"], e["action"], e["folder"]) for e in timeline["events"]]
    assert got == [
        ("anna", "read-headers", "INBOX"),
        ("anna", "opened", "INBOX"),
        ("anna", "flagged", "INBOX"),
        ("mario", "read-headers", "INBOX"),
        ("mario", "copied", "INBOX"),
        ("mario", "deleted", "Sent"),
        ("mario", "expunged", "Sent"),
    ], got
    assert all(e["ts"] for e in timeline["events"])

    appended = cli_json(gw, "audit", "message", "--message-id", stored)
    assert [(e["user"], e["action"], e["folder"]) for e in appended["events"]] == [("mario", "appended", "Sent")]

    history = cli_json(gw, "audit", "message", "--message-id", sent)
    actions = [(e["user"], e["action"]) for e in history["events"]]
    assert actions[0] == ("mario", "sent")
    assert sorted(a for u, a in actions[1:] if u is None) == ["receipt", "receipt"]
    text = gw.cli("audit", "message", "--message-id", sent).stdout.decode()
    assert "sent" in text and "avvenuta-consegna" in text


def test_a_receipts_folder_set_by_reload_files_the_receipts_already_in_inbox(make_gw, dove):
    import os
    import signal

    gw = make_gw(mailbox_options={})
    msgid = send(gw, "Prima della cartella", to=(ALTRO,))
    settled(gw, msgid, {ALTRO: "delivered"})
    wait_until(lambda: len(receipts_about(folder_messages(dove, "INBOX"), msgid)) == 2, 30,
               "both receipts archived and left in INBOX")
    session = gw.client("anna")  # a reception session: its rights do not change
    try:
        gw.mailboxes["studio"]["receipts_folder"] = "Ricevute"
        ports = {a: getattr(gw, a) for a in ("tls_port", "starttls_port", "smtp_tls_port",
                                             "smtp_starttls_port")}
        for a in ports:
            setattr(gw, a, 0)
        gw.conf_path.write_text(gw.config_text())
        for a, v in ports.items():
            setattr(gw, a, v)
        mark = gw.log_mark()
        os.kill(gw.proc.pid, signal.SIGHUP)
        gw.wait_log("configuration reloaded", mark)
        wait_until(lambda: receipts_about(folder_messages(dove, "INBOX"), msgid) == [], 30,
                   "the receipts filed after the reload")
        assert len(receipts_about(folder_messages(dove, "Ricevute"), msgid)) == 2
        # Filing receipts is no reason to end a client's session.
        assert session.noop()[0] == "OK"
    finally:
        session.logout()
    # Archived once, whatever the worker's restart repeated.
    index = sqlite3.connect(gw.state_dir / "archive" / "index.sqlite")
    hashes = {hashlib.sha256(m).hexdigest() for m in receipts_about(folder_messages(dove, "Ricevute"), msgid)}
    files = {row[0] for row in index.execute("SELECT DISTINCT sha256 FROM archived")}
    assert hashes <= files


def test_idle_outlasts_the_provider_timeout_and_wakes_on_new_mail(make_gw, dove):
    """The worker waits in IDLE far longer than `provider_timeout_secs` (news may take
    hours), and a new receipt reaches the archive at once, not at the next poll."""
    gw = make_gw(receipts={"poll_secs": 600}, gateway_options={"provider_timeout_secs": 1})
    first = send(gw, "Prima", to=(ALTRO,))
    settled(gw, first, {ALTRO: "delivered"})
    mark = gw.log_mark()
    # The property is about time passing: three provider timeouts of silence must not end
    # the worker's session (it did once: IDLE reads were bound by the provider timeout).
    with pytest.raises(TimeoutError):
        gw.wait_log("provider session ended", since=mark, timeout=3.5)
    second = send(gw, "Seconda", to=(ALTRO,))
    settled(gw, second, {ALTRO: "delivered"})
    assert "provider session ended" not in gw.log_text()[mark:]


def test_the_worker_rides_the_watcher_of_parked_sessions(make_gw, dove, clients):
    """With a client parked in IDLE on INBOX, the folder watcher already tells of new mail:
    the worker gives its own connection back and waits on the watcher. A new receipt still
    reaches the archive at once (not at the next poll, ten minutes away), and meanwhile the
    mailbox uses one provider connection: the watcher's."""
    gw = make_gw(receipts={"poll_secs": 600}, imap_options={"park_idle": True},
                 metrics="127.0.0.1:0")
    idler = clients(gw.raw(tls=True, timeout=30))
    idler.login("anna", gw.password("anna"))
    _, tagged = idler.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    idler.send(b"I1 IDLE\r\n")
    assert idler.read_line().startswith(b"+")
    wait_until(lambda: harness.pool_metric(gw, "pecgate_folder_watchers") == 1, 20,
               "the folder watcher of the parked session")
    # The worker was already in IDLE when the client parked: its next scan (woken by this
    # receipt) finds the watcher.
    first = send(gw, "Prima", to=(ALTRO,))
    settled(gw, first, {ALTRO: "delivered"})
    wait_until(lambda: harness.pool_metric(gw, "pecgate_provider_connections") == 1, 30,
               "the worker to give its connection back and ride the watcher")
    second = send(gw, "Seconda", to=(ALTRO,))
    settled(gw, second, {ALTRO: "delivered"})
    wait_until(lambda: harness.pool_metric(gw, "pecgate_provider_connections") == 1, 30,
               "the worker to ride the watcher again after its scan")
    idler.send(b"DONE\r\n")
    _, tagged = idler.read_until_tagged("I1", 30)
    assert tagged == b"I1 OK IDLE terminated", tagged
