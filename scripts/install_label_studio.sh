#!/usr/bin/env bash
# Install the Label Studio server for the review round-trip test
# (fer_pipeline_tests/review/test_label_studio_loop.py) into its own virtual environment,
# .venv-label-studio/ (git-ignored): its pins (Django, its own label-studio-sdk's numpy and OpenCV)
# are not ours, so it never shares the project's .venv. The project's client side
# (label-studio-sdk) is installed into .venv by the Makefile's setup.
#
# Idempotent and quiet: does nothing when .venv-label-studio/bin/label-studio already runs as the
# pinned version. When installation is impossible (no network, no Python 3.11), it says why,
# records the reason in test-output/label-studio-install.txt and exits 0, so the test SKIPS with
# that reason on a developer's machine (and FAILS under CI=true).
set -u

VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv-label-studio"
NOTE="$ROOT/test-output/label-studio-install.txt"
PYTHON="${LABEL_STUDIO_PYTHON:-python3.11}"

installed() {
    [ -x "$VENV/bin/label-studio" ] && \
        [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null)" = "$VERSION" ]
}

give_up() {
    mkdir -p "$(dirname "$NOTE")"
    echo "label-studio $VERSION not installed: $1" | tee "$NOTE" >&2
    exit 0
}

if installed; then
    rm -f "$NOTE"
    exit 0
fi
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' 2>/dev/null \
    || give_up "no Python >= 3.10 ($PYTHON) to build its virtual environment"
echo "installing label-studio $VERSION into $VENV (a few minutes, once)" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV" || give_up "python -m venv failed"
"$VENV/bin/pip" install --quiet --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/pip" install --quiet "label-studio==$VERSION" || give_up "pip install label-studio==$VERSION failed"
installed || give_up "$VENV/bin/label-studio does not report version $VERSION"
rm -f "$NOTE"
