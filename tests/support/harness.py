#!/usr/bin/env python3
"""End-to-end harness for pecgate.

One library shared by the pytest suite (tests/e2e), the sandbox script
(scripts/sandbox.sh) and benchmarks:

* ``make_cert`` / ``free_port`` helpers;
* ``Dovecot``: a private Dovecot instance playing the PEC provider (IMAP, LMTP);
* ``PecProvider``: the sandbox PEC provider's SMTP side (``pec_provider.py``),
  which accepts submissions and delivers receipts into Dovecot over LMTP;
* ``Pecgate``: writes a pecgate config, stores the provider password in the
  vault, runs ``pecgate serve`` and gives logged-in imaplib / smtplib clients;
* ``RawImap``: a tiny line/literal-aware IMAP client over a raw (TLS) socket
  for the tests that must control the bytes on the wire.

Run ``python3 tests/support/harness.py sandbox`` for the "run it for real"
mode (see ``main``).  Python standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import imaplib
import json
import os
import pwd
import grp
import hashlib
import re
import secrets
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import string
import subprocess
import sys
import tempfile
import threading
import urllib.request
import time
from email.utils import formatdate, make_msgid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
PROVIDER_ADDRESS = "studio@pec.example.test"

# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


class HarnessError(RuntimeError):
    pass


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and was not handed out before by this
    process (the kernel may offer a just-closed port again, and a daemon given two equal
    ports refuses to start)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def read_until_closed(port: int, source: str | None = None, timeout: float = 10.0,
                      host: str = HOST) -> bytes:
    """Connect over plain TCP (from the loopback address ``source``, e.g. ``127.0.0.2``: Linux
    routes all of 127.0.0.0/8 to loopback, so tests can act as several client addresses),
    send nothing, and return every byte the server sends before it closes the connection.
    ``TimeoutError`` if it is still open after ``timeout``."""
    deadline = time.monotonic() + timeout
    source_address = (source, 0) if source else None
    with socket.create_connection((host, port), timeout=timeout, source_address=source_address) as s:
        out = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"connection to {port} still open after {timeout}s; got {out[:300]!r}")
            s.settimeout(remaining)
            try:
                chunk = s.recv(4096)
            except (socket.timeout, TimeoutError):
                raise TimeoutError(f"connection to {port} still open after {timeout}s; got {out[:300]!r}")
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - reported on timeout
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def make_cert(directory, cn: str = "localhost", san: str = "DNS:localhost,IP:127.0.0.1"):
    """Self-signed certificate (``CN.crt``, ``CN.key`` in ``directory``) valid for the names
    in ``san`` (openssl's subjectAltName syntax): by default DNS:localhost, IP:127.0.0.1."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / f"{cn}.crt"
    key = directory / f"{cn}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
            "-days", "30", "-subj", f"/CN={cn}",
            "-addext", f"subjectAltName={san}",
            # A leaf, not a CA: rustls (webpki) refuses a CA certificate as a server's
            # end-entity certificate, and so would a careful client.
            "-addext", "basicConstraints=critical,CA:FALSE",
            "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
            "-addext", "extendedKeyUsage=serverAuth",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    os.chmod(key, 0o644)  # read by Dovecot's login processes (unprivileged)
    return cert, key


def tls_context(cafile) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = True
    return ctx


def make_message(subject: str, body: str = "", sender: str = "mittente@pec.example.test",
                 to: str = PROVIDER_ADDRESS, extra_headers=None, msgid: str | None = None) -> bytes:
    """A small RFC 5322 message with CRLF line endings."""
    headers = [
        ("From", sender),
        ("To", to),
        ("Subject", subject),
        ("Date", formatdate(localtime=False)),
        ("Message-ID", msgid or make_msgid(domain="pec.example.test")),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8"),
    ]
    for k, v in (extra_headers or {}).items():
        headers.append((k, v))
    text = "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    body = body or f"Corpo del messaggio: {subject}\r\n"
    body = body.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    return (text + body).encode("utf-8")


def make_big_message(size: int, subject: str = "big message") -> bytes:
    """A ~``size`` bytes message made of 76-char base64-ish lines (CRLF)."""
    msgid = make_msgid(domain="pec.example.test")
    head = (
        f"From: mittente@pec.example.test\r\nTo: {PROVIDER_ADDRESS}\r\n"
        f"Subject: {subject}\r\nMessage-ID: {msgid}\r\nDate: {formatdate()}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode()
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    rnd = secrets.token_bytes(76)
    lines = []
    total = len(head)
    i = 0
    while total < size:
        line = bytes(alphabet[(b + i) % 64] for b in rnd) + b"\r\n"
        lines.append(line)
        total += len(line)
        i += 1
    return head + b"".join(lines)


def message_id_of(raw: bytes) -> str:
    m = re.search(rb"^Message-ID:\s*(<[^>]+>)", raw, re.M | re.I)
    if not m:
        raise ValueError("message has no Message-ID")
    return m.group(1).decode()


@contextlib.contextmanager
def tracking(close):
    """Yields ``track(client) -> client``; on exit ``close(client)`` runs for every tracked
    client, its errors ignored. For fixtures that close a test's clients after it."""
    opened = []

    def track(c):
        opened.append(c)
        return c

    try:
        yield track
    finally:
        for c in opened:
            with contextlib.suppress(Exception):
                close(c)


def _work_dir(base_dir, prefix: str) -> tuple[Path, bool]:
    """``base_dir`` (created if needed), or a fresh temp dir named ``prefix...``; and whether
    the directory is ours to remove."""
    if base_dir is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    path = Path(base_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def _ensure_traversable(path: Path):
    """Dovecot's unprivileged processes must reach files under ``path``."""
    path.chmod(0o755)
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise HarnessError(
                f"{parent} is not traversable by other users (mode {oct(mode & 0o777)}); "
                "Dovecot's unprivileged processes could not reach its files. "
                "Use a directory under the system temp dir."
            )


def run_cli(args, input_bytes: bytes | None = None, timeout: float = 120, env=None):
    """Run a CLI command without a controlling terminal (no tty prompt can hang us)."""
    return subprocess.run(
        [str(a) for a in args], input=input_bytes if input_bytes is not None else b"",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
        start_new_session=True, env=env,
    )


def _kill_group(proc: subprocess.Popen, term_timeout: float = 3.0) -> int | None:
    """SIGTERM the process group, then SIGKILL it after ``term_timeout``."""
    if proc.poll() is not None and not _group_alive(proc.pid):
        return proc.returncode
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=term_timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        wait_until(lambda: not _group_alive(proc.pid), term_timeout, "process group exit")
    except TimeoutError:
        pass
    if _group_alive(proc.pid) or proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    return proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def tmpfs_mounted(directory, size: str = "2m"):
    """A tmpfs of ``size`` (mount's syntax) on ``directory`` while the ``with`` lasts, for tests
    that fill a disk. Raises HarnessError when it cannot be mounted (not root, or a container
    without CAP_SYS_ADMIN). Whatever keeps files open there must be stopped before leaving."""
    directory = Path(directory)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise HarnessError(f"cannot run mount: {exc}") from exc
    if res.returncode != 0:
        raise HarnessError(f"cannot mount a tmpfs on {directory}: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], stderr=subprocess.DEVNULL)


def fill_disk(path) -> int:
    """Write zeros to the new file ``path`` until the filesystem is full (every write fails);
    returns the bytes written. Remove the file to give the space back."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 64 * 1024, 4096, 1):
            block = bytes(size)
            while True:
                try:
                    n = f.write(block)
                except OSError:
                    break
                if not n:
                    break
                written += n
    return written


# ---------------------------------------------------------------------------
# raw IMAP client
# ---------------------------------------------------------------------------

_LITERAL_RE = re.compile(rb"\{(\d+)\+?\}\r\n$")


class RawImap:
    """Minimal IMAP client over a raw socket (optionally TLS).

    ``read_line`` returns one complete server response line, literals
    included (``{N}\\r\\n`` followed by N bytes is folded into the line).
    Every read has a deadline; nothing blocks forever. ``source``: the local address to
    connect from (any of 127.0.0.0/8 on Linux), to act as another client address.
    """

    def __init__(self, port: int, tls: bool = True, cafile=None, host: str = HOST,
                 timeout: float = 15.0, source: str | None = None):
        self.host = host
        self.timeout = timeout
        self.cafile = cafile
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        if tls:
            sock = tls_context(cafile).wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.buf = b""
        self.greeting = self.read_line()

    # -- low level -------------------------------------------------------
    def send(self, data: bytes | str):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("IMAP read deadline passed; buffered: %r" % self.buf[:300])
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            raise TimeoutError("IMAP read deadline passed; buffered: %r" % self.buf[:300])
        if not chunk:
            return False
        self.buf += chunk
        return True

    def read_line(self, timeout: float | None = None) -> bytes:
        """One logical response line (with literals), without the final CRLF."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        out = b""
        while True:
            idx = self.buf.find(b"\r\n")
            while idx < 0:
                if not self._fill(deadline):
                    raise EOFError("connection closed by server; partial: %r" % (out + self.buf)[:300])
                idx = self.buf.find(b"\r\n")
            line, self.buf = self.buf[: idx + 2], self.buf[idx + 2:]
            out += line
            m = _LITERAL_RE.search(line)
            if not m:
                return out[:-2]
            n = int(m.group(1))
            while len(self.buf) < n:
                if not self._fill(deadline):
                    raise EOFError("connection closed inside a literal")
            out += self.buf[:n]
            self.buf = self.buf[n:]

    def read_until_tagged(self, tag: str, timeout: float | None = None):
        """Read until the tagged response for ``tag``. Returns (untagged, tagged)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        untagged = []
        t = tag.encode() + b" "
        while True:
            line = self.read_line(max(0.001, deadline - time.monotonic()))
            if line.startswith(t):
                return untagged, line
            untagged.append(line)

    def command(self, tag: str, text: str | bytes, timeout: float | None = None):
        if isinstance(text, str):
            text = text.encode()
        self.send(tag.encode() + b" " + text + b"\r\n")
        return self.read_until_tagged(tag, timeout)

    def login(self, user: str, password: str, tag: str = "L1"):
        _, tagged = self.command(tag, f"LOGIN {quote(user)} {quote(password)}")
        if not tagged.startswith(f"{tag} OK".encode()):
            raise HarnessError(f"LOGIN failed: {tagged!r}")
        return tagged

    def starttls(self, tag: str = "S1"):
        _, tagged = self.command(tag, "STARTTLS")
        if not tagged.startswith(f"{tag} OK".encode()):
            raise HarnessError(f"STARTTLS failed: {tagged!r}")
        if self.buf:
            raise HarnessError("server sent data after STARTTLS OK (injection)")
        self.sock = tls_context(self.cafile).wrap_socket(self.sock, server_hostname=self.host)
        return tagged

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def capabilities_from(lines) -> set[str]:
    """Capability atoms from '* CAPABILITY ...' lines or '[CAPABILITY ...]' codes."""
    caps = set()
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        m = re.search(r"^\* CAPABILITY (.*)$", line, re.I) or re.search(r"\[CAPABILITY ([^\]]*)\]", line, re.I)
        if m:
            caps.update(a.upper() for a in m.group(1).split())
    return caps


# ---------------------------------------------------------------------------
# Dovecot
# ---------------------------------------------------------------------------

# The private Dovecot's configuration, in the two formats Dovecot has had: 2.3 (Debian 12
# "bookworm") and 2.4 (Debian 13 "trixie"; 2.4 refuses 2.3 settings and vice versa). The
# harness asks `dovecot --version` and writes the matching text (``dovecot_config_format``).
# Both describe the same provider; keep them in step when a setting changes.
#
# 2.3 setting                          2.4 setting (doc.dovecot.org, "Upgrading 2.3 to 2.4")
# ------------------------------------ ----------------------------------------------------
# (none)                               dovecot_config_version, dovecot_storage_version: the
#                                      first setting must be dovecot_config_version. 2.4.0 is
#                                      accepted by every 2.4.x and keeps 2.4.0's defaults.
# ssl_cert = <FILE, ssl_key = <FILE    ssl_server_cert_file = FILE, ssl_server_key_file = FILE
# disable_plaintext_auth = no          auth_allow_cleartext = yes
# mail_location = maildir:~/Maildir    mail_driver = maildir, mail_path = ~/Maildir
# (\Noselect parents are listed)       mailbox_list_drop_noselect = no (2.4's default is yes:
#                                      it would hide the \Noselect parents the tests list)
# rawlog_dir = DIR/%u                  rawlog_dir = DIR/%{user} (one-letter variables are gone)
# passdb { driver = passwd-file        passdb passwd-file { driver = passwd-file
#   args = scheme=PLAIN                  passwd_file_path = FILE }  (sections need a name;
#   username_format=%u FILE }            args is gone; passwords carry {PLAIN}; the lookup
#                                        key defaults to the user name)
# userdb { driver = passwd-file        userdb passwd-file { driver = passwd-file
#   args = username_format=%u FILE       passwd_file_path = FILE }  (default_fields is gone,
#   default_fields = uid=U gid=G }       and uid/gid come from mail_uid/mail_gid when the
#                                        passwd-file leaves them empty, as ours does)
# service imap-login {                 service imap-login { restart_request_count = unlimited }
#   service_count = 0 }                  (renamed; 0 is an error in 2.4)
# service anvil { unix_listener        unchanged (documented for 2.4 as the way to disable
#   anvil-auth-penalty { mode = 0 } }    authentication penalties)
# everything else (instance_name, base_dir, state_dir, protocols, listen, log_path,
# info_log_path, default_internal_user/group, default_login_user, ssl, ssl_min_protocol,
# auth_mechanisms, auth_cache_size, auth_failure_delay, mail_uid/gid, first_valid_uid/gid,
# mail_fsync, mail_max_userip_connections, imap_idle_notify_interval, namespace, mailbox
# special_use, inet_listener address/port/ssl, process_limit, client_limit, chroot,
# default_client_limit, lmtp_add_received_header) keeps its name and meaning.
#
# The 2.4 text follows the 2.4.0/2.4.1 documentation and dovecot/docker's 2.4.0 and 2.4.1
# configurations; it has not been run against a 2.4 Dovecot from this repository
# (tests/e2e/test_dovecot_config.py checks its shape, and checks it with `doveconf` when
# the installed Dovecot is 2.4).

DOVECOT_CONF_23 = string.Template("""\
# generated by tests/support/harness.py (Dovecot 2.3 format)
instance_name = pecgate-test-${imaps_port}
base_dir = ${run}
state_dir = ${state}
protocols = imap lmtp
listen = ${host}
log_path = ${log}
info_log_path = ${log}
${ident}
ssl = yes
ssl_cert = <${cert}
ssl_key = <${key}
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login
disable_plaintext_auth = no
auth_cache_size = 0
auth_failure_delay = 0
mail_location = maildir:~/Maildir
mail_uid = ${user}
mail_gid = ${group}
first_valid_uid = 0
first_valid_gid = 0
mail_fsync = never
mail_max_userip_connections = 1000
protocol imap {
  mail_max_userip_connections = ${max_userip}
  imap_idle_notify_interval = 120 secs
${rawlog_23}}
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u ${passwd}
}
userdb {
  driver = passwd-file
  args = username_format=%u ${passwd}
  default_fields = uid=${user} gid=${group}
}
namespace inbox {
  inbox = yes
  separator = ${separator}
  prefix = ${prefix}
  mailbox Sent {
    special_use = \\Sent
  }
}
${services}""")

DOVECOT_CONF_24 = string.Template("""\
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
# generated by tests/support/harness.py (Dovecot 2.4 format)
instance_name = pecgate-test-${imaps_port}
base_dir = ${run}
state_dir = ${state}
protocols = imap lmtp
listen = ${host}
log_path = ${log}
info_log_path = ${log}
${ident}
ssl = yes
ssl_server_cert_file = ${cert}
ssl_server_key_file = ${key}
ssl_min_protocol = TLSv1.2
auth_mechanisms = plain login
auth_allow_cleartext = yes
auth_cache_size = 0
auth_failure_delay = 0
mail_driver = maildir
mail_path = ~/Maildir
mailbox_list_drop_noselect = no
mail_uid = ${user}
mail_gid = ${group}
first_valid_uid = 0
first_valid_gid = 0
mail_fsync = never
mail_max_userip_connections = 1000
protocol imap {
  mail_max_userip_connections = ${max_userip}
  imap_idle_notify_interval = 120 secs
${rawlog_24}}
passdb passwd-file {
  driver = passwd-file
  passwd_file_path = ${passwd}
}
userdb passwd-file {
  driver = passwd-file
  passwd_file_path = ${passwd}
}
namespace inbox {
  inbox = yes
  separator = ${separator}
  prefix = ${prefix}
  mailbox Sent {
    special_use = \\Sent
  }
}
${services}""")

# The services and limits, the same in both formats but for how imap-login processes are kept
# (2.3 `service_count = 0`, 2.4 `restart_request_count = unlimited`).
DOVECOT_SERVICES = string.Template("""\
service imap-login {
  chroot =
  inet_listener imap {
    address = ${host}
    port = ${imap_port}
  }
  inet_listener imaps {
    address = ${host}
    port = ${imaps_port}
    ssl = yes
  }
  ${login_reuse}
  process_limit = 4
  client_limit = 1000
}
service imap {
  process_limit = 1000
}
service lmtp {
  chroot =
  inet_listener lmtp {
    address = ${host}
    port = ${lmtp_port}
  }
}
service anvil {
  chroot =
  # no auth penalty: failed logins (tests) must not slow down later good ones
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
service auth {
  chroot =
}
service auth-worker {
  chroot =
}
service stats {
  chroot =
}
default_client_limit = 5000
lmtp_add_received_header = no
""")
DOVECOT_LOGIN_REUSE = {"2.3": "service_count = 0", "2.4": "restart_request_count = unlimited"}
DOVECOT_CONF = {"2.3": DOVECOT_CONF_23, "2.4": DOVECOT_CONF_24}


def parse_dovecot_version(text: str) -> tuple[int, int]:
    """(major, minor) from ``dovecot --version`` output: ``2.3.19.1 (9b53102964)``,
    ``2.4.1-4 (7d8c0e5759)``..."""
    m = re.match(r"\s*(\d+)\.(\d+)", text)
    if not m:
        raise HarnessError(f"cannot read a Dovecot version from {text!r}")
    return int(m.group(1)), int(m.group(2))


def dovecot_config_format(version: tuple[int, int]) -> str:
    """The configuration format (a key of ``DOVECOT_CONF``) a Dovecot ``version`` reads:
    2.4 and later (Dovecot Pro 3.x shares 2.4's format) take "2.4", older ones "2.3"."""
    return "2.4" if version >= (2, 4) else "2.3"


_dovecot_version: tuple[int, int] | None = None


def dovecot_version() -> tuple[int, int]:
    """The installed Dovecot's (major, minor), asked once per process."""
    global _dovecot_version
    if _dovecot_version is None:
        try:
            out = subprocess.run(["dovecot", "--version"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise HarnessError(f"cannot run `dovecot --version` (is dovecot-imapd installed?): {exc}") from exc
        _dovecot_version = parse_dovecot_version(out.decode(errors="replace"))
    return _dovecot_version



class _Daemon:
    """A helper process in its own directory (``self.dir``): ``with`` starts it; leaving
    stops it and removes the directory if the helper made it."""

    def cleanup(self):
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


class Dovecot(_Daemon):
    """A private Dovecot playing the PEC provider, on loopback free ports.

    ``layout``: ``"default"`` (hierarchy separator ``/``, folders at the root, as most
    providers) or ``"aruba"`` (separator ``.``, every folder under ``INBOX.``, as Aruba PEC
    and other Courier-style servers). ``provider_name`` / ``policy_pattern`` translate the
    ``/``-separated names the tests think in.

    ``rawlog``: record the raw IMAP traffic of logged-in connections (Dovecot's
    ``rawlog_dir``): ``True`` for every user, or an iterable of the user names to record (so
    the harness's own inspection logins, e.g. an alias made with ``add_user(share_with=)``,
    stay out of it). Read it with ``rawlog_connections``.

    ``config_format``: ``"2.3"`` or ``"2.4"`` (see ``DOVECOT_CONF``); by default the one
    the installed Dovecot reads (``dovecot --version``).

    ``max_userip_connections``: IMAP connections Dovecot accepts per user and address
    (``mail_max_userip_connections``); a provider's own connection limit in small.
    """

    LAYOUTS = {"default": ("/", ""), "aruba": (".", "INBOX.")}

    def __init__(self, base_dir=None, imaps_port=None, imap_port=None, lmtp_port=None, *,
                 layout: str = "default", rawlog=False, config_format: str | None = None,
                 max_userip_connections: int = 1000):
        if layout not in self.LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}")
        if config_format is not None and config_format not in DOVECOT_CONF:
            raise ValueError(f"unknown Dovecot configuration format {config_format!r}")
        self.config_format = config_format
        self.max_userip_connections = max_userip_connections
        self.layout = layout
        self.separator, self.prefix = self.LAYOUTS[layout]
        self.rawlog = rawlog if isinstance(rawlog, bool) else tuple(rawlog)
        self.dir, self._own_dir = _work_dir(base_dir, "pecgate-dovecot-")
        self.rawlog_root = self.dir / "rawlog"
        _ensure_traversable(self.dir)
        self.imaps_port = imaps_port or free_port()
        self.imap_port = imap_port or free_port()
        self.lmtp_port = lmtp_port or free_port()
        self.users: dict[str, str] = {}
        self.homes: dict[str, Path] = {}
        self.proc: subprocess.Popen | None = None
        self.conf_path = self.dir / "dovecot.conf"
        self.log_path = self.dir / "dovecot.log"
        self.mail_root = self.dir / "mail"
        self.cert, self.key = make_cert(self.dir / "tls", "localhost")

    # -- setup -----------------------------------------------------------
    def add_user(self, name: str, password: str, share_with: str | None = None):
        """Add a passwd-file user (before start). ``share_with``: another user
        whose mail home this login opens too (an alias of the same mailbox)."""
        if self.proc is not None:
            raise HarnessError("add_user must be called before start()")
        if ":" in name or ":" in password or "\n" in password:
            raise ValueError("':' and newlines are not allowed in passwd-file entries")
        if share_with is not None and share_with not in self.users:
            raise ValueError(f"unknown user {share_with!r}")
        self.users[name] = password
        self.homes[name] = self.mail_root / (share_with if share_with else name)

    def _identity(self):
        if os.geteuid() == 0:
            return "nobody", grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
        pw = pwd.getpwuid(os.geteuid())
        return pw.pw_name, grp.getgrgid(pw.pw_gid).gr_name

    def _write_config(self):
        user, group = self._identity()
        run = self.dir / "run"
        state = self.dir / "state"
        for d in (run, state, self.mail_root):
            d.mkdir(exist_ok=True)
        passwd = self.dir / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{p}::::{self.homes[u]}::\n" for u, p in self.users.items()))
        passwd.chmod(0o644)
        if os.geteuid() == 0:
            uid = pwd.getpwnam(user).pw_uid
            gid = grp.getgrnam(group).gr_gid
            os.chown(self.mail_root, uid, gid)
            os.chown(state, uid, gid)
        privileged = os.geteuid() == 0
        rawlog_dirs = None
        if self.rawlog:
            # Dovecot writes a connection's rawlog only if the directory exists: one directory
            # per recorded user, writable by the mail user (files are created after login).
            logged = self.users if self.rawlog is True else list(self.rawlog)
            for u in logged:
                if u not in self.users:
                    raise ValueError(f"rawlog for unknown user {u!r}")
                d = self.rawlog_root / u
                d.mkdir(parents=True, exist_ok=True)
                if privileged:
                    for path in (self.rawlog_root, d):
                        os.chown(path, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)
            rawlog_dirs = self.rawlog_root
        conf = self.config_text(
            self.config_format or dovecot_config_format(dovecot_version()),
            user=user, group=group, run=run, state=state, passwd=passwd,
            privileged=privileged, rawlog_dirs=rawlog_dirs)
        self.conf_path.write_text(conf)
        self.conf_path.chmod(0o644)

    def config_text(self, config_format: str, *, user: str, group: str, run: Path, state: Path,
                    passwd: Path, privileged: bool, rawlog_dirs: Path | None) -> str:
        """This Dovecot's configuration in ``config_format`` (a key of ``DOVECOT_CONF``).
        ``privileged``: Dovecot runs as root (it then uses its own internal users);
        ``rawlog_dirs``: record logged-in connections under ``rawlog_dirs/USER``."""
        ident = f"""
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
""" if not privileged else ""
        services = DOVECOT_SERVICES.substitute(
            imaps_port=self.imaps_port, imap_port=self.imap_port, lmtp_port=self.lmtp_port,
            host=HOST, login_reuse=DOVECOT_LOGIN_REUSE[config_format])
        return DOVECOT_CONF[config_format].substitute(
            services=services,
            imaps_port=self.imaps_port, imap_port=self.imap_port, lmtp_port=self.lmtp_port,
            host=HOST, run=run, state=state, log=self.log_path, ident=ident,
            cert=self.cert, key=self.key, user=user, group=group, passwd=passwd,
            separator=self.separator, prefix=self.prefix,
            max_userip=self.max_userip_connections,
            rawlog_23=f"  rawlog_dir = {rawlog_dirs}/%u\n" if rawlog_dirs else "",
            rawlog_24=f"  rawlog_dir = {rawlog_dirs}/%{{user}}\n" if rawlog_dirs else "",
        )

    def start(self, timeout: float = 20.0):
        if self.proc is not None:
            raise HarnessError("already started")
        self._write_config()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL, stdout=open(self.dir / "dovecot.stdout", "ab"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )

        def ready():
            if self.proc.poll() is not None:
                raise HarnessError(f"dovecot exited with {self.proc.returncode}:\n{self.log_text()}")
            with socket.create_connection((HOST, self.imaps_port), timeout=2) as s:
                with tls_context(self.cert).wrap_socket(s, server_hostname=HOST) as t:
                    t.settimeout(2)
                    if not t.recv(256).startswith(b"* OK"):
                        return False
            with socket.create_connection((HOST, self.lmtp_port), timeout=2) as s:
                s.settimeout(2)
                return s.recv(256).startswith(b"220")

        try:
            wait_until(ready, timeout, "dovecot to accept connections")
        except Exception as exc:
            self.stop()
            raise HarnessError(f"dovecot did not start: {exc}\n{self.log_text()}") from exc
        return self

    def log_text(self) -> str:
        out = ""
        for p in (self.log_path, self.dir / "dovecot.stdout"):
            if p.exists():
                out += p.read_text(errors="replace")
        return out

    def stop(self):
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    # -- layout ------------------------------------------------------------
    def provider_name(self, name: str) -> str:
        """The provider's wire name of a folder the tests call ``name`` (``/``-separated,
        relative to the personal namespace): ``Ricevute/Consegne`` is ``INBOX.Ricevute.Consegne``
        on the Aruba layout. ``INBOX`` is ``INBOX`` everywhere."""
        if name.upper() == "INBOX":
            return "INBOX"
        return self.prefix + name.replace("/", self.separator)

    def policy_pattern(self, pattern: str) -> str:
        """A pecgate folder pattern (always ``/``-separated, on the provider's names) for what
        the tests call ``pattern``: ``Ricevute/**`` is ``INBOX/Ricevute/**`` on the Aruba
        layout."""
        if pattern.upper() == "INBOX" or not self.prefix:
            return pattern
        return self.prefix.rstrip(self.separator) + "/" + pattern

    # -- rawlog ------------------------------------------------------------
    def rawlog_connections(self, users=None, exclude=()) -> list["RawlogConnection"]:
        """Every recorded connection (oldest first) of ``users`` (default: all recorded
        users), except those whose ``key`` is in ``exclude`` (see ``rawlog_mark``)."""
        if not self.rawlog:
            raise HarnessError("this Dovecot was started without rawlog")
        out = []
        if not self.rawlog_root.is_dir():
            return out
        for d in sorted(self.rawlog_root.iterdir()):
            if users is not None and d.name not in users:
                continue
            for f in d.glob("*.in"):
                conn = RawlogConnection(d.name, f.with_suffix(""))
                if conn.key not in exclude:
                    out.append(conn)
        out.sort(key=lambda c: (c.started, c.pid, c.counter))
        return out

    def rawlog_mark(self) -> set[str]:
        """Keys of the connections recorded so far: pass as ``exclude`` to see only later ones."""
        return {c.key for c in self.rawlog_connections()}

    _DISCONNECTED_RE = re.compile(r"imap\(([^)]*)\)<(\d+)><[^>]*>: Info: Disconnected")

    def closed_connections(self) -> set[tuple[str, int]]:
        """(user, pid) of the IMAP processes whose client has disconnected (from the log:
        Dovecot logs it when the session ends, after its last rawlog write)."""
        return {(m.group(1), int(m.group(2))) for m in self._DISCONNECTED_RE.finditer(self.log_text())}

    def wait_rawlogs_closed(self, connections, timeout: float = 30) -> None:
        """Wait until every one of ``connections`` has ended, so its rawlog is complete."""

        def open_ones():
            closed = self.closed_connections()
            return [c for c in connections if (c.user, c.pid) not in closed]

        try:
            wait_until(lambda: not open_ones(), timeout, "provider connections to end")
        except TimeoutError as exc:
            raise HarnessError(f"{exc}: still open {[c.key for c in open_ones()]}") from exc

    def wait_new_connection(self, exclude, users=None, timeout: float = 30) -> "RawlogConnection":
        """The one connection recorded since ``exclude`` (a ``rawlog_mark``), waiting for it to
        appear: the provider connection of the pecgate session that has just logged in. Its
        ``pid`` is the ``imap`` process serving it (see ``signal_imap``)."""
        conns = wait_until(lambda: self.rawlog_connections(users, exclude), timeout,
                           "a new provider connection in Dovecot's rawlog")
        if len(conns) != 1:
            raise HarnessError(f"expected one new provider connection, got {conns}")
        return conns[0]

    def signal_imap(self, pid: int, sig: int) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT, SIGKILL...) to the ``imap`` process ``pid`` (one per
        connection), after checking that it is one of this Dovecot's own ``imap`` processes."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError as exc:
            raise ProcessLookupError(f"no process {pid}: {exc}") from exc
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if self.proc is None or ppid != self.proc.pid or comm != "imap":
            raise HarnessError(f"process {pid} ({comm!r}, parent {ppid}) is not an imap process of this Dovecot")
        os.kill(pid, sig)

    # -- provider-side operations ---------------------------------------
    @property
    def imaps_url(self) -> str:
        return f"imaps://{HOST}:{self.imaps_port}"

    @property
    def imap_url(self) -> str:
        return f"imap://{HOST}:{self.imap_port}"

    def imap_direct(self, user: str, timeout: float = 60) -> imaplib.IMAP4_SSL:
        c = imaplib.IMAP4_SSL(HOST, self.imaps_port, ssl_context=tls_context(self.cert), timeout=timeout)
        c.login(user, self.users[user])
        return c

    def deliver(self, user: str, raw: bytes, sender: str = "posta-certificata@pec.example.test"):
        """Deliver ``raw`` to ``user``'s INBOX through LMTP."""
        with smtplib.LMTP(HOST, self.lmtp_port, timeout=30) as lmtp:
            refused = lmtp.sendmail(sender, [user], raw)
            if refused:
                raise HarnessError(f"LMTP refused: {refused}")

    def append(self, user: str, folder: str, raw: bytes, flags: str | None = None):
        c = self.imap_direct(user)
        try:
            typ, data = c.append(quote(folder), flags, None, raw)
            if typ != "OK":
                raise HarnessError(f"APPEND failed: {data}")
            return data
        finally:
            c.logout()

    def append_many(self, user: str, folder: str, messages, batch: int = 250):
        """Fast bulk load: MULTIAPPEND with LITERAL+ in batches."""
        messages = list(messages)
        with RawImap(self.imaps_port, tls=True, cafile=self.cert) as r:
            r.login(user, self.users[user])
            for n, start in enumerate(range(0, len(messages), batch)):
                chunk = messages[start:start + batch]
                parts = [f"B{n} APPEND {quote(folder)}".encode()]
                for m in chunk:
                    parts.append(b" {%d+}\r\n" % len(m) + m)
                r.send(b"".join(parts) + b"\r\n")
                _, tagged = r.read_until_tagged(f"B{n}", timeout=120)
                if not tagged.startswith(f"B{n} OK".encode()):
                    raise HarnessError(f"bulk APPEND failed: {tagged!r}")
            r.command("Z", "LOGOUT")

    def create_folders(self, user: str, folders):
        c = self.imap_direct(user)
        try:
            for f in folders:
                typ, data = c.create(quote(f))
                if typ != "OK" and b"exists" not in b" ".join(data).lower():
                    raise HarnessError(f"CREATE {f} failed: {data}")
                c.subscribe(quote(f))
        finally:
            c.logout()

    def fetch_all(self, user: str, folder: str) -> list[bytes]:
        """Every message of ``folder`` (BODY.PEEK[]), in UID order."""
        c = self.imap_direct(user)
        try:
            typ, _ = c.select(quote(folder), readonly=True)
            if typ != "OK":
                raise HarnessError(f"SELECT {folder} failed")
            typ, data = c.uid("FETCH", "1:*", "(BODY.PEEK[])")
            return [part[1] for part in data if isinstance(part, tuple)]
        finally:
            c.logout()


class RawlogConnection:
    """One connection recorded by Dovecot's ``rawlog_dir``: what Dovecot received from the
    client after login (``received``) and what it sent (``sent``), with Dovecot's per-line
    timestamps removed. ``key`` names it; ``pid`` is the imap process that served it."""

    # Dovecot 2.3 (iostream-rawlog.c, rawlog_dir): files DIR/YYYYMMDD-HHMMSS.PID.N.{in,out},
    # each line (file start, then after every LF) prefixed with "SECONDS.MICROSECONDS ".
    _NAME_RE = re.compile(r"^(\d{8}-\d{6})\.(\d+)\.(\d+)$")
    _STAMP_RE = re.compile(rb"\d+\.\d{6} ")

    def __init__(self, user: str, prefix: Path):
        self.user = user
        self.prefix = prefix
        m = self._NAME_RE.match(prefix.name)
        if not m:
            raise HarnessError(f"unexpected rawlog file name {prefix.name!r}")
        self.started, self.pid, self.counter = m.group(1), int(m.group(2)), int(m.group(3))
        self.key = f"{user}/{prefix.name}"

    @classmethod
    def strip_timestamps(cls, data: bytes) -> bytes:
        out = []
        pos = 0
        while pos < len(data):
            m = cls._STAMP_RE.match(data, pos)
            if not m:
                raise HarnessError(f"rawlog line without a timestamp at {pos}: {data[pos:pos + 80]!r}")
            end = data.find(b"\n", m.end())
            end = len(data) if end < 0 else end + 1
            out.append(data[m.end():end])
            pos = end
        return b"".join(out)

    def _read(self, suffix: str) -> bytes:
        path = self.prefix.with_name(self.prefix.name + suffix)
        return self.strip_timestamps(path.read_bytes()) if path.exists() else b""

    def timed_lines(self, direction: str) -> list[tuple[float, bytes]]:
        """(Dovecot's time, line) for every line received (``"in"``) or sent (``"out"``)."""
        path = self.prefix.with_name(f"{self.prefix.name}.{direction}")
        out = []
        data = path.read_bytes() if path.exists() else b""
        for raw in re.findall(rb"[^\n]*\n|[^\n]+$", data):
            m = self._STAMP_RE.match(raw)
            if m:
                out.append((float(m.group(0)), raw[m.end():]))
        return out

    @property
    def received(self) -> bytes:
        return self._read(".in")

    @property
    def sent(self) -> bytes:
        return self._read(".out")

    def __repr__(self):
        return f"RawlogConnection({self.key!r})"


# ---------------------------------------------------------------------------
# the sandbox PEC provider's SMTP side
# ---------------------------------------------------------------------------

PEC_DOMAIN = PROVIDER_ADDRESS.split("@", 1)[1]
FAILING_ADDRESS = f"inesistente@{PEC_DOMAIN}"


class PecProvider(_Daemon):
    """``tests/support/pec_provider.py`` in a subprocess: SMTP submission (implicit TLS and
    STARTTLS) for Dovecot's users, receipts delivered into Dovecot over LMTP. Every accepted
    message is kept in ``store/accepted/NNNNN.eml`` (+ ``.json``: envelope and login).
    ``faults``: the provider's fault knobs (``pec_provider.FAULTS``), none by default;
    ``journal()`` is every command it received, connection by connection."""

    SCRIPT = Path(__file__).resolve().parent / "pec_provider.py"

    def __init__(self, dovecot: Dovecot, base_dir=None, *, fail=(FAILING_ADDRESS,),
                 max_total_bytes: int = 100 * 1024 * 1024, rate: tuple[int, int] | None = None,
                 tls_port: int | None = None, starttls_port: int | None = None,
                 faults: dict | None = None):
        self.dir, self._own_dir = _work_dir(base_dir, "pecgate-provider-")
        self.dovecot = dovecot
        # 0: the provider binds a free port and reports it (read back by start()).
        self.tls_port = tls_port or 0
        self.starttls_port = starttls_port or 0
        self.store = self.dir / "store"
        self.conf_path = self.dir / "provider.json"
        self.log_path = self.dir / "provider.log"
        self.fail = list(fail)
        self.max_total_bytes = max_total_bytes
        self.rate = rate
        self.faults = dict(faults or {})
        self.proc: subprocess.Popen | None = None

    @property
    def smtps_url(self) -> str:
        return f"smtps://{HOST}:{self.tls_port}"

    @property
    def smtp_url(self) -> str:
        return f"smtp://{HOST}:{self.starttls_port}"

    def config(self) -> dict:
        users = {u: {"password": p, "address": u, "mailbox": u} for u, p in self.dovecot.users.items()}
        return {
            "domain": PEC_DOMAIN,
            "store": str(self.store),
            "users": users,
            "local": {u: u for u in self.dovecot.users},
            "lmtp": [HOST, self.dovecot.lmtp_port],
            "cert": str(self.dovecot.cert),
            "key": str(self.dovecot.key),
            "host": HOST,
            "listen_tls": self.tls_port,
            "listen_starttls": self.starttls_port,
            "fail": self.fail,
            "max_total_bytes": self.max_total_bytes,
            "rate": list(self.rate) if self.rate else None,
            "faults": self.faults,
        }

    def start(self, timeout: float = 20.0):
        if self.proc is not None:
            raise HarnessError("already started")
        self.conf_path.write_text(json.dumps(self.config(), indent=1))
        self._log = open(self.log_path, "ab")
        log_start = self._log.tell()
        self.proc = subprocess.Popen(
            [sys.executable, str(self.SCRIPT), "--config", str(self.conf_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, start_new_session=True,
        )

        def ready():
            if self.proc.poll() is not None:
                raise HarnessError(f"pec_provider exited with {self.proc.returncode}:\n{self.log_text()}")
            # This run's line only (the log is appended across restarts).
            found = re.search(r"listening tls=(\d+) starttls=(\d+)",
                              self.log_path.read_bytes()[log_start:].decode(errors="replace"))
            return found and (int(found.group(1)), int(found.group(2)))

        try:
            self.tls_port, self.starttls_port = wait_until(ready, timeout, "the sandbox PEC provider to listen")
        except Exception:
            self.stop()
            raise
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self):
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None
            with contextlib.suppress(Exception):
                self._log.close()

    # -- what it received --------------------------------------------------
    def accepted(self) -> list[dict]:
        """Every accepted message: the JSON metadata plus ``raw`` (the bytes as received)."""
        out = []
        folder = self.store / "accepted"
        if not folder.is_dir():
            return out
        for meta_path in sorted(folder.glob("*.json")):
            meta = json.loads(meta_path.read_text())
            meta["raw"] = meta_path.with_suffix(".eml").read_bytes()
            out.append(meta)
        return out

    def accepted_count(self) -> int:
        folder = self.store / "accepted"
        return len(list(folder.glob("*.json"))) if folder.is_dir() else 0

    def journal(self) -> list[dict]:
        """What clients sent, oldest first: ``{"conn": N, "event": "connect", "port": ...}``,
        ``{"conn": N, "cmd": "MAIL FROM:<...>", "tls": bool}`` (AUTH arguments and SASL lines
        redacted), ``{"conn": N, "data_end": true, "mail_from", "rcpts", "size", "sha256"}``,
        ``{"conn": N, "event": "stalled" | "dropped" | "closed"}``."""
        path = self.store / "journal.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def sessions(self, since: int = 0) -> dict[int, list[dict]]:
        """The journal grouped by connection, for connections numbered above ``since`` that
        sent at least one command (readiness probes are left out)."""
        out: dict[int, list[dict]] = {}
        for e in self.journal():
            if e["conn"] > since:
                out.setdefault(e["conn"], []).append(e)
        return {c: es for c, es in out.items() if any("cmd" in e for e in es)}

    def last_connection(self) -> int:
        """The number of the latest connection so far (0 if none): a mark for ``sessions``."""
        return max((e["conn"] for e in self.journal()), default=0)


def strip_trace_headers(raw: bytes) -> bytes:
    """``raw`` without the ``Received:`` lines (and their continuations) at its top."""
    lines = raw.split(b"\r\n")
    i = 0
    while i < len(lines) and lines[i][:9].lower() == b"received:":
        i += 1
        while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
            i += 1
    return b"\r\n".join(lines[i:])


# ---------------------------------------------------------------------------
# pecgate
# ---------------------------------------------------------------------------

ALL_PERMISSIONS = ["read", "flag", "delete", "move", "append", "manage_folders", "send"]

DEFAULT_ROLES = {
    "segreteria": {
        "mailboxes": ["studio"],
        "folders": ["INBOX", "Sent", "Ricevute/**"],
        "permissions": ALL_PERMISSIONS,
    },
    "reception": {
        "mailboxes": ["studio"],
        "folders": ["INBOX"],
        "permissions": ["read", "flag"],
    },
}

_DEFAULT_PASSWORDS = {name: f"{name}-{secrets.token_hex(6)}" for name in ("mario", "anna")}
_HASH_CACHE: dict[tuple[str, str], str] = {}
_HASH_LOCK = threading.Lock()


def pecgate_bin() -> Path:
    p = Path(os.environ.get("PECGATE_BIN", "target/debug/pecgate"))
    return p if p.is_absolute() else (REPO_ROOT / p)


def hash_password(password: str, binary: Path | None = None) -> str:
    """PHC string from ``pecgate hash-password`` (password on stdin); cached."""
    binary = Path(binary or pecgate_bin())
    key = (str(binary), password)
    with _HASH_LOCK:
        if key in _HASH_CACHE:
            return _HASH_CACHE[key]
    res = run_cli([binary, "hash-password"], (password + "\n").encode())
    out = res.stdout.decode().strip()
    phc = out.splitlines()[-1].strip() if out else ""
    if res.returncode != 0 or not phc.startswith("$argon2"):
        raise HarnessError(
            f"pecgate hash-password failed (exit {res.returncode}): stdout={res.stdout!r} stderr={res.stderr!r}")
    with _HASH_LOCK:
        _HASH_CACHE[key] = phc
    return phc


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))  # JSON string escapes are valid TOML basic strings
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot encode {v!r}")


def toml_table(name: str, table: dict) -> str:
    lines = [f"[{name}]"]
    for k, v in table.items():
        if v is None:
            continue
        lines.append(f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def gateways(dovecot: Dovecot | None, **defaults):
    """A factory of fresh, started pecgate instances (``make(start=True, **options)``, options
    over ``defaults``) on ``dovecot``, all cleaned up when the block ends."""
    made = []

    def make(start: bool = True, **options):
        gw = Pecgate(dovecot, **{**defaults, **options})
        made.append(gw)
        gw.setup()
        if start:
            gw.start()
        return gw

    try:
        yield make
    finally:
        for gw in made:
            gw.cleanup()


def provider_mailbox(dovecot: Dovecot, login: str, *, upstream: str = "imaps", max_connections: int = 10,
                     **options) -> dict:
    """A ``[mailboxes.NAME]`` entry for ``Pecgate(mailboxes=...)`` whose provider login is
    the Dovecot user ``login``: several of them give a config where one person chooses the
    mailbox at login (``mario/studio``, ``mario/altro``)."""
    entry = {
        "address": login,
        "login": login,
        "imap": dovecot.imaps_url if upstream == "imaps" else dovecot.imap_url,
        "ca_file": str(dovecot.cert),
        "max_connections": max_connections,
        "_password": dovecot.users[login],
    }
    entry.update(options)
    return entry


class Pecgate:
    """One pecgate instance with its own temp dir, config, vault and audit log."""

    def __init__(self, dovecot: Dovecot | None = None, *, users: dict | None = None,
                 roles: dict | None = None, mailboxes: dict | None = None,
                 mailbox_name: str = "studio", provider_login: str = PROVIDER_ADDRESS,
                 provider_password: str | None = None, upstream: str = "imaps",
                 upstream_url: str | None = None, max_connections: int = 10,
                 login_failure_delay_ms: int = 200, base_dir=None, binary=None,
                 tls_port: int | None = None, starttls_port: int | None = None,
                 env: dict | None = None, smtp_url: str | None = None,
                 mailbox_options: dict | None = None, smtp_tls_port: int | None = None,
                 smtp_starttls_port: int | None = None, gateway_options: dict | None = None,
                 metrics: str | None = None, receipts: dict | None = None,
                 imap_options: dict | None = None):
        """``smtp_url``: the mailbox's provider SMTP URL (``PecProvider.smtps_url``);
        ``mailbox_options``: extra keys of the mailbox table (``max_message_bytes``,
        ``send_rate``...); ``gateway_options``: extra keys of ``[gateway]``
        (``lockout_address_failures``, ``provider_timeout_secs``...; ``provider_idle_keep_secs``
        and ``body_cache_mib`` are 0 unless given there). SMTP listeners are
        always configured. ``metrics``: ``[metrics] listen`` (e.g. ``"127.0.0.1:0"``; the
        real port is read back into ``metrics_port``), off when None. ``receipts``: the
        ``[receipts]`` table (``{}`` for the defaults: the worker on); when None the worker is
        off, so that tests counting provider connections count only their sessions'.
        ``imap_options``: extra keys of ``[imap]``; ``park_idle`` and ``lend_between_commands``
        are false unless given there, so that tests reading the provider's side see each
        session's own IDLE and connection (parking is tested in test_parking.py, lending in
        test_lending.py)."""
        self.bin = Path(binary or pecgate_bin())
        self.dir, self._own_dir = _work_dir(base_dir, "pecgate-gw-")
        self.state_dir = self.dir / "state"
        self.state_dir.mkdir(exist_ok=True)
        self.conf_path = self.dir / "pecgate.toml"
        self.log_path = self.dir / "pecgate.log"
        # 0: pecgate binds a free port itself and reports it in its `listening` log line
        # (read back by start(); no probe-and-release race).
        self.tls_port = tls_port or 0
        self.starttls_port = starttls_port or 0
        self.smtp_tls_port = smtp_tls_port or 0
        self.smtp_starttls_port = smtp_starttls_port or 0
        self.cert, self.key = make_cert(self.dir / "tls", "localhost")
        self.login_failure_delay_ms = login_failure_delay_ms
        self.gateway_options = dict(gateway_options or {})
        self.env = env
        self.metrics = metrics
        self.metrics_port: int | None = None
        self.receipts = receipts
        self.imap_options = dict(imap_options or {})
        self.proc: subprocess.Popen | None = None

        if users is None:
            # random per test run, shared by every instance so the (slow,
            # argon2) hashes are computed once
            users = {
                "mario": {"password": _DEFAULT_PASSWORDS["mario"], "roles": ["segreteria"]},
                "anna": {"password": _DEFAULT_PASSWORDS["anna"], "roles": ["reception"]},
            }
        self.users = users
        self.roles = DEFAULT_ROLES if roles is None else roles

        if mailboxes is None:
            if upstream_url is None:
                if dovecot is None:
                    raise HarnessError("need a Dovecot or an explicit upstream_url")
                upstream_url = dovecot.imaps_url if upstream == "imaps" else dovecot.imap_url
            if provider_password is None and dovecot is not None:
                provider_password = dovecot.users[provider_login]
            mailboxes = {
                mailbox_name: {
                    "address": provider_login,
                    "login": provider_login,
                    "imap": upstream_url,
                    "ca_file": str(dovecot.cert) if dovecot is not None else None,
                    "max_connections": max_connections,
                    "_password": provider_password or "unused-" + secrets.token_hex(4),
                }
            }
            if smtp_url is not None:
                mailboxes[mailbox_name]["smtp"] = smtp_url
            mailboxes[mailbox_name].update(mailbox_options or {})
        self.mailboxes = mailboxes

    # -- config ------------------------------------------------------------
    def config_text(self) -> str:
        parts = [
            toml_table("gateway", {
                "state_dir": str(self.state_dir),
                "login_failure_delay_ms": self.login_failure_delay_ms,
                # Each session's provider connection ends with it (no idle reuse), so tests
                # reading a connection's complete rawlog can wait for it to close; the pool's
                # reuse is tested where it is asked for (test_pool.py).
                "provider_idle_keep_secs": 0,
                # Each FETCH reaches the provider as the client sent it, so the rawlog-based
                # suites see every command; the cache is tested in test_cache.py.
                "body_cache_mib": 0,
                **self.gateway_options,
            }),
            toml_table("tls", {"cert": str(self.cert), "key": str(self.key)}),
            toml_table("imap", {
                "listen_tls": [f"{HOST}:{self.tls_port}"],
                "listen_starttls": [f"{HOST}:{self.starttls_port}"],
                "park_idle": False,
                "lend_between_commands": False,
                **self.imap_options,
            }),
            toml_table("smtp", {
                "listen_tls": [f"{HOST}:{self.smtp_tls_port}"],
                "listen_starttls": [f"{HOST}:{self.smtp_starttls_port}"],
            }),
        ]
        if self.metrics is not None:
            parts.append(toml_table("metrics", {"listen": self.metrics}))
        parts.append(toml_table("receipts", {"enabled": False} if self.receipts is None else self.receipts))
        for name, mb in self.mailboxes.items():
            parts.append(toml_table(f"mailboxes.{name}", {k: v for k, v in mb.items() if not k.startswith("_")}))
        for name, role in self.roles.items():
            parts.append(toml_table(f"roles.{name}", role))
        for name, u in self.users.items():
            parts.append(toml_table(f"users.{name}", {
                "password": hash_password(u["password"], self.bin),
                "roles": u["roles"],
            }))
        return "\n".join(parts)

    def write_config(self) -> Path:
        self.conf_path.write_text(self.config_text())
        return self.conf_path

    def cli(self, *args, input_bytes: bytes | None = None, timeout: float = 120, config=None):
        """Run ``pecgate ARGS... -c CONF``."""
        return run_cli([self.bin, *args, "-c", str(config or self.conf_path)], input_bytes, timeout,
                       env=self._env())

    def _env(self):
        env = dict(os.environ)
        env.setdefault("RUST_BACKTRACE", "1")
        if self.env:
            env.update(self.env)
        return env

    def setup(self):
        """Write the config and store every provider password in the vault."""
        if not self.bin.exists():
            raise HarnessError(f"pecgate binary not found at {self.bin} (set PECGATE_BIN or run cargo build)")
        self.write_config()
        for name, mb in self.mailboxes.items():
            res = self.cli("vault", "set", name, input_bytes=(mb["_password"] + "\n").encode())
            if res.returncode != 0:
                raise HarnessError(
                    f"pecgate vault set {name} failed (exit {res.returncode}): {res.stderr.decode(errors='replace')}")
        return self

    # -- lifecycle ---------------------------------------------------------
    def start(self, timeout: float = 30.0):
        if self.proc is not None:
            raise HarnessError("already started")
        if not self.conf_path.exists():
            self.setup()
        self._log = open(self.log_path, "ab")
        log_start = self._log.tell()
        self.proc = subprocess.Popen(
            [str(self.bin), "serve", "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            start_new_session=True, env=self._env(),
        )
        self._learn_ports(log_start, timeout)

        def listening(port):
            def probe():
                if self.proc.poll() is not None:
                    raise HarnessError(
                        f"pecgate exited with {self.proc.returncode} during startup:\n{self.log_text()}")
                with socket.create_connection((HOST, port), timeout=1):
                    return True
            return probe

        try:
            for port in (self.tls_port, self.starttls_port, self.smtp_tls_port, self.smtp_starttls_port):
                wait_until(listening(port), timeout, f"pecgate to listen on {port}")
        except HarnessError:
            self.proc = None
            raise
        except TimeoutError as exc:
            self.kill()
            raise HarnessError(f"{exc}\n--- pecgate log ---\n{self.log_text()}") from exc
        return self

    _LISTENING = re.compile(r'listening address=\S+:(\d+) listener="?([a-z_.]+)')
    _PORT_ATTRS = {
        "imap.listen_tls": "tls_port",
        "imap.listen_starttls": "starttls_port",
        "smtp.listen_tls": "smtp_tls_port",
        "smtp.listen_starttls": "smtp_starttls_port",
        "metrics.listen": "metrics_port",
    }

    def _learn_ports(self, log_start: int, timeout: float):
        """Read this run's `listening` lines: the real ports where 0 was configured."""
        def ready():
            if self.proc.poll() is not None:
                return "exited"
            with open(self.log_path, "rb") as f:
                f.seek(log_start)
                text = f.read().decode(errors="replace")
            return "pecgate ready" in text and text
        try:
            text = wait_until(ready, timeout, "pecgate to report its listeners")
        except TimeoutError as exc:
            self.kill()
            raise HarnessError(f"{exc}\n--- pecgate log ---\n{self.log_text()}") from exc
        if text == "exited":
            code, self.proc = self.proc.returncode, None
            raise HarnessError(f"pecgate exited with {code} during startup:\n{self.log_text()}")
        for port, key in self._LISTENING.findall(text):
            attr = self._PORT_ATTRS.get(key)
            if attr is not None:
                setattr(self, attr, int(port))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it was not running)."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise HarnessError(f"pecgate did not exit {timeout}s after SIGTERM:\n{self.log_text()}")
        self.proc = None
        with contextlib.suppress(Exception):
            self._log.close()
        return proc.returncode

    def kill(self):
        if self.proc is not None:
            _kill_group(self.proc, 1.0)
            self.proc = None

    def crash(self) -> int:
        """SIGKILL pecgate, with no chance to clean up (a power cut, the OOM killer); returns
        its exit code. ``start()`` runs it again on the same config and state_dir."""
        if self.proc is None:
            raise HarnessError("pecgate is not running")
        proc = self.proc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self.proc = None
        with contextlib.suppress(Exception):
            self._log.close()
        return proc.returncode

    def log_mark(self) -> int:
        """The log's current size: pass to ``wait_log`` to look only at what comes after."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def wait_log(self, needle: str, since: int = 0, timeout: float = 30) -> str:
        """Wait until the log (from byte ``since``) has a line containing ``needle``; returns it."""

        def found():
            data = self.log_path.read_bytes()[since:] if self.log_path.exists() else b""
            return next((l for l in data.decode(errors="replace").splitlines() if needle in l), None)

        return wait_until(found, timeout, f"{needle!r} in pecgate's log")

    def cleanup(self):
        with contextlib.suppress(Exception):
            self.stop()
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def set_up(self) -> "Pecgate":
        """``setup()`` for use in a ``with``: a failed set-up still removes the directory."""
        try:
            self.setup()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.cleanup()

    # -- clients -----------------------------------------------------------
    def password(self, user: str) -> str:
        return self.users[user]["password"]

    def connect(self, tls=True, timeout: float = 60):
        """An unauthenticated imaplib client (tls=True: implicit TLS;
        tls='starttls': plain port after STARTTLS; tls=False: plain port, no TLS)."""
        ctx = tls_context(self.cert)
        if tls is True:
            return imaplib.IMAP4_SSL(HOST, self.tls_port, ssl_context=ctx, timeout=timeout)
        c = imaplib.IMAP4(HOST, self.starttls_port, timeout=timeout)
        if tls == "starttls":
            c.starttls(ssl_context=ctx)
        elif tls is not False:
            raise ValueError(f"bad tls mode {tls!r}")
        return c

    def client(self, login: str, password: str | None = None, tls=True, timeout: float = 60):
        """A logged-in imaplib client."""
        if password is None:
            password = self.password(login.split("/")[0])
        c = self.connect(tls, timeout)
        try:
            c.login(login, password)
        except Exception:
            with contextlib.suppress(Exception):
                c.shutdown()
            raise
        return c

    def raw(self, tls=True, timeout: float = 15, source: str | None = None) -> RawImap:
        """A RawImap client (``tls`` as for ``connect``), from the address ``source``."""
        if tls is True:
            return RawImap(self.tls_port, tls=True, cafile=self.cert, timeout=timeout, source=source)
        r = RawImap(self.starttls_port, tls=False, cafile=self.cert, timeout=timeout, source=source)
        if tls == "starttls":
            r.starttls()
        return r

    def smtp(self, login: str | None = None, password: str | None = None, tls=True,
             timeout: float = 60, source: str | None = None) -> smtplib.SMTP:
        """An smtplib client (tls=True: implicit TLS; tls='starttls': submission port after
        STARTTLS; tls=False: submission port in clear), logged in when ``login`` is given;
        connected from the address ``source`` when given."""
        ctx = tls_context(self.cert)
        source_address = (source, 0) if source else None
        if tls is True:
            c = smtplib.SMTP_SSL(HOST, self.smtp_tls_port, context=ctx, timeout=timeout,
                                 source_address=source_address)
        else:
            c = smtplib.SMTP(HOST, self.smtp_starttls_port, timeout=timeout, source_address=source_address)
            if tls == "starttls":
                c.starttls(context=ctx)
            elif tls is not False:
                raise ValueError(f"bad tls mode {tls!r}")
        if login is not None:
            if password is None:
                password = self.password(login.split("/")[0])
            try:
                c.login(login, password)
            except Exception:
                with contextlib.suppress(Exception):
                    c.close()
                raise
        return c

    # -- ledger ------------------------------------------------------------
    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    def ledger_rows(self, where: str = "", params=()) -> list[dict]:
        return _sqlite_rows(self.ledger_path, "sent", where, params)

    # -- audit -------------------------------------------------------------
    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.sqlite"

    def audit_rows(self, where: str = "", params=()) -> list[dict]:
        return _sqlite_rows(self.audit_path, "events", where, params)


def _sqlite_rows(path: Path, table: str, where: str = "", params=()) -> list[dict]:
    """Rows of ``table`` in the SQLite file ``path`` (read-only), oldest first; [] if the file
    does not exist yet."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        sql = f"SELECT * FROM {table}" + (f" WHERE {where}" if where else "") + " ORDER BY id"
        return [dict(r) for r in db.execute(sql, params)]
    finally:
        db.close()


# ---------------------------------------------------------------------------
# mbsync helpers
# ---------------------------------------------------------------------------


def _mbsync_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mbsync_pull(port: int, user: str, password: str, cafile, folders, dest, *, tls: str = "imaps",
                workdir=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Pull ``folders`` from an IMAP server into the Maildir tree ``dest`` with mbsync."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    workdir = Path(workdir or dest.parent)
    state = workdir / (dest.name + ".mbsync-state")
    state.mkdir(parents=True, exist_ok=True)
    cfg = workdir / (dest.name + ".mbsyncrc")
    patterns = " ".join(_mbsync_quote(f) for f in folders)
    cfg.write_text(f"""IMAPAccount acc
Host localhost
Port {port}
User {_mbsync_quote(user)}
Pass {_mbsync_quote(password)}
SSLType {"IMAPS" if tls == "imaps" else "STARTTLS"}
CertificateFile {cafile}
AuthMechs LOGIN
Timeout 120

IMAPStore remote
Account acc

MaildirStore local
Path {dest}/
Inbox {dest}/INBOX
SubFolders Verbatim

Channel ch
Far :remote:
Near :local:
Patterns {patterns}
Create Near
Sync Pull
Expunge None
SyncState {state}/
""")
    return subprocess.run(["mbsync", "-c", str(cfg), "ch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=timeout, start_new_session=True)


_X_TUID_RE = re.compile(rb"^X-TUID: [^\n]*\n", re.M)


def normalise_synced(raw: bytes) -> bytes:
    """mbsync stores LF line endings and adds its own random ``X-TUID`` header
    to the header block; undo both so contents can be compared."""
    raw = raw.replace(b"\r\n", b"\n")
    end = raw.find(b"\n\n")
    head, rest = (raw, b"") if end < 0 else (raw[: end + 1], raw[end + 1:])
    return _X_TUID_RE.sub(b"", head) + rest


def maildir_digests(folder_dir) -> list[str]:
    """Sorted sha256 digests of every message in a Maildir folder (cur+new),
    normalised with ``normalise_synced``; file names (and so mbsync's flag
    suffixes) are ignored."""
    folder_dir = Path(folder_dir)
    out = []
    for sub in ("cur", "new"):
        d = folder_dir / sub
        if d.is_dir():
            for f in d.iterdir():
                out.append(hashlib.sha256(normalise_synced(f.read_bytes())).hexdigest())
    return sorted(out)


# ---------------------------------------------------------------------------
# sandbox mode
# ---------------------------------------------------------------------------

DEMO_FOLDERS = ["Sent", "Ricevute", "Ricevute/Consegne", "Riservata"]


def demo_messages():
    """(folder, raw) pairs resembling a PEC mailbox's traffic."""
    ref = make_msgid(domain="pec.example.test")
    return [
        ("INBOX", make_message(
            "POSTA CERTIFICATA: Convocazione assemblea", "Si trasmette la convocazione in allegato.",
            sender='"Per conto di: comune@pec.example.test" <posta-certificata@pec.example.test>',
            extra_headers={"X-Trasporto": "posta-certificata", "Reply-To": "comune@pec.example.test"})),
        ("INBOX", make_message(
            "POSTA CERTIFICATA: Fattura n. 42", "Fattura elettronica n. 42.",
            sender='"Per conto di: fornitore@pec.example.test" <posta-certificata@pec.example.test>',
            extra_headers={"X-Trasporto": "posta-certificata", "Reply-To": "fornitore@pec.example.test"})),
        ("INBOX", make_message("ANOMALIA MESSAGGIO: Newsletter", "Messaggio non PEC.",
                               sender="posta-certificata@pec.example.test",
                               extra_headers={"X-Trasporto": "errore"})),
        ("Sent", make_message("Richiesta documenti", "Buongiorno, si richiedono i documenti.",
                              sender=PROVIDER_ADDRESS, to="ufficio@pec.example.test", msgid=ref)),
        ("Ricevute", make_message("ACCETTAZIONE: Richiesta documenti", "Ricevuta di accettazione.",
                                  sender="posta-certificata@pec.example.test",
                                  extra_headers={"X-Ricevuta": "accettazione", "X-Riferimento-Message-ID": ref})),
        ("Ricevute/Consegne", make_message("CONSEGNA: Richiesta documenti", "Ricevuta di avvenuta consegna.",
                                           sender="posta-certificata@pec.example.test",
                                           extra_headers={"X-Ricevuta": "avvenuta-consegna",
                                                          "X-Riferimento-Message-ID": ref})),
        ("Riservata", make_message("Pratica riservata", "Contenuto riservato: visibile solo alla segreteria "
                                   "se la policy lo consente (qui: a nessuno).")),
    ]


def pool_metric(gw, name: str, mailbox: str = "studio") -> int | None:
    """One per-mailbox figure from pecgate's ``/metrics`` (started with ``metrics=``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(rf'^{name}{{mailbox="{mailbox}"}} (\d+)$', text, re.M)
    return int(found.group(1)) if found else None


def small_message(subject: str) -> bytes:
    """A short message with its own Message-ID, for tests that count and move messages."""
    return (f"From: a@pec.example.test\r\nTo: studio@pec.example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{secrets.token_hex(6)}@pec.example.test>\r\n\r\nbody\r\n").encode()


def folder_truth(direct: "RawImap", folder: str = "INBOX") -> tuple[list[int], dict[int, set[str]]]:
    """A folder's UIDs and flags (``\\Recent`` left out), read on a direct connection to the
    provider."""
    _, tagged = direct.command("T0", f"EXAMINE {folder}")
    assert tagged.startswith(b"T0 OK"), tagged
    untagged, tagged = direct.command("T1", "UID FETCH 1:* (FLAGS)")
    assert tagged.startswith(b"T1 OK"), tagged
    flags = {}
    for line in untagged:
        m = re.match(rb"\* \d+ FETCH \((?=.*UID (\d+))(?=.*FLAGS \(([^)]*)\)).*", line)
        if m:
            flags[int(m.group(1))] = set(m.group(2).decode().split()) - {"\\Recent"}
    return sorted(flags), flags


def populate_demo(dovecot: Dovecot, user: str = PROVIDER_ADDRESS, messages=None):
    """The demo folders and messages, named for the Dovecot's layout (``Ricevute/Consegne``
    is ``INBOX.Ricevute.Consegne`` on the Aruba one). ``messages``: (folder, raw) pairs to
    use instead of ``demo_messages()`` (e.g. the same bytes for two users)."""
    dovecot.create_folders(user, [dovecot.provider_name(f) for f in DEMO_FOLDERS])
    for folder, raw in (demo_messages() if messages is None else messages):
        dovecot.append(user, dovecot.provider_name(folder), raw)


def _pick_port(preferred: int) -> int:
    return preferred if preferred and port_is_free(preferred) else free_port()


def sandbox(args) -> int:
    root = Path(args.dir).resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    binary = pecgate_bin()
    if not binary.exists():
        print(f"pecgate binary not found at {binary}; build it first (cargo build --release) "
              "or set PECGATE_BIN", file=sys.stderr)
        return 2

    try:
        _ensure_traversable(root)
        dove_dir = root / "dovecot"
    except HarnessError as exc:
        dove_dir = None  # fall back to a temp dir Dovecot can reach
        print(f"note: {exc}; Dovecot will live in a temp dir", file=sys.stderr)

    provider_pw = secrets.token_urlsafe(12)
    stop_event = threading.Event()

    def on_signal(signum, _frame):
        stop_event.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    dovecot = Dovecot(base_dir=dove_dir)
    dovecot.add_user(PROVIDER_ADDRESS, provider_pw)
    dovecot.add_user(f"altro@{PEC_DOMAIN}", secrets.token_urlsafe(12))
    gw = None
    provider = None
    try:
        dovecot.start()
        populate_demo(dovecot)
        provider = PecProvider(dovecot, base_dir=root / "provider",
                               tls_port=_pick_port(args.provider_smtp_port))
        provider.start()
        users = {
            "mario": {"password": args.mario_password or "mario-" + secrets.token_hex(4), "roles": ["segreteria"]},
            "anna": {"password": args.anna_password or "anna-" + secrets.token_hex(4), "roles": ["reception"]},
        }
        gw = Pecgate(dovecot, users=users, base_dir=root / "pecgate", binary=binary,
                     tls_port=_pick_port(args.tls_port), starttls_port=_pick_port(args.starttls_port),
                     smtp_tls_port=_pick_port(args.smtp_tls_port),
                     smtp_starttls_port=_pick_port(args.smtp_starttls_port),
                     smtp_url=provider.smtps_url, login_failure_delay_ms=1500,
                     mailbox_options={"receipts_folder": "Ricevute"}, receipts={"poll_secs": 60})
        gw.setup()
        gw.start()
        print(f"""
pecgate sandbox is running (Ctrl-C to stop)

  IMAP server (incoming mail) for your mail client
    host:            {HOST}
    port {gw.tls_port:<6}      SSL/TLS (implicit TLS)
    port {gw.starttls_port:<6}      STARTTLS (required before login)
    authentication:  normal password
    certificate:     {gw.cert}
                     (self-signed for localhost/127.0.0.1: trust it or accept the exception)

  SMTP server (outgoing mail), same host, users and certificate
    port {gw.smtp_tls_port:<6}      SSL/TLS (implicit TLS)
    port {gw.smtp_starttls_port:<6}      STARTTLS (required before login)
    sender address:  {PROVIDER_ADDRESS}   (the only one PEC accepts; no Bcc)
    try it:          swaks --server {HOST}:{gw.smtp_tls_port} --tls-on-connect --auth PLAIN \\
                       --auth-user mario --auth-password '{users['mario']['password']}' \\
                       --from {PROVIDER_ADDRESS} --to altro@{PEC_DOMAIN}
    receipts (ACCETTAZIONE, CONSEGNA) arrive a moment later: pecgate archives them
    and files them in Ricevute; {FAILING_ADDRESS} always fails (AVVISO DI MANCATA CONSEGNA)
    per-recipient state: {gw.bin} receipts show -c {gw.conf_path} --message-id ID

  users
    mario  / {users['mario']['password']:<20} role segreteria: all permissions; INBOX, Sent, Ricevute/**
    anna   / {users['anna']['password']:<20} role reception: read+flag; INBOX
    (log in as "mario" or "mario/studio")

  files
    config:          {gw.conf_path}
    pecgate log:     {gw.log_path}
    audit log:       {gw.audit_path}   (sqlite3 ... 'SELECT * FROM events')
    verify audit:    {gw.bin} audit verify -c {gw.conf_path}
    sent ledger:     {gw.bin} ledger show -c {gw.conf_path}

  provider (Dovecot playing the PEC provider)
    {PROVIDER_ADDRESS} / {provider_pw}
    imaps {HOST}:{dovecot.imaps_port}, imap+STARTTLS {HOST}:{dovecot.imap_port}, LMTP {HOST}:{dovecot.lmtp_port}
    SMTP (sandbox PEC provider): smtps {HOST}:{provider.tls_port}, smtp+STARTTLS {HOST}:{provider.starttls_port}
    accepted messages kept in {provider.store / "accepted"}; log {provider.log_path}
    deliver a test message:  swaks --server {HOST}:{dovecot.lmtp_port} --protocol LMTP --to {PROVIDER_ADDRESS}
""", flush=True)
        while not stop_event.wait(0.5):
            if gw.proc.poll() is not None:
                print(f"pecgate exited unexpectedly ({gw.proc.returncode}); log:\n{gw.log_text()[-4000:]}",
                      file=sys.stderr)
                return 1
            if dovecot.proc.poll() is not None:
                print(f"dovecot exited unexpectedly; log:\n{dovecot.log_text()[-4000:]}", file=sys.stderr)
                return 1
            if provider.proc.poll() is not None:
                print(f"the sandbox PEC provider exited unexpectedly; log:\n{provider.log_text()[-4000:]}",
                      file=sys.stderr)
                return 1
        print("stopping...", flush=True)
        code = gw.stop()
        print(f"pecgate exited with {code}", flush=True)
        return 0 if code == 0 else 1
    finally:
        if gw is not None:
            gw.kill()
        if provider is not None:
            provider.stop()
        dovecot.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sb = sub.add_parser("sandbox", help="run Dovecot + pecgate with demo data until Ctrl-C")
    sb.add_argument("--dir", default="sandbox-run", help="state directory (removed and recreated)")
    sb.add_argument("--tls-port", type=int, default=10993, help="preferred implicit-TLS port")
    sb.add_argument("--starttls-port", type=int, default=10143, help="preferred STARTTLS port")
    sb.add_argument("--smtp-tls-port", type=int, default=10465, help="preferred SMTP implicit-TLS port")
    sb.add_argument("--smtp-starttls-port", type=int, default=10587, help="preferred SMTP STARTTLS port")
    sb.add_argument("--provider-smtp-port", type=int, default=11465,
                    help="preferred port of the sandbox provider's SMTPS")
    sb.add_argument("--mario-password", default=None)
    sb.add_argument("--anna-password", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "sandbox":
        return sandbox(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
