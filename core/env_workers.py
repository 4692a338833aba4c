"""Envs side by side: each in its own worker process (or all in this one), called as one batch.

Evaluation steps N envs in lockstep: one batched policy call in this process, then every
env steps at once. An :class:`EnvPool` does the env half. With ``processes=True`` each env
lives in a worker process of its own (spawned: a fresh interpreter that builds its env
from an :class:`EnvSpec`), so simulators that keep process-wide state, such as pybullet's
default client in calvin_env, never share a process; the envs also step in parallel on
several cores. ``processes=False`` keeps the envs in this process, which is right for envs
that declare :attr:`robovla.env.Env.safe_in_process` and for debugging.

A call goes to several slots at once and answers per slot: the value, or a :class:`Fault`
when the env raised (it stays usable) or its worker process died or hung (then
:meth:`EnvPool.restart` starts a fresh one). A worker ends when this process closes the
pool, and when this process is gone (on Linux at once, even inside a simulator call).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from robovla.env import Env
from robovla.errors import RobovlaError

START_TIMEOUT = 600.0  # seconds for a worker to build its env (a simulator loads its meshes)
CALL_TIMEOUT = 300.0  # seconds for one call (a reset, a step); a worker that takes longer is killed


class EnvWorkerError(RobovlaError, RuntimeError):
    """An env could not be built in its worker process, or a worker failed outside a slot's call."""


@dataclass(frozen=True)
class EnvSpec:
    """How to build an env in any process: a registered env name (or an Env subclass that a
    fresh interpreter can import) and its config as JSON-ready field values."""

    env: str | type
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.env if isinstance(self.env, str) else self.env.__name__

    def env_class(self) -> type[Env]:
        from robovla.registry import get_component

        return get_component("env", self.env).load() if isinstance(self.env, str) else self.env

    def validated(self) -> Any:
        """The config as the env's Config instance."""
        from robovla.config import validate_component

        return validate_component("env", self.name, self.env_class().Config, dict(self.config))

    def build(self) -> Env:
        return self.env_class()(self.validated())


@dataclass(frozen=True)
class Fault:
    """Why a slot's call gave no value: ``message`` names the error; ``died`` is True when the
    worker process ended or hung (restart it), False when the env raised (it is still usable)."""

    message: str
    died: bool = False


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, its first 2,000 characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


# ------------------------------------------------------------------------ the calls


def _begin(env: Env, state: Any) -> tuple[Any, tuple[str, ...]]:
    observation = env.reset(state)
    return observation, tuple(env.tasks)


def _step(env: Env, command: Any) -> tuple[Any, bool]:
    observation = env.step(command)
    return observation, bool(env.task_success())


CALLS: dict[str, Callable[..., Any]] = {
    "begin": _begin,  # reset(state) -> (observation, the tasks feasible there)
    "start": lambda env, task: env.start_task(task),  # -> instruction
    "step": _step,  # step(command) -> (observation, task_success())
    "chains": lambda env, n: env.chains(n),
}


def _answer(env: Env, name: str, args: tuple) -> tuple[str, Any]:
    """Call ``name`` on ``env``: ("ok", value), or ("raised", "Type: message") when the env raised."""
    try:
        return "ok", CALLS[name](env, *args)
    except Exception as exc:  # noqa: BLE001 - a slot's fault, answered in its place
        return "raised", describe(exc)


def _serve(conn: Connection, spec: EnvSpec) -> None:
    """A worker process: build the env, then answer calls until told to stop or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pool
    _die_with_parent()
    try:
        env = spec.build()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("failed", describe(exc), traceback.format_exc(limit=-8), isinstance(exc, RobovlaError)))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the parent is gone
            if message is None:
                return
            name, args = message
            reply = _answer(env, name, args)
            try:
                conn.send(reply)
            except OSError:
                return  # the parent is gone
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                conn.send(("raised", f"the env's answer to {name} cannot be sent back from its worker process "
                                     f"({describe(exc)}); observations must pickle"))
    finally:
        env.close()


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when its parent ends, also while the worker
    is inside a long simulator call (elsewhere the worker ends at its next read of the pipe)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent ended before the call above
        os._exit(0)


def _value(reply: tuple[str, Any]) -> Any:
    """An answer's value, or the Fault of an env that raised."""
    return reply[1] if reply[0] == "ok" else Fault(reply[1])


@dataclass
class _Worker:
    process: Any
    conn: Connection


def _signal_name(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


class EnvPool:
    """``n`` envs: each in a spawned worker process (``processes=True``) or all in this one.

    Build one from a spec (:meth:`__init__`) or wrap envs already built here
    (:meth:`of`). :meth:`call` runs one call on several slots at once.
    """

    def __init__(self, spec: EnvSpec, n: int, processes: bool, timeout: float = CALL_TIMEOUT):
        if n < 1:
            raise ValueError(f"an EnvPool needs at least one env, got {n}")
        self.spec, self.processes, self.timeout = spec, processes, timeout
        self.envs: list[Env] = []
        self.workers: list[_Worker | None] = [None] * n
        self.restarts = 0
        if not processes:
            self.envs = [spec.build() for _ in range(n)]
            return
        self._context = multiprocessing.get_context("spawn")
        try:
            for slot in range(n):
                self.workers[slot] = self._spawn()  # all start building at once
            for worker in self.workers:
                self._ready(worker)
        except BaseException:
            self.close()
            raise

    @classmethod
    def of(cls, envs: Env | list[Env]) -> EnvPool:
        """A pool over envs built in this process (closing it closes them)."""
        envs = [envs] if isinstance(envs, Env) else list(envs)
        if not envs:
            raise ValueError("an EnvPool needs at least one env")
        pool = cls.__new__(cls)
        pool.spec, pool.processes, pool.timeout = None, False, CALL_TIMEOUT
        pool.envs, pool.workers, pool.restarts = envs, [None] * len(envs), 0
        return pool

    def __len__(self) -> int:
        return len(self.workers)

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def config(self) -> Any:
        """The envs' config (a ComponentConfig instance)."""
        return self.envs[0].config if self.envs else self.spec.validated()

    @property
    def pids(self) -> list[int | None]:
        """The worker processes' ids (None for envs in this process)."""
        return [w.process.pid if w is not None else None for w in self.workers]

    # ----------------------------------------------------------------------- calls

    def call(self, name: str, requests: dict[int, tuple]) -> dict[int, Any]:
        """Run call ``name`` with each slot's arguments; per slot, its value or a :class:`Fault`."""
        if not self.processes:
            return {slot: _value(_answer(self.envs[slot], name, args)) for slot, args in requests.items()}
        out, waiting = {}, {}
        for slot, args in requests.items():
            worker = self.workers[slot]
            try:
                worker.conn.send((name, args))
                waiting[worker.conn] = slot
            except (OSError, ValueError) as exc:  # the worker is gone (a broken pipe)
                out[slot] = self._died(slot, f"sending {name}: {exc}")
        deadline = time.monotonic() + self.timeout
        while waiting:
            ready = wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                for conn, slot in waiting.items():
                    out[slot] = self._hung(slot, name)
                break
            for conn in ready:
                slot = waiting.pop(conn)
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    out[slot] = self._died(slot, name)
                    continue
                out[slot] = _value(reply)
        return out

    def ask(self, slot: int, name: str, *args: Any) -> Any:
        """One call on one slot; a fault raises EnvWorkerError naming the env and the call
        (NotImplementedError stays itself: an env without that part)."""
        reply = self.call(name, {slot: args})[slot]
        if isinstance(reply, Fault):
            kind, _, message = reply.message.partition(": ")
            if kind == "NotImplementedError" and not reply.died:
                raise NotImplementedError(message)
            raise EnvWorkerError(f"env {self.name}: {name}{args}: {reply.message}")
        return reply

    # --------------------------------------------------------------------- workers

    def restart(self, slot: int) -> None:
        """A fresh worker (and env) in ``slot``, after its worker died or hung."""
        if not self.processes:
            raise RuntimeError("restart is for worker processes; an env in this process cannot be restarted")
        self._kill(slot)
        self.workers[slot] = self._spawn()
        self._ready(self.workers[slot])
        self.restarts += 1

    def close(self) -> None:
        """Stop the workers (each closes its env) or close the envs in this process."""
        for env in self.envs:
            env.close()
        self.envs = []
        workers = [w for w in self.workers if w is not None]
        self.workers = [None] * len(self.workers)
        for worker in workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
            worker.conn.close()  # a worker still in a call sees the pipe gone when it answers
        deadline = time.monotonic() + 10
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)

    @property
    def name(self) -> str:
        """The env's name (registered, or its class's)."""
        return self.spec.name if self.spec is not None else type(self.envs[0]).__name__

    def _spawn(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, self.spec), daemon=True,
                                        name=f"robovla-env-{self.spec.name}")
        try:
            process.start()
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            parent.close()
            raise EnvWorkerError(
                f"env {self.spec.name} cannot be sent to a worker process ({describe(exc)}): its class must be "
                "importable by module and name in a fresh interpreter (defined at a module's top level) and its "
                "config picklable; an env that is safe in-process can instead declare safe_in_process = True "
                "(robo-run eval --workers inline)") from None
        finally:
            child.close()  # so that the worker's end closing shows here as EOF
        return _Worker(process, parent)

    def _ready(self, worker: _Worker) -> None:
        """Wait for a spawned worker to build its env (the caller closes the pool when it fails)."""
        if not worker.conn.poll(START_TIMEOUT):
            worker.process.kill()
            raise EnvWorkerError(f"env {self.spec.name}: its worker process built no env in {START_TIMEOUT:.0f} s")
        try:
            reply = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(5)
            raise EnvWorkerError(f"env {self.spec.name}: its worker process ended while building the env "
                                 f"({_signal_name(worker.process.exitcode)})") from None
        if reply[0] == "failed":
            worker.process.join(5)
            where = "" if reply[3] else f"\n{reply[2].rstrip()}"  # robovla's own errors say what to fix
            raise EnvWorkerError(f"env {self.spec.name} cannot be built in its worker process: {reply[1]}{where}")

    def _kill(self, slot: int) -> None:
        worker, self.workers[slot] = self.workers[slot], None
        if worker is None:
            return
        worker.process.kill()
        worker.process.join(5)
        worker.conn.close()

    def _died(self, slot: int, during: str) -> Fault:
        worker = self.workers[slot]
        worker.process.join(5)
        return Fault(f"the env's worker process (pid {worker.process.pid}) ended during {during} "
                     f"({_signal_name(worker.process.exitcode)})", died=True)

    def _hung(self, slot: int, name: str) -> Fault:
        worker = self.workers[slot]
        worker.process.kill()
        worker.process.join(5)
        return Fault(f"the env's worker process (pid {worker.process.pid}) gave no answer to {name} in "
                     f"{self.timeout:.0f} s and was stopped", died=True)
