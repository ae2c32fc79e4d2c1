#!/usr/bin/env bash
# Set up farebox on a fresh Debian / Raspberry Pi OS machine (Python 3.11+):
# the system packages pyscard builds against, then .venv with farebox and its test tools.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: farebox needs Python 3.11 or newer as '$PYTHON' (set PYTHON=...)" >&2
  exit 2
fi

# System packages: swig + libpcsclite-dev + a C compiler + Python headers build pyscard;
# pcscd (the PC/SC daemon) and vsmartcard-vpcd (its virtual reader driver, which the tests and
# `farebox sim serve --via vpcd:` use); postgresql (the clearing store's tests start a private
# cluster; the receiver runs on SQLite by default); kmod (modprobe: the tests check hw/'s module
# blacklist with it; every Raspberry Pi OS has it); softhsm2 (a software PKCS#11 token: the tests
# keep master keys in it for keys = "pkcs11:..."); prometheus (its promtool checks the alert
# rules in hw/prometheus/; the server itself is not left running); strace (the tests count the
# terminal's fsyncs while a card is in the field: SQLite syncs from C, only the system calls
# tell); chromium and chromium-driver (the clearing console's tests drive the headless browser
# with Selenium); python3-venv provides venv/ensurepip.
need=()
for pkg in swig libpcsclite-dev pcscd vsmartcard-vpcd postgresql kmod softhsm2 prometheus strace \
           chromium chromium-driver; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need+=("$pkg")
done
command -v gcc >/dev/null || need+=(gcc)
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need+=(python3-dev)
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "bootstrap: missing system packages: ${need[*]}" >&2
      echo "bootstrap: as root, run: apt-get install ${need[*]}   then run ./bootstrap.sh again" >&2
      exit 2
    fi
    sudo="sudo"
  fi
  echo "bootstrap: installing system packages: ${need[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  # prometheus is here for its promtool (the tests check hw/prometheus/ with it), not to run a
  # server on this machine: where systemd started one, stop it again
  if [[ " ${need[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
# The dependencies at the versions and hashes requirements.lock pins (hw/lock.sh makes it from
# pyproject.toml), then farebox itself on top, built offline with the pinned setuptools.
echo "bootstrap: installing the pinned dependencies (requirements.lock, hash-checked) into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes \
  -r requirements.lock
echo "bootstrap: installing farebox into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
  --no-build-isolation --editable .
echo "bootstrap: ready: .venv/bin/farebox"
