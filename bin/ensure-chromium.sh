#!/usr/bin/env bash
# Test set-up for tests/test_report_browser.py: make sure Debian's headless-capable Chromium and its
# matching chromedriver are installed. Silent (and instant) when both are already there; otherwise
# installs the `chromium` and `chromium-driver` packages with apt-get. Needs root (as in CI); exits
# non-zero with one line on stderr when it cannot install, and the browser tests then skip.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-chromium: /usr/bin/chromium or /usr/bin/chromedriver is missing and apt-get as root is not available; install Debian's chromium and chromium-driver" >&2
  exit 1
fi
echo "ensure-chromium: installing chromium and chromium-driver with apt-get (once)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -qq -o DPkg::Lock::Timeout=300 update >&2
apt-get -qq -y -o DPkg::Lock::Timeout=300 install --no-install-recommends chromium chromium-driver >/dev/null
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "ensure-chromium: apt-get finished but /usr/bin/chromium or /usr/bin/chromedriver is still missing" >&2
  exit 1
fi
