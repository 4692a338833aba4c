"""``robo-run serve``: a trained policy behind HTTP, one policy state per client session.

    robo-run serve --run RUN_DIR [--checkpoint NAME] [--host 127.0.0.1] [--port 8000]
                   [--execute first|chunk:K|ensemble[:M]] [--device cpu] [--max-batch 8]

Endpoints (JSON unless said otherwise; errors are JSON ``{"error": ..., "status": ...}``
with a 4xx code for a bad request, after which the server keeps serving):

    GET    /health                  {"status": "ok", "sessions": n}
    GET    /metadata                cameras, image size, window, chunk, action space, execution, ...
    POST   /sessions                a new session (its own history): {"session": ID}; body {"seed": S} optional
    POST   /sessions/ID/reset       a new episode in the session (the policy forgets its history)
    POST   /sessions/ID/act         body: an .npz archive (application/x-npz) with ``image.CAMERA``
                                    uint8 [H, W, 3] per camera, ``robot_obs`` float [15] and
                                    ``instruction`` (a 0-d unicode array); answer: an .npz with
                                    ``action`` float64 [A], the command (gripper exactly -1 or +1)
    DELETE /sessions/ID             end the session

npz is numpy's own container: typed, shaped arrays with no pickling (the server reads it
with ``allow_pickle=False``), uncompressed by default. Requests from concurrent sessions
are stepped together, one batched VLM pass for up to ``--max-batch`` of them.
:class:`robovla.client.PolicyClient` speaks this protocol.
"""

from __future__ import annotations

import argparse
import io
import json
import queue
import secrets
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from robovla.env import Observation
from robovla.policy import MAX_IMAGE_SIDE, ObservationError, Policy, check_observation

PROTOCOL = "robovla-serve/1"
NPZ = "application/x-npz"
MAX_SESSIONS = 64
IMAGE_PREFIX = "image."


class RequestError(Exception):
    """A request the server refuses: the HTTP status and what to fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def encode_npz(**arrays: Any) -> bytes:
    """Arrays -> the bytes of an uncompressed .npz archive."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_npz(body: bytes, what: str = "body") -> dict[str, np.ndarray]:
    """The bytes of an .npz archive -> its arrays (never unpickling); RequestError(400) otherwise."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("a single .npy array, not an .npz archive")
            return {name: archive[name] for name in archive.files}
    except Exception as exc:  # zipfile, numpy format and pickle refusals all mean: not a valid archive
        raise RequestError(400, f"the {what} is not a readable .npz archive ({type(exc).__name__}: {exc}); send "
                                "numpy.savez output with content type application/x-npz") from None


def observation_from(arrays: dict[str, np.ndarray], cameras: tuple[str, ...]) -> tuple[Observation, str]:
    """An act request's arrays -> (Observation, instruction), or RequestError(400) saying what is wrong."""
    allowed = {f"{IMAGE_PREFIX}{cam}" for cam in cameras} | {"robot_obs", "instruction"}
    unknown = sorted(set(arrays) - allowed)
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; an act request has {sorted(allowed)}")
    missing = sorted(allowed - set(arrays))
    if missing:
        raise RequestError(400, f"missing field(s) {missing}; an act request has {sorted(allowed)}")
    instruction = arrays["instruction"]
    if instruction.dtype.kind != "U" or instruction.shape != ():
        raise RequestError(400, f"instruction must be a 0-d unicode array (numpy.array('...')), got dtype "
                                f"{instruction.dtype} shape {list(instruction.shape)}")
    observation = Observation({cam: arrays[f"{IMAGE_PREFIX}{cam}"] for cam in cameras}, arrays["robot_obs"])
    try:
        check_observation(observation, str(instruction), cameras)
    except ObservationError as exc:
        raise RequestError(400, str(exc)) from None
    return observation, str(instruction)


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
        # the largest images allowed, and change
        self.max_body = len(policy.cameras) * MAX_IMAGE_SIDE ** 2 * 3 + (1 << 20)
        self.sessions: dict[str, int] = {}  # session -> steps taken
        self.lock = threading.Lock()  # guards the policy and the sessions
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # size of every batch stepped (tests and logs read it)
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
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
        """Step queued act requests, several sessions in one batch (each session at most once)."""
        waiting: list[_Job] = []
        while True:
            job = waiting.pop(0) if waiting else self.jobs.get()
            if job is None:
                return
            batch, later = [job], []
            for pending in [*waiting, *self._drain()]:
                if pending is None:
                    self.jobs.put(None)
                    continue
                if len(batch) < self.max_batch and all(pending.session != j.session for j in batch):
                    batch.append(pending)
                else:
                    later.append(pending)
            waiting = later
            with self.lock:
                live = [j for j in batch if j.session in self.sessions]
                for j in batch:
                    if j.session not in self.sessions:
                        j.result.set_exception(RequestError(404, f"session {j.session} ended while its request waited"))
                if not live:
                    continue
                try:
                    actions = self.policy.act_batch([j.observation for j in live], [j.instruction for j in live],
                                                    [j.session for j in live])
                except Exception as exc:  # noqa: BLE001 - reported to each client; the server keeps serving
                    for j in live:
                        j.result.set_exception(exc)
                    continue
                self.batches.append(len(live))
                for j, action in zip(live, actions):
                    self.sessions[j.session] += 1
                    j.result.set_result(action)

    def _drain(self) -> list[_Job | None]:
        out = []
        while True:
            try:
                out.append(self.jobs.get_nowait())
            except queue.Empty:
                return out

    # ------------------------------------------------------------------------ requests

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
        with self.lock:
            self._known(session)
        observation, instruction = observation_from(decode_npz(body), self.policy.cameras)
        job = _Job(session, observation, instruction, Future())
        self.jobs.put(job)
        return job.result.result()

    def _known(self, session: str) -> None:
        if session not in self.sessions:
            raise RequestError(404, f"no session {session!r}; open one with POST /sessions")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
            server_version = "robovla-serve"

            def log_message(self, format: str, *args: Any) -> None:  # one line per error only
                pass

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

            def do_PUT(self) -> None:
                self._route("PUT")

            def _route(self, method: str) -> None:
                try:
                    body = self._body(method)
                    self._dispatch(method, self.path.rstrip("/").split("?")[0], body)
                except RequestError as exc:
                    self._json(exc.status, {"error": str(exc), "status": exc.status})
                except Exception as exc:  # noqa: BLE001 - a bug or a model failure: 500, and keep serving
                    print(f"robo-run serve: {method} {self.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    self._json(500, {"error": f"{type(exc).__name__}: {exc}", "status": 500})

            def _body(self, method: str) -> bytes:
                if method not in ("POST", "PUT"):
                    return b""
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
                if n > server.max_body:
                    self.close_connection = True  # the body is not read: the connection cannot be reused
                    raise RequestError(413, f"the body has {n} bytes; at most {server.max_body} (images up to "
                                            f"{MAX_IMAGE_SIDE} px a side)")
                return self.rfile.read(n)

            def _dispatch(self, method: str, path: str, body: bytes) -> None:
                parts = [p for p in path.split("/") if p]
                routes = {("health",): ("GET",), ("metadata",): ("GET",), ("sessions",): ("POST",)}
                if len(parts) == 1 and tuple(parts) in routes:
                    if method not in routes[tuple(parts)]:
                        raise RequestError(405, f"{path} takes {', '.join(routes[tuple(parts)])}, not {method}")
                    if parts[0] == "health":
                        return self._json(200, {"status": "ok", "sessions": len(server.sessions)})
                    if parts[0] == "metadata":
                        return self._json(200, {**server.policy.metadata(), "protocol": PROTOCOL, "encoding": NPZ,
                                                "image_fields": [f"{IMAGE_PREFIX}{c}" for c in server.policy.cameras]})
                    session = server.new_session(self._seed(body))
                    return self._json(201, {"session": session})
                if len(parts) == 2 and parts[0] == "sessions":
                    if method != "DELETE":
                        raise RequestError(405, f"{path} takes DELETE, not {method}")
                    server.end(parts[1])
                    return self._json(200, {"session": parts[1], "ended": True})
                if len(parts) == 3 and parts[0] == "sessions" and parts[2] in ("act", "reset"):
                    if method != "POST":
                        raise RequestError(405, f"{path} takes POST, not {method}")
                    if parts[2] == "reset":
                        server.reset(parts[1], self._seed(body))
                        return self._json(200, {"session": parts[1], "reset": True})
                    kind = self.headers.get("Content-Type", "").split(";")[0].strip()
                    if kind != NPZ:
                        raise RequestError(415, f"an act request is {NPZ}, got content type {kind or 'none'!r}")
                    action = server.act(parts[1], body)
                    return self._send(200, encode_npz(action=np.asarray(action, dtype=np.float64)), NPZ)
                raise RequestError(404, f"no endpoint {path!r}; endpoints: GET /health, GET /metadata, POST /sessions, "
                                        "POST /sessions/ID/act, POST /sessions/ID/reset, DELETE /sessions/ID")

            def _seed(self, body: bytes) -> int:
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

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                self._send(status, json.dumps(payload).encode(), "application/json")

            def _send(self, status: int, data: bytes, kind: str) -> None:
                self.send_response(status, HTTPStatus(status).phrase)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

        return Handler


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
