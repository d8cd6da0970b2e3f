#!/usr/bin/env bash
# Did the files the course VM is made of change since `make test-vm` last passed?
#
#   bash scripts/vm_changed.sh           # exit 0: changed (or never passed); 1: as when it passed
#   bash scripts/vm_changed.sh --stamp   # record the files as they are now: make test-vm passed
#
# The files: the Vagrantfiles, vagrant/ (provision.sh, lab.sh, the service units), the
# compiled command provisioning builds (labkit/cli/client.c, compiled.py), the
# requirements and pyproject.toml, and the VM test's own scripts and tests. Their content's
# hash (sha256 of each file that git tracks, in path order) is kept in .ci/vm-tested, a
# file that is committed with the change it was tested with (LABKIT_VM_TESTED moves it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STAMP=${LABKIT_VM_TESTED:-.ci/vm-tested}

INPUTS=(Vagrantfile vagrant/ requirements.txt pyproject.toml labkit/cli/client.c labkit/cli/compiled.py
        scripts/build_box.py scripts/boot_box.py
        scripts/test_vm.sh tests/test_vm_box.py tests/test_vm_vagrant.py tests/browser.py)

inputs_hash() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -- "${INPUTS[@]}"
  else  # a copy of the checkout without .git (make test-fresh): the same files, found on disk
    find "${INPUTS[@]}" -type f ! -name '*.pyc' -print0 2>/dev/null
  fi | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

case "${1:-}" in
  --stamp) inputs_hash > "$STAMP"; exit 0 ;;
  "") ;;
  *) echo "vm_changed.sh: unknown option '$1' (accepted: --stamp)" >&2; exit 2 ;;
esac
if [ "$(inputs_hash)" = "$(cat "$STAMP" 2>/dev/null || true)" ]; then
  exit 1
fi
exit 0
