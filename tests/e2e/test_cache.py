"""Fetch once: a message body one employee downloaded serves the next employee's download from
pecgate's cache (under state_dir, readable only by pecgate), so the provider sends each body
once. The provider still answers every command (without the body): which messages exist,
their numbers and flags. A folder replaced on the provider (new UIDVALIDITY) never gets the
old folder's bodies; a damaged cache entry is a miss. Against a real Dovecot whose raw
protocol log shows what pecgate asked."""

from __future__ import annotations

import os
import re
import stat

import pytest

import harness
from harness import PROVIDER_ADDRESS, Dovecot, wait_until

BODY = re.compile(rb"BODY\[\](?:<\d+>)? \{(\d+)\}")


def message(subject: str) -> bytes:
    return (f"From: a@pec.example.test\r\nTo: studio@pec.example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{harness.secrets.token_hex(6)}@pec.example.test>\r\n\r\n"
            f"{subject} " * 200 + "\r\n").encode()


@pytest.fixture
def office(pecgate_binary):
    d = Dovecot(rawlog=[PROVIDER_ADDRESS])
    d.add_user(PROVIDER_ADDRESS, "provider-" + harness.secrets.token_hex(8))
    with d:
        for i in range(4):
            d.append(PROVIDER_ADDRESS, "INBOX", message(f"seed {i}"))
        d.create_folders(PROVIDER_ADDRESS, ["Ricevute"])
        # The cache keeps nothing while state_dir has less than min_free_space_mb free: a
        # small reserve, so the test does not depend on the machine's disk.
        with harness.gateways(d, binary=pecgate_binary,
                              gateway_options={"body_cache_mib": 16,
                                               "min_free_space_mb": 1}) as make:
            yield d, make()


def fetch_body(r, tag: str, uid: int, folder: str = "INBOX", part: str = "") -> bytes:
    _, tagged = r.command(f"{tag}s", f"SELECT {folder}")
    assert tagged.split()[1] == b"OK", tagged
    r.send(f"{tag} UID FETCH {uid} (UID FLAGS BODY.PEEK[]{part})\r\n".encode())
    answer = b""
    while True:
        line = r.read_line(20)
        if line.startswith(tag.encode() + b" "):
            assert line.split()[1] == b"OK", line
            break
        answer += line + b"\r\n"
    m = BODY.search(answer)
    assert m, answer
    start = m.end() + 2
    return answer[start:start + int(m.group(1))]


def provider_fetches(dovecot) -> list[bytes]:
    """pecgate's FETCH commands as the provider received them."""
    sent = b"".join(c.received for c in dovecot.rawlog_connections())
    return re.findall(rb"^c\d+ UID FETCH [^\r\n]*", sent, re.M)


def direct_body(dovecot, uid: int, folder: str = "INBOX") -> bytes:
    with harness.RawImap(dovecot.imaps_port, cafile=dovecot.cert) as direct:
        direct.login(PROVIDER_ADDRESS, dovecot.users[PROVIDER_ADDRESS])
        return fetch_body(direct, "d", uid, folder)


def test_a_body_downloaded_once_serves_the_next_download(office, clients):
    dovecot, gw = office
    mario = clients(gw.raw(tls=True))
    mario.login("mario", gw.password("mario"))
    first = fetch_body(mario, "m1", 2)
    assert first == direct_body(dovecot, 2)

    anna = clients(gw.raw(tls=True))
    anna.login("anna", gw.password("anna"))
    again = fetch_body(anna, "a1", 2)
    assert again == first
    # The provider sent the body once: anna's download asked it only for the rest.
    fetches = provider_fetches(dovecot)
    assert sum(b"BODY.PEEK[]" in f for f in fetches) == 1, fetches
    assert any(re.fullmatch(rb"c\d+ UID FETCH 2 \(UID FLAGS\)", f) for f in fetches), fetches
    # Thunderbird shows a message in parts (`BODY.PEEK[]<0.65536>`): served from the cache too.
    assert fetch_body(anna, "a2", 2, part="<0.100>") == first[:100]
    assert fetch_body(anna, "a3", 2, part=f"<100.{len(first)}>") == first[100:]
    fetches = provider_fetches(dovecot)
    assert sum(b"BODY.PEEK[]" in f for f in fetches) == 1, fetches

    # On disk under state_dir, readable only by pecgate.
    cache = gw.state_dir / "cache" / "bodies"
    files = [p for p in cache.iterdir()]
    assert len(files) == 1 and files[0].stat().st_size == len(first) + 32
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    # The audit names the message anna read, as for any download, and says where it came from.
    rows = wait_until(lambda: (rows := [r for r in gw.audit_rows() if r["user"] == "anna"
                                        and r["command"] in ("UID FETCH", "message")])
                      and len(rows) >= 2 and rows, 10, "anna's download in the audit log")
    fetch = next(r for r in rows if r["command"] == "UID FETCH")
    assert "bodies from pecgate's cache" in fetch["detail"] and fetch["outcome"] == "ok", fetch
    assert any("uid=2" in r["detail"] and "opened" in r["detail"] for r in rows
               if r["command"] == "message"), rows


def test_a_replaced_folder_and_a_damaged_entry_go_to_the_provider(office, clients):
    dovecot, gw = office
    dovecot.append(PROVIDER_ADDRESS, "Ricevute", message("prima"))
    mario = clients(gw.raw(tls=True))
    mario.login("mario", gw.password("mario"))
    old = fetch_body(mario, "m1", 1, "Ricevute")
    _, tagged = mario.command("u", "UNSELECT")
    # The folder is replaced: a new message gets UID 1 under a new UIDVALIDITY.
    with harness.RawImap(dovecot.imaps_port, cafile=dovecot.cert) as direct:
        direct.login(PROVIDER_ADDRESS, dovecot.users[PROVIDER_ADDRESS])
        for tag, text in (("x1", "DELETE Ricevute"), ("x2", "CREATE Ricevute")):
            _, tagged = direct.command(tag, text)
            assert tagged.split()[1] == b"OK", tagged
    dovecot.append(PROVIDER_ADDRESS, "Ricevute", message("seconda"))
    new = fetch_body(mario, "m2", 1, "Ricevute")
    assert new != old and b"seconda" in new
    assert new == direct_body(dovecot, 1, "Ricevute")

    # A damaged entry is not served: the provider is asked again, and the client gets the
    # message as it is.
    cache = gw.state_dir / "cache" / "bodies"
    for path in cache.iterdir():
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x20
        path.write_bytes(bytes(data))
    before = sum(b"BODY.PEEK[]" in f for f in provider_fetches(dovecot))
    again = fetch_body(mario, "m3", 1, "Ricevute")
    assert again == new
    assert sum(b"BODY.PEEK[]" in f for f in provider_fetches(dovecot)) == before + 1
