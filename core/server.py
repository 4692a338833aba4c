"""``robo-run serve``: a trained policy behind HTTP, one policy state per client session.

    robo-run serve --run RUN_DIR [--checkpoint NAME] [--host 127.0.0.1] [--port 8000]
                   [--execute first|chunk:K|ensemble[:M]] [--device cpu] [--max-batch 8]
                   [--max-sessions 64] [--session-timeout 600] [--max-connections 128]
                   [--read-timeout 30] [--drain-timeout 30] [--token TOKEN]

Endpoints (JSON unless said otherwise):

    GET    /health                  {"status": "ok", "sessions": n}
    GET    /metadata                cameras, image size, window, chunk, action space, execution, limits, ...
    POST   /sessions                a new session (its own history): {"session": ID}; body {"seed": S} optional
    POST   /sessions/ID/reset       a new episode in the session (the policy forgets its history);
                                    body {"seed": S} optional
    POST   /sessions/ID/act         body: an .npz archive (application/x-npz) with ``image.CAMERA``
                                    uint8 [H, W, 3] per camera, ``robot_obs`` float [15] and
                                    ``instruction`` (a 0-d unicode array); answer: an .npz with
                                    ``action`` float64 [A], the command (gripper exactly -1 or +1)
    DELETE /sessions/ID             end the session

HEAD is answered like GET, without the body. :mod:`robovla.wire` defines the .npz messages;
it never unpickles and inflates no member larger than its field can need. Every error is
JSON ``{"error": ..., "status": ...}``: a 4xx code for a request the server refuses (an
unknown path or session, a method a path does not take, a malformed or oversized body, a
missing token, too many sessions), 501 for an HTTP method no endpoint takes, 503 while every
connection is busy or the server shuts down, 500 when the policy fails on a request; after
each the server keeps serving.

Requests from concurrent sessions are stepped together, one batched VLM pass for up to
``--max-batch`` of them; if the pass fails, its requests are stepped again one by one, so
that only the session whose request fails gets the error (every episode is left as it was
before the failed step). A session without a request for ``--session-timeout`` seconds
expires and frees its place. With a token (``--token``, or the environment variable
ROBOVLA_SERVE_TOKEN) every endpoint but ``/health`` needs ``Authorization: Bearer TOKEN``;
HTTP is not encrypted, so beyond a trusted network put TLS in front. SIGTERM or Ctrl-C
drains: no new requests, the ones in flight finish, then the server exits.
:class:`robovla.client.PolicyClient` speaks this protocol; connections are handled by
:mod:`robovla.server_http`.
"""

from __future__ import annotations

import argparse
import copy
import errno
import queue
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from robovla.env import Observation
from robovla.errors import RobovlaError
from robovla.evaluation import CHECKPOINT_HELP, load_policy
from robovla.policy import MAX_IMAGE_SIDE, MAX_INSTRUCTION, ObservationError, Policy, check_observation
from robovla.server_http import (ENDPOINTS, TOKEN_ENV, HTTPServer, RequestError, fit_descriptors, seed_from,
                                 token_from)
from robovla.sharing import local_folder
from robovla.wire import (IMAGE_PREFIX, MAX_SKIPPED, NPZ, Field, WireError, decode_observation, encode_action,
                          observation_fields)

__all__ = ["ENDPOINTS", "PolicyServer", "RequestError", "main", "observation_from", "seed_from"]

PROTOCOL = "robovla-serve/1"
MAX_SESSIONS = 64
SESSION_TIMEOUT = 600.0  # seconds without a request before a session expires
MAX_CONNECTIONS = 128
READ_TIMEOUT = 30.0  # seconds a connection may send nothing (between requests too) before it is closed
DRAIN_TIMEOUT = 30.0  # seconds the requests in flight get to finish when the server stops
FORGOTTEN = 1024  # ended and expired sessions remembered, to say why a request names one


def observation_from(body: bytes, fields: dict[str, Field]) -> tuple[Observation, str]:
    """An act request's body -> (Observation, instruction), or RequestError (400, 413 for an
    oversized member) saying what is wrong."""
    try:
        images, robot_obs, instruction = decode_observation(body, fields)
        observation = Observation(images, robot_obs)
        check_observation(observation, instruction, tuple(images))
    except WireError as exc:
        raise RequestError(exc.status, str(exc)) from None
    except ObservationError as exc:
        raise RequestError(400, str(exc)) from None
    return observation, instruction


@dataclass
class _Job:
    session: str
    observation: Observation
    instruction: str
    result: Future


@dataclass
class _Session:
    used: float  # the clock when its last request came or finished
    steps: int = 0
    in_flight: int = 0  # act requests not answered yet (a session with one never expires)


class PolicyServer:
    """A :class:`Policy` served over HTTP (module docstring). ``port=0`` picks a free port;
    ``session_timeout=0`` keeps sessions until they end; ``clock`` (seconds) times expiry.

    Use as a context manager (or call :meth:`start` and :meth:`stop`) to serve from a
    background thread, or :meth:`serve_forever` in the foreground.
    """

    def __init__(self, policy: Policy, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
                 max_sessions: int = MAX_SESSIONS, *, session_timeout: float = SESSION_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS, read_timeout: float = READ_TIMEOUT,
                 token: str | None = None, clock: Callable[[], float] = time.monotonic):
        if min(max_batch, max_sessions, max_connections) < 1:
            raise ValueError(f"max_batch, max_sessions and max_connections must be >= 1, got {max_batch}, "
                             f"{max_sessions} and {max_connections}")
        if not (session_timeout >= 0 and read_timeout > 0):
            raise ValueError(f"session_timeout must be >= 0 and read_timeout > 0, got {session_timeout} and "
                             f"{read_timeout}")
        self.policy, self.max_batch, self.max_sessions = policy, max_batch, max_sessions
        self.session_timeout, self.token, self.clock = session_timeout, token, clock
        self.max_image_side = MAX_IMAGE_SIDE
        self.fields = observation_fields(policy.cameras, MAX_IMAGE_SIDE, policy.metadata()["robot_obs_dim"],
                                         MAX_INSTRUCTION)
        # the largest act body accepted: one RGB image of the largest size per camera, plus 1 MiB
        # for robot_obs, the instruction and the archive's own headers
        self.max_body = len(policy.cameras) * MAX_IMAGE_SIDE ** 2 * 3 + (1 << 20)
        self.sessions: dict[str, _Session] = {}
        self.forgotten: OrderedDict[str, str] = OrderedDict()  # ended or expired session -> why it is gone
        self.lock = threading.Lock()  # guards the sessions; held briefly
        self.policy_lock = threading.Lock()  # guards the policy; taken before self.lock, never after
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches: list[int] = []  # size of every batch stepped (tests read it)
        self.retried = 0  # batches whose pass failed and whose requests were stepped one by one
        self.httpd = HTTPServer((host, port), self, max_connections, read_timeout)
        self.worker = threading.Thread(target=self._work, name="robovla-policy", daemon=True)
        self.worker.start()
        self._thread: threading.Thread | None = None
        self._serving = False

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self._serving = True
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> PolicyServer:
        self._serving = True
        self._thread = threading.Thread(target=self.serve_forever, name="robovla-http", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: float = DRAIN_TIMEOUT) -> bool:
        """Stop accepting connections, let the requests in flight finish (up to ``drain``
        seconds; new ones get 503), close every connection and stop the policy's worker. True
        if every request in flight finished."""
        if self._serving:
            self.httpd.shutdown()  # returns at once if serve_forever has already returned
        self.httpd.server_close()
        finished = self.httpd.drain(drain)
        self.jobs.put(None)
        self.worker.join(timeout=10)
        return finished

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
        command, or the error that stopped it. A failed pass is stepped again job by job."""
        with self.policy_lock:
            self._step_locked(batch)

    def _step_locked(self, batch: list[_Job]) -> None:
        with self.lock:
            live = [j for j in batch if j.session in self.sessions]
            gone = [j for j in batch if j.session not in self.sessions]
        for j in gone:
            j.result.set_exception(RequestError(404, self._gone(j.session, "while its request waited")))
        if not live:
            return
        try:
            actions = self._act_batch(live)
        except Exception as exc:  # noqa: BLE001 - reported to the client whose request fails
            if len(live) == 1:
                live[0].result.set_exception(exc)
                return
            self.retried += 1
            for j in live:
                self._step_locked([j])
            return
        self.batches.append(len(live))
        with self.lock:
            for j in live:
                self.sessions[j.session].steps += 1
        for j, action in zip(live, actions):
            j.result.set_result(action)

    def _act_batch(self, jobs: list[_Job]) -> np.ndarray:
        """``Policy.act_batch`` for the jobs; if it raises, their episodes are as they were before."""
        episodes = self.policy.episodes
        saved = {j.session: (copy.copy(episodes[j.session]), episodes[j.session].generator.get_state())
                 for j in jobs if j.session in episodes}
        try:
            return self.policy.act_batch([j.observation for j in jobs], [j.instruction for j in jobs],
                                         [j.session for j in jobs])
        except Exception:
            for j in jobs:
                if j.session in saved:
                    episode, generator = saved[j.session]
                    episode.generator.set_state(generator)
                    episodes[j.session] = episode
                else:
                    episodes.pop(j.session, None)
            raise

    # ------------------------------------------------------------------------ requests

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "sessions": len(self.sessions)}

    def metadata(self) -> dict[str, Any]:
        meta = self.policy.metadata()
        if "run" in meta:  # the run's name; where it lies on the server's disk is not the client's business
            meta["run"] = Path(meta["run"]).name
        return {**meta, "protocol": PROTOCOL, "encoding": NPZ,
                "image_fields": [f"{IMAGE_PREFIX}{c}" for c in self.policy.cameras],
                "other_cameras": f"ignored (up to {MAX_SKIPPED} other {IMAGE_PREFIX}* fields, left unread)",
                "max_batch": self.max_batch, "max_sessions": self.max_sessions,
                "session_timeout": self.session_timeout or None, "auth": "bearer" if self.token else "none"}

    def new_session(self, seed: int) -> str:
        with self.policy_lock, self.lock:
            self._expire()
            if len(self.sessions) >= self.max_sessions:
                after = f", or one expires after {self.session_timeout:g} s without a request" \
                    if self.session_timeout else ""
                raise RequestError(429, f"{self.max_sessions} sessions are open; end one (DELETE /sessions/ID) "
                                        f"before opening another{after}")
            session = secrets.token_hex(8)
            self.sessions[session] = _Session(self.clock())
            self.policy.reset(session, seed=seed)
        return session

    def reset(self, session: str, seed: int) -> None:
        with self.policy_lock, self.lock:
            self._known(session).steps = 0
            self.sessions[session].used = self.clock()
            self.policy.reset(session, seed=seed)

    def end(self, session: str) -> None:
        with self.policy_lock, self.lock:
            self._known(session)
            self._forget(session, "was ended")

    def act(self, session: str, body: bytes) -> np.ndarray:
        """The command for an act request's body, once the worker has stepped it in a batch."""
        with self.lock:
            state = self._known(session)
            state.in_flight += 1
            state.used = self.clock()
        try:
            observation, instruction = observation_from(body, self.fields)
            job = _Job(session, observation, instruction, Future())
            self.jobs.put(job)
            return job.result.result()
        finally:
            with self.lock:
                state.in_flight -= 1
                state.used = self.clock()

    def act_answer(self, session: str, body: bytes) -> bytes:
        return encode_action(self.act(session, body))

    def expire(self) -> None:
        """Free the sessions idle past ``session_timeout`` (called between polls; skipped while
        the policy is stepping, as new_session expires them before it counts)."""
        if self.session_timeout and self.policy_lock.acquire(blocking=False):
            try:
                with self.lock:
                    self._expire()
            finally:
                self.policy_lock.release()

    def _expire(self) -> None:
        now = self.clock()
        for session, state in list(self.sessions.items()):
            if self.session_timeout and not state.in_flight and now - state.used > self.session_timeout:
                self._forget(session, f"expired after {self.session_timeout:g} s without a request")

    def _forget(self, session: str, why: str) -> None:
        del self.sessions[session]
        self.policy.drop(session)
        self.forgotten[session] = why
        while len(self.forgotten) > FORGOTTEN:
            self.forgotten.popitem(last=False)

    def _known(self, session: str) -> _Session:
        if session not in self.sessions:
            raise RequestError(404, self._gone(session))
        return self.sessions[session]

    def _gone(self, session: str, when: str = "") -> str:
        why = self.forgotten.get(session)
        if why is None:
            return f"no session {session!r}{' ' + when if when else ''}; open one with POST /sessions"
        return f"session {session!r} {why}{' ' + when if when else ''}; open a new one with POST /sessions"


# ------------------------------------------------------------------------- command line


def bind_error(host: str, port: int, exc: OSError) -> str:
    """Why ``--host HOST --port PORT`` cannot be listened on, naming the flag at fault."""
    why = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return (f"--host {host}: cannot resolve it to an address ({why}); give an address or name of this "
                "machine (127.0.0.1: this machine only, 0.0.0.0: every interface)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host}: not an address of this machine, so it cannot be bound ({why}); give one of its "
                "addresses (127.0.0.1: this machine only, 0.0.0.0: every interface)")
    if exc.errno == errno.EACCES:
        return f"--port {port}: not allowed here ({why}); ports below 1024 need privileges: choose one above 1023"
    return f"--host {host} --port {port}: cannot listen there ({why}); choose another --port (0 picks a free one)"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="robo-run serve", description="Serve a trained run's policy over HTTP: one "
                                "policy state per client session, numpy payloads (see robovla.client).")
    p.add_argument("--run", required=True, type=Path, help="the run folder (runs/<name>), an exported one, or a "
                   "Hugging Face hub repo id (owner/name; downloaded)")
    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--execute", default="first", help="action-chunk execution: first (default), chunk:K, ensemble[:M]")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true", help="(default 32-true)")
    p.add_argument("--max-batch", type=int, default=8, help="sessions stepped in one batch at most (default 8)")
    p.add_argument("--max-sessions", type=int, default=MAX_SESSIONS, help=f"open sessions at most ({MAX_SESSIONS})")
    p.add_argument("--session-timeout", type=float, default=SESSION_TIMEOUT, help="seconds without a request "
                   f"before a session expires and frees its place (default {SESSION_TIMEOUT:g}; 0: never)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, help="open connections at most; past it "
                   f"the longest-idle one closes, or 503 if all are busy (default {MAX_CONNECTIONS})")
    p.add_argument("--read-timeout", type=float, default=READ_TIMEOUT, help="seconds a connection may send nothing "
                   f"before it is closed, and the most a request's body may take (default {READ_TIMEOUT:g})")
    p.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT, help="seconds the requests in flight get "
                   f"to finish on SIGTERM or Ctrl-C (default {DRAIN_TIMEOUT:g})")
    p.add_argument("--token", default=None, help=f"a bearer token every endpoint but /health requires (default: "
                   f"the environment variable {TOKEN_ENV}, else none; the variable keeps it out of ps)")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be 0..65535 (0 picks a free one), got {args.port}")
    for flag in ("max_batch", "max_sessions", "max_connections"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("session_timeout", "read_timeout", "drain_timeout"):
        value = getattr(args, flag)
        if not 0 <= value < float("inf") or (value == 0 and flag == "read_timeout"):
            p.error(f"--{flag.replace('_', '-')} must be a finite number of seconds (> 0), got {value}")
    token = token_from(args.token)
    fit_descriptors(args.max_connections)  # before the model loads: a refusal costs nothing
    args.run = local_folder(args.run, "--run")  # a hub repo id: its files, downloaded
    policy = load_policy(args, "cannot serve")
    try:
        server = PolicyServer(policy, args.host, args.port, args.max_batch, args.max_sessions,
                              session_timeout=args.session_timeout, max_connections=args.max_connections,
                              read_timeout=args.read_timeout, token=token)
    except OSError as exc:
        raise RobovlaError(bind_error(args.host, args.port, exc)) from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"robo-run serve: listening on {args.host}: " + (
            "requests need the token; HTTP is not encrypted, so beyond a trusted network put TLS in front"
            if token else f"anyone who can reach this port can drive the policy (--token or {TOKEN_ENV} "
                          "requires a token)"), file=sys.stderr)
    meta = policy.metadata()
    print(f"serving {args.run} ({meta['checkpoint']}, step {meta['step']}) at {server.url}: cameras "
          f"{meta['cameras']}, chunk {meta['chunk']}, execution {meta['execution']}. Ctrl-C stops.", flush=True)
    # SIGTERM ends the accept loop from another thread (serve_forever cannot be shut down from
    # its own), then stop() drains as after Ctrl-C
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.httpd.shutdown, daemon=True).start())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if not server.stop(args.drain_timeout):
            print(f"robo-run serve: requests still running after {args.drain_timeout:g} s were cut off",
                  file=sys.stderr)
    return 0
