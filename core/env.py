"""The Env interface: an environment a policy is evaluated in, closed loop.

One environment instance is one robot. Commands are what an ActionSpace decodes:
[A] = (dx, dy, dz, droll, dpitch, dyaw, gripper) with the gripper exactly -1 or +1.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from robovla.config import ComponentConfig


@dataclass
class Observation:
    """What the policy sees at one control step."""

    images: dict[str, np.ndarray]  # camera -> uint8 [H, W, 3]
    robot_obs: np.ndarray  # float [15]


class Env(abc.ABC):
    """Reset to a state, start a task, step commands, report task success."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    @property
    @abc.abstractmethod
    def tasks(self) -> tuple[str, ...]:
        """Names of the tasks :meth:`start_task` accepts."""

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> Observation:
        """Put the scene and robot in a start state drawn from ``seed``."""

    @abc.abstractmethod
    def start_task(self, task: str) -> str:
        """Begin ``task`` from the current state (the robot is not reset); returns its instruction."""

    @abc.abstractmethod
    def step(self, command: np.ndarray) -> Observation:
        """Apply one command [A]; returns the next observation."""

    @abc.abstractmethod
    def task_success(self) -> bool:
        """Whether the task begun by :meth:`start_task` has been achieved."""
