"""Process lifecycle: graceful SIGTERM, `pecgate check`, vault CLI."""

import re
import signal
import socket
import time

import pytest

from harness import HOST


def _read_until_bye(r, timeout):
    deadline = time.monotonic() + timeout
    lines = []
    while True:
        try:
            line = r.read_line(max(0.01, deadline - time.monotonic()))
        except EOFError:
            return lines, False
        lines.append(line)
        if line.startswith(b"* BYE"):
            return lines, True


def test_sigterm_sends_bye_and_exits_zero(make_gateway, clients):
    gw = make_gateway()
    logged_in = clients(gw.raw(tls=True))
    logged_in.login("mario", gw.password("mario"))
    _, tagged = logged_in.command("S1", "SELECT INBOX")
    assert tagged.startswith(b"S1 OK"), tagged
    not_logged_in = clients(gw.raw(tls="starttls"))

    gw.proc.send_signal(signal.SIGTERM)

    lines, got_bye = _read_until_bye(logged_in, 15)
    assert got_bye, f"logged-in client got no * BYE: {lines!r}"
    lines, got_bye = _read_until_bye(not_logged_in, 15)
    assert got_bye, f"unauthenticated client got no * BYE: {lines!r}"

    code = gw.stop(timeout=15)
    assert code == 0, f"exit code {code}\n{gw.log_text()}"
    with pytest.raises(OSError):
        socket.create_connection((HOST, gw.tls_port), timeout=2).close()


def test_sigterm_while_idle_exits_zero(make_gateway, clients):
    gw = make_gateway()
    r = clients(gw.raw(tls=True))
    r.login("mario", gw.password("mario"))
    assert r.command("S1", "SELECT INBOX")[1].startswith(b"S1 OK")
    r.send(b"I1 IDLE\r\n")
    assert r.read_line().startswith(b"+")
    gw.proc.send_signal(signal.SIGTERM)
    lines, got_bye = _read_until_bye(r, 15)
    assert got_bye, lines
    assert gw.stop(timeout=15) == 0, gw.log_text()


def test_check_accepts_good_config(gateway):
    res = gateway.cli("check")
    assert res.returncode == 0, (res.stdout, res.stderr)


def _check(gateway, tmp_path, text):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    res = gateway.cli("check", config=bad)
    return res.returncode, (res.stdout + res.stderr).decode(errors="replace")


def test_check_rejects_unknown_key(gateway, tmp_path):
    good = gateway.config_text()
    text = good.replace("[imap]\n", '[imap]\nlisten_tsl = ["127.0.0.1:1"]\n', 1)
    assert text != good
    code, out = _check(gateway, tmp_path, text)
    assert code != 0, out
    assert "listen_tsl" in out, out


def test_check_lists_every_problem_with_key_paths(gateway, tmp_path):
    good = gateway.config_text()
    text = good.replace('[roles.segreteria]\nmailboxes = ["studio"]',
                        '[roles.segreteria]\nmailboxes = ["archivio"]', 1)
    text = text.replace('roles = ["reception"]', 'roles = ["portineria"]', 1)
    assert text.count("archivio") == 1 and text.count("portineria") == 1
    code, out = _check(gateway, tmp_path, text)
    assert code != 0, out
    assert "roles.segreteria" in out, out
    assert "users.anna" in out, out


def test_check_rejects_bad_listen_address(gateway, tmp_path):
    good = gateway.config_text()
    text = good.replace(f'listen_tls = ["127.0.0.1:{gateway.tls_port}"]', 'listen_tls = ["not-an-address"]', 1)
    assert text != good
    code, out = _check(gateway, tmp_path, text)
    assert code != 0, out
    assert "imap.listen_tls" in out or "listen_tls" in out, out


def test_vault_list_shows_mailbox_without_secret(gateway):
    res = gateway.cli("vault", "list")
    assert res.returncode == 0, res.stderr
    out = (res.stdout + res.stderr).decode(errors="replace")
    assert "studio" in out, out
    assert gateway.mailboxes["studio"]["_password"] not in out
    vault_files = [p for p in gateway.state_dir.iterdir() if "vault" in p.name]
    assert vault_files, list(gateway.state_dir.iterdir())
    secret = gateway.mailboxes["studio"]["_password"].encode()
    for p in vault_files:
        assert secret not in p.read_bytes(), f"provider password stored in clear in {p}"


def test_check_live_shows_each_users_folders(gateway):
    res = gateway.cli("check", "--live")
    out = res.stdout.decode()
    assert res.returncode == 0, (out, res.stderr)
    # Per user, the folders they will see, from a live LIST at the provider.
    sections = dict(re.findall(r"^  (\w+) sees:\n((?:    .*\n)+)", out, re.M))
    assert set(sections) == {"mario", "anna"}, out
    seen = {user: {line.strip().split("  ")[0] for line in text.splitlines()}
            for user, text in sections.items()}
    assert seen["anna"] == {"INBOX"}, out
    assert {"INBOX", "Sent", "Ricevute", "Ricevute/Consegne"} <= seen["mario"], out
    assert "Riservata" not in seen["mario"], out


def test_check_without_live_prints_patterns(gateway):
    res = gateway.cli("check")
    out = res.stdout.decode()
    assert res.returncode == 0, (out, res.stderr)
    assert re.search(r"anna on studio: permissions read, flag; folders INBOX\n", out), out
