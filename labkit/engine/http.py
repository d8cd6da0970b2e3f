"""Just enough HTTP/1.1 for the Docker Engine API on a Unix socket (RFC 9112).

The docker CLI and docker-py speak plain HTTP to dockerd's socket: a request line, header
lines, an empty line, and a body whose length ``Content-Length`` gives (or that comes in
``Transfer-Encoding: chunked`` pieces). One connection carries one request after the other
(keep-alive). Three kinds of answer are used:

- **a whole answer**: status line, headers with ``Content-Length``, the body (JSON);
- **a stream**: ``Transfer-Encoding: chunked``, each piece sent as soon as it is known
  (``docker pull``'s progress, ``docker build``'s steps, a wait that answers at exit);
- **a hijack**: ``101 UPGRADED``, and from then on the socket is the container's
  stdin/stdout (``docker attach``, ``docker run`` and ``docker exec``). Without a terminal,
  output is *multiplexed*: each piece gets an 8-byte header, ``[stream, 0, 0, 0, size
  (uint32 big-endian)]``, stream 1 for stdout and 2 for stderr (``frame``).

Errors are JSON ``{"message": "..."}`` with Docker's status codes (``ApiError``).
Every limit is checked before anything is read past it: a header block of at most
``MAX_HEAD`` bytes, a JSON body of at most ``MAX_BODY``, larger bodies (a build
context) spooled to a temporary file up to ``MAX_UPLOAD``.

Layer: engine. Used by labkitd's API side (daemon.serve_api) and the routes (cli/api).
"""

from __future__ import annotations

import json
import socket
import struct
import tempfile
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

MAX_HEAD = 64 * 1024  # request line + headers
MAX_BODY = 16 * 1024 * 1024  # a JSON request body
MAX_UPLOAD = 2 * 1024**3  # a build context or an image archive
CHUNK = 64 * 1024
REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 411: "Length Required", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           501: "Not Implemented", 101: "UPGRADED"}  # fmt: skip
STDIN, STDOUT, STDERR = 0, 1, 2


class ApiError(Exception):
    """An answer other than success: Docker's status code and ``{"message": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Closed(Exception):
    """The client closed the connection between requests."""


@dataclass
class Request:
    method: str
    path: str  # without the /v1.NN prefix
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: BinaryIO | None = None  # the body, if any; read it with .read() or json()
    version: str = ""  # the API version asked for in the path ("1.41"), or ""
    params: dict[str, str] = field(default_factory=dict)  # the {name} parts of the route
    rfile: BinaryIO | None = None  # the connection, for a hijacked stream's stdin

    def json(self, default: object = None) -> object:
        """The body as JSON (``default`` when there is none); 400 when it is not JSON,
        413 when it is larger than MAX_BODY."""
        raw = self.body.read(MAX_BODY + 1) if self.body is not None else b""
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"a JSON request body may be at most {MAX_BODY} bytes")
        if not raw.strip():
            return default
        try:
            return json.loads(raw)
        except ValueError as err:
            raise ApiError(400, f"invalid JSON in the request body: {err}") from None

    def flag(self, name: str) -> bool:
        """A query parameter as Docker reads a boolean: 1, true, True (anything else: no)."""
        return self.query.get(name, "").lower() in ("1", "true", "yes")


def read_request(rfile: BinaryIO) -> Request:
    """The next request on the connection. Raises Closed at a clean end of the stream,
    ApiError for anything malformed or too large."""
    head = b""
    while not head.endswith(b"\r\n\r\n") and not head.endswith(b"\n\n"):
        line = rfile.readline(MAX_HEAD + 1)
        if not line:
            if head:
                raise ApiError(400, "the request ended inside its headers")
            raise Closed
        if not head and line in (b"\r\n", b"\n"):  # a stray empty line between requests
            continue
        head += line
        if len(head) > MAX_HEAD:
            raise ApiError(431, f"the request's headers are larger than {MAX_HEAD} bytes")
    lines = head.decode("latin-1").splitlines()
    try:
        method, target, proto = lines[0].split(" ")
    except ValueError:
        raise ApiError(400, f"malformed request line: {lines[0][:80]!r}") from None
    if not proto.startswith("HTTP/1.") or not method.isalpha():
        raise ApiError(400, f"malformed request line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:  # the empty line that ends the headers
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise ApiError(400, f"malformed header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    url = urlsplit(target)
    query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
    path, version = _split_version(unquote(url.path))
    return Request(method.upper(), path, query, headers, _body(rfile, headers), version)


def _split_version(path: str) -> tuple[str, str]:
    """'/v1.41/containers/json' -> ('/containers/json', '1.41')."""
    parts = path.split("/", 2)
    if len(parts) > 1 and parts[1].startswith("v") and parts[1][1:].replace(".", "", 1).isdigit():
        return "/" + (parts[2] if len(parts) > 2 else ""), parts[1][1:]
    return path, ""


def _body(rfile: BinaryIO, headers: dict[str, str]) -> BinaryIO | None:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return _spool(_chunks(rfile))
    length = headers.get("content-length")
    if length is None:
        return None
    if not length.isdigit():
        raise ApiError(400, f"invalid Content-Length: {length[:20]!r}")
    n = int(length)
    if n > MAX_UPLOAD:
        raise ApiError(413, f"the request body ({n} bytes) is larger than {MAX_UPLOAD} bytes")

    def pieces() -> Iterable[bytes]:
        left = n
        while left:
            data = rfile.read(min(CHUNK, left))
            if not data:
                raise ApiError(400, f"the request body ended {left} bytes early")
            left -= len(data)
            yield data

    return _spool(pieces())


def _chunks(rfile: BinaryIO) -> Iterable[bytes]:
    while True:
        size_line = rfile.readline(1024).split(b";")[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise ApiError(400, f"malformed chunk size: {size_line[:20]!r}") from None
        if size == 0:
            while rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return
        data = rfile.read(size)
        if len(data) != size:
            raise ApiError(400, "the request body ended inside a chunk")
        rfile.readline(3)  # the CRLF after the chunk
        yield data


def _spool(pieces: Iterable[bytes]) -> BinaryIO:
    """The body in a temporary file that stays in memory while it is small."""
    f = tempfile.SpooledTemporaryFile(max_size=MAX_BODY)
    total = 0
    for data in pieces:
        total += len(data)
        if total > MAX_UPLOAD:
            raise ApiError(413, f"the request body is larger than {MAX_UPLOAD} bytes")
        f.write(data)
    f.seek(0)
    return f  # type: ignore[return-value]


# -- answers ------------------------------------------------------------------------------
class Responder:
    """Writes the answers to one request on ``sock``."""

    def __init__(self, sock: socket.socket, headers: dict[str, str] | None = None) -> None:
        self.sock = sock
        self.extra = headers or {}  # sent with every answer (API-Version, Server)
        self.started = False  # a status line went out: an error can no longer be answered
        self.hijacked = False
        self.keep_alive = True

    def _head(self, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in {**self.extra, **headers}.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.started = True

    def send(self, status: int, body: object = None, content_type: str = "application/json") -> None:
        """A whole answer: ``body`` as JSON (bytes and str as they are; None: no body)."""
        if body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = (json.dumps(body) + "\n").encode()
        headers = {"Content-Length": str(len(data))}
        if data:
            headers["Content-Type"] = content_type
        self._head(status, headers)
        if data:
            self.sock.sendall(data)

    def error(self, status: int, message: str) -> None:
        self.send(status, {"message": message})

    def stream(self, content_type: str = "application/json") -> Callable[[bytes], None]:
        """Start a chunked answer; returns write(piece). end_stream() ends it."""
        self._head(200, {"Content-Type": content_type, "Transfer-Encoding": "chunked"})

        def write(data: bytes) -> None:
            if data:
                self.sock.sendall(b"%x\r\n%b\r\n" % (len(data), data))

        return write

    def end_stream(self) -> None:
        self.sock.sendall(b"0\r\n\r\n")

    def hijack(self, multiplexed: bool) -> socket.socket:
        """Answer 101 and hand over the raw socket (the connection ends with the stream)."""
        kind = "multiplexed-stream" if multiplexed else "raw-stream"
        self._head(101, {"Content-Type": f"application/vnd.docker.{kind}", "Connection": "Upgrade",
                         "Upgrade": "tcp"})  # fmt: skip
        self.hijacked = True
        self.keep_alive = False
        return self.sock


def frame(stream: int, data: bytes) -> bytes:
    """One piece of a multiplexed stream: 8-byte header, then the data.

    >>> frame(1, b"hi\\n")
    b'\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x03hi\\n'
    """
    return struct.pack(">BxxxI", stream, len(data)) + data


# -- routes and the connection's loop ------------------------------------------------------
Handler = Callable[[Request, Responder], None]


class Router:
    """``/containers/{id}/json``-style routes: ``add("GET", pattern, handler)``."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, list[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self.routes.append((method, pattern.strip("/").split("/"), handler))

    def find(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        parts = path.strip("/").split("/")
        allowed = False
        for want, pattern, handler in self.routes:
            params = _match(pattern, parts)
            if params is None:
                continue
            if want == method or (want == "GET" and method == "HEAD"):
                return handler, params
            allowed = True
        if allowed:
            raise ApiError(405, f"method {method} is not allowed on {path}")
        raise ApiError(404, "page not found")


def _match(pattern: list[str], parts: list[str]) -> dict[str, str] | None:
    """{name: value} when ``parts`` fits ``pattern``; a last ``{name*}`` takes the rest
    (an image name has slashes: /images/localhost:5000/app/json)."""
    params: dict[str, str] = {}
    for i, want in enumerate(pattern):
        if want.startswith("{") and want.endswith("*}"):
            rest = parts[i:len(parts) - (len(pattern) - i - 1)]
            tail = pattern[i + 1:]
            if not rest or parts[len(parts) - len(tail):] != tail:
                return None
            params[want[1:-2]] = "/".join(rest)
            return params
        if i >= len(parts):
            return None
        if want.startswith("{") and want.endswith("}"):
            if not parts[i]:
                return None
            params[want[1:-1]] = parts[i]
        elif want != parts[i]:
            return None
    return params if len(parts) == len(pattern) else None


def serve_connection(sock: socket.socket, router: Router, headers: dict[str, str],
                     check_version: Callable[[str], None], log: Callable[[str], None]) -> None:  # fmt: skip
    """Answer requests on ``sock`` until the client closes it or a stream takes it over.
    A handler's ApiError becomes Docker's error answer; anything else is a 500 and a
    line in the log, and the connection goes on."""
    rfile = sock.makefile("rb", buffering=CHUNK)
    try:
        while True:
            answer = Responder(sock, headers)
            try:
                request = read_request(rfile)
            except (Closed, ConnectionError):
                return
            except ApiError as err:  # malformed: answer, then close (we lost the framing)
                answer.error(err.status, err.message)
                return
            log(f"{request.method} {request.path} {request.query or ''}".rstrip())
            request.rfile = rfile  # a hijacked stream's stdin (with what is buffered already)
            try:
                check_version(request.version)
                handler, request.params = router.find(request.method, request.path)
                handler(request, answer)
            except ApiError as err:
                if not answer.started:
                    answer.error(err.status, err.message)
            except (BrokenPipeError, ConnectionResetError):
                return
            except Exception as err:  # noqa: BLE001 - one bad request must not end the daemon
                log(f"500 on {request.method} {request.path}:\n{traceback.format_exc()}")
                if not answer.started:
                    answer.error(500, f"{type(err).__name__}: {err}")
                else:
                    return
            if not answer.keep_alive or request.headers.get("connection", "").lower() == "close":
                return
            if request.body is not None:
                request.body.close()
    finally:
        rfile.close()
        # The end, for every process that holds the socket: a container's shim, forked by
        # the create that came on it, keeps a copy open as long as the container lives,
        # and a client reading up to the end (`Connection: close`) would wait for it.
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client was gone first
            pass
