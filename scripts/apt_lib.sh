# Shared by the scripts/install_*.sh helpers (source it; not run on its own): install a Debian
# package for a test, or record why not in test-output/<note> and exit 0 so that test SKIPS
# with the reason instead of failing the suite.
#
#   apt_lib_init SCRIPT PACKAGE NOTE_FILE TEST   # sets NOTE, give_up, and the paths below
#   apt_lib_prepare                              # apt-get present, root or password-less sudo
#   apt_lib_install [apt-get install args...]    # apt-get update, then install (quiet, logged)

apt_lib_init() {
    APT_SCRIPT="$1" APT_PACKAGE="$2" APT_TEST="$4"
    REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    NOTE="$REPO/test-output/$3"
    mkdir -p "$REPO/test-output"
}

give_up() {
    echo "$APT_SCRIPT: cannot install $APT_PACKAGE: $1 (the $APT_TEST will be skipped)" >&2
    echo "$1" >"$NOTE"
    exit 0
}

apt_lib_prepare() {
    command -v apt-get >/dev/null 2>&1 || give_up "apt-get not found (not a Debian/Ubuntu machine)"
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        give_up "not root and no password-less sudo to run apt-get"
    fi
    LOG="$(mktemp -t "$APT_SCRIPT.XXXXXX")"
    trap 'rm -f "$LOG"' EXIT
    export DEBIAN_FRONTEND=noninteractive
    APT_OPTS=(-q -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
}

apt_lib_install() {
    echo "$APT_SCRIPT: installing Debian's $APT_PACKAGE (apt-get) ..."
    if ! "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update >"$LOG" 2>&1; then
        tail -n 5 "$LOG" >&2
        give_up "apt-get update failed"
    fi
    if ! "${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y "$@" "$APT_PACKAGE" >>"$LOG" 2>&1; then
        tail -n 5 "$LOG" >&2
        give_up "apt-get install $APT_PACKAGE failed"
    fi
}
