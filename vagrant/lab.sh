#!/usr/bin/env bash
# Start the course's JupyterLab on this Linux machine: what `sudo make lab` runs.
#
#   sudo bash vagrant/lab.sh      # then open the URL it prints; Ctrl-C stops the lab
#
# Same server as the VM's labkit-lab service (python -m labkit.lab.jupyter serve): root,
# the token from /etc/labkit/jupyter_token, the labkit kernel, the work folder as its
# root. Where that service runs already (systemd as PID 1), this only prints its URL.
#
# Settings (environment):
#   LABKIT_LAB_IP    address to listen on (default 127.0.0.1: this machine only)
#   LABKIT_LAB_PORT  port (default 8888)
#   LABKIT_WORK      the work folder (default: work/ in this checkout)
#   LABKIT_VENV      the venv made by provision.sh (default /opt/labkit/venv)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LABKIT_VENV:-/opt/labkit/venv}
PY="$VENV/bin/python"
export LABKIT_WORK=${LABKIT_WORK:-$REPO/work}
export LABKIT_LAB_IP=${LABKIT_LAB_IP:-127.0.0.1}
export LABKIT_LAB_PORT=${LABKIT_LAB_PORT:-8888}

if [ "$(id -u)" -ne 0 ]; then
  echo "lab.sh: needs root: the notebooks create namespaces, cgroups and mounts (hint: sudo make lab)" >&2
  exit 1
fi
if [ ! -x "$PY" ]; then
  echo "lab.sh: no venv at $VENV (hint: sudo bash vagrant/provision.sh, or sudo make lab which runs it)" >&2
  exit 1
fi

# The VM (or a host provisioned with --service) already runs the lab as a service.
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && systemctl is-active --quiet labkit-lab 2>/dev/null; then
  echo "JupyterLab runs as the labkit-lab service; open:"
  exec "$PY" -m labkit.lab.jupyter url --wait 30
fi

"$PY" "$REPO/scripts/sync_work.py" --notebooks "$REPO/notebooks" --work "$LABKIT_WORK"
echo "Stop the lab with Ctrl-C (twice). Your notebooks stay in $LABKIT_WORK."
# serve prints the URL with the token, then becomes the Jupyter server (exec).
exec "$PY" -m labkit.lab.jupyter serve
