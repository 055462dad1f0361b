"""Test helpers for the agent: tiny ONNX models, Ed25519 signing, a scripted HTTP server, a cutting proxy.

Nothing here imports Django: the agent's unit tests run without settings.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


def linear_onnx(*, features: int = 64, classes: int = 10, seed: int = 0, hidden: int = 0) -> bytes:
    """A small classifier as ONNX bytes: MatMul + Add, with a ReLU hidden layer when ``hidden``.

    ``classes`` sets the output width (a wrong one fails the agent's health check);
    ``hidden`` makes the file larger (512 gives about 150 KB) for download tests.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    width, source = features, "input"
    if hidden:
        w1 = rng.normal(size=(features, hidden)).astype(np.float32) * 0.1
        inits += [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
        ]
        nodes += [
            helper.make_node("MatMul", ["input", "w1"], ["h1"]),
            helper.make_node("Add", ["h1", "b1"], ["a1"]),
            helper.make_node("Relu", ["a1"], ["r1"]),
        ]
        width, source = hidden, "r1"
    w = rng.normal(size=(width, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    inits += [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    nodes += [
        helper.make_node("MatMul", [source, "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@dataclass
class Signer:
    """An Ed25519 key pair standing in for the server's artifact-signing key."""

    seed: bytes = b"\x01" * 32

    def public_b64(self) -> str:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.from_private_bytes(self.seed)
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    def public_raw(self) -> bytes:
        return base64.b64decode(self.public_b64())

    def sign(self, data: bytes) -> tuple[str, str]:
        """(sha256 hex, base64 signature over the raw digest)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        digest = hashlib.sha256(data).digest()
        signature = Ed25519PrivateKey.from_private_bytes(self.seed).sign(digest)
        return digest.hex(), base64.b64encode(signature).decode()

    def ref(
        self,
        data: bytes,
        *,
        version_id: int,
        family: str = "digits",
        number: int | None = None,
        kind: str = "onnx",
        expires_at: int | None = None,
        rollback_for: tuple[int, str] | None = None,
    ) -> dict[str, Any]:
        """An ArtifactRef for ``data`` as the server serves it: a statement signed with this key.

        ``number`` defaults to ``version_id`` (the registry's order of the family's versions).
        """
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from devices_agent.wire import artifact_statement, statement_bytes

        sha, digest_signature = self.sign(data)
        statement = artifact_statement(
            family=family,
            family_id=1,
            version_id=version_id,
            number=version_id if number is None else number,
            variant="fp32",
            kind=kind,
            sha256=sha,
            size=len(data),
            expires_at=expires_at,
            rollback_for=rollback_for,
        )
        signature = Ed25519PrivateKey.from_private_bytes(self.seed).sign(statement_bytes(statement))
        return {
            "kind": kind,
            "url": f"/api/agent/v1/artifacts/{sha}",
            "sha256": sha,
            "size": len(data),
            "signature": digest_signature,
            "statement": statement,
            "statement_signature": base64.b64encode(signature).decode(),
        }


Route = Callable[["Handler", bytes], None]


class Handler(BaseHTTPRequestHandler):
    server: ScriptedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _dispatch(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        route = self.server.routes.get((self.command, self.path))
        if route is None:
            for (method, pattern), fn in self.server.routes.items():
                if method == self.command and re.fullmatch(pattern, self.path):
                    route = fn
                    break
        if route is None:
            self.send_json(404, {"error": {"code": "not_found", "message": self.path, "details": None}})
            return
        route(self, body)

    do_GET = _dispatch
    do_POST = _dispatch

    def send_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def serve_bytes(
        self, data: bytes, *, etag: str, cut_after: int | None = None, honour_range: bool = True
    ) -> None:
        """Serve ``data`` with Range/If-Range; ``cut_after`` closes the socket after that many body bytes."""
        start = 0
        header = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        match = re.fullmatch(r"bytes=(\d+)-", header)
        if honour_range and match and (if_range is None or if_range == etag):
            start = int(match.group(1))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if cut_after is not None and cut_after < len(body):
            self.wfile.write(body[:cut_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class ScriptedServer(ThreadingHTTPServer):
    """A loopback HTTP server whose routes are Python callables (a stand-in device API)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def posted(self, path: str) -> list[Any]:
        return [json.loads(body) for method, p, _, body in self.requests if method == "POST" and p == path]


@dataclass
class CuttingProxy:
    """A loopback TCP proxy that forwards to ``target`` and cuts responses after ``cut_after`` bytes.

    Each accepted connection forwards the client's bytes upstream and the server's bytes
    back; while ``cut_after`` is set, the server-to-client direction is closed once that
    many bytes went through (headers included), as a dropped mobile link would, for the
    first ``max_cuts`` cuts. Set ``cut_after = None`` to let everything through.
    """

    target_host: str
    target_port: int
    cut_after: int | None = None
    max_cuts: int = 1
    cuts: int = 0
    upstream_bytes: list[bytes] = field(default_factory=list)  # what clients sent, for assertions
    _sock: socket.socket = field(init=False)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((self.target_host, self.target_port), timeout=30)
        except OSError:
            client.close()
            return
        limit = self.cut_after if self.cuts < self.max_cuts else None

        def pump_up() -> None:
            try:
                while chunk := client.recv(65536):
                    self.upstream_bytes.append(chunk)
                    upstream.sendall(chunk)
            except OSError:
                pass
            finally:
                try:
                    upstream.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        threading.Thread(target=pump_up, daemon=True).start()
        sent = 0
        try:
            while chunk := upstream.recv(65536):
                if limit is not None and sent + len(chunk) >= limit:
                    client.sendall(chunk[: max(0, limit - sent)])
                    self.cuts += 1
                    break
                client.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


Rewrite = Callable[[dict[str, Any]], dict[str, Any]]


class _RewritingHandler(BaseHTTPRequestHandler):
    server: RewritingProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        skip = {"host", "content-length", "connection", "accept-encoding"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        upstream = self.server.http.request(self.command, self.path, headers=headers, content=body)
        data = upstream.content
        rewrite = self.server.rewrite
        if self.path.endswith("/heartbeat") and upstream.status_code == 200:
            answer = json.loads(data)
            self.server.answers.append(answer)
            if rewrite is not None:
                answer = rewrite(answer)
                data = json.dumps(answer).encode()
        self.send_response(upstream.status_code)
        drop = {"content-length", "transfer-encoding", "connection", "content-encoding"}
        for key, value in upstream.headers.multi_items():
            if key.lower() not in drop:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _forward
    do_POST = _forward


class RewritingProxy(ThreadingHTTPServer):
    """A loopback HTTP proxy in front of a real server that may rewrite heartbeat answers.

    It stands where an attacker on the path (or a compromised mirror) would: every
    heartbeat answer is recorded in ``answers``; while ``rewrite`` is set, the JSON the
    agent receives is ``rewrite(answer)``. Everything else passes through unchanged.
    """

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        import httpx

        super().__init__(("127.0.0.1", 0), _RewritingHandler)
        self.http = httpx.Client(base_url=upstream, timeout=30.0)
        self.rewrite: Rewrite | None = None
        self.answers: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.http.close()
