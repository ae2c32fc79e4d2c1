#!/usr/bin/env bash
# Install the farebox terminal daemon on a Raspberry Pi (Raspberry Pi OS Bookworm, Python 3.11)
# or any Debian-like systemd machine, from this checkout:
#
#   apt packages   python3-venv, pcscd, libusb, and what builds pyscard (only those missing)
#   user, group    farebox (systemd-sysusers, /etc/sysusers.d/farebox.conf)
#   /opt/farebox   a venv with farebox[nfc,pcsc] from this checkout; /usr/local/bin/farebox
#   /etc/systemd/system/farebox.service, /etc/udev/rules.d/60-farebox-readers.rules,
#   /etc/modprobe.d/farebox-blacklist.conf
#   /etc/farebox/terminal.toml   the example, only when there is none (never over an edited one)
#   /var/lib/farebox             the state, with the terminal's identity (`farebox terminal init`)
#   then reloads systemd and udev and unloads port100 / pn533_usb if loaded.
#
# It never enables or starts the service (README: `systemctl enable --now farebox`).
# Idempotent: a second run changes nothing (files are written only when their content differs,
# the venv is rebuilt only when the checkout's code changed, the identity is made once).
#
# Options:
#   --root DIR         install into DIR as if it were / (a test, an image being built): no apt,
#                      no reloads, no modules unloaded
#   --no-apt           do not install apt packages (say which are missing instead)
#   --terminal-id ID   the terminal id for a new config and identity [default: the config's id]
#   --python PY        the Python (3.11+) the venv is made from [default: python3]
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(dirname "$HERE")
ROOT=/
APT=1
TERMINAL_ID=""
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install: error: $*" >&2; exit 2; }
say() { echo "install: $*"; }

while (($#)); do
  case $1 in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
    --no-apt) APT=0; shift ;;
    --terminal-id) [ $# -ge 2 ] || die "--terminal-id needs an id"; TERMINAL_ID=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || die "--python needs a program"; PYTHON=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [ -n "$TERMINAL_ID" ] && ! [[ $TERMINAL_ID =~ ^[A-Za-z0-9._-]{1,32}$ ]]; then
  die "--terminal-id: 1-32 letters, digits, '.', '_' or '-', got '$TERMINAL_ID'"
fi
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
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$SOURCE_HASH" ]; then
  say "installing farebox[nfc,pcsc] from $CHECKOUT into ${VENV#"$R"} (a minute or two)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$CHECKOUT[nfc,pcsc]"
  # the same version number from an edited checkout: this checkout's code, always
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --force-reinstall "$CHECKOUT"
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
put "$HERE/modprobe.d/farebox-blacklist.conf" "$R/etc/modprobe.d/farebox-blacklist.conf" 644 \
  || true

# ---- 5. configuration (never over an edited one) ---------------------------------------------
CONFIG="$R/etc/farebox/terminal.toml"
config_id() { "$VENV/bin/python" -c 'import sys, tomllib
with open(sys.argv[1], "rb") as f: print(tomllib.load(f).get("terminal", {}).get("id", ""))' "$1"; }
if [ ! -e "$CONFIG" ]; then
  mkdir -p "$R/etc/farebox"
  tmp=$(mktemp)
  if [ -n "$TERMINAL_ID" ]; then
    sed "s/^id = .*/id = \"$TERMINAL_ID\"/" "$HERE/terminal.toml" > "$tmp"
  else
    cp "$HERE/terminal.toml" "$tmp"
  fi
  install -m 640 "$tmp" "$CONFIG"
  rm -f "$tmp"
  own "root:$FB_GID" "$CONFIG"
  say "installed /etc/farebox/terminal.toml (edit it: reader, fares, clearing_url)"
elif ! cmp -s "$HERE/terminal.toml" "$CONFIG"; then
  say "kept your /etc/farebox/terminal.toml (the example is $HERE/terminal.toml)"
fi
CONFIGURED_ID=$(config_id "$CONFIG")
if [ -n "$TERMINAL_ID" ] && [ -n "$CONFIGURED_ID" ] && [ "$TERMINAL_ID" != "$CONFIGURED_ID" ]; then
  die "--terminal-id $TERMINAL_ID but /etc/farebox/terminal.toml says id = \"$CONFIGURED_ID\""
fi
TERMINAL_ID=${TERMINAL_ID:-$CONFIGURED_ID}

# ---- 6. state and the terminal's identity (once) ---------------------------------------------
STATE="$R/var/lib/farebox"
if [ ! -d "$STATE" ]; then
  install -d -m 750 "$STATE"
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
