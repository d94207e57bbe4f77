"""Provider session limits, provider outages and upstream STARTTLS."""

import time

from harness import free_port, quote


def _login_line(gw, clients, user="mario", timeout=15):
    r = clients(gw.raw(tls=True, timeout=timeout))
    t0 = time.monotonic()
    _, tagged = r.command("L1", f"LOGIN {user} {quote(gw.password(user))}", timeout=timeout)
    return r, tagged, time.monotonic() - t0


def test_provider_down_gives_unavailable(dovecot, make_gateway, clients):
    closed = free_port()
    gw = make_gateway(upstream_url=f"imaps://127.0.0.1:{closed}")
    _, tagged, elapsed = _login_line(gw, clients, "mario", timeout=30)
    assert tagged.startswith(b"L1 NO"), tagged
    assert b"[UNAVAILABLE]" in tagged, tagged
    # the gateway itself keeps serving
    r = clients(gw.raw(tls=True))
    _, t = r.command("N1", "NOOP")
    assert t.startswith(b"N1 OK"), t


def test_wrong_provider_password_does_not_log_user_in(dovecot, make_gateway, clients):
    gw = make_gateway(provider_password="not-the-provider-password")
    _, tagged, _ = _login_line(gw, clients, "mario", timeout=30)
    assert tagged.startswith(b"L1 NO"), tagged


def test_upstream_starttls(dovecot, make_gateway, clients):
    gw = make_gateway(upstream="imap")
    assert gw.mailboxes["studio"]["imap"].startswith("imap://")
    c = clients(gw.client("mario"))
    typ, data = c.select("INBOX", readonly=True)
    assert typ == "OK", data
    direct = dovecot.imap_direct("studio@pec.example.test")
    try:
        assert direct.select("INBOX", readonly=True)[1][0] == data[0]
    finally:
        direct.logout()
