"""Real IMAP clients through pecgate: mbsync (isync) and curl."""

import hashlib
import re
import subprocess

import pytest

from harness import PROVIDER_ADDRESS, make_message, maildir_digests, mbsync_pull, normalise_synced, wait_until

BULK_FOLDER = "Ricevute/Archivio"
BULK_COUNT = 2000


@pytest.fixture(scope="module")
def bulk_folder(dovecot):
    messages = [
        make_message(f"CONSEGNA: pratica {i}", f"Ricevuta numero {i}.\n" + "testo di prova\n" * (i % 13))
        for i in range(BULK_COUNT)
    ]
    dovecot.create_folders(PROVIDER_ADDRESS, [BULK_FOLDER])
    dovecot.append_many(PROVIDER_ADDRESS, BULK_FOLDER, messages)
    return sorted(hashlib.sha256(normalise_synced(m)).hexdigest() for m in messages)


def _check_mbsync(res, label):
    assert res.returncode == 0, f"mbsync {label} failed ({res.returncode}):\n{res.stderr.decode(errors='replace')}"


def test_mbsync_through_gateway_matches_direct(gateway, dovecot, bulk_folder, tmp_path):
    direct = mbsync_pull(dovecot.imaps_port, PROVIDER_ADDRESS, dovecot.users[PROVIDER_ADDRESS], dovecot.cert,
                         [BULK_FOLDER], tmp_path / "direct")
    _check_mbsync(direct, "direct to Dovecot")
    via = mbsync_pull(gateway.tls_port, "mario", gateway.password("mario"), gateway.cert,
                      [BULK_FOLDER], tmp_path / "gateway")
    _check_mbsync(via, "through pecgate")

    direct_digests = maildir_digests(tmp_path / "direct" / BULK_FOLDER)
    via_digests = maildir_digests(tmp_path / "gateway" / BULK_FOLDER)
    assert len(direct_digests) == BULK_COUNT
    assert direct_digests == bulk_folder
    assert len(via_digests) == BULK_COUNT, f"pecgate sync produced {len(via_digests)} messages"
    assert via_digests == direct_digests


def test_mbsync_over_starttls_listener(gateway, dovecot, tmp_path):
    folder = "Ricevute/Consegne"
    direct = mbsync_pull(dovecot.imap_port, PROVIDER_ADDRESS, dovecot.users[PROVIDER_ADDRESS], dovecot.cert,
                         [folder], tmp_path / "direct", tls="starttls")
    _check_mbsync(direct, "direct to Dovecot")
    via = mbsync_pull(gateway.starttls_port, "mario", gateway.password("mario"), gateway.cert,
                      [folder], tmp_path / "gateway", tls="starttls")
    _check_mbsync(via, "through pecgate (STARTTLS)")
    d = maildir_digests(tmp_path / "direct" / folder)
    assert d and maildir_digests(tmp_path / "gateway" / folder) == d


def _curl(*args):
    return subprocess.run(["curl", "-sS", "--max-time", "60", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=90)


def _list_names(output: bytes):
    return {m.group(1).strip().strip('"') for m in re.finditer(r'^\* LIST \([^)]*\) "[^"]*" (.+?)\r?$',
                                                                output.decode(), re.M)}


def test_curl_imaps_list(gateway):
    res = _curl("--ssl-reqd", "--cacert", str(gateway.cert), "--user", f"mario:{gateway.password('mario')}",
                f"imaps://127.0.0.1:{gateway.tls_port}/")
    assert res.returncode == 0, res.stderr
    names = _list_names(res.stdout)
    assert {"INBOX", "Sent"} <= names, res.stdout


def test_curl_starttls_list(gateway):
    res = _curl("--ssl-reqd", "--cacert", str(gateway.cert), "--user", f"mario:{gateway.password('mario')}",
                f"imap://127.0.0.1:{gateway.starttls_port}/")
    assert res.returncode == 0, res.stderr
    assert "INBOX" in _list_names(res.stdout), res.stdout


def test_curl_fetch_matches_direct(gateway, dovecot):
    c = dovecot.imap_direct(PROVIDER_ADDRESS)
    try:
        c.select("INBOX", readonly=True)
        typ, data = c.fetch("1", "(BODY.PEEK[])")
        expected = data[0][1]
    finally:
        c.logout()
    res = _curl("--ssl-reqd", "--cacert", str(gateway.cert), "--user", f"mario:{gateway.password('mario')}",
                f"imaps://127.0.0.1:{gateway.tls_port}/INBOX;MAILINDEX=1")
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected


def test_mbsync_through_a_pool_of_two_beside_parked_idlers(make_gateway, dovecot, bulk_folder, tmp_path):
    """Two provider connections for everything: a colleague's five clients idle on INBOX
    (parked: the folder watcher holds one connection for all of them) while two full mbsync
    pulls run one after the other on the other; both equal a direct sync, and the second
    gets every body from pecgate's cache (fetch once)."""
    gw = make_gateway(max_connections=2,
                      gateway_options={"provider_idle_keep_secs": 60, "body_cache_mib": 256,
                                       "min_free_space_mb": 1},
                      imap_options={"park_idle": True, "lend_between_commands": True})
    idlers = []
    try:
        for _ in range(5):
            r = gw.raw(tls=True, timeout=30)
            r.login("anna", gw.password("anna"))
            _, tagged = r.command("S1", "SELECT INBOX")
            assert tagged.startswith(b"S1 OK"), tagged
            r.send(b"I1 IDLE\r\n")
            assert r.read_line().startswith(b"+")
            idlers.append(r)
        def cached_downloads() -> int:
            return sum(1 for r in gw.audit_rows()
                       if r["command"] == "UID FETCH" and "bodies from pecgate's cache" in r["detail"])

        for run in ("first", "second"):
            before = cached_downloads()
            via = mbsync_pull(gw.tls_port, "mario", gw.password("mario"), gw.cert,
                              [BULK_FOLDER], tmp_path / run)
            _check_mbsync(via, f"{run} pull through a pool of two")
            assert maildir_digests(tmp_path / run / BULK_FOLDER) == bulk_folder
            if run == "second":
                wait_until(lambda: cached_downloads() - before >= len(bulk_folder), 20,
                           "every body of the second pull to come from the cache")
        for r in idlers:
            r.send(b"DONE\r\n")
            _, tagged = r.read_until_tagged("I1", 30)
            assert tagged == b"I1 OK IDLE terminated", tagged
            _, tagged = r.command("L1", "LOGOUT")
    finally:
        for r in idlers:
            r.close()
