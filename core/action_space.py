"""The ActionSpace interface: raw robot actions <-> normalized training targets.

Shape letters: A action dim (7: dx, dy, dz, droll, dpitch, dyaw, gripper); ``...`` any
leading dims. robot_obs is CALVIN's 15-vector (TCP position and Euler orientation first).
Works on numpy arrays, so that data-loading workers need no torch.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np

from robovla.config import ComponentConfig


class ActionSpace(abc.ABC):
    """Encodes dataset actions into targets and decodes predictions into commands.

    Fitted statistics (when the normalization needs them) are part of
    :meth:`state_dict`, which travels in every checkpoint.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    action_dim: ClassVar[int] = 7  # targets, what the model predicts
    # raw actions and decoded commands, when their size differs from the targets' (a space may add
    # a target the commands lack); None: action_dim
    command_dim: ClassVar[int | None] = None
    source: ClassVar[str] = "actions"  # the dataset's action key this space reads (Frames.actions)

    def __init__(self, config: ComponentConfig):
        self.config = config

    def fit(self, samples: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        """Compute statistics in one streaming pass over (actions [n, A], robot_obs [n, 15]).

        The default needs none; spaces that normalize from statistics override it.
        """

    def fit_statistics(self, stats: dict[str, list[float]]) -> bool:
        """Take statistics the dataset ships (:meth:`robovla.Dataset.statistics`) instead of
        fitting; True when taken. The default takes none, so :meth:`fit` runs."""
        return False

    @abc.abstractmethod
    def encode(self, actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
        """Raw actions [..., A] with robot_obs [..., 15] -> float32 targets [..., A] in [-1, 1]."""

    @abc.abstractmethod
    def decode(self, targets: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
        """Normalized [..., A] -> environment commands [..., A]; the gripper is exactly -1 or +1."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready fitted state (empty when nothing is fitted)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no fitted state, got keys {sorted(state)}")
