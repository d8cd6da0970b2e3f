#!/usr/bin/env bash
# The README's test command (`sudo make test` runs this): set the machine up with
# vagrant/provision.sh --dev (system packages, the venv, labkit, every tool a test uses),
# then run the whole suite on the real kernel, the notebooks in solutions/ under nbval
# included. It needs root and bash, nothing more: on a new Debian 12 or Ubuntu 24.04
# machine it installs everything else itself, make included.
#
#   sudo bash scripts/test.sh                 # all of it
#   sudo bash scripts/test.sh -k overlay -x   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${LABKIT_VENV:-/opt/labkit/venv}

bash vagrant/provision.sh --dev

# LABKIT_QUICK=1: the notebooks' long measurements take fewer rounds.
# --nbval-lax: a notebook cell fails on an error, its printed output is not compared.
export LABKIT_QUICK=1
exec "$VENV/bin/python" -m pytest -p no:cacheprovider \
  --nbval-lax --nbval-current-env --nbval-cell-timeout=300 \
  --nbval-sanitize-with tests/nbval_sanitize.cfg \
  tests solutions "$@"
