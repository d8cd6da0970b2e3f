"""Helpers for the registry and archive tests: images made here, a cutting proxy, and a
token server for docker-registry's Bearer auth. Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

from labkit.engine import archive, content


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def oci_layout(root: Path, ref_name: str, layer_tars: list[bytes], config_extra: dict | None = None,
               compress: bool = True) -> str:  # fmt: skip
    """Write an OCI image layout with one image of ``layer_tars``; its manifest digest."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> dict:
        (blobs / sha(data)[7:]).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    layers = []
    for tar in layer_tars:
        blob = gzip.compress(tar, mtime=0) if compress else tar
        layers.append({"mediaType": content.LAYER_GZIP if compress else content.LAYER_TAR, **put(blob)})
    config = {"architecture": "amd64" if os.uname().machine == "x86_64" else "arm64", "os": "linux",
              "config": {"Env": ["PATH=/bin", "GREETING=hi"], "Cmd": ["sh"]},
              "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layer_tars]}, **(config_extra or {})}  # fmt: skip
    cfg = {"mediaType": content.OCI_CONFIG, **put(json.dumps(config).encode())}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": content.OCI_MANIFEST, "config": cfg,
                           "layers": layers}).encode()  # fmt: skip
    desc = {"mediaType": content.OCI_MANIFEST, **put(manifest), "annotations": {archive.REF_ANNOTATION: ref_name}}
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return desc["digest"]


def random_layer(n_bytes: int, name: str = "data") -> bytes:
    """A tar holding one file of random bytes (incompressible, like a real binary)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = n_bytes
        tar.addfile(info, io.BytesIO(os.urandom(n_bytes)))
    return buf.getvalue()


# --- a proxy that cuts blob downloads ------------------------------------------


class CuttingProxy:
    """A one-request-per-connection HTTP proxy to ``upstream`` (host, port) that cuts
    the first ``cuts`` blob responses after ``after`` bytes. ``ranges`` records the
    Range headers it saw."""

    def __init__(self, upstream: tuple[str, int], cuts: int, after: int) -> None:
        self.upstream, self.cuts, self.after = upstream, cuts, after
        self.ranges: list[str] = []
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.upstream, timeout=10) as up:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n")
            cut = b"/blobs/sha256:" in lines[0] and lines[0].startswith(b"GET") and self.cuts > 0
            for line in lines:
                if line.lower().startswith(b"range:"):
                    self.ranges.append(line.split(b":", 1)[1].strip().decode())
            head = b"\r\n".join(x for x in lines if not x.lower().startswith(b"connection:"))
            head = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            up.sendall(head)  # (requests with bodies are not proxied: pulls only)
            sent = 0
            while True:
                data = up.recv(65536)
                if not data:
                    return
                if cut and sent + len(data) > self.after and self._take():
                    conn.sendall(data[: self.after - sent])
                    conn.shutdown(socket.SHUT_RDWR)
                    return
                conn.sendall(data)
                sent += len(data)

    def _take(self) -> bool:
        with self.lock:
            if self.cuts <= 0:
                return False
            self.cuts -= 1
            return True

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


# --- a token server for docker-registry's auth: token: ------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def key_id(cert: Path) -> str:
    """libtrust's key ID, which distribution matches the JWT's "kid" against: base32 of
    the first 240 bits of sha256(DER public key), in groups of four joined by ':'."""
    pem = subprocess.run(["openssl", "x509", "-in", cert, "-pubkey", "-noout"], capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem, capture_output=True,
                         check=True).stdout  # fmt: skip
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))


@contextlib.contextmanager
def token_server(workdir: Path, service: str, issuer: str):
    """An HTTP token realm on 127.0.0.1 signing RS256 JWTs with a key made by openssl.
    Yields (auth config for local_registry, list of scopes it was asked for)."""
    key, cert = workdir / "token.key", workdir / "token.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=labkit-test-token"], capture_output=True, check=True, timeout=60)  # fmt: skip
    kid, asked = key_id(cert), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            scopes = query.get("scope", [])
            asked.extend(scopes)
            access = []
            for s in scopes:
                kind, name, actions = s.split(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
            now = int(time.time())
            claims = {"iss": issuer, "sub": "student", "aud": query.get("service", [""])[0], "exp": now + 300,
                      "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}  # fmt: skip
            head = _b64(json.dumps({"typ": "JWT", "alg": "RS256", "kid": kid}).encode())
            signing = f"{head}.{_b64(json.dumps(claims).encode())}".encode()
            sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing,
                                 capture_output=True, check=True, timeout=30).stdout  # fmt: skip
            body = json.dumps({"token": f"{signing.decode()}.{_b64(sig)}"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    realm = f"http://127.0.0.1:{server.server_address[1]}/token"
    auth = {"token": {"realm": realm, "service": service, "issuer": issuer, "rootcertbundle": str(cert)}}
    try:
        yield auth, asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
