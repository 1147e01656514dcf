#!/usr/bin/env bash
# What the web-page test (tests/test_serve.py) needs: Debian's Chromium and the Playwright Python
# package that drives it. Idempotent: with both present it only checks and exits (well under a second).
# Playwright's own browser download (`playwright install`) is never used: the machines have no
# internet beyond the package registries; the test launches /usr/bin/chromium instead.
set -euo pipefail
PYTHON="${PYTHON:-python3}"

if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends chromium
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q "playwright>=1.40"
fi

chromium --version 2>/dev/null  # (its wrapper script prints a harmless shell warning)
