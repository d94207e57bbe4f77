#!/usr/bin/env python3
"""pecgate benchmark: a direct TLS session to Dovecot vs the same through pecgate.

One private Dovecot (the PEC provider), one pecgate (release build, implicit-TLS
listener, audit log on as in production), measured side by side in one run:

1. bulk FETCH     UID FETCH 1:* (BODY.PEEK[]) over N ~50 KB messages, median of R runs
2. round trip     sequential NOOP, UID FETCH n (FLAGS) and UID STORE on one session: p50/p99
3. streaming RAM  one 50 MB message fetched by 10 clients at once: pecgate VmRSS
4. idle sessions  500 logged-in idle sessions: pecgate VmRSS per session
5. mbsync          a full `mbsync` pull of the bulk folder into an empty Maildir, median of R

Prints a Markdown table (stdout) to paste into the README; progress goes to
stderr. Run through scripts/bench.sh (builds the release binary first), or
directly with PECGATE_BIN=target/release/pecgate python3 scripts/bench.py.
Python standard library only.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import re
import selectors
import urllib.request
import hashlib
import math
import os
import platform
import random
import resource
import smtplib
import secrets
import shutil
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from email.utils import formatdate, make_msgid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "support"))

import harness  # noqa: E402
from harness import HOST, PROVIDER_ADDRESS, Dovecot, Pecgate, quote, tls_context  # noqa: E402

BULK_FOLDER = "INBOX"
BIG_FOLDER = "Sent"  # the segreteria role (all permissions) sees INBOX, Sent, Ricevute/**
USER = "mario"

TARGET_BULK_RATIO = 1.10
# The emulated provider link for the fetch-once measure: 20 ms round trip, 100 Mbit/s.
LINK_DELAY = 0.010
LINK_RATE = 100e6 / 8
TARGET_ADDED_P50_US = 30.0
TARGET_STREAM_MIB_PER_SESSION = 4.0  # "a few MiB per streaming session at most"


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# message generation (fast: base64 of random bytes, 76-char CRLF lines)
# ---------------------------------------------------------------------------


def _b64_lines(nbytes: int) -> bytes:
    """About ``nbytes`` of base64 text in 76-char CRLF lines."""
    raw = os.urandom(nbytes * 3 // 4 + 57)
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")[:nbytes]


def _head(subject: str) -> bytes:
    return (
        f"From: mittente@pec.example.test\r\nTo: {PROVIDER_ADDRESS}\r\n"
        f"Subject: {subject}\r\nMessage-ID: {make_msgid(domain='pec.example.test')}\r\n"
        f"Date: {formatdate()}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    ).encode()


def _body(pool: bytes, offset: int, size: int) -> bytes:
    """A slice of ``pool`` starting on a line boundary and ending with CRLF."""
    start = (offset // 78) * 78
    body = pool[start:start + size]
    cut = body.rfind(b"\r\n")
    return body[: cut + 2]


def make_messages(n: int, size: int) -> list[bytes]:
    pool = _b64_lines(max(4 * size, 1 << 20))
    out = []
    for i in range(n):
        head = _head(f"bench message {i + 1}")
        out.append(head + _body(pool, (i * 7919 * 78) % (len(pool) - size), size - len(head)))
    return out


def make_big(size: int) -> bytes:
    head = _head("bench big message")
    body = _b64_lines(size - len(head))
    return head + body[: body.rfind(b"\r\n") + 2]


# ---------------------------------------------------------------------------
# a small, fast IMAP client: one bytearray buffer, literals skipped or streamed
# ---------------------------------------------------------------------------


class ImapError(RuntimeError):
    pass


class Conn:
    """IMAP over TLS with a literal-aware reader that never builds big bytes objects."""

    CHUNK = 1 << 20

    def __init__(self, port: int, cafile, timeout: float = 120.0):
        sock = socket.create_connection((HOST, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls_context(cafile).wrap_socket(sock, server_hostname=HOST)
        self.buf = bytearray()
        self.pos = 0
        self.scratch = memoryview(bytearray(self.CHUNK))
        self.n = 0
        greeting = self.readline()
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"bad greeting {greeting[:200]!r}")

    def _fill(self):
        k = self.sock.recv_into(self.scratch)
        if k == 0:
            raise EOFError("connection closed by server")
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += self.scratch[:k]

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                line = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return line
            self._fill()

    def _literal(self, n: int, sink):
        avail = len(self.buf) - self.pos
        if avail >= n:
            if sink is not None:
                sink(bytes(self.buf[self.pos:self.pos + n]))
            self.pos += n
            return
        if sink is not None and avail:
            sink(bytes(self.buf[self.pos:]))
        n -= avail
        del self.buf[:]
        self.pos = 0
        recv_into, scratch = self.sock.recv_into, self.scratch
        while n > 0:
            k = recv_into(scratch)
            if k == 0:
                raise EOFError("connection closed inside a literal")
            if k <= n:
                if sink is not None:
                    sink(scratch[:k])
                n -= k
            else:
                if sink is not None:
                    sink(scratch[:n])
                self.buf += scratch[n:k]
                n = 0

    def run(self, command: str | bytes, sink=None, expect_ok: bool = True):
        """Send one command; returns (literal count, literal bytes, tagged line)."""
        if isinstance(command, str):
            command = command.encode()
        self.n += 1
        tag = b"b%d " % self.n
        self.sock.sendall(tag + command + b"\r\n")
        nlit = nbytes = 0
        while True:
            line = self.readline()
            if line.endswith(b"}"):
                j = line.rfind(b"{")
                if j >= 0 and line[j + 1:-1].isdigit():
                    n = int(line[j + 1:-1])
                    self._literal(n, sink)
                    nlit += 1
                    nbytes += n
                    continue
            if line.startswith(tag):
                if expect_ok and not line.startswith(tag + b"OK"):
                    raise ImapError(f"{command[:60]!r} failed: {line[:300]!r}")
                return nlit, nbytes, line

    def login(self, user: str, password: str):
        self.run(f"LOGIN {quote(user)} {quote(password)}")
        return self

    def close(self):
        with contextlib.suppress(Exception):
            self.sock.settimeout(5)
            self.run("LOGOUT", expect_ok=False)
        with contextlib.suppress(Exception):
            self.sock.close()


# ---------------------------------------------------------------------------
# process facts
# ---------------------------------------------------------------------------


class ProviderLink:
    """The internet between an office and its PEC provider, played on loopback: a TCP
    forwarder to ``target`` where every chunk arrives ``delay`` seconds later and each
    direction carries at most ``rate`` bytes per second (TLS passes through untouched)."""

    def __init__(self, target: int, delay: float, rate: float):
        import asyncio
        self.target, self.delay, self.rate = target, delay, rate
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve():
            self.server = await asyncio.start_server(self._connection, HOST, 0)
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        started.wait(10)

    async def _connection(self, reader, writer):
        import asyncio
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)

    async def _pump(self, source, sink):
        import asyncio
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                if not data:
                    sink.close()
                    return
                sink.write(data)
                await sink.drain()

        delivering = asyncio.ensure_future(deliver())
        free_at = 0.0
        while True:
            data = await source.read(65536)
            now = self.loop.time()
            free_at = max(free_at, now) + len(data) / self.rate
            await queue.put((free_at + self.delay, data))
            if not data:
                break
            if free_at - now > 0.05:
                # The link is full: stop reading, as a real one would push back.
                await asyncio.sleep(free_at - now - 0.05)
        await delivering

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM (peak RSS) of ``pid``; False if the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _stat_fields(path: str) -> list[str]:
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """user+system CPU of a process (all its threads)."""
    f = _stat_fields(f"/proc/{pid}/stat")
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int, name: str) -> float:
    """user+system CPU of the threads of ``pid`` called ``name``."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == name:
                f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
                total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def group_cpu(pgid: int) -> float:
    """user+system CPU of the live processes of process group ``pgid`` (Dovecot's)."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                f = _stat_fields(f"/proc/{entry}/stat")
                if int(f[2]) == pgid:
                    total += int(f[11]) + int(f[12])
    return total / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, rss_kib(self.pid))
                self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def settle_rss(pid: int, seconds: float = 1.0) -> int:
    """RSS after letting the process settle (last of a few samples)."""
    time.sleep(seconds)
    return rss_kib(pid)


def machine_facts(binary: Path) -> dict:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1048576:.1f} GiB"

    def out(*cmd):
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30,
                               cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
            return r.stdout.decode(errors="replace").strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = out("git", "rev-parse", "--short=12", "HEAD") or "unknown"
    if out("git", "status", "--porcelain", "--untracked-files=no"):
        commit += " (uncommitted changes)"
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem": mem,
        "kernel": platform.release(),
        "pecgate": out(str(binary), "--version") or "pecgate ?",
        "commit": commit,
        "dovecot": out("dovecot", "--version").split(" ")[0] or "?",
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
    }


def pct(values, p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))
    return s[k]


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------


# `[gateway] provider_idle_keep_secs` when the configuration says nothing.
DEFAULT_IDLE_KEEP_SECS = 300


class Bench:
    def __init__(self, args):
        self.a = args
        self.provider_pw = "provider-" + secrets.token_hex(8)
        self.user_pw = "mario-" + secrets.token_hex(8)
        self.dovecot: Dovecot | None = None
        self.gw: Pecgate | None = None
        self.results: dict = {}

    # -- connections --------------------------------------------------------
    def direct(self) -> Conn:
        c = Conn(self.dovecot.imaps_port, self.dovecot.cert)
        return c.login(PROVIDER_ADDRESS, self.provider_pw)

    def gateway(self) -> Conn:
        c = Conn(self.gw.tls_port, self.gw.cert)
        return c.login(USER, self.user_pw)

    @property
    def pid(self) -> int:
        return self.gw.proc.pid

    def restart_gateway(self):
        """A fresh pecgate process, so a memory section starts from a clean heap.

        (pecgate pins glibc's mmap threshold itself, so argon2's 19 MiB login buffers go back
        to the system when freed and RSS shows what the sessions hold.)
        """
        self.gw.stop()
        self.gw.start()
        # One full session first: lazy one-time allocations are not per-session costs.
        self.gateway().close()

    # -- set-up -------------------------------------------------------------
    def setup(self):
        a = self.a
        self.dovecot = Dovecot()
        self.dovecot.add_user(PROVIDER_ADDRESS, self.provider_pw)
        self.dovecot.start()
        log(f"dovecot {self.dovecot.imaps_port} in {self.dovecot.dir}")

        t0 = time.perf_counter()
        msgs = make_messages(a.messages, a.message_size)
        self.bulk_bytes = sum(len(m) for m in msgs)
        self.dovecot.append_many(PROVIDER_ADDRESS, BULK_FOLDER, msgs, batch=250)
        del msgs
        log(f"loaded {a.messages} messages ({self.bulk_bytes / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")

        t0 = time.perf_counter()
        big = make_big(a.big_mb * 1_000_000)
        self.big_size = len(big)
        self.big_sha = hashlib.sha256(big).hexdigest()
        self.dovecot.create_folders(PROVIDER_ADDRESS, [BIG_FOLDER])
        self.dovecot.append_many(PROVIDER_ADDRESS, BIG_FOLDER, [big], batch=1)
        del big
        log(f"appended a {self.big_size / 1e6:.1f} MB message in {time.perf_counter() - t0:.1f}s")

        self.gw = Pecgate(
            self.dovecot,
            users={USER: {"password": self.user_pw, "roles": ["segreteria"]},
                   # Only the logins section logs in as her: her first login is a cold one.
                   "anna": {"password": "anna-" + self.user_pw, "roles": ["segreteria"]}},
            max_connections=a.idle_sessions + 100,
            binary=a.binary,
            # One user holds every idle session here: lift the per-user cap (default 20).
            gateway_options={"max_sessions_per_user": a.idle_sessions + a.stream_clients + 100,
                             # The product default (the test harness sets 0).
                             "provider_idle_keep_secs": DEFAULT_IDLE_KEEP_SECS},
        )
        self.gw.setup()
        self.gw.start()
        log(f"pecgate pid {self.pid} on {self.gw.tls_port} in {self.gw.dir}")

    def cleanup(self):
        if self.gw is not None:
            self.gw.cleanup()
        if self.dovecot is not None:
            self.dovecot.cleanup()

    # -- 1. bulk FETCH --------------------------------------------------------
    def fetch_all(self, connect) -> tuple[float, int, int]:
        c = connect()
        try:
            c.run(f"EXAMINE {quote(BULK_FOLDER)}")
            t0 = time.perf_counter()
            nlit, nbytes, _ = c.run("UID FETCH 1:* (BODY.PEEK[])")
            dt = time.perf_counter() - t0
        finally:
            c.close()
        if nlit != self.a.messages or nbytes != self.bulk_bytes:
            raise ImapError(f"bulk fetch got {nlit} messages / {nbytes} bytes, expected "
                            f"{self.a.messages} / {self.bulk_bytes}")
        return dt, nlit, nbytes

    def bench_bulk(self):
        a = self.a
        log("bulk FETCH: warm-up")
        self.fetch_all(self.direct)
        self.fetch_all(self.gateway)
        times = {"direct": [], "pecgate": []}
        cpu = {"direct": [], "pecgate": []}  # (client, dovecot, pecgate) CPU seconds per run
        dpid = self.dovecot.proc.pid
        for i in range(a.runs):
            # Alternate which path goes first, so neither always follows the other.
            for path in (("direct", "pecgate") if i % 2 == 0 else ("pecgate", "direct")):
                c0, d0, g0 = self_cpu(), group_cpu(dpid), cpu_seconds(self.pid)
                times[path].append(self.fetch_all(self.direct if path == "direct" else self.gateway)[0])
                cpu[path].append((self_cpu() - c0, group_cpu(dpid) - d0, cpu_seconds(self.pid) - g0))
            log(f"bulk run {i + 1}/{a.runs}: direct {times['direct'][-1]:.3f}s, "
                f"pecgate {times['pecgate'][-1]:.3f}s (pecgate CPU {cpu['pecgate'][-1][2]:.2f}s)")
        med = lambda runs: tuple(statistics.median(x[k] for x in runs) for k in range(3))  # noqa: E731
        self.results["bulk"] = {
            "direct": statistics.median(times["direct"]),
            "pecgate": statistics.median(times["pecgate"]),
            "all": times,
            "cpu": {k: med(v) for k, v in cpu.items()},
        }

    def bench_mbsync(self):
        """A real client's full sync (mbsync pipelines UID FETCHes): wall time, direct vs pecgate."""
        if shutil.which("mbsync") is None:
            log("mbsync: not installed, section skipped")
            return
        times = {"direct": [], "pecgate": []}
        provider_password = self.dovecot.users[PROVIDER_ADDRESS]

        def pull(path: str, dest: Path, gw=None, port=None) -> float:
            gw = gw or self.gw
            if path == "direct":
                args = (port or self.dovecot.imaps_port, PROVIDER_ADDRESS, provider_password, self.dovecot.cert)
            else:
                args = (gw.tls_port, USER, gw.password(USER), gw.cert)
            t0 = time.perf_counter()
            res = harness.mbsync_pull(*args, [BULK_FOLDER], dest)
            took = time.perf_counter() - t0
            if res.returncode != 0:
                raise ImapError(f"mbsync {path} failed: {res.stderr.decode(errors='replace')[-500:]}")
            got = sum(1 for _ in (dest / "INBOX" / "cur").iterdir()) + sum(
                1 for _ in (dest / "INBOX" / "new").iterdir())
            if got != self.a.messages:
                raise ImapError(f"mbsync {path} synced {got} of {self.a.messages} messages")
            shutil.rmtree(dest)
            return took

        with tempfile.TemporaryDirectory(prefix="pecgate-bench-mbsync-") as tmp:
            for i in range(self.a.runs):
                for path in (("direct", "pecgate") if i % 2 == 0 else ("pecgate", "direct")):
                    times[path].append(pull(path, Path(tmp) / f"{path}-{i}"))
                log(f"mbsync run {i + 1}/{self.a.runs}: direct {times['direct'][-1]:.2f}s, "
                    f"pecgate {times['pecgate'][-1]:.2f}s")
            # Fetch once: with the body cache on (the product default; off above, to measure
            # the relay), a colleague's pull fills it and each later pull is a second
            # employee's download of a folder already synced.
            self.set_gateway_option("body_cache_mib", 1024)
            try:
                filling = pull("pecgate", Path(tmp) / "filling")
                cached = [pull("pecgate", Path(tmp) / f"cached-{i}") for i in range(self.a.runs)]
            finally:
                self.set_gateway_option("body_cache_mib", 0)
            log(f"mbsync with the body cache: filling {filling:.2f}s, then {statistics.median(cached):.2f}s")
            # On loopback the client's own work dominates a pull: what the cache saves is the
            # provider's side. The same over an emulated provider link (what an office has).
            link = ProviderLink(self.dovecot.imaps_port, delay=LINK_DELAY, rate=LINK_RATE)
            far = Pecgate(
                self.dovecot,
                users={USER: {"password": self.user_pw, "roles": ["segreteria"]}},
                mailboxes={"studio": harness.provider_mailbox(
                    self.dovecot, PROVIDER_ADDRESS, imap=f"imaps://{HOST}:{link.port}")},
                binary=self.a.binary,
                gateway_options={"body_cache_mib": 1024,
                                 "provider_idle_keep_secs": DEFAULT_IDLE_KEEP_SECS},
            )
            try:
                far.setup()
                far.start()
                wan_direct = pull("direct", Path(tmp) / "wan-direct", port=link.port)
                wan_filling = pull("pecgate", Path(tmp) / "wan-filling", gw=far)
                wan_cached = pull("pecgate", Path(tmp) / "wan-cached", gw=far)
            finally:
                far.cleanup()
                link.close()
            log(f"mbsync over the emulated link: direct {wan_direct:.2f}s, through pecgate "
                f"{wan_filling:.2f}s, second employee {wan_cached:.2f}s")
        self.results["mbsync"] = {k: statistics.median(v) for k, v in times.items()} | {
            "all": times, "filling": filling, "cached": statistics.median(cached),
            "wan": {"direct": wan_direct, "filling": wan_filling, "cached": wan_cached}}

    # -- 2. round trips -------------------------------------------------------
    def bench_rtt(self):
        a = self.a
        d, g = self.direct(), self.gateway()
        try:
            for c in (d, g):
                c.run(f"SELECT {quote(BULK_FOLDER)}")
            out = {}
            # STORE changes the mailbox: pecgate writes its audit row durably (fsync, group
            # commit) before sending it, so its round trip shows that cost.
            for name, cmd in (("NOOP", lambda i: "NOOP"),
                              ("UID FETCH n (FLAGS)", lambda i: f"UID FETCH {i % a.messages + 1} (FLAGS)"),
                              ("UID STORE n +FLAGS.SILENT", lambda i: f"UID STORE {i % a.messages + 1} "
                                                                    f"{'+' if i % 2 else '-'}FLAGS.SILENT (\\Flagged)")):
                for i in range(min(200, a.rtt)):  # warm-up
                    d.run(cmd(i))
                    g.run(cmd(i))
                lat = {"direct": [], "pecgate": []}
                clock = time.perf_counter_ns
                g0, w0 = cpu_seconds(self.pid), thread_cpu(self.pid, "audit-writer")
                # Alternate the two paths command by command: both see the same noise.
                for i in range(a.rtt):
                    text = cmd(i)
                    for key, c in (("direct", d), ("pecgate", g)):
                        t0 = clock()
                        c.run(text)
                        lat[key].append((clock() - t0) / 1000.0)
                out[name] = {k: (pct(v, 50), pct(v, 99)) for k, v in lat.items()}
                writer = thread_cpu(self.pid, "audit-writer") - w0
                out[name]["cpu_us"] = ((cpu_seconds(self.pid) - g0) / a.rtt * 1e6, writer / a.rtt * 1e6)
                log(f"{name}: direct p50/p99 {out[name]['direct'][0]:.0f}/{out[name]['direct'][1]:.0f} us, "
                    f"pecgate {out[name]['pecgate'][0]:.0f}/{out[name]['pecgate'][1]:.0f} us")
        finally:
            d.close()
            g.close()
        self.results["rtt"] = out

    # -- 3. streaming memory --------------------------------------------------
    def bench_stream(self):
        a = self.a
        self.restart_gateway()
        pid = self.pid
        before_login = settle_rss(pid, 1.0)
        n = a.stream_clients
        arrived = threading.Barrier(n + 1)
        go = threading.Barrier(n + 1)

        def client(_):
            c = self.gateway()
            try:
                c.run(f"EXAMINE {quote(BIG_FOLDER)}")
                h = hashlib.sha256()
                arrived.wait(120)
                go.wait(120)
                t0 = time.perf_counter()
                nlit, nbytes, _ = c.run("UID FETCH 1:* (BODY.PEEK[])", sink=h.update)
                return nlit, nbytes, h.hexdigest(), time.perf_counter() - t0
            finally:
                c.close()

        sampler = RssSampler(pid, 0.02)
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(client, i) for i in range(n)]
            arrived.wait(120)  # all logged in, folder selected, nothing fetched yet
            base = settle_rss(pid, 0.5)
            hwm_ok = reset_hwm(pid)
            log(f"streaming: {n} clients x {self.big_size / 1e6:.0f} MB; RSS {before_login / 1024:.1f} MiB "
                f"before login, {base / 1024:.1f} MiB logged in")
            sampler.start()
            go.wait(120)
            t0 = time.perf_counter()
            got = [f.result() for f in futures]
            wall = time.perf_counter() - t0
        peak = sampler.stop()
        hwm = _status_kib(pid, "VmHWM") if hwm_ok else None
        bad = [g for g in got if g[0] != 1 or g[1] != self.big_size or g[2] != self.big_sha]
        if bad:
            raise ImapError(f"{len(bad)} streaming clients got wrong data: "
                            f"{[(g[0], g[1]) for g in bad]} (expected 1 x {self.big_size} bytes)")
        self.results["stream"] = {
            "before_login": before_login, "base": base, "peak": max(peak, hwm or 0), "sampled": peak,
            "hwm": hwm, "clients": n, "wall": wall, "samples": sampler.samples,
            "mb": self.big_size / 1e6, "rate": n * self.big_size / wall / 1e6,
        }
        log(f"streaming: peak RSS {peak / 1024:.1f} MiB ({sampler.samples} samples"
            + (f", VmHWM {hwm / 1024:.1f} MiB" if hwm else "") + f"), {wall:.1f}s, all {n} verified")

    # -- 4. idle sessions -----------------------------------------------------
    def bench_idle(self):
        self.results["idle"] = self._idle()

    def bench_logins(self):
        """Repeat logins: the first login of a user costs an argon2 check; the same user and
        password again is checked against pecgate's verified-login cache. Timed from LOGIN
        sent to its tagged OK, on connections already through TLS; plus a burst of 5 at once
        (what Thunderbird opens) and the wall time of a run of sequential logins."""
        a = self.a
        # A fresh process; its warm-up session logs in as mario, so anna's cache entry is cold.
        self.restart_gateway()
        gw = self.gw
        user = "anna"
        password = gw.password(user)

        def timed_login() -> float:
            r = gw.raw(tls=True)
            try:
                started = time.perf_counter()
                r.login(user, password)
                return time.perf_counter() - started
            finally:
                r.close()

        def timed_auth() -> float:
            # SMTP AUTH opens no provider session: this is the credential check alone.
            with smtplib.SMTP_SSL(harness.HOST, gw.smtp_tls_port,
                                  context=harness.tls_context(gw.cert), timeout=30) as c:
                c.ehlo("bench")
                started = time.perf_counter()
                c.login(user, password)
                return time.perf_counter() - started

        first_auth = timed_auth()
        auths = [timed_auth() for _ in range(a.logins // 5)]
        self.restart_gateway()  # cold again for the IMAP figures
        gw = self.gw
        first = timed_login()
        repeats = [timed_login() for _ in range(a.logins)]
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            started = time.perf_counter()
            burst = list(pool.map(lambda _: timed_login(), range(5)))
            burst_wall = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(a.logins):
            timed_login()
        run_wall = time.perf_counter() - started
        # The same logins with the pool keeping no idle connection: each opens its own
        # provider session (TCP, TLS, LOGIN), as every login did before the pool kept them.
        self.set_gateway_option("provider_idle_keep_secs", 0)
        cold = [timed_login() for _ in range(a.logins)]
        self.set_gateway_option("provider_idle_keep_secs", DEFAULT_IDLE_KEEP_SECS)
        self.results["logins"] = {
            "first_auth_ms": first_auth * 1000,
            "auth_p50_ms": pct(auths, 50) * 1000,
            "auth_p99_ms": pct(auths, 99) * 1000,
            "auths": len(auths),
            "first_ms": first * 1000,
            "p50_ms": pct(repeats, 50) * 1000,
            "p99_ms": pct(repeats, 99) * 1000,
            "burst_ms": max(burst) * 1000,
            "burst_wall_ms": burst_wall * 1000,
            "n": a.logins,
            "run_s": run_wall,
            "no_reuse_p50_ms": pct(cold, 50) * 1000,
            "no_reuse_p99_ms": pct(cold, 99) * 1000,
        }

    def bench_parked(self):
        """The shared pool: N client sessions in IDLE on INBOX over a pool of K provider
        connections, and a Dovecot that refuses more than K + 2 per login (so the pool really
        is the budget). Opening them, pecgate RSS per parked session, provider connections in
        use, the time for a new message (LMTP) to reach every idler, and the cost of waking:
        DONE → OK (a pooled connection, SELECT, UID SEARCH), then `UID FETCH 1:* (FLAGS)`,
        against the same FETCH on a direct connection."""
        a = self.a
        n, k = a.parked_sessions, a.parked_pool
        provider = Dovecot(max_userip_connections=k + 2)
        provider.add_user(PROVIDER_ADDRESS, self.provider_pw)
        provider.start()
        for i in range(20):
            provider.append(PROVIDER_ADDRESS, "INBOX", _head(f"seed {i}") + b"\r\nbody\r\n")
        gw = Pecgate(
            provider,
            users={USER: {"password": self.user_pw, "roles": ["segreteria"]}},
            max_connections=k,
            binary=a.binary,
            metrics="127.0.0.1:0",
            gateway_options={"max_sessions": n + 100, "max_sessions_per_user": n + 100,
                             "max_preauth_per_address": 1000,
                             "provider_idle_keep_secs": DEFAULT_IDLE_KEEP_SECS},
            imap_options={"park_idle": True, "lend_between_commands": True},
        )
        gw.setup()
        gw.start()
        sessions: list[Conn] = []
        try:
            def scrape(name: str) -> int:
                with urllib.request.urlopen(f"http://{HOST}:{gw.metrics_port}/metrics", timeout=10) as r:
                    text = r.read().decode()
                m = re.search(rf'^{name}{{mailbox="studio"}} (\d+)$', text, re.M)
                return int(m.group(1)) if m else -1

            def open_one(_):
                c = Conn(gw.tls_port, gw.cert)
                c.login(USER, self.user_pw)
                c.run("SELECT INBOX")
                c.sock.sendall(b"i IDLE\r\n")
                line = c.readline()
                if not line.startswith(b"+"):
                    raise ImapError(f"IDLE answered {line!r}")
                return c

            open_one(0).close()
            pid = gw.proc.pid
            base = settle_rss(pid, 1.0)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                sessions.extend(pool.map(open_one, range(n)))
            opened = time.perf_counter() - t0
            after = settle_rss(pid, 2.0)
            in_use = scrape("pecgate_provider_connections")

            # New mail: every idler must hear EXISTS.
            sel = selectors.DefaultSelector()
            for c in sessions:
                sel.register(c.sock, selectors.EVENT_READ, c)
            t0 = time.perf_counter()
            provider.deliver(PROVIDER_ADDRESS, _head("nuova PEC") + b"\r\nbody\r\n")
            waits: list[float] = []
            pending = len(sessions)
            deadline = t0 + 60
            while pending and time.perf_counter() < deadline:
                for key, _ in sel.select(timeout=1):
                    c = key.data
                    line = c.readline()
                    if line.endswith(b"EXISTS"):
                        waits.append(time.perf_counter() - t0)
                        sel.unregister(c.sock)
                        pending -= 1
            sel.close()
            if pending:
                raise ImapError(f"{pending} of {n} idle sessions never heard of the new message")

            # Waking: DONE → OK, a FETCH of every message's flags, IDLE again (as Thunderbird).
            active = sessions[: a.parked_active]
            wakes, fetches = [], []
            for _ in range(3):
                for c in active:
                    started = time.perf_counter()
                    c.sock.sendall(b"DONE\r\n")
                    while not c.readline().startswith(b"i OK"):
                        pass
                    woke = time.perf_counter()
                    c.run("UID FETCH 1:* (FLAGS)")
                    fetched = time.perf_counter()
                    c.sock.sendall(b"i IDLE\r\n")
                    while not c.readline().startswith(b"+"):
                        pass
                    wakes.append(woke - started)
                    fetches.append(fetched - woke)
            def timed_fetches(c: Conn) -> list[float]:
                c.run("SELECT INBOX")
                out = []
                for _ in range(len(fetches)):
                    started = time.perf_counter()
                    c.run("UID FETCH 1:* (FLAGS)")
                    out.append(time.perf_counter() - started)
                c.close()
                return out

            direct_fetches = timed_fetches(
                Conn(provider.imaps_port, provider.cert).login(PROVIDER_ADDRESS, self.provider_pw))
            # A session that never idles: attached for its whole life, as every session was
            # before the pool (one-to-one).
            attached_fetches = timed_fetches(Conn(gw.tls_port, gw.cert).login(USER, self.user_pw))

            # Working sessions (never in IDLE) beside the idlers: a mixed read / flag / append
            # load with think time, over what the watcher leaves of the pool; then the same
            # commands by one session alone (one-to-one: nobody asks for its connection).
            lends_before = scrape("pecgate_provider_lends_total")
            mixed = self._mixed_load(gw, a.parked_active, a.mixed_rounds)
            lends = scrape("pecgate_provider_lends_total") - lends_before
            alone = self._mixed_load(gw, 1, a.mixed_rounds * 5)
            refused = provider.log_text().count("Maximum number of connections")
            self.results["parked"] = {
                "n": n, "k": k, "opened_s": opened, "base": base, "after": after,
                "in_use": in_use, "new_mail_p50_ms": pct(waits, 50) * 1000,
                "new_mail_max_ms": max(waits) * 1000, "active": len(active),
                "wake_p50_ms": pct(wakes, 50) * 1000, "wake_p99_ms": pct(wakes, 99) * 1000,
                "fetch_p50_ms": pct(fetches, 50) * 1000,
                "direct_fetch_p50_ms": pct(direct_fetches, 50) * 1000,
                "attached_fetch_p50_ms": pct(attached_fetches, 50) * 1000,
                "refused": refused,
                "mixed": mixed, "alone": alone, "lends": lends,
            }
        finally:
            def leave(c: Conn):
                # In IDLE: DONE first, or the LOGOUT is taken for a broken IDLE and dropped.
                with contextlib.suppress(Exception):
                    c.sock.sendall(b"DONE\r\n")
                c.close()

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(leave, sessions))
            gw.cleanup()
            provider.cleanup()

    def _mixed_load(self, gw, sessions: int, rounds: int) -> dict:
        """``sessions`` sessions with INBOX selected, each running ``rounds`` commands with
        50–250 ms of think time between them: `UID FETCH` of one message's body (40 %),
        `FETCH 1:* (FLAGS)` (25 %), `UID STORE` of a flag (25 %), `APPEND` (10 %). Every
        command must answer OK. Latency per command, p50 / p99, by kind and overall."""
        def worker(seed: int) -> list[tuple[str, float]]:
            rng = random.Random(seed)
            c = Conn(gw.tls_port, gw.cert).login(USER, self.user_pw)
            try:
                c.run("SELECT INBOX")
                uids: list[int] = []
                c.sock.sendall(b"u UID SEARCH ALL\r\n")
                while True:
                    line = c.readline()
                    if line.startswith(b"* SEARCH"):
                        uids = [int(u) for u in line.split()[2:]]
                    if line.startswith(b"u "):
                        break
                out = []
                for _ in range(rounds):
                    time.sleep(rng.uniform(0.05, 0.25))
                    pick = rng.random()
                    uid = rng.choice(uids)
                    if pick < 0.4:
                        kind, command = "read", f"UID FETCH {uid} (UID RFC822.SIZE BODY.PEEK[])"
                    elif pick < 0.65:
                        kind, command = "flags", "FETCH 1:* (FLAGS)"
                    elif pick < 0.9:
                        sign = rng.choice("+-")
                        kind, command = "store", f"UID STORE {uid} {sign}FLAGS (\\Flagged)"
                    else:
                        body = _head(f"bozza {seed}") + b"\r\nbody\r\n"
                        kind = "append"
                        command = b"APPEND INBOX {%d+}\r\n" % len(body) + body
                    started = time.perf_counter()
                    c.run(command)
                    out.append((kind, time.perf_counter() - started))
                return out
            finally:
                c.close()

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
            runs = list(pool.map(worker, range(sessions)))
        wall = time.perf_counter() - t0
        timings = [t for run in runs for t in run]
        by_kind = {kind: [d for k, d in timings if k == kind] for kind in ("read", "flags", "store", "append")}
        return {
            "sessions": sessions, "commands": len(timings), "wall_s": wall,
            "p50_ms": pct([d for _, d in timings], 50) * 1000,
            "p99_ms": pct([d for _, d in timings], 99) * 1000,
            "kinds": {k: (pct(v, 50) * 1000, pct(v, 99) * 1000) for k, v in by_kind.items() if v},
        }

    def set_gateway_option(self, key: str, value):
        """Restart pecgate with ``[gateway] key`` set."""
        self.gw.gateway_options[key] = value
        self.gw.write_config()
        self.restart_gateway()

    def _idle(self) -> dict:
        a = self.a
        self.restart_gateway()
        pid = self.pid
        workers = 8

        def open_one(_):
            c = self.gateway()
            c.run(f"SELECT {quote(BULK_FOLDER)}")
            return c

        base = settle_rss(pid, 1.0)
        log(f"idle: baseline RSS {base / 1024:.1f} MiB; opening {a.idle_sessions} sessions")
        sessions: list[Conn] = []
        t0 = time.perf_counter()
        half = a.idle_sessions // 2
        try:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                sessions.extend(pool.map(open_one, range(half)))
                mid = settle_rss(pid, 1.0)
                sessions.extend(pool.map(open_one, range(a.idle_sessions - half)))
            opened = time.perf_counter() - t0
            after = settle_rss(pid, 2.0)
            # Every session is really alive and logged in.
            for c in sessions:
                c.sock.settimeout(30)
                c.run("NOOP")
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        finally:
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                list(pool.map(Conn.close, sessions))
        closed = settle_rss(pid, 1.5)
        log(f"idle: {len(sessions)} sessions in {opened:.1f}s; RSS {after / 1024:.1f} MiB "
            f"(half-way {mid / 1024:.1f}); after closing {closed / 1024:.1f} MiB; pecgate fds {fds}")
        return {"n": len(sessions), "base": base, "mid": mid, "after": after, "closed": closed,
                "opened_s": opened, "fds": fds, "workers": workers}

    def audit_events(self) -> int:
        db = sqlite3.connect(f"file:{self.gw.audit_path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            db.close()

    # -- report ---------------------------------------------------------------
    def report(self, facts: dict, elapsed: float):
        a, r = self.a, self.results
        ok = lambda cond: "yes" if cond else "**no**"  # noqa: E731
        mib = lambda kib: f"{kib / 1024:.1f} MiB"  # noqa: E731
        lines = []
        p = lines.append
        p(f"### pecgate benchmark{' (quick)' if a.quick else ''}")
        p("")
        p(f"- Machine: {facts['nproc']} × {facts['cpu']}, {facts['mem']} RAM, Linux {facts['kernel']}")
        p(f"- {facts['pecgate']} (commit {facts['commit']}), release build; Dovecot {facts['dovecot']}; "
          f"client: Python {facts['python']}, {facts['openssl']}")
        p(f"- Everything on loopback, TLS on both hops (client→pecgate implicit TLS, pecgate→Dovecot IMAPS); "
          f"audit log on (SQLite WAL, synchronous=FULL). Client, pecgate and Dovecot share the "
          f"{facts['nproc']} cores.")
        p("")
        p("| Measure | Direct to Dovecot | Through pecgate | pecgate vs direct | Target | Met |")
        p("|---|---:|---:|---:|---|:-:|")
        if "bulk" in r:
            b = r["bulk"]
            mb = self.bulk_bytes / 1e6
            ratio = b["pecgate"] / b["direct"]
            p(f"| Bulk `UID FETCH 1:* (BODY.PEEK[])`, {a.messages} × {a.message_size // 1000} KB "
              f"({mb:.0f} MB), median of {a.runs} | {b['direct']:.2f} s, {mb / b['direct']:.0f} MB/s "
              f"| {b['pecgate']:.2f} s, {mb / b['pecgate']:.0f} MB/s | {ratio:.2f}× "
              f"| ≤ {TARGET_BULK_RATIO:.2f}× | {ok(ratio <= TARGET_BULK_RATIO)} |")
        if "mbsync" in r:
            m = r["mbsync"]
            ratio = m["pecgate"] / m["direct"]
            p(f"| `mbsync` full pull of the bulk folder ({a.messages} messages), median of {a.runs} "
              f"| {m['direct']:.2f} s | {m['pecgate']:.2f} s | {ratio:.2f}× | ≤ {TARGET_BULK_RATIO:.2f}× "
              f"| {ok(ratio <= TARGET_BULK_RATIO)} |")
            ratio = m["cached"] / m["direct"]
            p(f"| `mbsync` full pull by a second employee, bodies from pecgate's cache (the first "
              f"pull, filling it: {m['filling']:.2f} s), median of {a.runs} "
              f"| {m['direct']:.2f} s | {m['cached']:.2f} s | {ratio:.2f}× | ≤ 0.5× direct "
              f"| {ok(ratio <= 0.5)} |")
            w = m["wan"]
            ratio = w["cached"] / w["direct"]
            p(f"| The same over an emulated provider link ({LINK_DELAY * 2000:.0f} ms round trip, "
              f"{LINK_RATE * 8 / 1e6:.0f} Mbit/s): a second employee's pull (the first through "
              f"pecgate: {w['filling']:.2f} s) | {w['direct']:.2f} s | {w['cached']:.2f} s "
              f"| {ratio:.2f}× | ≤ 0.5× direct | {ok(ratio <= 0.5)} |")
        if "rtt" in r:
            for name, v in r["rtt"].items():
                (d50, d99), (g50, g99) = v["direct"], v["pecgate"]
                # A state-changing command waits for its durable audit row by design: no target.
                durable = name.startswith("UID STORE")
                target = "— (durable audit row first)" if durable else f"≤ +{TARGET_ADDED_P50_US:.0f} µs"
                met = "" if durable else ok(g50 - d50 <= TARGET_ADDED_P50_US)
                p(f"| `{name}` round trip p50 ({a.rtt} sequential) | {d50:.0f} µs | {g50:.0f} µs "
                  f"| +{g50 - d50:.0f} µs | {target} | {met} |")
                p(f"| `{name}` round trip p99 | {d99:.0f} µs | {g99:.0f} µs | +{g99 - d99:.0f} µs | — | |")
        if "stream" in r:
            s = r["stream"]
            delta = s["peak"] - s["base"]
            per = delta / s["clients"] / 1024
            p(f"| Streaming: {s['clients']} clients fetch one {s['mb']:.0f} MB message at once "
              f"(pecgate RSS, logged in → peak) | — | {mib(s['base'])} → {mib(s['peak'])} "
              f"| +{mib(delta)} ({per:.2f} MiB/session) | ≤ {TARGET_STREAM_MIB_PER_SESSION:.0f} MiB/session, "
              f"flat in message size | {ok(per <= TARGET_STREAM_MIB_PER_SESSION)} |")
        if "logins" in r:
            g = r["logins"]
            p(f"| Credential check alone (SMTP `AUTH PLAIN` → 235), same user and password again, "
              f"{g['auths']} sequential, p50 / p99 | — | {g['auth_p50_ms']:.2f} / {g['auth_p99_ms']:.2f} ms "
              f"| first (argon2): {g['first_auth_ms']:.1f} ms | ~1 ms | {ok(g['auth_p50_ms'] <= 1.5)} |")
            p(f"| IMAP `LOGIN` → OK of a user seen before ({g['n']} sequential; a provider connection "
              f"the previous session gave back), p50 / p99 | — | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} ms "
              f"| first: {g['first_ms']:.1f} ms | — | |")
            p(f"| The same with no idle provider connection kept (`provider_idle_keep_secs = 0`: "
              f"each login opens its own), p50 / p99 | — | {g['no_reuse_p50_ms']:.2f} / "
              f"{g['no_reuse_p99_ms']:.2f} ms | — | — | |")
            p(f"| {g['n']} logins in a row (TLS connect, LOGIN, close) / a burst of 5 at once "
              f"| — | {g['run_s']:.1f} s / {g['burst_wall_ms']:.0f} ms | — | — | |")
        if "idle" in r:
            i = r["idle"]
            per = (i["after"] - i["base"]) / i["n"]
            p(f"| Idle: {i['n']} logged-in sessions, INBOX selected (pecgate RSS, before → after) "
              f"| — | {mib(i['base'])} → {mib(i['after'])} | {per:.0f} KiB/session | — | |")
        if "parked" in r:
            q = r["parked"]
            per = (q["after"] - q["base"]) / q["n"]
            p(f"| Shared pool: {q['n']} sessions in IDLE on INBOX over `max_connections = {q['k']}` "
              f"(Dovecot capped at {q['k'] + 2}): provider connections in use / opened in / pecgate RSS "
              f"| — | {q['in_use']} / {q['opened_s']:.1f} s / {mib(q['base'])} → {mib(q['after'])} "
              f"| {per:.0f} KiB/session | ≤ {q['k']} connections | {ok(q['in_use'] <= q['k'])} |")
            p(f"| New mail (LMTP) heard by every one of the {q['n']} idle sessions, p50 / last "
              f"| — | {q['new_mail_p50_ms']:.0f} / {q['new_mail_max_ms']:.0f} ms | — | ≤ 2 s "
              f"| {ok(q['new_mail_max_ms'] <= 2000)} |")
            ratio = q["fetch_p50_ms"] / q["attached_fetch_p50_ms"]
            p(f"| {q['active']} sessions waking (DONE → OK, then `UID FETCH 1:* (FLAGS)`, IDLE again), "
              f"wake p50 / p99; FETCH p50 (direct / a one-to-one session through pecgate) "
              f"| {q['direct_fetch_p50_ms']:.2f} ms | {q['wake_p50_ms']:.2f} / {q['wake_p99_ms']:.2f} ms; "
              f"FETCH {q['fetch_p50_ms']:.2f} ms (one-to-one {q['attached_fetch_p50_ms']:.2f} ms) "
              f"| FETCH {ratio:.2f}× one-to-one | ≤ 1.5× one-to-one | {ok(ratio <= 1.5)} |")
            m, one = q["mixed"], q["alone"]
            ratio = m["p50_ms"] / one["p50_ms"]
            kinds = ", ".join(f"{k} {v[0]:.2f}/{v[1]:.2f}" for k, v in m["kinds"].items())
            p(f"| {m['sessions']} working sessions beside the idlers ({m['commands']} commands: body read, "
              f"`FETCH 1:* (FLAGS)`, flag STORE, APPEND; 50–250 ms think time), all OK; p50 / p99 "
              f"({kinds} ms); connections lent {q['lends']} times "
              f"| — | {m['p50_ms']:.2f} / {m['p99_ms']:.2f} ms (one session alone {one['p50_ms']:.2f} / "
              f"{one['p99_ms']:.2f} ms) | p50 {ratio:.2f}× one-to-one | ≤ 1.5× one-to-one "
              f"| {ok(ratio <= 1.5)} |")
        p("")
        notes = []
        if "bulk" in r:
            b = r["bulk"]
            gb = self.bulk_bytes / 1e9
            cd, cg = b["cpu"]["direct"], b["cpu"]["pecgate"]
            notes.append(
                "bulk runs (s): direct " + ", ".join(f"{x:.3f}" for x in b["all"]["direct"])
                + "; pecgate " + ", ".join(f"{x:.3f}" for x in b["all"]["pecgate"])
                + f". CPU per run (median, s), client / Dovecot / pecgate: direct {cd[0]:.2f} / {cd[1]:.2f} / —, "
                f"through pecgate {cg[0]:.2f} / {cg[1]:.2f} / {cg[2]:.2f} "
                f"(pecgate {cg[2] / gb:.1f} CPU-s per GB relayed; {facts['nproc']} cores available)")
        if "rtt" in r:
            parts = [f"`{name}` {v['cpu_us'][0]:.0f} µs (audit-writer thread {v['cpu_us'][1]:.0f})"
                     for name, v in r["rtt"].items()]
            notes.append("pecgate CPU per relayed command: " + ", ".join(parts))
        if "stream" in r:
            s = r["stream"]
            notes.append(
                f"streaming: every client got {self.big_size} bytes with the right SHA-256; "
                f"{s['wall']:.1f} s wall, {s['rate']:.0f} MB/s aggregate; RSS sampled every 20 ms "
                f"({s['samples']} samples, peak {mib(s['sampled'])})" + (f", kernel VmHWM {mib(s['hwm'])}" if s["hwm"] else "")
                + f"; {mib(s['before_login'])} before the {s['clients']} logins")
        if "idle" in r:
            i = r["idle"]
            half = i["n"] // 2
            marginal = (i["after"] - i["mid"]) / (i["n"] - half) if i["mid"] else 0
            notes.append(
                f"idle: opened in {i['opened_s']:.1f} s ({i['workers']} at a time); marginal {marginal:.0f} KiB/session "
                f"from {half} to {i['n']}; {i['fds']} fds in pecgate; RSS {mib(i['closed'])} after all closed")
        with contextlib.suppress(Exception):
            notes.append(f"audit events written during the run: {self.audit_events()}")
        notes.append(f"whole run: {elapsed:.0f} s")
        for n in notes:
            p(f"- {n}")
        print("\n".join(lines), flush=True)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=None, help="messages in the bulk folder (default 3000)")
    ap.add_argument("--message-size", type=int, default=50_000, help="bytes per bulk message (default 50000)")
    ap.add_argument("--runs", type=int, default=None, help="timed bulk runs per path, median taken (default 3)")
    ap.add_argument("--rtt", type=int, default=None, help="sequential commands per round-trip test (default 2000)")
    ap.add_argument("--big-mb", type=int, default=None, help="size of the streamed message in MB (default 50)")
    ap.add_argument("--stream-clients", type=int, default=None, help="concurrent streaming clients (default 10)")
    ap.add_argument("--idle-sessions", type=int, default=None, help="idle sessions to open (default 500)")
    ap.add_argument("--logins", type=int, default=None, help="repeat logins timed (default 500)")
    ap.add_argument("--parked-sessions", type=int, default=None, help="sessions parked in IDLE (default 1000)")
    ap.add_argument("--parked-pool", type=int, default=10, help="max_connections for the parked section (default 10)")
    ap.add_argument("--parked-active", type=int, default=50, help="parked sessions woken in turn, and working sessions beside the idlers (default 50)")
    ap.add_argument("--mixed-rounds", type=int, default=40, help="commands per working session in the mixed load (default 40)")
    ap.add_argument("--only", default="bulk,mbsync,rtt,stream,idle,logins,parked", help="comma-separated subset of sections")
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few iterations")
    a = ap.parse_args(argv)
    defaults = dict(messages=3000, runs=3, rtt=2000, big_mb=50, stream_clients=10, idle_sessions=500,
                    logins=500, parked_sessions=1000)
    if a.quick:
        defaults = dict(messages=300, runs=1, rtt=300, big_mb=10, stream_clients=4, idle_sessions=50,
                        logins=50, parked_sessions=100)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.binary = harness.pecgate_bin()
    if "PECGATE_BIN" not in os.environ:
        a.binary = REPO_ROOT / "target" / "release" / "pecgate"
    if not a.binary.exists():
        print(f"pecgate binary not found at {a.binary}: run scripts/bench.sh (it builds the release "
              "binary) or set PECGATE_BIN", file=sys.stderr)
        return 2
    sections = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = set(sections) - {"bulk", "mbsync", "rtt", "stream", "idle", "logins", "parked"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")

    if a.idle_sessions + a.stream_clients > 900:
        ap.error("the harness's Dovecot allows 1000 connections per user and IP: keep "
                 "--idle-sessions + --stream-clients under 900")

    soft, _ = raise_nofile()  # inherited by Dovecot and pecgate too
    need = max(a.idle_sessions, a.parked_sessions) * 2 + 200
    if soft < need:
        print(f"RLIMIT_NOFILE is {soft}, {need} needed for {a.idle_sessions} idle sessions", file=sys.stderr)
        return 2

    started = time.perf_counter()
    bench = Bench(a)
    try:
        bench.setup()
        facts = machine_facts(a.binary)
        for s in sections:
            getattr(bench, f"bench_{s}")()
        bench.report(facts, time.perf_counter() - started)
    except Exception:
        if bench.gw is not None:
            log("pecgate log tail:\n" + bench.gw.log_text()[-3000:])
        raise
    finally:
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
