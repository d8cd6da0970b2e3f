"""The course's setup: shell scripts pass shellcheck, the Vagrantfile validates, and
vagrant/provision.sh is idempotent: run again, it changes nothing and is quick.

These run inside `make test`, right after `make setup` provisioned this machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, need_tool

VENV = Path(os.environ.get("LABKIT_VENV") or "/opt/labkit/venv")
UNIT = Path("/etc/systemd/system/labkit-lab.service")
SECOND_RUN_LIMIT_S = 30.0
SKIP_DIRS = {".git", "work", "node_modules", ".venv", "build", ".vagrant"}


def shell_scripts() -> list[Path]:
    found = [REPO / ".ci" / "run"]
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".sh")]
    return sorted(found)


def test_shellcheck_every_script():
    shellcheck = need_tool("shellcheck")
    scripts = shell_scripts()
    assert REPO / "vagrant" / "provision.sh" in scripts and REPO / "vagrant" / "lab.sh" in scripts
    result = subprocess.run([shellcheck, *map(str, scripts)], check=False, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Vagrantfile ------------------------------------------------------------------


def vagrant_validate(cwd: Path, **env: str) -> subprocess.CompletedProcess:
    vagrant = need_tool("vagrant")
    with tempfile.TemporaryDirectory(prefix="labkit-vagrant-") as home:
        full_env = {
            **os.environ,
            "VAGRANT_HOME": home,  # not root's ~/.vagrant.d
            "VAGRANT_DOTFILE_PATH": f"{home}/dot",  # no .vagrant/ left in the checkout
            "VAGRANT_CHECKPOINT_DISABLE": "1",  # no version check over the network
            **env,
        }
        for name in ("LABKIT_CPUS", "LABKIT_MEMORY", "LABKIT_PORT", "LABKIT_SYNC"):
            if name not in env:
                full_env.pop(name, None)
        return subprocess.run([vagrant, "validate"], cwd=cwd, env=full_env,
                              check=False, capture_output=True, text=True, timeout=120)


def vagrant_version() -> tuple[int, ...]:
    out = subprocess.run([need_tool("vagrant"), "--version"], check=False, capture_output=True, text=True,
                         timeout=60).stdout
    return tuple(int(x) for x in out.split()[-1].split(".")[:2])


@pytest.mark.parametrize("where", [".", "vagrant"], ids=["from-checkout", "from-vagrant-dir"])
def test_vagrantfile_validates(where):
    result = vagrant_validate(REPO / where)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout
    if vagrant_version() < (2, 4):  # Debian 12 ships 2.3: the file must still load there
        assert "arm64 hosts" in result.stderr and "2.4 or newer" in result.stderr


def test_vagrantfile_settings_from_environment():
    good = vagrant_validate(REPO, LABKIT_CPUS="4", LABKIT_MEMORY="6144", LABKIT_PORT="9999",
                            LABKIT_SYNC="rsync")
    assert good.returncode == 0, good.stdout + good.stderr
    for name, bad, accepted in [("LABKIT_MEMORY", "4g", "MiB"), ("LABKIT_CPUS", "two", "CPUs"),
                                ("LABKIT_PORT", "70000", "1 to 65535"), ("LABKIT_SYNC", "ftp", "rsync")]:
        result = vagrant_validate(REPO, **{name: bad})
        assert result.returncode != 0, f"{name}={bad} was accepted"
        named = f'{name}="{bad}"'  # the value, quoted, and the form that is accepted
        assert named in result.stderr and accepted in result.stderr, result.stderr


def test_vagrantfile_keeps_work_out_of_rsync_and_jupyter_on_loopback():
    text = (REPO / "vagrant" / "Vagrantfile").read_text()
    assert '"/work/"' in text and "rsync__exclude" in text  # rsync --delete must never see work/
    assert 'host_ip: "127.0.0.1"' in text
    assert "bento/ubuntu-24.04" in text and "box_version" in text
    for provider in ("virtualbox", "libvirt", "vmware_desktop", "parallels"):
        assert f'config.vm.provider "{provider}"' in text


# --- provision.sh -----------------------------------------------------------------------


def provision(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "LABKIT_VENV": str(VENV)}
    return subprocess.run(["bash", str(REPO / "vagrant" / "provision.sh"), *args], env=env,
                          check=False, capture_output=True, text=True, timeout=timeout)


def snapshot() -> dict[str, tuple]:
    """What provisioning may touch, as (mtime, size, mode) per path or link target."""
    site = next((VENV / "lib").glob("python3*/site-packages"))
    paths = [Path("/var/lib/dpkg/status"), VENV / ".labkit-stamp", site, VENV / "bin",
             Path("/usr/local/bin/labkit"), Path("/usr/local/bin/labkit-lab"),
             Path("/etc/labkit"), Path("/etc/labkit/jupyter_token"), UNIT,
             VENV / "share/jupyter/lab/settings/overrides.json"]
    paths += sorted((VENV / "share/jupyter/kernels/labkit").glob("*"))
    state: dict[str, tuple] = {}
    for p in paths:
        try:
            st = p.lstat()
        except FileNotFoundError:
            state[str(p)] = ("absent",)
            continue
        link = os.readlink(p) if p.is_symlink() else ""
        state[str(p)] = (st.st_mtime_ns, st.st_size, st.st_mode, link)
    return state


def test_provision_rejects_unknown_option():
    result = provision("--servce", timeout=60)
    assert result.returncode == 2
    assert "'--servce'" in result.stderr and "--dev, --service" in result.stderr


def test_provision_second_run_changes_nothing_and_is_quick():
    first = provision("--dev", timeout=1800)  # normally `make setup` did it all already
    assert first.returncode == 0, first.stdout + first.stderr
    before = snapshot()
    start = time.monotonic()
    # --service as the VM passes it: without systemd as PID 1 it must install nothing.
    # On a systemd host only where the service is there already: a test never adds one.
    systemd = Path("/proc/1/comm").read_text().strip() == "systemd"
    service = ["--service"] if not systemd or UNIT.exists() else []
    second = provision("--dev", *service, timeout=600)
    took = time.monotonic() - start
    assert second.returncode == 0, second.stdout + second.stderr
    assert snapshot() == before, second.stdout
    assert "installing" not in second.stdout and "wrote" not in second.stdout, second.stdout
    assert took < SECOND_RUN_LIMIT_S, f"second provisioning took {took:.1f} s"
    if not systemd:
        assert not UNIT.exists(), "a service was installed on a host without systemd"
        assert "no service installed" in second.stdout
    token = Path("/etc/labkit/jupyter_token")
    assert token.stat().st_mode & 0o777 == 0o600
    print(f"second provisioning run: {took:.2f} s")


def _systemd_version() -> int:
    out = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True, check=False).stdout
    return int(re.search(r"systemd (\d+)", out).group(1))


def test_service_unit_verifies():
    """The unit provision.sh --service installs, checked by systemd's own parser."""
    analyze = need_tool("systemd-analyze")
    template = (REPO / "vagrant" / "labkit-lab.service.in").read_text()
    values = {"@VENV@": str(VENV), "@REPO@": str(REPO), "@WORK@": str(REPO / "work"), "@PORT@": "8888",
              "@TOKEN_FILE@": "/etc/labkit/jupyter_token"}
    text = template
    for name, value in values.items():
        assert name in template, f"provision.sh fills in {name}, the template lacks it"
        text = text.replace(name, value)
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder that provision.sh does not fill in"
    for line in ("Restart=always", "WantedBy=multi-user.target", "--ip 0.0.0.0 --port 8888"):
        assert line in text
    with tempfile.TemporaryDirectory(prefix="labkit-unit-") as d:
        unit = Path(d, "labkit-lab.service")
        unit.write_text(text)
        result = subprocess.run([analyze, "verify", str(unit)], check=False, capture_output=True, text=True,
                                timeout=60)
    # DelegateSubgroup= is new in systemd 254 (the course VM has 255); older systemd
    # (Debian 12: 252) names it as unknown and ignores it, which is what we want there.
    noise = [line for line in result.stderr.splitlines()
             if line.strip() and not ("DelegateSubgroup" in line and _systemd_version() < 254)]
    assert result.returncode == 0 and not noise, result.stderr


def test_labkitd_unit_verifies():
    """labkitd.service, as provision.sh --service fills it in, checked by systemd's parser."""
    analyze = need_tool("systemd-analyze")
    template = (REPO / "vagrant" / "labkitd.service.in").read_text()
    text = template.replace("@VENV@", str(VENV))
    assert not re.search(r"@[A-Z_]+@", text), "a placeholder that provision.sh does not fill in"
    assert "@VENV@" in (REPO / "vagrant" / "provision.sh").read_text()
    for line in ("ExecStart=" + str(VENV) + "/bin/python -m labkit daemon run", "KillMode=process",
                 "Restart=always", "WantedBy=multi-user.target"):  # fmt: skip
        assert line in text
    with tempfile.TemporaryDirectory(prefix="labkit-unit-") as d:
        unit = Path(d, "labkitd.service")
        unit.write_text(text)
        result = subprocess.run([analyze, "verify", str(unit)], check=False, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
    noise = [line for line in result.stderr.splitlines()
             if line.strip() and not ("DelegateSubgroup" in line and _systemd_version() < 254)]
    assert result.returncode == 0 and not noise, result.stderr
