#!/usr/bin/env bash
# Install Debian's headless Chromium for the browser end-to-end test (fer_pipeline_tests/test_ui_browser.py).
#
# Idempotent and quiet: does nothing when the browser is already there. Nothing downloads a
# browser build at run time; the test drives this system Chromium through Playwright.
# When installation is impossible (no apt-get, not root and no password-less sudo, no network),
# it says why, records the reason in test-output/browser-install.txt and exits 0, so the
# browser test SKIPS with that reason instead of failing the suite.
set -u

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
NOTE="$REPO/test-output/browser-install.txt"
mkdir -p "$REPO/test-output"

give_up() {
    echo "install_browser: cannot install chromium: $1 (the browser test will be skipped)" >&2
    echo "$1" >"$NOTE"
    exit 0
}

if [ -x "$CHROMIUM" ]; then
    rm -f "$NOTE"
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || give_up "apt-get not found (not a Debian/Ubuntu machine)"

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    give_up "not root and no password-less sudo to run apt-get"
fi

LOG="$(mktemp -t install_browser.XXXXXX)"
trap 'rm -f "$LOG"' EXIT
export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-q -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)

echo "install_browser: installing Debian's chromium (apt-get) ..."
if ! "${SUDO[@]}" apt-get "${APT_OPTS[@]}" update >"$LOG" 2>&1; then
    tail -n 5 "$LOG" >&2
    give_up "apt-get update failed"
fi
if ! "${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y chromium >>"$LOG" 2>&1; then
    tail -n 5 "$LOG" >&2
    give_up "apt-get install chromium failed"
fi
[ -x "$CHROMIUM" ] || give_up "apt-get installed chromium but $CHROMIUM is missing"
rm -f "$NOTE"
echo "install_browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) installed at $CHROMIUM"
exit 0
