"""Conformance checks for envs, run on every registered env.

Each check builds two instances from the env's Config defaults (or from ``config``, when a
test calls the check itself, e.g. with a stand-in simulator) and drives them side by side
for at most :data:`STEPS` steps, so that evaluation runs repeat: the same seed gives the
same start, the same tasks and instructions, and the same chains. An env that cannot be
built here (a field without a default, or a simulator whose module is not installed) is
skipped with the reason. Commands are [A] with the gripper exactly -1 or +1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

from robovla.action_space import ActionSpace
from robovla.batch import ROBOT_OBS_DIM
from robovla.env import Env, Observation
from robovla.registry import Component, create
from robovla.testing import check, name

SEEDS = (0, 1, 2, 3)
STEPS = 2  # steps driven after a reset: enough to see a difference, cheap for a real simulator
CHAINS = 3
STILL = np.array([0.0] * (ActionSpace.action_dim - 1) + [1.0])  # no arm motion, gripper open


def missing_module(exc: BaseException | None) -> ModuleNotFoundError | None:
    """The ModuleNotFoundError behind ``exc``, when one is (also when re-raised ``from None``)."""
    while exc is not None:
        if isinstance(exc, ModuleNotFoundError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def build(component: Component, config: dict[str, Any] | None = None) -> Env:
    """The env at ``config`` (default: its Config defaults); skips when it cannot be built here."""
    if config is None:
        required = [n for n, f in component.load().Config.model_fields.items() if f.is_required()]
        if required:
            pytest.skip(f"{name(component)}: fields {required} have no default, so the checks cannot build one; "
                        f"call robovla.testing.envs checks with a config to run them")
        config = {}
    try:
        return create("env", component.name, config)
    except Exception as exc:
        missing = missing_module(exc)
        if missing is None:
            raise
        pytest.skip(f"{name(component)} needs the module {missing.name!r}, which is not installed: "
                    f"{str(exc).splitlines()[0]}")


@contextmanager
def two(component: Component, config: dict[str, Any] | None) -> Iterator[tuple[Env, Env]]:
    """Two instances, closed afterwards."""
    first = build(component, config)
    try:
        second = build(component, config)
        try:
            yield first, second
        finally:
            second.close()
    finally:
        first.close()


def differences(a: Observation, b: Observation) -> list[str]:
    """What differs between two observations (cameras, images, robot_obs)."""
    if set(a.images) != set(b.images):
        return [f"cameras {sorted(a.images)} vs {sorted(b.images)}"]
    out = [f"the {cam} image" for cam in a.images if not np.array_equal(a.images[cam], b.images[cam])]
    if not np.array_equal(a.robot_obs, b.robot_obs):
        out.append("robot_obs")
    return out


def well_formed(component: Component, obs: Observation) -> None:
    assert isinstance(obs, Observation) and obs.images, (
        f"{name(component)}: reset/step must return a robovla.env.Observation with at least one camera")
    for cam, img in obs.images.items():
        img = np.asarray(img)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3, (
            f"{name(component)}: camera {cam!r} gives {img.dtype} {img.shape}; images are uint8 [H, W, 3]")
    assert np.shape(obs.robot_obs) == (ROBOT_OBS_DIM,), (
        f"{name(component)}: robot_obs is {np.shape(obs.robot_obs)}, expected [{ROBOT_OBS_DIM}]")


def instruction(component: Component, env: Env, task: str) -> str:
    text = env.start_task(task)
    assert isinstance(text, str) and text.strip(), f"{name(component)}: start_task({task!r}) gives {text!r}, not a sentence"
    return text


@check("env")
def env_same_seed_same_start(component: Component, config: dict[str, Any] | None = None) -> None:
    """Two instances reset with one seed give the same observation, tasks and instruction, and
    the same observations over a few identical steps; a reset forgets the episode before it;
    different seeds do not all give the same start."""
    with two(component, config) as (a, b):
        first = a.reset(SEEDS[0])
        well_formed(component, first)
        diff = differences(first, b.reset(SEEDS[0]))
        assert not diff, (f"{name(component)}: reset({SEEDS[0]}) on two instances differs in {', '.join(diff)}; "
                          "draw the start state (and any camera noise) from the seed alone")
        assert a.tasks and a.tasks == b.tasks, (
            f"{name(component)}: after reset({SEEDS[0]}) the tasks are {a.tasks} and {b.tasks}; the same seed must "
            "give the same, non-empty tasks")
        task = a.tasks[0]
        assert instruction(component, a, task) == instruction(component, b, task), (
            f"{name(component)}: after reset({SEEDS[0]}), start_task({task!r}) gives two instructions")
        for step in range(1, STEPS + 1):
            obs = a.step(STILL.copy())
            well_formed(component, obs)
            diff = differences(obs, b.step(STILL.copy()))
            assert not diff, (f"{name(component)}: step {step} of the same commands from reset({SEEDS[0]}) differs "
                              f"in {', '.join(diff)}; seed every random draw of an episode in reset")
        starts = [(a.reset(seed), a.tasks) for seed in SEEDS]
        diff = differences(starts[0][0], first)
        assert not diff, (f"{name(component)}: reset({SEEDS[0]}) after another episode differs from the first "
                          f"reset({SEEDS[0]}) in {', '.join(diff)}; reset must not keep state from earlier episodes")
        alike = all(not differences(obs, starts[0][0]) and tasks == starts[0][1] for obs, tasks in starts)
        assert not alike, (f"{name(component)}: seeds {list(SEEDS)} all give the same start observation and tasks; "
                           "reset(seed) must draw the start state from the seed")


@check("env")
def env_chains_are_fixed(component: Component, config: dict[str, Any] | None = None) -> None:
    """chains(n) is the same list on every instance, JSON-ready, and its first n-1 are
    chains(n-1); each chain's start gives the same observation on two instances, and its
    first task is feasible there, with one instruction."""
    with two(component, config) as (a, b):
        try:
            chains = a.chains(CHAINS)
        except NotImplementedError:
            pytest.skip(f"{name(component)} defines no long-horizon chains")
        assert len(chains) == CHAINS, f"{name(component)}: chains({CHAINS}) gives {len(chains)} chains"

        def text(found: list[Any]) -> str:
            try:
                return json.dumps([[c.state, list(c.tasks)] for c in found], sort_keys=True)
            except (TypeError, ValueError) as exc:
                raise AssertionError(f"{name(component)}: a chain's state or tasks are not JSON-ready ({exc}); "
                                     "results record them") from None

        assert text(chains) == text(b.chains(CHAINS)), (
            f"{name(component)}: chains({CHAINS}) differs between two instances; chains must always be the same")
        assert text(a.chains(CHAINS - 1)) == text(chains[:-1]), (
            f"{name(component)}: chains({CHAINS - 1}) is not the first {CHAINS - 1} of chains({CHAINS}); "
            "chains(n) is the first n of one fixed list")
        for i, chain in enumerate(chains):
            assert chain.tasks and all(isinstance(t, str) for t in chain.tasks), (
                f"{name(component)}: chain {i} has tasks {chain.tasks!r}; a chain is a non-empty tuple of task names")
            diff = differences(a.reset(chain.state), b.reset(chain.state))
            assert not diff, f"{name(component)}: chain {i}'s start differs between two instances in {', '.join(diff)}"
            task = chain.tasks[0]
            assert task in a.tasks, (f"{name(component)}: chain {i} starts with {task!r}, which is not among the "
                                     f"tasks feasible at its start ({', '.join(a.tasks)})")
            assert instruction(component, a, task) == instruction(component, b, task), (
                f"{name(component)}: chain {i}: start_task({task!r}) gives two instructions")


@check("env")
def env_runs_in_a_worker_process(component: Component, config: dict[str, Any] | None = None) -> None:
    """The env builds and steps in a spawned worker process, where ``robo-run eval`` runs envs
    that do not declare ``safe_in_process``, exactly as in this process: its class imports in
    a fresh interpreter, its observations pickle, and after the same reset and commands the
    observations are the same (no state shared between instances of one process)."""
    from robovla.env_workers import EnvPool, EnvSpec, Fault

    here = build(component, config)
    try:
        expected = [here.reset(SEEDS[0])]
        task = here.tasks[0]
        here.start_task(task)
        expected += [here.step(STILL.copy()) for _ in range(STEPS)]
    finally:
        here.close()
    with EnvPool(EnvSpec(component.load(), dict(config or {})), 1, processes=True) as pool:
        begun = pool.call("begin", {0: (SEEDS[0],)})[0]
        got = [begun if isinstance(begun, Fault) else begun[0]]
        started = pool.call("start", {0: (task,)})[0]
        assert not isinstance(started, Fault), f"{name(component)}: start_task in a worker process failed: {started}"
        got += [pool.call("step", {0: (STILL.copy(),)})[0] for _ in range(STEPS)]
    for step, (obs, reply) in enumerate(zip(expected, got)):
        what = f"reset({SEEDS[0]})" if step == 0 else f"step {step} after reset({SEEDS[0]})"
        assert not isinstance(reply, Fault), f"{name(component)}: {what} in a worker process failed: {reply.message}"
        theirs = reply if step == 0 else reply[0]
        diff = differences(obs, theirs)
        assert not diff, (f"{name(component)}: {what} differs in {', '.join(diff)} between this process and a "
                          "worker process; keep no state between instances in one process (class or module "
                          "variables, a shared simulator client), since robo-run eval builds each env in a fresh "
                          "process")
