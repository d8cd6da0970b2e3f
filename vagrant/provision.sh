#!/usr/bin/env bash
# The one set-up script for labkit: the course VM, a plain Linux host and CI all run it.
#
#   sudo vagrant/provision.sh          # system packages, venv, labkit
#   sudo vagrant/provision.sh --dev    # also the tools the test suite uses
#
# Idempotent: a second run installs nothing and takes a few seconds.
# Supported: Debian 12 and Ubuntu 24.04. Other Debian-like systems are untried.
# Settings (environment): LABKIT_VENV (default /opt/labkit/venv).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LABKIT_VENV:-/opt/labkit/venv}
DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "provision.sh: unknown option '$arg' (accepted: --dev)" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "provision.sh: needs root: installs system packages (hint: run it with sudo)" >&2
  exit 1
fi

# --- which system ---------------------------------------------------------------
. /etc/os-release
case "${ID}:${VERSION_ID:-}" in
  debian:12|ubuntu:24.04) ;;
  *) say "WARNING: ${PRETTY_NAME:-this system} is untried; labkit supports Debian 12 and Ubuntu 24.04" ;;
esac
ARCH=$(dpkg --print-architecture)

# --- system packages --------------------------------------------------------------
pkgs=(python3 python3-venv python3-dev gcc make git ca-certificates
      iproute2 nftables kmod cpio e2fsprogs util-linux procps psmisc
      busybox-static runc debootstrap iperf3 skopeo umoci)
case "$ARCH" in
  amd64) pkgs+=(qemu-system-x86) ;;
  arm64) pkgs+=(qemu-system-arm) ;;
esac
# labkit's small VM boots the host's own kernel image; containers and CI machines often
# come with an empty /boot.
if ! compgen -G "/boot/vmlinuz-*" >/dev/null; then
  if [ "$ID" = ubuntu ]; then pkgs+=(linux-image-generic); else pkgs+=("linux-image-$ARCH"); fi
fi
if [ "$DEV" = 1 ]; then
  pkgs+=(shellcheck)
  # a registry for the image lessons and a browser for the lab's end-to-end test:
  # welcome where the distribution has them, not required
  optional=(docker-registry vagrant chromium chromium-driver)
else
  optional=()
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
opt_missing=()
for p in "${optional[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || opt_missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] || [ ${#opt_missing[@]} -gt 0 ]; then
  say "installing system packages: ${missing[*]} ${opt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  for p in "${opt_missing[@]}"; do
    apt-get install -y -q --no-install-recommends "$p" || say "optional package $p is not available here; skipped"
  done
else
  say "system packages: all present"
fi

# --- the venv ------------------------------------------------------------------
# The system Python, so the VM and a plain host run the same interpreter students get.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the venv in $VENV"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
fi
# Reinstall only when requirements.txt, pyproject.toml or the checkout's place changed.
stamp="$VENV/.labkit-stamp"
want=$( (cat "$REPO/requirements.txt" "$REPO/pyproject.toml"; echo "$REPO") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages (requirements.txt and labkit, editable)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$REPO/requirements.txt"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO"
  echo "$want" > "$stamp"
else
  say "Python packages: up to date"
fi
ln -sf "$VENV/bin/labkit" /usr/local/bin/labkit

say "done: labkit $("$VENV/bin/labkit" --version | cut -d' ' -f2) in $VENV"
