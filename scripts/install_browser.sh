#!/usr/bin/env bash
# Install Debian's headless Chromium for the browser end-to-end test (fer_pipeline_tests/ui/test_browser.py).
#
# Idempotent and quiet: does nothing when the browser is already there. Nothing downloads a
# browser build at run time; the test drives this system Chromium through Playwright.
# When installation is impossible (no apt-get, not root and no password-less sudo, no network),
# it says why, records the reason in test-output/browser-install.txt and exits 0, so the
# browser test SKIPS with that reason instead of failing the suite.
set -u

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
source "$(dirname "$0")/apt_lib.sh"
apt_lib_init install_browser chromium browser-install.txt "browser test"

if [ -x "$CHROMIUM" ]; then
    rm -f "$NOTE"
    exit 0
fi

apt_lib_prepare
apt_lib_install
[ -x "$CHROMIUM" ] || give_up "apt-get installed chromium but $CHROMIUM is missing"
rm -f "$NOTE"
echo "install_browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) installed at $CHROMIUM"
exit 0
