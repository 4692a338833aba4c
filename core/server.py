"""``robo-run serve``: a trained policy behind HTTP, one policy state per client session.

    robo-run serve --run RUN_DIR [--checkpoint NAME] [--host 127.0.0.1] [--port 8000]
                   [--execute first|chunk:K|ensemble[:M]] [--device cpu] [--max-batch 8]

Endpoints (JSON unless said otherwise):

    GET    /health                  {"status": "ok", "sessions": n}
    GET    /metadata                cameras, image size, window, chunk, action space, execution, ...
    POST   /sessions                a new session (its own history): {"session": ID}; body {"seed": S} optional
    POST   /sessions/ID/reset       a new episode in the session (the policy forgets its history);
                                    body {"seed": S} optional
    POST   /sessions/ID/act         body: an .npz archive (application/x-npz) with ``image.CAMERA``
                                    uint8 [H, W, 3] per camera, ``robot_obs`` float [15] and
                                    ``instruction`` (a 0-d unicode array); answer: an .npz with
                                    ``action`` float64 [A], the command (gripper exactly -1 or +1)
    DELETE /sessions/ID             end the session

:mod:`robovla.wire` defines the .npz messages; it never unpickles. Every error is JSON
``{"error": ..., "status": ...}``: a 4xx code for a request the server refuses (an unknown
path or session, a method a path does not take, a malformed body, too many sessions), 501
for an HTTP method no endpoint takes, 500 when the policy fails; after each the server keeps
serving. Requests from concurrent sessions are stepped together, one batched VLM pass for up
to ``--max-batch`` of them. :class:`robovla.client.PolicyClient` speaks this protocol.
"""

from __future__ import annotations

import argparse
import json
import queue
import secrets
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np

from robovla.env import Observation
from robovla.policy import MAX_IMAGE_SIDE, ObservationError, Policy, check_observation
from robovla.wire import IMAGE_PREFIX, NPZ, WireError, decode_observation, encode_action

PROTOCOL = "robovla-serve/1"
MAX_SESSIONS = 64

# path pattern (ID: any one path segment, a session) -> HTTP method -> the _Handler method answering it
_ROUTES: dict[tuple[str, ...], dict[str, str]] = {
    ("health",): {"GET": "_health"},
    ("metadata",): {"GET": "_metadata"},
    ("sessions",): {"POST": "_open_session"},
    ("sessions", "ID"): {"DELETE": "_end_session"},
    ("sessions", "ID", "reset"): {"POST": "_reset_session"},
    ("sessions", "ID", "act"): {"POST": "_act"},
}
ENDPOINTS = ", ".join(f"{method} /{'/'.join(pattern)}" for pattern, methods in _ROUTES.items() for method in methods)


class RequestError(Exception):
    """A request the server refuses: the HTTP status and what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def observation_from(body: bytes, cameras: tuple[str, ...]) -> tuple[Observation, str]:
    """An act request's body -> (Observation, instruction), or RequestError(400) saying what is wrong."""
    try:
        images, robot_obs, instruction = decode_observation(body, cameras)
        observation = Observation(images, robot_obs)
        check_observation(observation, instruction, cameras)
    except (WireError, ObservationError) as exc:
        raise RequestError(400, str(exc)) from None
    return observation, instruction


def seed_from(body: bytes) -> int:
    """A session request's body (empty, or JSON ``{"seed": S}``) -> the seed (0 unless given)."""
    if not body.strip():
        return 0
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, 'the body must be JSON such as {"seed": 0}, or empty') from None
    if not isinstance(data, dict) or set(data) - {"seed"}:
        raise RequestError(400, f'the body takes only {{"seed": INT}}, got {str(data)[:100]}')
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise RequestError(400, f"seed must be an integer in [0, 2^63), got {seed!r}")
    return seed


@dataclass
class _Job:
    session: str
    observation: Observation
    instruction: str
    result: Future


class PolicyServer:
    """A :class:`Policy` served over HTTP (module docstring). ``port=0`` picks a free port.

    Use as a context manager (or call :meth:`start` and :meth:`stop`) to serve from a
    background thread, or :meth:`serve_forever` in the foreground.
    """

    def __init__(self, policy: Policy, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                 max_sessions: int = MAX_SESSIONS):
        if max_batch < 1 or max_sessions < 1:
            raise ValueError(f"max_batch and max_sessions must be >= 1, got {max_batch} and {max_sessions}")
        self.policy, self.max_batch, self.max_sessions = policy, max_batch, max_sessions
        # the largest act body accepted: one RGB image of the largest size per camera, plus 1 MiB
        # for robot_obs, the instruction and the archive's own headers
        self.max_body = len(policy.cameras) * MAX_IMAGE_SIDE ** 2 * 3 + (1 << 20)
        self.sessions: dict[str, int] = {}  # session -> steps taken
        self.lock = threading.Lock()  # guards the policy and the sessions
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # size of every batch stepped (tests read it)
        self.httpd = _HTTPServer((host, port), self)
        self.worker = threading.Thread(target=self._work, name="robovla-policy", daemon=True)
        self.worker.start()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> PolicyServer:
        self._thread = threading.Thread(target=self.serve_forever, name="robovla-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (call it after :meth:`start` or once :meth:`serve_forever` has returned)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.jobs.put(None)
        self.worker.join(timeout=10)

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----------------------------------------------------------------------- the model

    def _work(self) -> None:
        """Step queued act requests until :meth:`stop`, several sessions in one batch."""
        waiting: list[_Job] = []
        while True:
            job = waiting.pop(0) if waiting else self.jobs.get()
            if job is None:
                return
            batch, waiting = self._batch(job, waiting)
            self._step(batch)

    def _batch(self, first: _Job, waiting: list[_Job]) -> tuple[list[_Job], list[_Job]]:
        """(``first`` plus the waiting and queued jobs that fit, the rest): a batch has each
        session at most once and ``max_batch`` jobs at most; the rest wait in arrival order."""
        batch, later = [first], []
        for pending in [*waiting, *self._drain()]:
            if pending is None:  # stop() was called: leave its mark for the next get
                self.jobs.put(None)
                continue
            if len(batch) < self.max_batch and all(pending.session != j.session for j in batch):
                batch.append(pending)
            else:
                later.append(pending)
        return batch, later

    def _drain(self) -> list[_Job | None]:
        out = []
        while True:
            try:
                out.append(self.jobs.get_nowait())
            except queue.Empty:
                return out

    def _step(self, batch: list[_Job]) -> None:
        """One batched policy step for the jobs whose session is still open; every job gets its
        command, or the error that stopped it."""
        with self.lock:
            live = [j for j in batch if j.session in self.sessions]
            for j in batch:
                if j.session not in self.sessions:
                    j.result.set_exception(RequestError(404, f"session {j.session} ended while its request waited"))
            if not live:
                return
            try:
                actions = self.policy.act_batch([j.observation for j in live], [j.instruction for j in live],
                                                [j.session for j in live])
            except Exception as exc:  # noqa: BLE001 - reported to each client; the server keeps serving
                for j in live:
                    j.result.set_exception(exc)
                return
            self.batches.append(len(live))
            for j, action in zip(live, actions):
                self.sessions[j.session] += 1
                j.result.set_result(action)

    # ------------------------------------------------------------------------ requests

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "sessions": len(self.sessions)}

    def metadata(self) -> dict[str, Any]:
        return {**self.policy.metadata(), "protocol": PROTOCOL, "encoding": NPZ,
                "image_fields": [f"{IMAGE_PREFIX}{c}" for c in self.policy.cameras]}

    def new_session(self, seed: int) -> str:
        with self.lock:
            if len(self.sessions) >= self.max_sessions:
                raise RequestError(429, f"{self.max_sessions} sessions are open; end one (DELETE /sessions/ID) "
                                        "before opening another")
            session = secrets.token_hex(8)
            self.sessions[session] = 0
            self.policy.reset(session, seed=seed)
        return session

    def reset(self, session: str, seed: int) -> None:
        with self.lock:
            self._known(session)
            self.policy.reset(session, seed=seed)
            self.sessions[session] = 0

    def end(self, session: str) -> None:
        with self.lock:
            self._known(session)
            del self.sessions[session]
            self.policy.drop(session)

    def act(self, session: str, body: bytes) -> np.ndarray:
        """The command for an act request's body, once the worker has stepped it in a batch."""
        with self.lock:
            self._known(session)
        observation, instruction = observation_from(body, self.policy.cameras)
        job = _Job(session, observation, instruction, Future())
        self.jobs.put(job)
        return job.result.result()

    def _known(self, session: str) -> None:
        if session not in self.sessions:
            raise RequestError(404, f"no session {session!r}; open one with POST /sessions")


class _HTTPServer(ThreadingHTTPServer):
    """The HTTP side of a :class:`PolicyServer`: a thread per connection, each served by a _Handler."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], policy_server: PolicyServer):
        self.policy_server = policy_server
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    """One client connection: each request goes to the method ``_ROUTES`` names, which answers
    it from ``self.server.policy_server``; every error is answered as JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    server_version = "robovla-serve"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # no line per request; a 500 prints one (_route)
        pass

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_DELETE(self) -> None:
        self._route()

    def _route(self) -> None:
        try:
            body = self._body() if self.command == "POST" else b""
            answer, sessions = self._resolve(self.path.split("?")[0].rstrip("/"))
            answer(body, *sessions)
        except RequestError as exc:
            self._json(exc.status, {"error": str(exc), "status": exc.status})
        except Exception as exc:  # noqa: BLE001 - a bug or a model failure: 500, and keep serving
            print(f"robo-run serve: {self.command} {self.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}", "status": 500})

    def _resolve(self, path: str) -> tuple[Callable[..., None], list[str]]:
        """The method answering this request and the session IDs in its path; 404 or 405 otherwise."""
        parts = [p for p in path.split("/") if p]
        for pattern, methods in _ROUTES.items():
            if len(pattern) != len(parts) or not all(p in ("ID", q) for p, q in zip(pattern, parts)):
                continue
            if self.command not in methods:
                raise RequestError(405, f"{path} takes {', '.join(methods)}, not {self.command}")
            return getattr(self, methods[self.command]), [q for p, q in zip(pattern, parts) if p == "ID"]
        raise RequestError(404, f"no endpoint {path!r}; endpoints: {ENDPOINTS}")

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "send a Content-Length header with the body")
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"Content-Length {length!r} is not a byte count") from None
        limit = self.server.policy_server.max_body
        if n > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(413, f"the body has {n} bytes; at most {limit} (images up to {MAX_IMAGE_SIDE} px "
                                    "a side)")
        return self.rfile.read(n)

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
        self._send(200, encode_action(self.server.policy_server.act(session, body)), NPZ)

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
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(data)


# ------------------------------------------------------------------------- command line


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="robo-run serve", description="Serve a trained run's policy over HTTP: one "
                                "policy state per client session, numpy payloads (see robovla.client).")
    p.add_argument("--run", required=True, help="the run folder (runs/<name>)")
    p.add_argument("--checkpoint", default=None, help="a checkpoint name under RUN/checkpoints (default: last)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--execute", default="first", help="action-chunk execution: first (default), chunk:K, ensemble[:M]")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true", help="(default 32-true)")
    p.add_argument("--max-batch", type=int, default=8, help="sessions stepped in one batch at most (default 8)")
    p.add_argument("--max-sessions", type=int, default=MAX_SESSIONS, help=f"open sessions at most ({MAX_SESSIONS})")
    args = p.parse_args(argv)
    policy = Policy.from_run(args.run, args.checkpoint, device=args.device, precision=args.precision,
                             execution=args.execute)
    server = PolicyServer(policy, args.host, args.port, args.max_batch, args.max_sessions)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"robo-run serve: listening on {args.host}: anyone who can reach this port can drive the policy",
              file=sys.stderr)
    meta = policy.metadata()
    print(f"serving {args.run} ({meta['checkpoint']}, step {meta['step']}) at {server.url}: cameras "
          f"{meta['cameras']}, chunk {meta['chunk']}, execution {meta['execution']}. Ctrl-C stops.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
