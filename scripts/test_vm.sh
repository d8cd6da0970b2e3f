#!/usr/bin/env bash
# `make test-vm`: the course VM booted for real, as a student's `vagrant up` boots it.
#
#   sudo bash scripts/test_vm.sh              # all of it (tens of minutes under emulation)
#   sudo bash scripts/test_vm.sh -k browser   # extra arguments go to pytest
#
# 1. scripts/build_box.py makes the base box from Debian 13's packages (once per recipe,
#    cached in /var/cache/labkit/box), and tests/test_vm_box.py boots it with qemu.
# 2. tests/test_vm_vagrant.py runs `vagrant up --provider=libvirt` on vagrant/Vagrantfile
#    (libvirt's qemu driver: software emulation), then checks the lab from this host, in
#    Chromium too, and destroys the VM.
# The machine must be set up first (provision.sh --dev); this adds the host tools only the
# VM test needs: libvirt's daemon, qemu-img and dnsmasq (libvirt's DHCP for the guest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${LABKIT_VENV:-/opt/labkit/venv}

if [ "$(id -u)" -ne 0 ]; then
  echo "test_vm.sh: needs root: debootstrap, libvirt and qemu (hint: sudo make test-vm)" >&2
  exit 1
fi
need=(libvirt-daemon-system libvirt-clients qemu-utils dnsmasq-base vagrant vagrant-libvirt
      debootstrap chromium chromium-driver)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing the VM test's host tools: ${missing[*]}"
  # the packages' postinst would start libvirtd: the test starts it itself where no
  # systemd does (see provision.sh for this policy-rc.d)
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# written by labkit test_vm.sh while it installs packages\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

export LABKIT_TEST_VM=1
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -s tests/test_vm_box.py tests/test_vm_vagrant.py "$@"
