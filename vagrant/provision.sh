#!/usr/bin/env bash
# The one set-up script for labkit: the course VM, a plain Linux host and CI all run it.
#
#   sudo vagrant/provision.sh            # system packages, venv, labkit, Jupyter's token
#   sudo vagrant/provision.sh --dev      # also the tools the test suite uses
#   sudo vagrant/provision.sh --service  # also JupyterLab (labkit-lab) and labkitd as systemd services
#                                        # (the course VM; only where systemd is PID 1)
#
# Idempotent: a second run installs nothing, changes nothing and takes a few seconds.
# Supported: Debian 12, Debian 13 and Ubuntu 24.04. Other Debian-like systems are untried.
# Settings (environment): LABKIT_VENV (default /opt/labkit/venv), LABKIT_REPO (the
# checkout; default: the folder this script sits in; Vagrant sets it to /vagrant).
set -euo pipefail

REPO=${LABKIT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV=${LABKIT_VENV:-/opt/labkit/venv}
DEV=0
SERVICE=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --service) SERVICE=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "provision.sh: unknown option '$arg' (accepted: --dev, --service)" >&2; exit 2 ;;
  esac
done

say() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "provision.sh: needs root: installs system packages (hint: run it with sudo)" >&2
  exit 1
fi

if [ ! -f "$REPO/pyproject.toml" ]; then
  echo "provision.sh: $REPO is not the labkit checkout (expected pyproject.toml there; set LABKIT_REPO)" >&2
  exit 1
fi

# --- which system ---------------------------------------------------------------
# shellcheck source=/dev/null
. /etc/os-release
case "${ID}:${VERSION_ID:-}" in
  debian:12|debian:13|ubuntu:24.04) ;;
  *) say "WARNING: ${PRETTY_NAME:-this system} is untried; labkit supports Debian 12, Debian 13 and Ubuntu 24.04" ;;
esac
ARCH=$(dpkg --print-architecture)

# --- system packages --------------------------------------------------------------
# (docker.io: the docker CLI, a client of labkitd's Engine API; strace times runc's start,
# notebook 12; criu checkpoints and restores a container, notebook 07)
pkgs=(python3 python3-venv python3-dev gcc make git ca-certificates
      iproute2 nftables kmod cpio zstd e2fsprogs util-linux procps psmisc
      busybox-static runc debootstrap iperf3 skopeo umoci docker.io strace uidmap)
case "$ARCH" in
  amd64) pkgs+=(qemu-system-x86) ;;
  arm64) pkgs+=(qemu-system-arm) ;;
esac
# labkit's small VM boots the host's own kernel image; containers and CI machines often
# come with an empty /boot.
if ! compgen -G "/boot/vmlinuz-*" >/dev/null; then
  if [ "$ID" = ubuntu ]; then pkgs+=(linux-image-generic); else pkgs+=("linux-image-$ARCH"); fi
fi
optional=()
# Ubuntu 24.04's archive has no criu: there the checkpoint lesson says so instead
if [ "$ID" = debian ]; then pkgs+=(criu); else optional+=(criu); fi
if [ "$DEV" = 1 ]; then
  # What the test suite runs besides labkit: shellcheck; systemd-analyze (package systemd)
  # verifies the service units; vagrant with the libvirt provider plugin validates the
  # Vagrantfile (without a provider plugin `vagrant validate` finds "no usable default
  # provider"); a registry for the image lessons; a browser for the lab's end-to-end test.
  pkgs+=(shellcheck systemd)
  tools=(vagrant vagrant-libvirt docker-registry chromium chromium-driver podman openssl)
  if [ "${ID}:${VERSION_ID:-}" = debian:12 ]; then
    pkgs+=("${tools[@]}")  # CI's system: every test tool is required, so that no test skips
  else
    optional+=("${tools[@]}")  # Ubuntu's chromium is a snap, and not every release has vagrant
  fi
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
  # Packages such as docker-registry start a daemon from their postinst, listening on every
  # interface. labkit starts what it needs itself, on 127.0.0.1, and stops it again: while
  # apt installs, a policy-rc.d (see invoke-rc.d(8)) refuses every service start. One that
  # is there already (container images ship one) is left as it is.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# written by labkit provision.sh while it installs packages\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -q
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  for p in "${opt_missing[@]}"; do
    apt-get install -y -q --no-install-recommends "$p" || say "optional package $p is not available here; skipped"
  done
  # docker.io also brings dockerd, which the course never runs (labkitd is its engine):
  # where this run installed it and systemd runs, it stays off at boot too
  if [[ " ${missing[*]} " == *" docker.io "* ]] && [ -d /run/systemd/system ]; then
    systemctl mask --quiet docker.service docker.socket
  fi
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
want=$( (cat "$REPO/requirements.txt" "$REPO/pyproject.toml"; echo "$REPO compat") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages (requirements.txt and labkit, editable)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$REPO/requirements.txt"
  # compat mode puts the checkout on sys.path with a plain .pth line: the default import
  # hook of an editable install costs ~30 ms at every `labkit` start.
  "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO" --config-settings editable_mode=compat
  # matplotlib builds its font cache on first import (seconds): do it now, not in a
  # student's first plot
  "$VENV/bin/python" -c 'import matplotlib.pyplot' >/dev/null 2>&1 || true
  echo "$want" > "$stamp"
else
  say "Python packages: up to date"
fi
# Write a file only when its content differs, so a second run changes nothing on disk.
put() {  # put PATH MODE < content; returns 0 when it wrote, 1 when nothing changed
  local tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  install -m "$2" "$tmp" "$1"; rm -f "$tmp"
  say "wrote $1"
}
# The labkit command: the thin client compiled from C (labkit/cli/client.c), as the docker
# CLI is a compiled program. It hands container commands to labkitd before Python could
# even have started (~6 ms), and starts this venv's Python (with -S: labkit.cli.main()
# loads site-packages when it needs them) for a command that runs here.
[ -L /usr/local/bin/labkit ] && rm -f /usr/local/bin/labkit  # a symlink made by older versions
client=$(mktemp -d)
"$VENV/bin/python" -m labkit.cli.compiled "$client/labkit"
put /usr/local/bin/labkit 0755 < "$client/labkit" || true
rm -rf "$client"
# labkit-lab: the lab's URL with its token (`sudo labkit-lab url`), and the server itself
put /usr/local/bin/labkit-lab 0755 <<EOF || true
#!/bin/sh
# JupyterLab for the labkit course: 'labkit-lab url' prints the address with the token.
exec "$VENV/bin/python" -m labkit.lab.jupyter "\$@"
EOF

# --- subordinate ids for --userns=auto ------------------------------------------------
# `labkit run --userns=auto` gives each container a slice of 65536 host ids from the range
# /etc/subuid and /etc/subgid name for labkit (labkit/engine/userns.py). 16 slices, far
# above the ranges useradd hands to people (from 100000 on, and it skips taken ones).
for f in /etc/subuid /etc/subgid; do
  if ! grep -q '^labkit:' "$f" 2>/dev/null; then
    echo "labkit:1000000:1048576" >> "$f"
    say "added labkit:1000000:1048576 to $f"
  fi
done

# --- JupyterLab: token and kernel -------------------------------------------------
# The token is made once and kept (/etc/labkit/jupyter_token, 0600); the `labkit`
# kernelspec is the venv's Python, the default kernel of every notebook.
lab_setup=$("$VENV/bin/python" -m labkit.lab.jupyter setup)
say "JupyterLab: $lab_setup"

# --- JupyterLab as a service (the course VM) ---------------------------------------
if [ "$SERVICE" = 1 ]; then
  if [ "$(cat /proc/1/comm 2>/dev/null)" != systemd ]; then
    say "no systemd as PID 1 here: no service installed (start the lab with: sudo make lab)"
  else
    unit=/etc/systemd/system/labkit-lab.service
    if sed -e "s|@VENV@|$VENV|g" -e "s|@REPO@|$REPO|g" -e "s|@WORK@|$REPO/work|g" \
           -e "s|@PORT@|8888|g" -e "s|@TOKEN_FILE@|/etc/labkit/jupyter_token|g" \
           "$REPO/vagrant/labkit-lab.service.in" | put "$unit" 0644; then
      systemctl daemon-reload
      systemctl enable --quiet labkit-lab
      systemctl restart labkit-lab
    elif ! systemctl is-active --quiet labkit-lab; then
      systemctl enable --quiet --now labkit-lab
    fi
    say "JupyterLab: the labkit-lab service is $(systemctl is-active labkit-lab || true); 'sudo labkit-lab url' prints its address"
    # labkitd: the `labkit` command's daemon (like docker.service)
    if sed -e "s|@VENV@|$VENV|g" "$REPO/vagrant/labkitd.service.in" | put /etc/systemd/system/labkitd.service 0644; then
      systemctl daemon-reload
      systemctl enable --quiet labkitd
      systemctl restart labkitd
    elif ! systemctl is-active --quiet labkitd; then
      systemctl enable --quiet --now labkitd
    fi
    say "labkitd: the labkitd service is $(systemctl is-active labkitd || true)"
  fi
fi

say "done: labkit $("$VENV/bin/labkit" --version | cut -d' ' -f2) in $VENV"
