#!/usr/bin/env bash
# The browser tests (tests/report/test_browser.py, tests/dashboard/) drive Debian's Chromium with the
# Python Playwright client.  Idempotent: installs only what is missing; never downloads Playwright's
# own browser builds (`playwright install` needs more than a package registry).  Exits 0 whatever
# happens: when it cannot install, it says why and those tests skip with the reason.
BIN=${BIN:-.venv/bin}
CHROMIUM=${CRYOSCAPE_CHROMIUM:-/usr/bin/chromium}

lock() {  # run "$@" under the lock file $1 when flock exists (shared machines), else plainly
    local file=$1; shift
    if command -v flock >/dev/null 2>&1; then flock "$file" "$@"; else "$@"; fi
}

if ! "$BIN/python" -c "import playwright" >/dev/null 2>&1; then
    echo "browser.sh: installing the Python package playwright (the client only)"
    lock /tmp/pip.lock "$BIN/pip" install -q "playwright>=1.40" \
        || echo "browser.sh: pip could not install playwright; the browser tests will skip"
fi

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "browser.sh: no $CHROMIUM and no apt-get here; install Chromium and set CRYOSCAPE_CHROMIUM, or the browser tests skip"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "browser.sh: not root and no password-less sudo, so Debian's chromium cannot be installed; the browser tests will skip"
        exit 0
    fi
fi
echo "browser.sh: installing Debian's chromium (apt-get)"
if lock /tmp/apt.lock $SUDO apt-get update -qq \
        && lock /tmp/apt.lock env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; then
    echo "browser.sh: chromium installed at $CHROMIUM"
else
    echo "browser.sh: apt-get could not install chromium; the browser tests will skip"
fi
exit 0
