#!/usr/bin/env bash
# Install the farebox terminal daemon on a Raspberry Pi (Raspberry Pi OS Bookworm, Python 3.11)
# or any Debian-like systemd machine, from this checkout:
#
#   apt packages   python3-venv, pcscd, libusb, and what builds pyscard (only those missing)
#   user, group    farebox (systemd-sysusers, /etc/sysusers.d/farebox.conf)
#   /opt/farebox   a venv with farebox[nfc,pcsc] (and pkcs11 for a token) from this checkout;
#                  /usr/local/bin/farebox
#   /etc/systemd/system/farebox.service, /etc/udev/rules.d/60-farebox-readers.rules,
#   /etc/modprobe.d/farebox-blacklist.conf, /etc/polkit-1/rules.d/60-farebox-pcscd.rules
#   /etc/farebox/terminal.toml   the example with your key source, only when there is none (never
#                                over an edited one; --keys sets its keys line)
#   the key file or PKCS#11 PIN file  made 0600 and owned by farebox, and checked
#   /var/lib/farebox             the state (0700), with the terminal's identity (`terminal init`)
#   then reloads systemd and udev and unloads port100 / pn533_usb if loaded.
#
# It never enables or starts the service (README: `systemctl enable --now farebox`).
# Idempotent: a second run changes nothing (files are written only when their content differs,
# the venv is rebuilt only when the checkout's code changed, the identity is made once).
#
# Options:
#   --root DIR         install into DIR as if it were / (for tests): no apt, no reloads, no
#                      modules unloaded. The venv's scripts name their Python under DIR, so the
#                      tree is not an image to copy onto another machine: install there instead
#   --no-apt           do not install apt packages (say which are missing instead)
#   --terminal-id ID   the terminal id for a new config and identity [default: the config's id]
#   --python PY        the Python (3.11+) the venv is made from [default: python3]
#   --keys SOURCE      where the card keys are, for a new config or set in yours (asked for on a
#                      terminal when needed; never the published test keys):
#                        file:PATH   a key file already at PATH (docs/cli.md "Key file")
#                        pkcs11:module=LIB;token=LABEL;pin-file=PATH[;label=P][;issue-version=N]
#                                    the master keys in a PKCS#11 token (docs/cli.md "Card keys")
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(dirname "$HERE")
ROOT=/
APT=1
TERMINAL_ID=""
KEYS=""
PYTHON=${PYTHON:-python3}

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; }
die() { echo "install: error: $*" >&2; exit 2; }
say() { echo "install: $*"; }

while (($#)); do
  case $1 in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --no-apt) APT=0; shift ;;
    --terminal-id) [ $# -ge 2 ] || die "--terminal-id needs an id"; TERMINAL_ID=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs a program"; PYTHON=$2; shift 2 ;;
    --keys) [ $# -ge 2 ] || die "--keys needs file:PATH or pkcs11:..."; KEYS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [ -n "$TERMINAL_ID" ] && ! [[ $TERMINAL_ID =~ ^[A-Za-z0-9._-]{1,32}$ ]]; then
  die "--terminal-id: 1-32 letters, digits, '.', '_' or '-', got '$TERMINAL_ID'"
fi
check_keys_text() {
  case $1 in
    test) die "--keys test: the published test keys protect nothing (anyone can make a card" \
              "they approve); give file:PATH or pkcs11:..." ;;
    file:?*|pkcs11:?*) ;;
    *) die "--keys: expected file:PATH or pkcs11:module=LIB;token=LABEL;pin-file=PATH, got '$1'" ;;
  esac
}
[ -z "$KEYS" ] || check_keys_text "$KEYS"
[ -f "$CHECKOUT/pyproject.toml" ] && [ -d "$CHECKOUT/terminal" ] \
  || die "run me from a farebox checkout (hw/install.sh next to pyproject.toml)"
if [ "$ROOT" = / ]; then
  LIVE=1
  R=""
  [ "$(id -u)" -eq 0 ] || die "run as root: sudo $0 $*"
else
  LIVE=0
  mkdir -p "$ROOT"
  R=$(cd "$ROOT" && pwd)
  APT=0
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || die "farebox needs Python 3.11 or newer as '$PYTHON' (Bookworm's python3 is 3.11)"

# ---- 0. the card keys (decided before anything is installed) --------------------------------
# A terminal in service never runs on the published test keys: anyone can make a card they
# approve (`farebox card new`). A new config needs a key source; so does one that still names the
# test keys without allow_test_keys = true (a demo terminal that says so is left alone).
CONFIG="$R/etc/farebox/terminal.toml"
# config_keys FILE: the config's keys (default "test") and allow_test_keys, one per line
config_keys() { "$PYTHON" -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f: t = tomllib.load(f).get("terminal", {})
print(t.get("keys", "test")); print(str(t.get("allow_test_keys", False)).lower())' "$1" 2>/dev/null \
  || die "/etc/farebox/terminal.toml is not TOML: fix it (farebox doctor --config names the error)"; }
CURRENT_KEYS=""
CURRENT_ALLOW=false
if [ -e "$CONFIG" ]; then
  current=$(config_keys "$CONFIG")
  CURRENT_KEYS=${current%%$'\n'*}
  CURRENT_ALLOW=${current##*$'\n'}
fi
if [ -z "$KEYS" ] && { [ ! -e "$CONFIG" ] || { [ "$CURRENT_KEYS" = test ] && [ "$CURRENT_ALLOW" != true ]; }; }; then
  why="a new /etc/farebox/terminal.toml needs the card keys"
  [ -e "$CONFIG" ] && why="/etc/farebox/terminal.toml uses the published test keys, which the daemon refuses"
  if [ -t 0 ]; then
    say "$why: file:PATH (a key file, mode 0600) or pkcs11:module=LIB;token=LABEL;pin-file=PATH"
    read -r -p "install: card keys: " KEYS || true
    check_keys_text "$KEYS"
  else
    die "$why: give --keys file:PATH or --keys 'pkcs11:module=LIB;token=LABEL;pin-file=PATH'"
  fi
fi
EFFECTIVE_KEYS=${KEYS:-$CURRENT_KEYS}
# the files a key source names must be there before the install starts (inside --root DIR)
key_files() {
  case $1 in
    file:*) echo "${1#file:}" ;;
    pkcs11:*) tr ';' '\n' <<< "${1#pkcs11:}" | sed -n 's/^ *module *= *//p; s/^ *pin-file *= *//p' ;;
  esac
}
while read -r needed; do
  [ -z "$needed" ] || [ -e "$R$needed" ] || case $EFFECTIVE_KEYS in
    file:*) die "no key file at $needed: put the scheme's key file there first (docs/cli.md \"Key file\")" ;;
    *) die "$needed is missing: the PKCS#11 module (SoftHSM2: apt-get install softhsm2) and the PIN file must exist first" ;;
  esac
done < <(key_files "$EFFECTIVE_KEYS")
EXTRAS=nfc,pcsc
case $EFFECTIVE_KEYS in pkcs11:*) EXTRAS=nfc,pcsc,pkcs11 ;; esac

CHANGED_UNIT=0
CHANGED_UDEV=0

# put SRC DEST MODE: copy when the content or mode differs; true when it did
put() {
  local src=$1 dest=$2 mode=$3
  if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c %a "$dest")" = "$mode" ]; then
    return 1
  fi
  mkdir -p "$(dirname "$dest")"
  install -m "$mode" "$src" "$dest"
  say "installed ${dest#"$R"}"
  return 0
}

# ---- 1. system packages -------------------------------------------------------------------
# python3-venv: the venv; libusb-1.0-0: nfcpy's USB readers; pcscd + libpcsclite1: PC/SC
# readers (ACR122U); swig, gcc, python3-dev, libpcsclite-dev: build pyscard where no wheel fits
PACKAGES=(python3-venv python3-dev gcc swig libpcsclite-dev libpcsclite1 pcscd libusb-1.0-0)
if [ "$LIVE" = 1 ]; then
  missing=()
  for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    if [ "$APT" = 1 ]; then
      say "apt-get install ${missing[*]}"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
      say "note: --no-apt: packages missing: ${missing[*]}"
    fi
  fi
fi

# ---- 2. the farebox user and group --------------------------------------------------------
put "$HERE/sysusers.d/farebox.conf" "$R/etc/sysusers.d/farebox.conf" 644 || true
if ! grep -q '^farebox:' "$R/etc/passwd" 2>/dev/null; then
  if command -v systemd-sysusers >/dev/null; then
    if [ "$LIVE" = 1 ]; then
      systemd-sysusers /etc/sysusers.d/farebox.conf
    else
      mkdir -p "$R/etc"
      systemd-sysusers --root "$R" "$R/etc/sysusers.d/farebox.conf"
    fi
  elif [ "$LIVE" = 1 ]; then
    useradd --system --user-group --home-dir /var/lib/farebox --no-create-home \
      --shell /usr/sbin/nologin --comment "farebox fare terminal" farebox
  else
    die "systemd-sysusers is needed to create the farebox user under --root"
  fi
  say "created the farebox user and group"
fi
FB_UID=$(awk -F: '$1 == "farebox" {print $3}' "$R/etc/passwd" 2>/dev/null || true)
FB_GID=$(awk -F: '$1 == "farebox" {print $3}' "$R/etc/group" 2>/dev/null || true)
[ -n "$FB_UID" ] && [ -n "$FB_GID" ] || die "no farebox user/group in $R/etc/passwd, group"
# owner OWNER PATH...: chown when running as root (a test as a plain user keeps its own)
own() { [ "$(id -u)" -ne 0 ] || chown "$@"; }

# ---- 3. the venv ----------------------------------------------------------------------------
VENV="$R/opt/farebox"
SOURCE_HASH=$(cd "$CHECKOUT" && find cardimage protocol terminal tools pyproject.toml README.md \
                -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
              | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)
STAMP="$VENV/.farebox-source"
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the venv ${VENV#"$R"}"
  "$PYTHON" -m venv "$VENV"
fi
SOURCE_HASH="$SOURCE_HASH [$EXTRAS]"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$SOURCE_HASH" ]; then
  say "installing farebox[$EXTRAS] from $CHECKOUT into ${VENV#"$R"} (a minute or two)"
  # the dependencies at the versions and hashes hw/requirements.lock pins (the extras nfc, pcsc
  # and pkcs11, and the build backend), then this checkout's code on top, built offline; the same
  # version number from an edited checkout is reinstalled all the same
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
    -r "$CHECKOUT/hw/requirements.lock"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --force-reinstall "$CHECKOUT"
  echo "$SOURCE_HASH" > "$STAMP"
fi
FAREBOX="$VENV/bin/farebox"
if [ "$(readlink "$R/usr/local/bin/farebox" 2>/dev/null)" != /opt/farebox/bin/farebox ]; then
  mkdir -p "$R/usr/local/bin"
  ln -sfn /opt/farebox/bin/farebox "$R/usr/local/bin/farebox"
  say "linked /usr/local/bin/farebox"
fi
put "$HERE/README.md" "$VENV/share/doc/farebox/README.md" 644 || true

# ---- 4. systemd unit, udev rules, module blacklist -------------------------------------------
put "$HERE/farebox.service" "$R/etc/systemd/system/farebox.service" 644 && CHANGED_UNIT=1
put "$HERE/udev/60-farebox-readers.rules" "$R/etc/udev/rules.d/60-farebox-readers.rules" 644 \
  && CHANGED_UDEV=1
# pcsc-lite with polkit (pcsc-lite 2.x) refuses a service user without a login session: this
# rule lets the farebox user (only) use pcscd and the card on its reader; polkitd reloads it
put "$HERE/polkit/60-farebox-pcscd.rules" "$R/etc/polkit-1/rules.d/60-farebox-pcscd.rules" 644 \
  || true
put "$HERE/modprobe.d/farebox-blacklist.conf" "$R/etc/modprobe.d/farebox-blacklist.conf" 644 \
  || true

# ---- 5. configuration (never over an edited one) and the card keys ---------------------------
# the key source parsed by farebox itself: "file PATH" or "pkcs11 MODULE PIN-FILE" (exit 2: why)
parse_keys() { "$VENV/bin/python" -c 'import sys
from farebox.terminal.card.keys import KeyFileSource, Pkcs11Source, parse_key_source
try:
    s = parse_key_source(sys.argv[1])
except ValueError as error:
    sys.exit(f"install: error: --keys: {error}")
if isinstance(s, KeyFileSource): print("file", s.path)
elif isinstance(s, Pkcs11Source): print("pkcs11", s.module, s.pin_file)
else: sys.exit("install: error: --keys: the published test keys protect nothing")' "$1" \
  || exit 2; }
[ -z "$KEYS" ] || parse_keys "$KEYS" >/dev/null
# toml_string TEXT: TEXT as a TOML basic string
toml_string() { "$VENV/bin/python" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }
config_id() { "$VENV/bin/python" -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f: print(tomllib.load(f).get("terminal", {}).get("id", ""))' "$1"; }
if [ ! -e "$CONFIG" ]; then
  mkdir -p "$R/etc/farebox"
  tmp=$(mktemp)
  keys_line="keys = $(toml_string "$KEYS")"
  ID="$TERMINAL_ID" KEYS_LINE="$keys_line" awk '
    /^id = / && ENVIRON["ID"] != "" { print "id = \"" ENVIRON["ID"] "\""; next }
    /^keys = / { print ENVIRON["KEYS_LINE"]; next }
    { print }' "$HERE/terminal.toml" > "$tmp"
  install -m 640 "$tmp" "$CONFIG"
  rm -f "$tmp"
  own "root:$FB_GID" "$CONFIG"
  say "installed /etc/farebox/terminal.toml (edit it: reader, fares, clearing_url)"
else
  if [ -n "$KEYS" ] && [ "$KEYS" != "$CURRENT_KEYS" ]; then
    # --keys on an existing config changes its keys line only (added under [terminal] if none)
    tmp=$(mktemp)
    where='^keys[ \t]*='
    grep -q "$where" "$CONFIG" || where='^\[terminal\]'
    KEYS_LINE="keys = $(toml_string "$KEYS")" WHERE="$where" awk '
      $0 ~ ENVIRON["WHERE"] && !done {
        done = 1
        if (ENVIRON["WHERE"] ~ /terminal/) print
        print ENVIRON["KEYS_LINE"]
        next
      }
      { print }' "$CONFIG" > "$tmp"
    cat "$tmp" > "$CONFIG"
    rm -f "$tmp"
    say "set keys in /etc/farebox/terminal.toml (the rest of it is as you left it)"
  elif [ "$CURRENT_KEYS" = test ]; then
    say "note: /etc/farebox/terminal.toml allows the published test keys (a demo terminal)"
  fi
  if ! cmp -s "$HERE/terminal.toml" "$CONFIG"; then
    say "kept your /etc/farebox/terminal.toml (the example is $HERE/terminal.toml)"
  fi
fi
# private PATH: the key or PIN file readable by the farebox user only (0600, owned by it)
private() {
  local file="$R$1"
  if [ "$(stat -c %a "$file")" != 600 ]; then
    chmod 600 "$file"
    say "made $1 mode 0600"
  fi
  if [ "$(id -u)" -eq 0 ] && [ "$(stat -c %u:%g "$file")" != "$FB_UID:$FB_GID" ]; then
    chown "$FB_UID:$FB_GID" "$file"
    say "gave $1 to the farebox user"
  fi
}
if [ "$EFFECTIVE_KEYS" != test ]; then
  parsed=$(parse_keys "$EFFECTIVE_KEYS")
  read -r KIND FIRST SECOND <<< "$parsed"
  if [ "$KIND" = file ]; then
    private "$FIRST"
    "$VENV/bin/python" -c 'import sys
from pathlib import Path
from farebox.terminal.card.keys import KeyFileError, load_key_file
try:
    load_key_file(Path(sys.argv[1]))
except KeyFileError as error:
    sys.exit(f"install: error: {error}")' "$R$FIRST" || exit 2
  else
    private "$SECOND"
    if [ "$LIVE" = 1 ] && getent group softhsm >/dev/null && [[ $FIRST == *softhsm* ]] \
        && ! id -nG farebox | tr ' ' '\n' | grep -qx softhsm; then
      usermod -aG softhsm farebox
      say "added farebox to the softhsm group (SoftHSM2's token directory)"
    fi
  fi
fi
CONFIGURED_ID=$(config_id "$CONFIG")
if [ -n "$TERMINAL_ID" ] && [ -n "$CONFIGURED_ID" ] && [ "$TERMINAL_ID" != "$CONFIGURED_ID" ]; then
  die "--terminal-id $TERMINAL_ID but /etc/farebox/terminal.toml says id = \"$CONFIGURED_ID\""
fi
TERMINAL_ID=${TERMINAL_ID:-$CONFIGURED_ID}

# ---- 6. state and the terminal's identity (once) ---------------------------------------------
STATE="$R/var/lib/farebox"
if [ ! -d "$STATE" ]; then
  install -d -m 700 "$STATE"
  own "$FB_UID:$FB_GID" "$STATE"
  say "created /var/lib/farebox"
fi
if [ ! -e "$STATE/identity.json" ]; then
  [ -n "$TERMINAL_ID" ] || die "no terminal id: give --terminal-id ID or set id in /etc/farebox/terminal.toml"
  "$FAREBOX" terminal init --state "$STATE" --id "$TERMINAL_ID" >/dev/null
  own -R "$FB_UID:$FB_GID" "$STATE"
  say "terminal $TERMINAL_ID initialised (identity key in /var/lib/farebox)"
fi

# ---- 7. make it take effect (a live system only) ---------------------------------------------
if [ "$LIVE" = 1 ]; then
  if [ "$CHANGED_UNIT" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemd reloaded"
  fi
  if [ "$CHANGED_UDEV" = 1 ] && command -v udevadm >/dev/null; then
    udevadm control --reload
    udevadm trigger --subsystem-match=usb --action=change
    say "udev rules reloaded"
  fi
  for module in port100 pn533_usb pn533; do
    if [ -d "/sys/module/$module" ]; then
      if modprobe -r "$module" 2>/dev/null; then
        say "unloaded the kernel module $module"
      else
        say "note: $module is loaded and in use; unplug the reader or reboot"
      fi
    fi
  done
fi

say "done. Next: plug in the reader, then"
say "  farebox readers && sudo -u farebox farebox doctor --config /etc/farebox/terminal.toml"
say "  sudo systemctl enable --now farebox && journalctl -u farebox -f"
