"""The Env interface: an environment a policy is evaluated in, closed loop.

One environment instance is one robot. Commands are what an ActionSpace decodes:
[A] = (dx, dy, dz, droll, dpitch, dyaw, gripper) with the gripper exactly -1 or +1.

Two evaluation protocols drive an Env (robovla.rollout): single-task episodes (reset to a
seeded state, one task, until success or the step limit) and CALVIN's long-horizon
chains (reset once to a chain's start state, then its subtasks in order without resetting
the robot; :meth:`Env.chains` lists them).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from robovla.config import ComponentConfig


@dataclass
class Observation:
    """What the policy sees at one control step."""

    images: dict[str, np.ndarray]  # camera -> uint8 [H, W, 3]
    robot_obs: np.ndarray  # float [15]


@dataclass(frozen=True)
class Chain:
    """One long-horizon evaluation sequence: where the scene starts, and the subtasks in order."""

    state: Any  # JSON-ready; what Env.reset accepts (an int seed, or the env's own description)
    tasks: tuple[str, ...]


class Env(abc.ABC):
    """Reset to a state, start a task, step commands, report task success."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    safe_in_process: ClassVar[bool] = False
    """True when several instances can run in one process without affecting each other (no
    process-wide simulator state). Evaluation runs envs that do not say so each in its own
    worker process (robovla.env_workers), which also needs the env to be importable and its
    observations picklable there."""

    def __init__(self, config: ComponentConfig):
        self.config = config

    @property
    @abc.abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Names of the tasks :meth:`start_task` accepts in the current state."""

    @abc.abstractmethod
    def reset(self, state: Any = None) -> Observation:
        """Put the scene and robot in a start state: an int seed draws one; a :class:`Chain`'s
        ``state`` (from :meth:`chains`) is that chain's start."""

    @abc.abstractmethod
    def start_task(self, task: str) -> str:
        """Begin ``task`` from the current state (the robot is not reset); returns its instruction."""

    @abc.abstractmethod
    def step(self, command: np.ndarray) -> Observation:
        """Apply one command [A]; returns the next observation."""

    @abc.abstractmethod
    def task_success(self) -> bool:
        """Whether the task begun by :meth:`start_task` has been achieved."""

    def chains(self, n: int) -> list[Chain]:
        """The first ``n`` long-horizon evaluation chains, always the same ones in the same order."""
        raise NotImplementedError(f"{type(self).__name__} defines no long-horizon chains; evaluate it with "
                                  "single-task episodes (--protocol episodes), or implement Env.chains")

    def close(self) -> None:
        """Release what the environment holds (a simulator connection, windows); the default has nothing."""
