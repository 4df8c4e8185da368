#!/usr/bin/env bash
# Make sure headless Chromium is at /usr/bin/chromium, installing it from Debian if needed.
#
# Why: tests/test_audit_report.py renders the audit's report.html in a real browser to prove the
# page is self-contained and its figures actually display; that test fails (never skips) without
# Chromium, so `make test` runs this first. Idempotent: a no-op when Chromium is already there.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    echo "ensure-chromium: $CHROMIUM is missing and installing it needs root (apt-get);" >&2
    echo "ensure-chromium: run as root, or: sudo apt-get install -y chromium" >&2
    exit 1
fi

echo "ensure-chromium: installing chromium with apt-get" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

if [[ ! -x "$CHROMIUM" ]]; then
    echo "ensure-chromium: apt-get finished but $CHROMIUM is still missing" >&2
    exit 1
fi
"$CHROMIUM" --version >&2 || true
