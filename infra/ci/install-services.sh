#!/usr/bin/env bash
# Installs the Debian packages the server and browser tests need, when missing:
#   postgresql (initdb, pg_ctl, postgres: tests/servers.py starts its own cluster in a temp dir)
#   chromium   (headless browser for tests/test_browser.py, driven through Playwright)
#   cmake, g++, make (llama.cpp's tools, built once from the installed llama-cpp-python's source:
#               steps/llamacpp_tools.py; the imatrix, KLD-parity and speed tests use them)
# Idempotent and quiet: nothing is fetched when all are present. Needs root (CI runs as root);
# as another user it uses sudo when available.
set -euo pipefail

need=()
# Debian installs the server binaries under /usr/lib/postgresql/<major>/bin, not on PATH.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    need+=(postgresql)
fi
if ! command -v chromium >/dev/null 2>&1; then
    need+=(chromium)
fi
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v g++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-services.sh: need root (or sudo) to install ${need[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-services.sh: installing ${need[*]}" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-install-recommends keeps chromium from pulling a desktop; the Debian postgresql package
# also creates (and starts, where systemd runs) a default cluster, which the tests do not use.
# apt's chatter goes to a log that is shown only when something fails.
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    exit 1
fi
