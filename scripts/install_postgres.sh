#!/usr/bin/env bash
# Install Debian's PostgreSQL server for the Postgres-instance test
# (fer_pipeline_tests/defs/test_postgres_instance.py).
#
# Idempotent and quiet: does nothing when a server (initdb + postgres, in
# /usr/lib/postgresql/<version>/bin or on PATH) is already there. Only the binaries are needed:
# the test runs its own throw-away cluster (initdb into a temporary folder, as the unprivileged
# `postgres` user when run as root, on a free loopback port) and never uses the packaged
# service, so this script neither starts nor configures it.
# When installation is impossible (no apt-get, not root and no password-less sudo, no network),
# it says why, records the reason in test-output/postgres-install.txt and exits 0, so the
# Postgres test SKIPS with that reason instead of failing the suite.
set -u

source "$(dirname "$0")/apt_lib.sh"
apt_lib_init install_postgres postgresql postgres-install.txt "Postgres instance test"

# The bin folder of a complete server: newest /usr/lib/postgresql/<version>/bin, else PATH.
server_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    if command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return 0
    fi
    return 1
}

if server_bindir >/dev/null; then
    rm -f "$NOTE"
    exit 0
fi

apt_lib_prepare

# In containers without an init system, keep the package from starting its own service
# (invoke-rc.d honours policy-rc.d); the test runs its own cluster. Removed again on exit
# unless it was already there.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ] && [ ! -d /run/systemd/system ]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null && "${SUDO[@]}" chmod 755 "$POLICY"
    trap 'rm -f "$LOG"; "${SUDO[@]}" rm -f "$POLICY"' EXIT
fi

apt_lib_install --no-install-recommends
BINDIR="$(server_bindir)" || give_up "apt-get installed postgresql but no initdb/postgres in /usr/lib/postgresql/*/bin"
rm -f "$NOTE"
echo "install_postgres: $("$BINDIR/postgres" --version 2>/dev/null || echo postgresql) installed in $BINDIR"
exit 0
