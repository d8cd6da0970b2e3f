"""JupyterLab for the course: one definition of how the lab's server runs.

Three places start the lab, and all three go through ``serve()`` below, so they cannot
drift apart:

- the ``labkit-lab`` systemd service in the course VM (vagrant/labkit-lab.service.in),
- ``sudo make lab`` on a plain Linux host (vagrant/lab.sh),
- the tests (tests/test_lab.py).

The server runs as root, because the notebooks create namespaces, cgroups and mounts.
A server that runs code as root must never run without a token: the token is made once,
at provisioning, kept in ``/etc/labkit/jupyter_token`` (mode 0600, readable by root only)
and handed to Jupyter through ``JUPYTER_TOKEN_FILE`` rather than on the command line,
where every user could read it in ``ps``. Requests without it get ``403 Forbidden``.

Kernels run in the ``labkit`` kernelspec: the venv's own Python, so ``import labkit``,
matplotlib and ipywidgets work in every notebook without setup.

Docs: Jupyter Server's "Security in the Jupyter Server" (tokens), ``jupyter lab
--help-all`` (every option used below), ipykernel's ``kernelspec`` module.
Command line: ``python -m labkit.lab.jupyter {serve,url,setup,token}``; the VM installs it
as ``labkit-lab``.

Layer: lab (the course). Imports only labkit.errors; Jupyter's packages are imported
inside the functions that need them, so ``import labkit`` stays cheap.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from labkit import poll
from labkit.errors import InvalidValue, LabkitError, NotFound

TOKEN_FILE = Path("/etc/labkit/jupyter_token")  # LABKIT_TOKEN_FILE moves it (tests do)
DEFAULT_IP = "127.0.0.1"  # a plain host: this machine only; the VM's service uses 0.0.0.0
DEFAULT_PORT = 8888  # the Vagrantfile forwards the host's 127.0.0.1:8888 to this port
KERNEL_NAME = "labkit"
KERNEL_DISPLAY_NAME = "labkit (Python 3)"


def token_file() -> Path:
    """Where the token lives: ``$LABKIT_TOKEN_FILE`` or /etc/labkit/jupyter_token."""
    return Path(os.environ.get("LABKIT_TOKEN_FILE") or TOKEN_FILE)


def parse_port(value: str | int) -> int:
    """A TCP port from user input, e.g. ``"8888"``."""
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = 0
    if not 1 <= port <= 65535:
        raise InvalidValue("port", value, "a TCP port number from 1 to 65535, e.g. 8888")
    return port


def parse_ip(value: str) -> str:
    """An address to listen on, e.g. ``127.0.0.1`` (this machine) or ``0.0.0.0`` (all)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidValue("listen address", value, "an IP address such as 127.0.0.1 or 0.0.0.0") from None


def ensure_token(path: Path | None = None) -> tuple[str, bool]:
    """Return ``(token, created)``: read the token, or make one if there is none yet.

    A token is made once and then kept, so the URL a student bookmarked keeps working
    across ``vagrant halt``/``up`` and re-provisioning.
    """
    path = path or token_file()
    if path.is_file() and path.stat().st_size > 0:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # whoever made it: nobody but root reads a root server's key
        return read_token(path), False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(24)  # 192 bits, the same strength Jupyter picks itself
    # Mode 0600 from the first byte: the token is never readable by others, not even
    # for the instant between creating the file and a chmod.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)  # no newline: Jupyter takes JUPYTER_TOKEN_FILE's content verbatim
    return token, True


def read_token(path: Path | None = None) -> str:
    """The token from its file; NotFound with a hint when provisioning never made one."""
    path = path or token_file()
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise NotFound(
            f"no JupyterLab token at {path}", hint="'sudo make setup' (vagrant/provision.sh) makes one"
        ) from None
    if not token:
        raise NotFound(f"the token file {path} is empty",
                       hint="delete it, then 'sudo make setup' makes a new one")
    return token


@dataclass(frozen=True)
class KernelSpecResult:
    """Where the ``labkit`` kernelspec is, and whether this call wrote it."""

    path: Path
    changed: bool


def ensure_kernelspec(prefix: str | None = None) -> KernelSpecResult:
    """Install the ``labkit`` kernelspec (the venv's Python) under the venv's prefix.

    Writes only when the spec differs from what is there, so a second provisioning
    changes nothing on disk.
    """
    prefix = prefix or sys.prefix
    spec_dir = Path(prefix, "share", "jupyter", "kernels", KERNEL_NAME)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": KERNEL_DISPLAY_NAME,
        "language": "python",
        "metadata": {"debugger": True},
    }
    spec_file = spec_dir / "kernel.json"
    try:
        if json.loads(spec_file.read_text()) == spec:
            return KernelSpecResult(spec_dir, False)
    except (OSError, ValueError):
        pass
    from ipykernel.kernelspec import install  # heavy: only when there is work to do

    install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME, prefix=prefix)
    spec_file.write_text(json.dumps(spec, indent=1) + "\n")  # ours exactly, logos kept
    return KernelSpecResult(spec_dir, True)


# JupyterLab's defaults for every user of this venv: the lab works offline, so it does
# not ask to fetch news or check for updates (a prompt students would only dismiss).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def ensure_lab_settings(prefix: str | None = None) -> bool:
    """Write JupyterLab's ``overrides.json`` under the venv's prefix; True if it changed."""
    path = Path(prefix or sys.prefix, "share", "jupyter", "lab", "settings", "overrides.json")
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    wanted = {**current, **LAB_SETTINGS}
    if wanted == current:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=1) + "\n")
    return True


@dataclass(frozen=True)
class LabServer:
    """How one JupyterLab server runs: where, on which address, with which token file."""

    root_dir: Path
    ip: str = DEFAULT_IP
    port: int = DEFAULT_PORT
    token_file: Path = TOKEN_FILE

    def command(self) -> list[str]:
        """The ``jupyter lab`` command line (the token is not on it: see environment())."""
        return [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--allow-root",  # the notebooks unshare, mount and write cgroups: root only
            f"--ServerApp.ip={self.ip}",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",  # a busy port is an error, not a silent 8889
            f"--ServerApp.root_dir={self.root_dir}",
            f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}",
            # the lab works offline: no update checks, no news feed from the internet
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.news_url=None",
        ]

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["JUPYTER_TOKEN_FILE"] = str(self.token_file)
        env.pop("JUPYTER_TOKEN", None)  # it would win over the file
        return env

    def url(self, token: str, port: int | None = None) -> str:
        """The address to open in a browser. ``port``: the host's side of a forward."""
        host = "127.0.0.1" if ipaddress.ip_address(self.ip).is_unspecified else self.ip
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port or self.port}/lab?token={token}"


def serve(server: LabServer, announce: bool = False) -> None:
    """Replace this process with the JupyterLab server (it never returns on success).

    exec rather than a child process: systemd, ``make`` and the tests then signal
    Jupyter itself, and Ctrl-C or ``systemctl stop`` shuts its kernels down cleanly.
    ``announce`` first prints the URL with the token.
    """
    if not server.root_dir.is_dir():  # checked first: a wrong path creates nothing
        raise NotFound(
            f"work folder {server.root_dir} does not exist",
            hint="run 'sudo make lab', which creates it from notebooks/",
        )
    token, _ = ensure_token(server.token_file)
    ensure_kernelspec()
    if announce:
        print(f"JupyterLab for labkit: open {server.url(token)}", flush=True)
    os.execve(sys.executable, server.command(), server.environment())


def wait_until_up(port: int, timeout: float, host: str = "127.0.0.1") -> bool:
    """Poll the server's unauthenticated ``/api`` until it answers or ``timeout`` ends."""
    import urllib.error
    import urllib.request

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/api", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    return bool(poll.until(answers, timeout, first=0.5, most=0.5))


def _env_port(name: str) -> int:
    return parse_port(os.environ.get(name) or DEFAULT_PORT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labkit-lab", description="The course's JupyterLab server.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p_serve = sub.add_parser("serve", help="run JupyterLab in the foreground")
    p_serve.add_argument("--root-dir", default=os.environ.get("LABKIT_WORK"), help="the work folder")
    p_serve.add_argument("--ip", default=os.environ.get("LABKIT_LAB_IP") or DEFAULT_IP)
    p_serve.add_argument("--port", default=os.environ.get("LABKIT_LAB_PORT") or str(DEFAULT_PORT))
    p_url = sub.add_parser("url", help="print the URL with the token")
    p_url.add_argument("--port", help="the port in the URL (the host's side of a port forward)")
    p_url.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                       help="first wait until the server on this machine answers")
    sub.add_parser("setup", help="make the token (once) and the labkit kernelspec")
    sub.add_parser("token", help="print the token")
    args = parser.parse_args(argv)
    try:
        if args.verb == "serve":
            if not args.root_dir:
                raise InvalidValue("work folder", "", "a folder, given as --root-dir DIR or LABKIT_WORK=DIR")
            root = Path(args.root_dir).resolve()
            server = LabServer(root, parse_ip(args.ip), parse_port(args.port), token_file())
            serve(server, announce=True)
        elif args.verb == "url":
            local = _env_port("LABKIT_LAB_PORT")
            shown = parse_port(args.port) if args.port else local
            if args.wait and not wait_until_up(local, args.wait):
                print(f"labkit-lab: JupyterLab does not answer on port {local} after {args.wait:g} s "
                      "(hint: 'sudo systemctl status labkit-lab' or 'sudo journalctl -u labkit-lab')",
                      file=sys.stderr)
                return 1
            print(LabServer(Path("."), port=shown).url(read_token()))
        elif args.verb == "setup":
            token_path = token_file()
            created = ensure_token(token_path)[1]
            spec = ensure_kernelspec()
            settings = ensure_lab_settings()
            print(f"token {token_path}: {'created' if created else 'kept'}; "
                  f"kernelspec {spec.path.name}: {'written' if spec.changed else 'up to date'}; "
                  f"settings: {'written' if settings else 'up to date'}")
        elif args.verb == "token":
            print(read_token())
    except LabkitError as err:
        print(f"labkit-lab: {err.one_line()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
