#!/usr/bin/env bash
# Build a Debian package of pecgate: pecgate_<version>_<arch>.deb
#   scripts/package-deb.sh [--binary PATH] [--out DIR] [--no-strip]
# Without --binary it runs `cargo build --release` and packages target/release/pecgate;
# with --binary it packages that file instead (no build). The binary is stripped unless
# --no-strip. The package goes to --out (default target/debian); it prints the .deb's path.
#
# What the package holds: /usr/bin/pecgate, the systemd unit (generated from
# systemd/pecgate.service, with /usr/local/bin/pecgate rewritten to /usr/bin/pecgate),
# /etc/pecgate/proxy.toml.example (a conffile), README.md, ARCHITECTURE.md and the copyright
# under /usr/share/doc/pecgate. The maintainer scripts create the `pecgate` system user,
# /etc/pecgate (0750 root:pecgate) and /var/lib/pecgate (0700 pecgate:pecgate); they never
# start the service (there is no proxy.toml until the administrator writes one).
#
# Needs dpkg-deb (and dpkg-shlibdeps from dpkg-dev for exact library dependencies, strip from
# binutils for a stripped binary; both optional). Maintainer: $DEBFULLNAME <$DEBEMAIL> if set,
# else git's user.name and user.email, else the last commit's author.
set -euo pipefail

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
}

binary=""
out=""
strip_binary=1
while (($#)); do
    case "$1" in
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --binary=*) binary=${1#--binary=}; shift ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --out=*) out=${1#--out=}; shift ;;
        --no-strip) strip_binary=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "package-deb.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { echo "package-deb.sh: $*" >&2; exit 1; }

# Paths given on the command line are relative to where the script was called from.
if [[ -n "$binary" && "$binary" != /* ]]; then binary="$PWD/$binary"; fi
if [[ -n "$out" && "$out" != /* ]]; then out="$PWD/$out"; fi
cd "$(dirname "$0")/.."
repo=$PWD
out=${out:-$repo/target/debian}

command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found (it is part of dpkg)"

if [[ -z "$binary" ]]; then
    echo "==> cargo build --release"
    cargo build --release
    binary=$repo/target/release/pecgate
fi
[[ -f "$binary" && -x "$binary" ]] || die "not an executable file: $binary"

# Cargo's version, made a Debian version: a pre-release `1.0.0-rc.1` sorts before `1.0.0`
# only as `1.0.0~rc.1`. No Debian revision: this is a native package.
cargo_version=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml |
    head -n 1)
[[ -n "$cargo_version" ]] || die "no version in Cargo.toml's [package]"
version=${cargo_version//-/\~}
arch=$(dpkg --print-architecture)

git_or_empty() { git "$@" 2>/dev/null || true; }
maintainer_name=${DEBFULLNAME:-$(git_or_empty config user.name)}
maintainer_name=${maintainer_name:-$(git_or_empty log -1 --format=%an)}
maintainer_email=${DEBEMAIL:-$(git_or_empty config user.email)}
maintainer_email=${maintainer_email:-$(git_or_empty log -1 --format=%ae)}
[[ -n "$maintainer_name" && -n "$maintainer_email" ]] ||
    die "no maintainer: set DEBFULLNAME and DEBEMAIL"
maintainer="$maintainer_name <$maintainer_email>"

# Reproducible timestamps: the last commit's time unless the caller set one.
if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)

umask 022
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"

# -- files --------------------------------------------------------------------------------
install -d "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/pecgate" \
    "$root/usr/share/doc/pecgate" "$root/usr/share/lintian/overrides" "$root/DEBIAN"

install -m 0755 "$binary" "$root/usr/bin/pecgate"
if ((strip_binary)); then
    if command -v strip >/dev/null 2>&1; then
        # As dh_strip does for executables (the release profile keeps line tables).
        strip --remove-section=.comment --remove-section=.note "$root/usr/bin/pecgate"
    else
        echo "package-deb.sh: strip not found (binutils); packaging the binary unstripped" >&2
    fi
fi

# The unit: the repository's own, with its install notes (steps for a hand install) replaced
# by the package's, and the binary's path rewritten. Everything else — type, reload,
# hardening — is taken as it is, so a change to systemd/pecgate.service reaches the package.
unit=$root/lib/systemd/system/pecgate.service
{
    cat <<'EOF'
# pecgate as a system service, installed by the pecgate package (generated from
# systemd/pecgate.service). For local changes use `systemctl edit pecgate`, not this file.
# Set up (as root):
#   cp /etc/pecgate/proxy.toml.example /etc/pecgate/proxy.toml   # then edit it
#   chgrp pecgate /etc/pecgate/proxy.toml && chmod 0640 /etc/pecgate/proxy.toml
#   runuser -u pecgate -- pecgate vault set MAILBOX -c /etc/pecgate/proxy.toml
#   runuser -u pecgate -- pecgate check -c /etc/pecgate/proxy.toml
#   systemctl enable --now pecgate
# The vault key: either let pecgate create /var/lib/pecgate/vault.key on the first
# `pecgate vault set` (run as the pecgate user, as above), or keep it outside the state
# directory as a systemd credential (LoadCredential=vault-key:/etc/pecgate/vault.key in a
# `systemctl edit pecgate` drop-in); pecgate then reads $CREDENTIALS_DIRECTORY/vault-key.
EOF
    # Drop the leading comment block (up to the first section header), keep the rest.
    sed -n '/^\[/,$p' systemd/pecgate.service |
        sed 's#/usr/local/bin/pecgate\([^[:alnum:]_.-]\|$\)#/usr/bin/pecgate\1#g'
} >"$unit"
chmod 0644 "$unit"
! grep -n '/usr/local' "$unit" >&2 || die "the packaged unit still names /usr/local (lines above)"
grep -q '^ExecStart=/usr/bin/pecgate serve ' "$unit" ||
    die "the packaged unit's ExecStart does not run /usr/bin/pecgate serve"

install -m 0644 proxy.toml.example "$root/etc/pecgate/proxy.toml.example"

doc=$root/usr/share/doc/pecgate
install -m 0644 README.md "$doc/README.md"
install -m 0644 docs/ARCHITECTURE.md "$doc/ARCHITECTURE.md"
# Years of the git history (first commit to SOURCE_DATE_EPOCH).
last_year=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)
first_year=$(git log --reverse --format=%cd --date=format:%Y 2>/dev/null | head -n 1 || true)
years=${first_year:-$last_year}
if [[ "$years" != "$last_year" ]]; then years="$years-$last_year"; fi
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pecgate

Files: *
Copyright: $years the pecgate authors (see the project's git history)
License: Expat or Apache-2.0
EOF
cat >>"$doc/copyright" <<'EOF'

License: Expat
 Permission is hereby granted, free of charge, to any person obtaining a copy
 of this software and associated documentation files (the "Software"), to deal
 in the Software without restriction, including without limitation the rights
 to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
 copies of the Software, and to permit persons to whom the Software is
 furnished to do so, subject to the following conditions:
 .
 The above copyright notice and this permission notice shall be included in
 all copies or substantial portions of the Software.
 .
 THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
 IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
 FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
 AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
 LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
 OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
 THE SOFTWARE.

License: Apache-2.0
 Licensed under the Apache License, Version 2.0 (the "License"); you may not
 use this file except in compliance with the License. You may obtain a copy of
 the License at
 .
     http://www.apache.org/licenses/LICENSE-2.0
 .
 Unless required by applicable law or agreed to in writing, software
 distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
 WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
 License for the specific language governing permissions and limitations under
 the License.
 .
 On Debian systems, the complete text of the Apache License, Version 2.0 can
 be found in "/usr/share/common-licenses/Apache-2.0".
EOF
chmod 0644 "$doc/copyright"
# A native package's changelog (Debian policy 12.7); the history itself is git's.
{
    printf 'pecgate (%s) unstable; urgency=medium\n\n' "$version"
    printf '  * Package built from git commit %s; see the git history for changes.\n\n' "$commit"
    printf ' -- %s  %s\n' "$maintainer" "$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

cat >"$root/usr/share/lintian/overrides/pecgate" <<'EOF'
# The CLI documents itself (`pecgate --help`, `pecgate COMMAND --help`); README.md is the manual.
pecgate: no-manual-page [usr/bin/pecgate]
# Rust code does not go through glibc's fortified (_chk) functions.
pecgate: hardening-no-fortify-functions [usr/bin/pecgate]
# pecgate runs under systemd only (the unit carries its sandboxing); there is no init script.
pecgate: package-supports-alternative-init-but-no-init.d-script [lib/systemd/system/pecgate.service]
EOF
chmod 0644 "$root/usr/share/lintian/overrides/pecgate"

# -- control ------------------------------------------------------------------------------
# Shared-library dependencies as dpkg-shlibdeps finds them (libc6, libgcc-s1 with minimum
# versions); without dpkg-dev, the same packages unversioned.
shlibs=""
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    mkdir -p "$work/shlibs/debian"
    printf 'Source: pecgate\n\nPackage: pecgate\nArchitecture: any\n' >"$work/shlibs/debian/control"
    shlibs=$(cd "$work/shlibs" && dpkg-shlibdeps -O "$root/usr/bin/pecgate" 2>/dev/null |
        sed -n 's/^shlibs:Depends=//p') || shlibs=""
fi
if [[ -z "$shlibs" ]]; then
    echo "package-deb.sh: no dpkg-shlibdeps result; Depends: libc6, libgcc-s1 unversioned" >&2
    shlibs="libc6, libgcc-s1"
fi

installed_size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<EOF
Package: pecgate
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: adduser, $shlibs
Section: mail
Priority: optional
Description: gateway sharing PEC mailboxes with personal logins and audit
 pecgate lets a whole company use its PEC mailboxes (Posta Elettronica
 Certificata) safely. Employees keep their usual mail client and log in to
 pecgate with their own name and password; pecgate relays the session to the
 PEC provider over the mailbox's one provider login, whose password only
 pecgate knows (an encrypted vault).
 .
 Every command is recorded per user in a tamper-evident audit log, each user
 sees only the folders their roles grant, and messages sent through pecgate
 (SMTP submission) are checked against the PEC formal rules and recorded in a
 sent ledger.
 .
 The service is not started on installation: write /etc/pecgate/proxy.toml
 (from proxy.toml.example), store the provider passwords with
 \`pecgate vault set\`, then \`systemctl enable --now pecgate\`.
EOF

# Everything under /etc is a conffile: the administrator's edits survive upgrades.
(cd "$root" && find etc -type f -printf '/%p\n' | sort) >"$root/DEBIAN/conffiles"

cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# pecgate postinst: the system user, /etc/pecgate and the state directory. The service is
# never started here: there is no /etc/pecgate/proxy.toml until the administrator writes one.
set -e

case "$1" in
configure)
    # System user and group `pecgate`: no login shell, home = the state directory.
    # adduser (not systemd-sysusers) so it works with and without systemd.
    if ! getent group pecgate >/dev/null; then
        addgroup --system --quiet pecgate
    fi
    if ! getent passwd pecgate >/dev/null; then
        adduser --system --quiet --ingroup pecgate --home /var/lib/pecgate \
            --no-create-home --shell /usr/sbin/nologin pecgate
    fi

    # Configuration (it names the certificates' keys): readable by root and pecgate only.
    # An administrator's `dpkg-statoverride` for /etc/pecgate wins.
    if ! dpkg-statoverride --list /etc/pecgate >/dev/null 2>&1; then
        chown root:pecgate /etc/pecgate
        chmod 0750 /etc/pecgate
    fi
    if [ ! -d /etc/pecgate/certs ]; then
        install -d -o root -g pecgate -m 0750 /etc/pecgate/certs
    fi

    # State (audit log, sent ledger, vault): pecgate's alone. systemd's StateDirectory=
    # enforces the same owner and mode on every start.
    if [ ! -d /var/lib/pecgate ]; then
        install -d -o pecgate -g pecgate -m 0700 /var/lib/pecgate
    fi

    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
        # On an upgrade, a running pecgate moves to the new binary (clients get `* BYE` and
        # reconnect); a stopped one stays stopped.
        if [ -n "$2" ]; then
            deb-systemd-invoke try-restart pecgate.service >/dev/null || true
        fi
    fi

    if [ ! -e /etc/pecgate/proxy.toml ]; then
        echo "pecgate: not started. Write /etc/pecgate/proxy.toml (see proxy.toml.example and"
        echo "  /usr/share/doc/pecgate/README.md), then: systemctl enable --now pecgate"
    fi
    ;;
abort-upgrade|abort-remove|abort-deconfigure)
    ;;
*)
    echo "postinst called with unknown argument '$1'" >&2
    exit 1
    ;;
esac

exit 0
EOF

cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# pecgate prerm: stop the service before its binary goes away (not on upgrade: postinst
# restarts a running pecgate once the new binary is in place).
set -e

case "$1" in
remove|deconfigure)
    if [ -d /run/systemd/system ]; then
        deb-systemd-invoke stop pecgate.service >/dev/null || true
    fi
    ;;
esac

exit 0
EOF

cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# pecgate postrm.
#
# Purge deliberately keeps:
#  - /var/lib/pecgate: the audit log and the sent ledger are evidence of who did what with
#    a certified mailbox and may have to be kept for years; the vault is there too. Delete
#    it yourself once it is no longer needed (or archived).
#  - the administrator's files in /etc/pecgate (proxy.toml, certificates, a vault key).
#  - the `pecgate` user and group: the files kept above are owned by them, and removing
#    the user would leave them to a bare uid that a later account could be given (the usual
#    Debian practice for system users). `deluser --system pecgate` removes it by hand.
set -e

case "$1" in
remove)
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
    fi
    ;;
purge)
    # `systemctl enable pecgate` links; the unit file itself is gone already.
    for link in /etc/systemd/system/*.wants/pecgate.service; do
        if [ -L "$link" ]; then
            rm -f "$link"
        fi
    done
    if [ -d /run/systemd/system ]; then
        systemctl --system daemon-reload >/dev/null || true
    fi
    # Only if the administrator left nothing in them.
    rmdir /etc/pecgate/certs 2>/dev/null || true
    rmdir /etc/pecgate 2>/dev/null || true
    if [ -d /var/lib/pecgate ]; then
        echo "pecgate: kept /var/lib/pecgate (audit log, sent ledger, vault) and the pecgate user;"
        echo "  remove them yourself once no longer needed"
    fi
    ;;
upgrade|failed-upgrade|abort-install|abort-upgrade|disappear)
    ;;
*)
    echo "postrm called with unknown argument '$1'" >&2
    exit 1
    ;;
esac

exit 0
EOF

chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles"

# md5sums of the shipped files, conffiles excepted (dpkg records those itself).
(cd "$root" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\0' |
    LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

mkdir -p "$out"
deb=$out/pecgate_${version}_${arch}.deb
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
