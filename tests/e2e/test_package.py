"""The Debian package: scripts/package-deb.sh builds a .deb of the binary under test
(PECGATE_BIN), and its layout, control data, unit and maintainer scripts are checked
statically (dpkg-deb --info/--contents/-x/-e). Nothing is installed."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import REPO_ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or shutil.which("dpkg") is None,
    reason="dpkg-deb not found: the package test needs dpkg (Debian/Ubuntu)")

SCRIPT = REPO_ROOT / "scripts" / "package-deb.sh"
MAINTAINER = "pecgate test <pecgate-test@example.test>"

# Every regular file the package ships, with its mode; all owned by root:root.
EXPECTED_FILES = {
    "usr/bin/pecgate": "-rwxr-xr-x",
    "lib/systemd/system/pecgate.service": "-rw-r--r--",
    "etc/pecgate/proxy.toml.example": "-rw-r--r--",
    "usr/share/doc/pecgate/README.md": "-rw-r--r--",
    "usr/share/doc/pecgate/ARCHITECTURE.md": "-rw-r--r--",
    "usr/share/doc/pecgate/copyright": "-rw-r--r--",
    "usr/share/doc/pecgate/changelog.gz": "-rw-r--r--",
    "usr/share/lintian/overrides/pecgate": "-rw-r--r--",
}


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 300)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)


def _cargo_version() -> str:
    text = (REPO_ROOT / "Cargo.toml").read_text()
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', package, re.M).group(1)


@pytest.fixture(scope="module")
def deb(pecgate_binary, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    name, email = MAINTAINER.rstrip(">").split(" <")
    env = {**os.environ, "DEBFULLNAME": name, "DEBEMAIL": email}
    res = _run("bash", SCRIPT, "--binary", pecgate_binary, "--out", out, env=env, cwd=out)
    assert res.returncode == 0, f"package-deb.sh failed:\n{res.stdout}\n{res.stderr}"
    debs = list(out.glob("*.deb"))
    assert len(debs) == 1, debs
    assert res.stdout.strip().splitlines()[-1] == str(debs[0])
    return debs[0]


@pytest.fixture(scope="module")
def extracted(deb, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("root")
    res = _run("dpkg-deb", "-x", deb, root)
    assert res.returncode == 0, res.stderr
    return root


@pytest.fixture(scope="module")
def control_dir(deb, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("control") / "DEBIAN"
    res = _run("dpkg-deb", "-e", deb, d)
    assert res.returncode == 0, res.stderr
    return d


def _field(deb: Path, name: str) -> str:
    res = _run("dpkg-deb", "-f", deb, name)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_name_and_control_fields(deb):
    version = _cargo_version().replace("-", "~")
    arch = _run("dpkg", "--print-architecture").stdout.strip()
    assert deb.name == f"pecgate_{version}_{arch}.deb"

    info = _run("dpkg-deb", "--info", deb)
    assert info.returncode == 0, info.stderr
    assert _field(deb, "Package") == "pecgate"
    assert _field(deb, "Version") == version
    assert _field(deb, "Architecture") == arch
    assert _field(deb, "Maintainer") == MAINTAINER
    depends = [d.strip().split(" ")[0] for d in _field(deb, "Depends").split(",")]
    assert "adduser" in depends and "libc6" in depends, depends
    description = _field(deb, "Description")
    synopsis = description.splitlines()[0]
    assert synopsis and len(synopsis) < 80 and not synopsis.endswith("."), synopsis
    assert len(description.splitlines()) > 3, "no long description"
    assert int(_field(deb, "Installed-Size")) > 0


def test_file_list_modes_and_owners(deb):
    res = _run("dpkg-deb", "--contents", deb)
    assert res.returncode == 0, res.stderr
    files, dirs = {}, set()
    for line in res.stdout.splitlines():
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        assert owner == "root/root", line
        assert " -> " not in path, f"unexpected link: {line}"
        path = path.removeprefix("./")
        if mode.startswith("d"):
            assert mode == "drwxr-xr-x", line
            dirs.add(path.rstrip("/"))
        else:
            files[path] = mode
    assert files == EXPECTED_FILES
    # State and the live config are the administrator's (postinst makes the directories).
    assert not any(p.startswith("var/") for p in dirs | set(files)), sorted(dirs)
    assert "etc/pecgate" in dirs


def test_conffiles_and_md5sums(control_dir, extracted):
    conffiles = (control_dir / "conffiles").read_text().split()
    assert conffiles == ["/etc/pecgate/proxy.toml.example"]
    sums = {}
    for line in (control_dir / "md5sums").read_text().splitlines():
        digest, path = line.split(None, 1)
        sums[path] = digest
    assert set(sums) == {p for p in EXPECTED_FILES if not p.startswith("etc/")}
    for path, digest in sums.items():
        assert hashlib.md5((extracted / path).read_bytes()).hexdigest() == digest, path


def test_unit_is_the_repositorys_with_the_packaged_path(extracted):
    unit = (extracted / "lib/systemd/system/pecgate.service").read_text()
    assert "/usr/local" not in unit
    exec_start = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == ["ExecStart=/usr/bin/pecgate serve -c /etc/pecgate/proxy.toml"]
    assert "User=pecgate" in unit.splitlines()

    # Everything from the first section on is the repository's unit (type, reload,
    # hardening...) with only the binary's path changed.
    def body(text):
        return text[text.index("\n[") + 1:] if not text.startswith("[") else text

    repo_unit = (REPO_ROOT / "systemd" / "pecgate.service").read_text()
    assert body(unit) == body(repo_unit).replace("/usr/local/bin/pecgate", "/usr/bin/pecgate")
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectoryMode=0700"):
        assert hardening in unit.splitlines(), hardening


def test_packaged_binary_runs(extracted):
    binary = extracted / "usr/bin/pecgate"
    for args in (["--help"], ["check", "--help"]):
        res = _run(binary, *args, timeout=60)
        assert res.returncode == 0, f"pecgate {' '.join(args)}: {res.stderr}"
    assert "pecgate" in _run(binary, "--version", timeout=60).stdout


def test_docs_and_example_config(extracted):
    doc = extracted / "usr/share/doc/pecgate"
    assert (doc / "README.md").read_bytes() == (REPO_ROOT / "README.md").read_bytes()
    assert (doc / "ARCHITECTURE.md").read_bytes() == (REPO_ROOT / "docs/ARCHITECTURE.md").read_bytes()
    assert (extracted / "etc/pecgate/proxy.toml.example").read_bytes() == \
        (REPO_ROOT / "proxy.toml.example").read_bytes()
    copyright = (doc / "copyright").read_text()
    assert copyright.startswith("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/")
    assert "License: Expat or Apache-2.0" in copyright


def test_maintainer_scripts(control_dir):
    for name in ("postinst", "prerm", "postrm"):
        script = control_dir / name
        assert script.stat().st_mode & 0o777 == 0o755, name
        text = script.read_text()
        assert text.startswith("#!/bin/sh\n") and "\nset -e\n" in text, name
        res = _run("sh", "-n", script)
        assert res.returncode == 0, f"{name}: {res.stderr}"
        # Never starts or enables the service (no config exists on a first install);
        # try-restart (upgrade of a running pecgate) is the only restart.
        for line in text.splitlines():
            command = line.strip()
            if command.startswith(("#", "echo ")):
                continue
            assert not re.search(r"(?<![\w-])(start|restart|enable)\b", command), f"{name}: {line}"

    postinst = (control_dir / "postinst").read_text()
    assert "adduser --system" in postinst
    assert "--shell /usr/sbin/nologin" in postinst
    assert "--home /var/lib/pecgate" in postinst
    assert "install -d -o pecgate -g pecgate -m 0700 /var/lib/pecgate" in postinst
    assert "chown root:pecgate /etc/pecgate" in postinst and "chmod 0750 /etc/pecgate" in postinst
    assert "daemon-reload" in postinst and "[ -d /run/systemd/system ]" in postinst

    # Purge keeps the state (audit log, ledger, vault) and the user that owns it.
    postrm = (control_dir / "postrm").read_text()
    code = "\n".join(line for line in postrm.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"\brm(dir)?\b[^\n]*/var/lib/pecgate", code), "postrm removes the state"
    assert not re.search(r"\brm\s+-[a-z]*r", code), "postrm removes a tree"
    assert "deluser" not in code and "userdel" not in code


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed")
def test_lintian_has_no_errors_or_warnings(deb):
    res = _run("lintian", "--fail-on", "error,warning", deb)
    assert res.returncode == 0, res.stdout + res.stderr


def test_missing_binary_is_refused(tmp_path):
    res = _run("bash", SCRIPT, "--binary", tmp_path / "nope", "--out", tmp_path)
    assert res.returncode != 0
    assert "not an executable file" in res.stderr
    assert not list(tmp_path.glob("*.deb"))
