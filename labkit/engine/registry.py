"""A client for the OCI distribution API (Docker Registry HTTP API v2), on http.client.

Everything a registry does is a handful of HTTP calls (distribution-spec ``spec.md``)::

    GET  /v2/<name>/manifests/<tag or digest>    Accept: the manifest types we read
    GET  /v2/<name>/blobs/<digest>               a config or a layer (Range: to resume)
    HEAD /v2/<name>/blobs/<digest>               is it there already?
    POST /v2/<name>/blobs/uploads/               start an upload -> Location: ...
    PUT  <Location>&digest=<digest>              the blob, in one request
    PUT  /v2/<name>/manifests/<tag>              the manifest, last: it makes the tag

Authentication is a second round trip, the "token" flow (distribution's
``docs/spec/auth/token.md``): the registry answers 401 with
``WWW-Authenticate: Bearer realm="https://auth/token",service="reg",scope="repository:x:pull"``;
the client asks the realm for a token for that service and scope, and sends the
request again with ``Authorization: Bearer <token>``. Tokens are kept per scope.

Each thread has its own connection (kept alive), so layers download in parallel.
A registry on this machine (localhost, 127.x) speaks plain HTTP, as Docker allows by
default; any other uses HTTPS, unless named in ``LABKIT_INSECURE_REGISTRIES``
(comma-separated, like dockerd's ``--insecure-registry``).

Layer: engine. Used by pull and push.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import threading
import urllib.parse
from dataclasses import dataclass

from labkit.engine.reference import DOCKER_HUB, is_loopback
from labkit.errors import RegistryError

TIMEOUT = 30.0  # seconds a connection may stay silent
MAX_REDIRECTS = 5
MAX_MANIFEST = 4 << 20  # bytes; distribution refuses larger manifests too
_PARAM = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Challenge:
    """What a 401 asks for: ``WWW-Authenticate: Bearer realm=..,service=..,scope=..``.

    >>> parse_challenge('Bearer realm="http://a/token",service="reg",scope="repository:x:pull"')
    Challenge(scheme='bearer', realm='http://a/token', service='reg', scope='repository:x:pull')
    """

    scheme: str
    realm: str = ""
    service: str = ""
    scope: str = ""


def parse_challenge(header: str) -> Challenge:
    scheme, _, params = header.strip().partition(" ")
    found = dict(_PARAM.findall(params))
    return Challenge(scheme.lower(), found.get("realm", ""), found.get("service", ""), found.get("scope", ""))


class Client:
    """One registry. ``request`` sends a call, following redirects and the token flow;
    ``credentials`` (user, password) go to the token realm, if given."""

    def __init__(self, domain: str, credentials: tuple[str, str] | None = None, timeout: float = TIMEOUT) -> None:
        self.domain = "registry-1.docker.io" if domain == DOCKER_HUB else domain
        insecure = {d.strip() for d in os.environ.get("LABKIT_INSECURE_REGISTRIES", "").split(",") if d.strip()}
        self.scheme = "http" if is_loopback(domain) or domain in insecure else "https"
        self.credentials = credentials
        self.timeout = timeout
        self._tokens: dict[str, str] = {}
        self._local = threading.local()

    # -- connections ----------------------------------------------------------------

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        pool = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        conn = pool.get((scheme, netloc))
        if conn is None:
            cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
            conn = pool[(scheme, netloc)] = cls(netloc, timeout=self.timeout)
        return conn

    def reset(self) -> None:
        """Drop this thread's connections (after a cut one: the next call dials again)."""
        for conn in getattr(self._local, "pool", {}).values():
            conn.close()
        self._local.pool = {}

    def close(self) -> None:
        self.reset()

    # -- one call ---------------------------------------------------------------------

    def request(self, method: str, path: str, *, scope: str, headers: dict[str, str] | None = None,
                body=None, ok: tuple[int, ...] = (200,)) -> http.client.HTTPResponse:  # fmt: skip
        """Send ``method path``; the response, unread, when its status is in ``ok``.

        ``path`` is a path on the registry or an absolute URL (an upload's Location).
        A 401 gets a token for ``scope`` and is sent once more (a file ``body`` is
        rewound). Any other status raises ``RegistryError`` with the registry's message.
        """
        for attempt in range(2):
            resp = self._send(method, path, headers or {}, body, scope)
            if resp.status != 401 or attempt == 1:
                break
            challenge = parse_challenge(resp.getheader("WWW-Authenticate", ""))
            resp.read()
            self._authenticate(challenge, scope, path)
            if hasattr(body, "seek"):
                body.seek(0)
        if resp.status not in ok:
            raise self._error(method, path, resp)
        return resp

    def _send(self, method: str, path: str, headers: dict[str, str], body, scope: str) -> http.client.HTTPResponse:
        url = urllib.parse.urlsplit(path if "://" in path else f"{self.scheme}://{self.domain}{path}")
        for _ in range(MAX_REDIRECTS + 1):
            sent = dict(headers)
            if url.netloc == self.domain and scope in self._tokens:  # never hand a token to another host
                sent["Authorization"] = self._tokens[scope]
            target = url.path + (f"?{url.query}" if url.query else "")
            resp = self._exchange(url, method, target, body, sent)
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                resp.read()
                url = urllib.parse.urlsplit(urllib.parse.urljoin(url.geturl(), resp.getheader("Location")))
                if resp.status == 303:
                    method, body = "GET", None
                continue
            return resp
        raise RegistryError(f"{method} {path}: more than {MAX_REDIRECTS} redirects from {self.domain}")

    def _exchange(self, url, method: str, target: str, body, headers: dict[str, str]) -> http.client.HTTPResponse:
        conn = self._connection(url.scheme, url.netloc)
        for attempt in range(2):
            try:
                conn.request(method, target, body=body, headers=headers)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as err:
                # a kept-alive connection the server closed meanwhile: dial once more
                conn.close()
                if hasattr(body, "seek"):
                    body.seek(0)
                if attempt == 1:
                    raise RegistryError(f"{url.netloc} closed the connection: {err}", 0, "UNREACHABLE") from None
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                raise RegistryError(f"cannot reach {url.scheme}://{url.netloc}: {err}", 0, "UNREACHABLE",
                                    hint="is the registry running, and is the name right?") from None  # fmt: skip
        raise AssertionError("unreachable")

    def _authenticate(self, challenge: Challenge, scope: str, path: str) -> None:
        """The token flow: ask the realm the 401 named for a token, keep it for ``scope``."""
        if challenge.scheme == "basic":
            if not self.credentials:
                raise RegistryError(f"{self.domain} wants a user name and password for {path}", 401,
                                    "UNAUTHORIZED")  # fmt: skip
            user, password = self.credentials
            self._tokens[scope] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            return
        if challenge.scheme != "bearer" or not challenge.realm:
            raise RegistryError(f"{self.domain} answered 401 to {path} without a Bearer realm", 401, "UNAUTHORIZED")
        query = {"service": challenge.service, "scope": challenge.scope or scope}
        realm = urllib.parse.urlsplit(challenge.realm)
        target = realm.path + "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        headers = {}
        if self.credentials:
            user, password = self.credentials
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        conn = self._connection(realm.scheme, realm.netloc)
        try:
            conn.request("GET", target, headers=headers)
            resp = conn.getresponse()
            data = resp.read(MAX_MANIFEST)
        except OSError as err:
            conn.close()
            raise RegistryError(f"token server {challenge.realm} unreachable: {err}") from None
        if resp.status != 200:
            raise RegistryError(f"token server {challenge.realm} refused scope {query['scope']!r}: "
                                f"HTTP {resp.status}", resp.status, "DENIED")  # fmt: skip
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise RegistryError(f"token server {challenge.realm} sent no token") from None
        self._tokens[scope] = f"Bearer {token}"

    def _error(self, method: str, path: str, resp: http.client.HTTPResponse) -> RegistryError:
        """The registry's own words: ``{"errors": [{"code": "MANIFEST_UNKNOWN", "message": ...}]}``."""
        body = resp.read(65536)
        code, message = "", ""
        try:
            first = json.loads(body)["errors"][0]
            code, message = first.get("code", ""), first.get("message", "")
        except (ValueError, KeyError, IndexError, TypeError):
            message = body.decode(errors="replace").strip().splitlines()[0][:200] if body.strip() else ""
        text = f"{method} {self.domain}{path if '://' not in path else ''}: HTTP {resp.status}"
        text += f" {code}" if code else ""
        text += f": {message}" if message else ""
        return RegistryError(text, resp.status, code)


def scope(repository: str, actions: str = "pull") -> str:
    """The token scope for ``repository``: 'repository:library/busybox:pull'."""
    return f"repository:{repository}:{actions}"
