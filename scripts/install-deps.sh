#!/usr/bin/env bash
# Installs what the README's two commands need, when it is missing, on Debian/Ubuntu.
# The one list of pecgate's system dependencies: scripts/sandbox.sh and scripts/test.sh
# call it, and .ci/run reaches it through scripts/test.sh.
#
#   scripts/install-deps.sh sandbox   what scripts/sandbox.sh needs: Dovecot (IMAP, LMTP),
#                                     openssl, python3
#   scripts/install-deps.sh test      what scripts/test.sh needs: the above, plus isync
#                                     (mbsync), swaks with Net::SSLeay, curl, and Python's
#                                     pytest and prometheus_client
#   add --check to only report what is missing (exit 1 if anything is)
#
# On a machine that has everything it only looks (no apt, no network, a fraction of a
# second). Debian packages go through apt-get (as root, or with sudo); Python modules come
# from Debian's python3-* packages when python3 is Debian's own, otherwise (a venv, pyenv...)
# from pip for that python3. Without root or sudo it says what is missing and how to install
# it. Packages are installed with RUNLEVEL=1 (no system-wide Dovecot is started: the
# harness runs private ones) and --no-install-recommends. A Rust toolchain (cargo) is
# expected, not installed.
set -euo pipefail

profile=
check_only=0
for arg in "$@"; do
    case $arg in
        sandbox | test) profile=$arg ;;
        --check) check_only=1 ;;
        *) echo "usage: $0 sandbox|test [--check]" >&2; exit 2 ;;
    esac
done
[[ -n $profile ]] || { echo "usage: $0 sandbox|test [--check]" >&2; exit 2; }

# Python modules the tests import: module, Debian package, PyPI package.
py_modules=()
if [[ $profile == test ]]; then
    py_modules=(
        "pytest python3-pytest pytest"
        "prometheus_client python3-prometheus-client prometheus-client"
    )
fi

# Debian packages whose program is missing.
missing_debs() {
    command -v dovecot >/dev/null 2>&1 || echo dovecot-imapd
    [[ -x /usr/lib/dovecot/lmtp ]] || echo dovecot-lmtpd
    command -v openssl >/dev/null 2>&1 || echo openssl
    command -v python3 >/dev/null 2>&1 || echo python3
    if [[ $profile == test ]]; then
        command -v mbsync >/dev/null 2>&1 || echo isync
        command -v swaks >/dev/null 2>&1 || echo swaks
        # swaks needs Net::SSLeay for TLS: only a recommendation of swaks, so not pulled in
        # by --no-install-recommends.
        perl -MNet::SSLeay -e1 >/dev/null 2>&1 || echo libnet-ssleay-perl
        command -v curl >/dev/null 2>&1 || echo curl
    fi
    return 0
}

# The python3 modules (of py_modules) that python3 cannot find (all of them without python3).
missing_modules() {
    ((${#py_modules[@]})) || return 0
    local names=()
    local entry
    for entry in "${py_modules[@]}"; do names+=("${entry%% *}"); done
    if ! command -v python3 >/dev/null 2>&1; then
        printf '%s\n' "${names[@]}"
        return 0
    fi
    # find_spec looks the module up without importing it: fast.
    python3 -c 'import importlib.util, sys
for name in sys.argv[1:]:
    if importlib.util.find_spec(name) is None:
        print(name)' "${names[@]}"
}

# Field $2 (Debian package) or $3 (PyPI package) of a module's py_modules entry.
module_field() {
    local entry
    for entry in "${py_modules[@]}"; do
        read -r name deb pip <<<"$entry"
        if [[ $name == "$1" ]]; then
            case $2 in deb) echo "$deb" ;; pip) echo "$pip" ;; esac
            return
        fi
    done
}

# Is python3 Debian's own (so python3-* packages are the way to add modules)? A python3
# still to be installed by apt will be.
debian_python() {
    ! command -v python3 >/dev/null 2>&1 ||
        python3 -c 'import sys; sys.exit(not (sys.prefix == sys.base_prefix == "/usr"))' 2>/dev/null
}

mapfile -t debs < <(missing_debs)
mapfile -t modules < <(missing_modules)
if ((${#debs[@]} == 0 && ${#modules[@]} == 0)); then
    exit 0
fi

use_apt_for_modules=0
if ((${#modules[@]})) && debian_python; then
    use_apt_for_modules=1
fi

# What a person would type, for the messages.
how_to() {
    local apt_pkgs=("${debs[@]}")
    local pip_pkgs=()
    local m
    for m in "${modules[@]}"; do
        if ((use_apt_for_modules)); then
            apt_pkgs+=("$(module_field "$m" deb)")
        else
            pip_pkgs+=("$(module_field "$m" pip)")
        fi
    done
    if ((${#apt_pkgs[@]})); then
        echo "  apt-get update && RUNLEVEL=1 apt-get install --no-install-recommends ${apt_pkgs[*]}   (as root)"
    fi
    if ((${#pip_pkgs[@]})); then
        echo "  python3 -m pip install ${pip_pkgs[*]}"
    fi
}

report_missing() {
    local what=()
    ((${#debs[@]})) && what+=("Debian packages: ${debs[*]}")
    ((${#modules[@]})) && what+=("Python modules: ${modules[*]}")
    echo "$1" >&2
    printf '  %s\n' "${what[@]}" >&2
}

if ((check_only)); then
    report_missing "missing for scripts/$profile.sh:"
    echo "install with scripts/install-deps.sh $profile, or:" >&2
    how_to >&2
    exit 1
fi

# --- apt: Debian packages, and Python modules for Debian's python3 ---------------------
if ((${#debs[@]} || use_apt_for_modules)); then
    if ! command -v apt-get >/dev/null 2>&1; then
        report_missing "missing for scripts/$profile.sh, and this is not a Debian/Ubuntu machine (no apt-get):"
        echo "install the equivalents with your package manager, then run this again" >&2
        exit 1
    fi
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            report_missing "missing for scripts/$profile.sh (installing needs root, and sudo is not installed):"
            echo "install them as root, then run this again:" >&2
            how_to >&2
            exit 1
        fi
    fi
    echo "==> apt-get update"
    "${sudo[@]}" apt-get update -qq
    install=("${debs[@]}")
    if ((use_apt_for_modules)); then
        for m in "${modules[@]}"; do
            deb=$(module_field "$m" deb)
            # Debian's package when this release has it; otherwise pip, below.
            # (Not piped into grep -q: with pipefail, apt-cache's SIGPIPE would read as "no".)
            policy=$(apt-cache policy "$deb" 2>/dev/null || true)
            if grep -q '^ *Candidate: [^(]' <<<"$policy"; then
                install+=("$deb")
            fi
        done
    fi
    if ((${#install[@]})); then
        echo "==> apt-get install ${install[*]}"
        # env: sudo would drop these variables. RUNLEVEL=1: do not start a system-wide Dovecot.
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
            apt-get install -y -qq --no-install-recommends "${install[@]}" >/dev/null
    fi
fi

# --- pip: Python modules that apt did not provide -------------------------------------
mapfile -t modules < <(missing_modules)
if ((${#modules[@]})); then
    pip_pkgs=()
    for m in "${modules[@]}"; do pip_pkgs+=("$(module_field "$m" pip)"); done
    echo "==> python3 -m pip install ${pip_pkgs[*]}"
    if ! PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install -q "${pip_pkgs[@]}"; then
        deb_pkgs=()
        for m in "${modules[@]}"; do deb_pkgs+=("$(module_field "$m" deb)"); done
        echo "could not install ${pip_pkgs[*]} with pip for $(command -v python3)." >&2
        echo "Install them for that python3 (for Debian's own: apt-get install ${deb_pkgs[*]};" >&2
        echo "or run from a venv that has them), then run this again." >&2
        exit 1
    fi
fi

# --- everything there now? --------------------------------------------------------------
mapfile -t debs < <(missing_debs)
mapfile -t modules < <(missing_modules)
if ((${#debs[@]} || ${#modules[@]})); then
    report_missing "still missing for scripts/$profile.sh after installing:"
    exit 1
fi
