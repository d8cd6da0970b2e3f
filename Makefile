# Thin targets: each calls a script or a tool. Run them as root (sudo make test).
VENV ?= /opt/labkit/venv
PY := $(VENV)/bin/python
export LABKIT_VENV := $(VENV)

.PHONY: setup test test-fresh test-vm lab notebooks notebooks-v2 bench

setup:            ## system packages, the venv, labkit
	bash vagrant/provision.sh

test:             ## set everything up (with the test tools), then run the whole test suite
	bash scripts/test.sh

test-fresh:       ## the same, from nothing: in a bare Debian 12 root filesystem (debootstrap)
	python3 scripts/test_fresh.py

test-vm:          ## the course VM for real: a box built here, vagrant up under libvirt (qemu), the lab in Chromium
	bash scripts/test_vm.sh

lab: setup        ## start JupyterLab on http://127.0.0.1:8888
	bash vagrant/lab.sh

notebooks:        ## regenerate notebooks/ from solutions/
	$(PY) scripts/make_notebooks.py

notebooks-v2:     ## run the cgroup notebooks under nbval in labkit's cgroup v2 VM
	$(PY) scripts/notebooks_in_vm.py

bench:            ## speed against real peers (runc, crun, podman, skopeo, dockerd)
	failed=; for b in bench/[!_]*.py; do echo "== $$b"; $(PY) $$b || failed="$$failed $$b"; done; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi
