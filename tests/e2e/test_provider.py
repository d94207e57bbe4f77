"""Sanity checks of the test provider itself (Dovecot through the harness),
so that a failure elsewhere can be told apart from a broken harness."""

from harness import PROVIDER_ADDRESS, make_message, message_id_of, quote


def test_direct_login_sees_demo_folders(dovecot):
    c = dovecot.imap_direct(PROVIDER_ADDRESS)
    try:
        typ, data = c.list()
        assert typ == "OK"
        listed = b"\n".join(data)
        for folder in (b"INBOX", b"Sent", b"Ricevute/Consegne", b"Riservata"):
            assert folder in listed, data
        typ, data = c.select("INBOX", readonly=True)
        assert typ == "OK" and int(data[0]) >= 3
    finally:
        c.logout()


def test_lmtp_delivery_lands_in_inbox(dovecot):
    raw = make_message("consegna di prova via LMTP")
    dovecot.deliver(PROVIDER_ADDRESS, raw)
    c = dovecot.imap_direct(PROVIDER_ADDRESS)
    try:
        c.select("INBOX", readonly=True)
        typ, data = c.uid("SEARCH", None, "HEADER", "Message-ID", quote(message_id_of(raw)))
        assert typ == "OK" and len(data[0].split()) == 1, data
    finally:
        c.logout()
