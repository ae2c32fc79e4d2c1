#!/usr/bin/env bash
# Regenerate the pinned, hash-checked requirements after a dependency in pyproject.toml changes:
#   requirements.lock     everything bootstrap.sh installs (farebox[all,test] and the build backend)
#   hw/requirements.lock  what hw/install.sh puts on a Pi (farebox[nfc,pcsc,pkcs11], build backend)
# Universal (one file for x86_64 and aarch64, Python 3.11+). Needs uv (pip install uv).
# tests/test_packaging.py checks that both pin every dependency pyproject.toml names.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD='setuptools>=77'  # pyproject.toml [build-system]: installed from the lock, built offline
compile() {
  local out=$1; shift
  echo "$BUILD" | uv pip compile pyproject.toml - "$@" --generate-hashes --universal \
    --python-version 3.11 --no-header --quiet -o "$out"
}
compile requirements.lock --extra all --extra test
compile hw/requirements.lock --extra nfc --extra pcsc --extra pkcs11
echo "lock: wrote requirements.lock and hw/requirements.lock"
