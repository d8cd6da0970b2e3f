"""labkitd's wire protocol: what the ``labkit`` client and a labkitd worker say to each other.

One request, then lines back, over labkitd's Unix socket:

    client -> labkitd   MAGIC, a 4-byte length, then NUL-separated fields: cwd, argc,
                        the arguments, KEY=VALUE for each environment variable; and, as
                        SCM_RIGHTS ancillary data (unix(7)), the client's fds 0, 1, 2
    labkitd -> client   "pid N"      the worker that runs the command (Ctrl-C goes there)
                        "exit N"     the command's exit code, at the end
                        "fallback WHY"   instead: run the command in your own process

The client is on the clock of every ``labkit`` command, so this module, which it imports,
uses nothing but the language itself: no import at all.

Man pages: unix(7) (SCM_RIGHTS, SO_PEERCRED).
Layer: engine. Used by the daemon (engine/daemon.py) and the client (cli/client.py).
"""

MAGIC = b"LKD1"
EXIT_DAEMON = 125  # docker's code when the daemon, not the container, failed


def socket_path(environ: dict[bytes, bytes]) -> bytes:
    """labkitd's socket: paths.daemon_socket()'s rule, spelled on bytes without pathlib."""
    root = environ.get(b"LABKIT_ROOT")
    return root + b"/run/labkitd.sock" if root else b"/run/labkit/labkitd.sock"


def encode_request(argv: list[bytes], cwd: bytes, environ: dict[bytes, bytes]) -> bytes:
    """cwd, argc, the arguments and KEY=VALUE pairs, NUL-separated, behind a length."""
    fields = [cwd, str(len(argv)).encode(), *argv, *(k + b"=" + v for k, v in environ.items())]
    body = b"\0".join(fields)
    return MAGIC + len(body).to_bytes(4, "little") + body


def request_size(head: bytes) -> int:
    """The body's length from the first 8 bytes, or -1 when they are no labkit request."""
    if len(head) < 8 or head[:4] != MAGIC:
        return -1
    return int.from_bytes(head[4:8], "little")


def decode_request(body: bytes) -> tuple[list[bytes], bytes, dict[bytes, bytes]]:
    """The inverse of encode_request (after MAGIC and the length)."""
    fields = body.split(b"\0")
    cwd, argc = fields[0], int(fields[1])
    argv = fields[2 : 2 + argc]
    environ = dict(f.split(b"=", 1) for f in fields[2 + argc :] if b"=" in f)
    return argv, cwd, environ


def reply(word: str, value: object) -> bytes:
    """One answer line: ``reply("exit", 0)`` is b"exit 0\\n"."""
    return f"{word} {value}\n".encode()
