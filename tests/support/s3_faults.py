"""A fault-injecting HTTP reverse proxy in front of moto_server: S3 writes answered with errors or left hanging.

Reads (GET, HEAD, listings) always pass through; writes (PUT and POST: PutObject, the multipart calls) fail as a
test says, for the next N of them or until healed. Bodies are streamed both ways; every connection to the client
closes after one response, so no keep-alive state can leak from one answer into the next. With ``latency_seconds``
every answer is held back that long after the upstream has given it, as S3's own request latency, and with
``keep_alive`` a forwarded answer of known length leaves the connection open for the client's next request, as S3
does (the benchmark's S3 mode: a new connection per request would count against the daemon).
"""

from __future__ import annotations

import http.client
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_COPY_BYTES = 64 * 1024
# RFC 9110 7.6.1: hop-by-hop headers belong to one connection and are not forwarded. Expect is answered here.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect", "proxy-authorization"}
)
_WRITES = frozenset({"PUT", "POST"})


@dataclass(frozen=True)
class Fault:
    """An S3 error answer (status and XML error code), or a hang when ``status`` is 0."""

    code: str
    status: int = 0
    message: str = ""


# Codes and messages as S3 sends them (Amazon S3 API Reference, "Error responses").
SLOW_DOWN = Fault("SlowDown", 503, "Please reduce your request rate.")
INTERNAL_ERROR = Fault("InternalError", 500, "We encountered an internal error. Please try again.")
ACCESS_DENIED = Fault("AccessDenied", 403, "Access Denied")
HANG = Fault("Hang")
# The write reaches S3 and is stored, but its answer never comes back: the client times out on an object that exists.
ANSWER_LOST = Fault("AnswerLost")


def error_body(fault: Fault, resource: str) -> bytes:
    request_id = uuid.uuid4().hex[:16].upper()
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{fault.code}</Code><Message>{fault.message}</Message><Resource>{resource}</Resource>"
        f"<RequestId>{request_id}</RequestId><HostId>fault-proxy</HostId></Error>"
    ).encode()


@dataclass
class _Rule:
    fault: Fault
    remaining: int | None  # None: until healed
    key_prefix: str
    passing: int = 0  # matching writes still let through before the fault starts


class FaultProxy:
    """Forwards to ``upstream`` (an http:// endpoint) until told to fail; see :meth:`fail` and :meth:`heal`."""

    def __init__(self, upstream: str, latency_seconds: float = 0.0, keep_alive: bool = False) -> None:
        parts = urlsplit(upstream)
        self.latency_seconds = latency_seconds
        self.keep_alive = keep_alive
        assert parts.scheme == "http" and parts.hostname and parts.port, upstream
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.faulted: list[str] = []  # "<method> <path> <code>" of every request answered with a fault
        self.forwarded: list[str] = []  # "<method> <path> <status>" of every request S3 itself answered
        self._lock = threading.Lock()
        self._rule: _Rule | None = None
        self._stopped = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def fail(self, fault: Fault, times: int | None = None, key_prefix: str = "", after: int = 0) -> None:
        """Answer the next ``times`` writes (all when None) to keys starting with ``key_prefix`` with ``fault``,
        once ``after`` of them have passed through."""
        with self._lock:
            self._rule = _Rule(fault, times, key_prefix, after)

    def heal(self) -> None:
        with self._lock:
            self._rule = None

    def stop(self) -> None:
        self._stopped.set()  # releases hanging requests
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def fault_for(self, method: str, path: str) -> Fault | None:
        """The fault this request gets, counting it against the rule's budget."""
        if method not in _WRITES:
            return None
        key = unquote(urlsplit(path).path).lstrip("/").partition("/")[2]  # path-style: /<bucket>/<key>
        with self._lock:
            rule = self._rule
            if rule is None or not key.startswith(rule.key_prefix):
                return None
            if rule.passing > 0:
                rule.passing -= 1
                return None
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._rule = None
            self.faulted.append(f"{method} {path} {rule.fault.code}")
            return rule.fault

    def hang(self) -> None:
        self._stopped.wait()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: FaultProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def handle_expect_100(self) -> bool:
        return True  # decided per request below: "100 Continue" only when the body is wanted

    def log_message(self, format: str, *args: object) -> None:
        return  # the test's own assertions say what matters; per-request lines would bury them

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        self.close_connection = True
        proxy = self.server.proxy
        fault = proxy.fault_for(self.command, self.path)
        expects_continue = self.headers.get("Expect", "").lower() == "100-continue"
        if fault is HANG:
            proxy.hang()
            return
        if fault is ANSWER_LOST:
            self._forward(answer=False)
            proxy.hang()
            return
        if fault is not None:
            if not expects_continue:
                # Read the body first: closing on unread bytes resets the connection and the client would see
                # a transport error instead of the S3 error.
                self._copy_body(lambda _: None)
            self._answer_error(fault)
            return
        if expects_continue:
            self.send_response_only(100)
            self.end_headers()
        self._forward()

    def _answer_error(self, fault: Fault) -> None:
        body = error_body(fault, urlsplit(self.path).path)
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, answer: bool = True) -> None:
        proxy = self.server.proxy
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)  # Host too: it is part of the SigV4 signature
            upstream.endheaders()
            self._copy_body(upstream.send)
            response = upstream.getresponse()
            proxy.forwarded.append(f"{self.command} {self.path} {response.status}")
            if not answer:
                response.read()
                return
            if proxy.latency_seconds:
                time.sleep(proxy.latency_seconds)
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "transfer-encoding":
                    self.send_header(name, value)
            if proxy.keep_alive and response.getheader("Content-Length") is not None:
                self.close_connection = False
            else:
                # Without a Content-Length the body ends when this connection closes (RFC 9112 6.3).
                self.send_header("Connection", "close")
            self.end_headers()
            while chunk := response.read(_COPY_BYTES):
                self.wfile.write(chunk)
        finally:
            upstream.close()

    def _copy_body(self, write: Callable[[bytes], object]) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            for piece in self._chunked_framing():
                write(piece)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, _COPY_BYTES))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            write(chunk)
            remaining -= len(chunk)

    def _chunked_framing(self) -> Iterator[bytes]:
        """The chunked body exactly as framed on the wire (RFC 9112 7.1), up to and including its trailers."""
        while True:
            size_line = self.rfile.readline(1024)
            yield size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            remaining = size + 2  # the chunk and its CRLF
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, _COPY_BYTES))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                yield chunk
                remaining -= len(chunk)
        while True:
            trailer = self.rfile.readline(8192)
            yield trailer
            if trailer in (b"\r\n", b"\n", b""):
                return


@contextmanager
def fault_proxy(upstream: str, latency_seconds: float = 0.0, keep_alive: bool = False) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, latency_seconds, keep_alive)
    try:
        yield proxy
    finally:
        proxy.stop()
