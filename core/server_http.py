"""The HTTP side of ``robo-run serve`` (robovla.server): connections, routing, answers.

A thread per connection, at most ``max_connections`` of them. A connection is *idle* while
it waits for a request (or reads its headers) and *busy* while an endpoint answers one. A
new connection past the cap closes the longest-idle one (as keep-alive servers do; the
client reconnects), so idle sockets cannot lock anyone out; only when every connection is
busy is it answered 503 at once and closed. A connection that sends nothing for
``read_timeout`` seconds is closed, and a request's body must arrive within that time
(408 otherwise). A client that leaves mid-answer ends its connection
quietly. While the server drains (:meth:`HTTPServer.drain`) requests on open connections
get 503 and the busy ones finish. :func:`fit_descriptors` raises the process's limit on open
files to fit the cap; :func:`token_from` reads the bearer token a server requires.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from robovla.errors import RobovlaError
from robovla.wire import NPZ

JSON_BODY = 1 << 16  # bytes: the most a JSON request body may have ({"seed": S} needs a few)
TOKEN_ENV = "ROBOVLA_SERVE_TOKEN"
LINGER = 2.0  # seconds a refused connection is read from (and discarded) before it closes

# path pattern (ID: any one path segment, a session) -> HTTP method -> the _Handler method answering it
ROUTES: dict[tuple[str, ...], dict[str, str]] = {
    ("health",): {"GET": "_health"},
    ("metadata",): {"GET": "_metadata"},
    ("sessions",): {"POST": "_open_session"},
    ("sessions", "ID"): {"DELETE": "_end_session"},
    ("sessions", "ID", "reset"): {"POST": "_reset_session"},
    ("sessions", "ID", "act"): {"POST": "_act"},
}
ENDPOINTS = ", ".join(f"{method} /{'/'.join(pattern)}" for pattern, methods in ROUTES.items() for method in methods)


class RequestError(Exception):
    """A request the server refuses: the HTTP status and what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Connection:
    idle: bool = True
    since: float = field(default_factory=time.monotonic)  # when it last became idle


class HTTPServer(ThreadingHTTPServer):
    """Connections of a :class:`robovla.server.PolicyServer` (module docstring), each served by a _Handler."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # connections the system holds before they are accepted (socketserver's default: 5)

    def __init__(self, address: tuple[str, int], policy_server: Any, max_connections: int, read_timeout: float):
        self.policy_server, self.max_connections, self.read_timeout = policy_server, max_connections, read_timeout
        self.connections: dict[socket.socket, _Connection] = {}
        self.changed = threading.Condition()  # guards connections and draining; notified on every change
        self.draining = False
        self.refused = 0  # connections answered 503 because every one was busy
        self.lingering: deque[tuple[socket.socket, float]] = deque()  # refused sockets, read until they close
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.changed:
            room = len(self.connections) < self.max_connections or self._close_longest_idle()
            if room:
                self.connections[request] = _Connection()
                self.changed.notify_all()
        if not room:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread for it (e.g. the system's limit): it closes, uncounted
            self.shutdown_request(request)
            raise

    def _close_longest_idle(self) -> bool:
        idle = [(c.since, s) for s, c in self.connections.items() if c.idle]
        if not idle:
            return False
        self._close(min(idle, key=lambda pair: pair[0])[1])
        return True

    def _close(self, sock: socket.socket) -> None:
        """Stop counting ``sock`` and shut it: its thread reads the end of the stream and exits."""
        del self.connections[sock]
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed by the client
            pass

    def _refuse(self, request: socket.socket) -> None:
        """503 at once, without a thread; the request is read and dropped until the client closes
        (closing over unread bytes would reset the connection before the client reads the answer)."""
        self.refused += 1
        body = json.dumps({"error": f"all {self.max_connections} connections are busy (--max-connections); "
                                    "retry shortly", "status": 503}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            request.send(head + body)
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        if len(self.lingering) >= self.max_connections:
            self.lingering.popleft()[0].close()
        self.lingering.append((request, time.monotonic()))

    def service_actions(self) -> None:
        """Between polls of the listening socket: refused sockets read out and closed, expired sessions freed."""
        for _ in range(len(self.lingering)):
            sock, since = self.lingering.popleft()
            try:
                done = sock.recv(1 << 16) == b""
            except BlockingIOError:
                done = False
            except OSError:
                done = True
            if done or time.monotonic() - since > LINGER:
                sock.close()
            else:
                self.lingering.append((sock, since))
        self.policy_server.expire()

    def shutdown_request(self, request: socket.socket) -> None:
        with self.changed:
            self.connections.pop(request, None)
            self.changed.notify_all()
        super().shutdown_request(request)

    def begin(self, sock: socket.socket) -> bool:
        """A request on ``sock`` starts (busy); False if the connection was closed meanwhile."""
        with self.changed:
            if sock not in self.connections:
                return False
            self.connections[sock].idle = False
            self.changed.notify_all()
            return True

    def end(self, sock: socket.socket) -> None:
        with self.changed:
            if sock in self.connections:
                self.connections[sock] = _Connection()
            self.changed.notify_all()

    def busy(self) -> int:
        with self.changed:
            return sum(not c.idle for c in self.connections.values())

    def drain(self, timeout: float) -> bool:
        """Refuse new requests (503), let the busy ones finish (up to ``timeout`` s), close every
        connection; True if none was still busy."""
        with self.changed:
            self.draining = True
            finished = self.changed.wait_for(lambda: all(c.idle for c in self.connections.values()), timeout)
            for sock in list(self.connections):
                self._close(sock)
        while self.lingering:
            self.lingering.popleft()[0].close()
        return finished

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, not a traceback, for a connection that failed outside any endpoint."""
        exc = sys.exc_info()[1]
        print(f"robo-run serve: connection from {client_address[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)


class _Handler(BaseHTTPRequestHandler):
    """One client connection: each request goes to the method ``ROUTES`` names, which answers
    it from ``self.server.policy_server``; every error is answered as JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    server_version = "robovla-serve"
    server: HTTPServer

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # applied to the socket by StreamRequestHandler.setup
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError):  # the client left or stalled: nobody to answer
            pass

    def log_message(self, format: str, *args: Any) -> None:  # no line per request; a 500 prints one (_route)
        pass

    def do_GET(self) -> None:
        self._route()

    do_HEAD = do_POST = do_DELETE = do_GET  # HEAD: GET's answer without its body (_send)

    def _route(self) -> None:
        if not self.server.begin(self.connection):  # closed for a newer connection while the request came
            self.close_connection = True
            return
        try:
            self._answer()
        except (ConnectionError, TimeoutError):  # the client left or stalled mid-request
            self.close_connection = True
        finally:
            self.server.end(self.connection)

    def _answer(self) -> None:
        try:
            if self.server.draining:
                raise RequestError(503, "the server is shutting down")
            self._framing()
            path = self.path.split("?")[0].rstrip("/")
            answer, sessions = self._resolve(path)
            self._authorize(path)
            answer(self._body(answer == self._act) if self.command == "POST" else b"", *sessions)
        except RequestError as exc:
            self._json(exc.status, {"error": str(exc), "status": exc.status})
        except (ConnectionError, TimeoutError):  # the connection failed, not the request: _route closes it
            raise
        except Exception as exc:  # noqa: BLE001 - a bug or a model failure: 500, and keep serving
            print(f"robo-run serve: {self.command} {self.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}", "status": 500})

    def _resolve(self, path: str) -> tuple[Callable[..., None], list[str]]:
        """The method answering this request and the session IDs in its path; 404 or 405 otherwise."""
        parts = [p for p in path.split("/") if p]
        method = "GET" if self.command == "HEAD" else self.command
        for pattern, methods in ROUTES.items():
            if len(pattern) != len(parts) or not all(p in ("ID", q) for p, q in zip(pattern, parts)):
                continue
            if method not in methods:
                self.close_connection = self.command == "POST"  # its body is not read
                raise RequestError(405, f"{path} takes {', '.join(methods)}, not {self.command}")
            return getattr(self, methods[method]), [q for p, q in zip(pattern, parts) if p == "ID"]
        self.close_connection = self.command == "POST"
        raise RequestError(404, f"no endpoint {path!r}; endpoints: {ENDPOINTS}")

    def _authorize(self, path: str) -> None:
        """With a token, every endpoint but /health needs ``Authorization: Bearer TOKEN``."""
        token = self.server.policy_server.token
        if token is None or path == "/health":
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            self.close_connection = self.command == "POST"  # its body is not read
            raise RequestError(401, f"{'a wrong' if given else 'no'} token: this server needs the header "
                                    "'Authorization: Bearer TOKEN' (PolicyClient(url, token=...) or "
                                    "ROBOVLA_SERVE_TOKEN)")

    def _framing(self) -> None:
        """400, and the connection closed, for a request whose body a proxy in front could delimit
        otherwise than this server (request smuggling): any Transfer-Encoding, more than one
        Content-Length, or one that is not plain ASCII digits (``+2``, ``1_0``, `` 2``)."""
        lengths = self.headers.get_all("Content-Length") or []
        problem = ("Transfer-Encoding is not accepted; send the body with one Content-Length header"
                   if "Transfer-Encoding" in self.headers else
                   f"{len(lengths)} Content-Length headers ({', '.join(map(repr, lengths))[:200]}); send one"
                   if len(lengths) > 1 else
                   f"Content-Length {lengths[0][:100]!r} is not a byte count (ASCII digits only)"
                   if lengths and not re.fullmatch(r"[0-9]+", lengths[0]) else None)
        if problem is not None:
            self.close_connection = True
            raise RequestError(400, problem)
        if self.command != "POST" and lengths and lengths[0].strip("0"):
            self.close_connection = True  # its body is not read: it must not be taken for the next request

    def _body(self, act: bool) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "send a Content-Length header with the body")
        limit = self.server.policy_server.max_body if act else JSON_BODY
        n = int(length) if len(length) < 19 else limit + 1  # one, of ASCII digits (_framing)
        if n > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            why = f" (images up to {self.server.policy_server.max_image_side} px a side)" if act else ""
            raise RequestError(413, f"the body has {length[:30]} bytes; at most {limit}{why}")
        return self._read(n)

    def _read(self, n: int) -> bytes:
        """``n`` bytes of body, all within ``read_timeout`` seconds: a client trickling a byte
        now and then would otherwise hold a busy connection for as long as it likes (408)."""
        deadline, parts, got = time.monotonic() + self.server.read_timeout, [], 0
        try:
            while got < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(left)
                part = self.rfile.read1(min(n - got, 1 << 20))
                if not part:
                    raise ConnectionResetError("the client closed the connection mid-body")
                parts.append(part)
                got += len(part)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(408, f"the body came too slowly: {got} of {n} bytes in "
                                    f"{self.server.read_timeout:g} s (--read-timeout)") from None
        finally:
            self.connection.settimeout(self.server.read_timeout)
        return b"".join(parts)

    # ------------------------------------------------------------------- the endpoints

    def _health(self, body: bytes) -> None:
        self._json(200, self.server.policy_server.health())

    def _metadata(self, body: bytes) -> None:
        self._json(200, self.server.policy_server.metadata())

    def _open_session(self, body: bytes) -> None:
        self._json(201, {"session": self.server.policy_server.new_session(seed_from(body))})

    def _end_session(self, body: bytes, session: str) -> None:
        self.server.policy_server.end(session)
        self._json(200, {"session": session, "ended": True})

    def _reset_session(self, body: bytes, session: str) -> None:
        self.server.policy_server.reset(session, seed_from(body))
        self._json(200, {"session": session, "reset": True})

    def _act(self, body: bytes, session: str) -> None:
        kind = self.headers.get("Content-Type", "").split(";")[0].strip()
        if kind != NPZ:
            raise RequestError(415, f"an act request is {NPZ}, got content type {kind or 'none'!r}")
        self._send(200, self.server.policy_server.act_answer(session, body), NPZ)

    # ----------------------------------------------------------------------- answers

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a method no endpoint takes, a malformed request line,
        headers too large) in the JSON shape of every other error; the connection then closes."""
        self.close_connection = True
        if code == HTTPStatus.NOT_IMPLEMENTED:
            message = f"no endpoint takes method {self.command}; endpoints: {ENDPOINTS}"
        self._json(code, {"error": message or HTTPStatus(code).phrase, "status": code})

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: int, data: bytes, kind: str) -> None:
        if self.server.draining:
            self.close_connection = True
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="robo-run serve"')
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(data)


def seed_from(body: bytes) -> int:
    """A session request's body (empty, or JSON ``{"seed": S}``) -> the seed (0 unless given)."""
    if not body.strip():
        return 0
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep, an integer too long
        raise RequestError(400, 'the body must be JSON such as {"seed": 0}, or empty') from None
    if not isinstance(data, dict):
        raise RequestError(400, f'the body takes only {{"seed": INT}}, got a JSON {type(data).__name__}')
    if set(data) - {"seed"}:
        raise RequestError(400, f'the body takes only {{"seed": INT}}, got keys {sorted(data)[:10]}')
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        shown = repr(seed)[:100] if isinstance(seed, (int, float, str)) else f"a JSON {type(seed).__name__}"
        raise RequestError(400, f"seed must be an integer in [0, 2^63), got {shown}")
    return seed


def fit_descriptors(max_connections: int) -> None:
    """Raise this process's limit on open files so that ``max_connections`` connections (and as
    many refused ones closing) fit beside the files already open; RobovlaError if they cannot."""
    try:
        import resource
    except ImportError:  # not a POSIX system: no such limit to fit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 64
    need = in_use + 2 * max_connections + 16  # 16 spare: the listening socket, files the policy opens
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard == resource.RLIM_INFINITY or need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    most = (hard - in_use - 16) // 2
    fix = f"lower --max-connections to {most}" if most >= 1 else "raise the limit"
    raise RobovlaError(f"--max-connections {max_connections} needs about {need} open files, but this process may "
                       f"open {hard} (ulimit -n) and has {in_use} open; {fix} (ulimit -n {need})")


def token_from(flag: str | None) -> str | None:
    """The bearer token: ``--token``, else the environment variable, else None (no token)."""
    token, where = (flag, "--token") if flag is not None else (os.environ.get(TOKEN_ENV) or None, TOKEN_ENV)
    if token is not None and not re.fullmatch(r"[!-~]+", token):
        raise RobovlaError(f"{where}: a token is printable ASCII without spaces (e.g. python -c 'import secrets; "
                           f"print(secrets.token_urlsafe())'), got {len(token)} characters that are not")
    return token
