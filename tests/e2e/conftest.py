"""Fixtures for pecgate's end-to-end tests.

A session-wide Dovecot (the PEC provider) and a session-wide pecgate keep the
suite fast; tests that need a special configuration ask ``make_gateway`` for a
fresh pecgate (cleaned up at the end of the test).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

import harness  # noqa: E402
from harness import PROVIDER_ADDRESS, Dovecot, Pecgate  # noqa: E402


@pytest.fixture(scope="session")
def pecgate_binary() -> Path:
    binary = harness.pecgate_bin()
    if not binary.exists():
        pytest.fail(f"pecgate binary not found at {binary}: run `cargo build` first or set PECGATE_BIN")
    return binary


@pytest.fixture(scope="session")
def dovecot():
    d = Dovecot()
    d.add_user(PROVIDER_ADDRESS, "provider-" + harness.secrets.token_hex(8))
    d.add_user("altro@pec.example.test", "altro-" + harness.secrets.token_hex(8))
    with d:
        harness.populate_demo(d)
        yield d


@pytest.fixture(scope="session")
def gateway(dovecot, pecgate_binary):
    with Pecgate(dovecot, binary=pecgate_binary).set_up() as gw:
        yield gw


@pytest.fixture
def make_gateway(dovecot, pecgate_binary):
    """Factory for fresh pecgate instances: make_gateway(max_connections=2, ...)."""
    with harness.gateways(dovecot, binary=pecgate_binary) as make:
        yield make


@pytest.fixture
def clients():
    """Collects imaplib / RawImap clients and closes them after the test."""

    def close(c):
        if isinstance(c, harness.RawImap):
            c.close()
        else:
            try:
                c.logout()
            except Exception:
                c.shutdown()

    with harness.tracking(close) as track:
        yield track


@pytest.fixture
def mario(gateway, clients):
    return clients(gateway.client("mario"))
