"""``--action-space continuous``: any vector of continuous actions, with an optional gripper.

Each dimension is normalized into [-1, 1] on its own:

    minmax     2 (x - min) / (max - min) - 1
    quantile   as minmax between q01 and q99, values outside clipped
    meanstd    (x - mean) / std, clipped to +-clip_std and divided by clip_std

Statistics come from the dataset's own (a LeRobotDataset's meta/stats.json) when they hold
what the normalization needs, else from one pass over the training frames. The gripper
dimension (``--action-space.gripper``, default the last) is a binary target (1 above
``gripper_threshold``) and decodes to ``gripper_open`` or ``gripper_closed``; in the targets
it comes last, after the arm dimensions in their order, as every head expects. With
``--action-space.gripper none`` every dimension is continuous: the targets then end in a
constant "open" column that the heads' gripper output learns and decoding drops, so the
model predicts dim + 1 values and commands have dim.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from pydantic import Field

import robovla
from robovla.stats import RunningStats

NEEDS = {"minmax": ("min", "max"), "quantile": ("q01", "q99"), "meanstd": ("mean", "std")}


class Continuous(robovla.ActionSpace):
    """Per-dimension normalization of a continuous action vector (``--dataset.action_key``)."""

    class Config(robovla.ComponentConfig):
        key: str = Field("action", description="the dataset's action key to read (a LeRobotDataset's action "
                         "feature, or CALVIN's rel_actions / actions)")
        dim: int = Field(7, ge=1, le=256, description="action dimensions, the gripper included")
        normalization: Literal["minmax", "quantile", "meanstd"] = Field(
            "minmax", description="per-dimension normalization into [-1, 1] (see the module's doc)")
        clip_std: float = Field(3.0, gt=0, description="with normalization=meanstd: standard deviations kept")
        gripper: int | None = Field(-1, description="index of the binary gripper dimension (-1: the last), "
                                    "which the heads predict with their gripper loss; none: no gripper")
        gripper_threshold: float = Field(0.0, description="raw gripper values above it are 'open'")
        gripper_open: float = Field(1.0, description="the command sent for an open gripper")
        gripper_closed: float = Field(-1.0, description="the command sent for a closed gripper")
        statistics: Literal["dataset", "fit"] = Field(
            "dataset", description="dataset: the dataset's own statistics when it has them (else fit); fit: one "
            "pass over the training frames")

    def __init__(self, config: Any):
        super().__init__(config)
        self.source = config.key
        self.action_dim = config.dim
        g = config.gripper
        if g is not None and (not -config.dim <= g < config.dim or config.dim < 2):
            raise ValueError(f"--action-space.gripper {g}: outside the {config.dim} dimensions; give an index from "
                             f"{-config.dim} to {config.dim - 1} (with --action-space.dim 2 or more), or none")
        self.gripper = None if g is None else g % config.dim
        self.arm_dims = [d for d in range(config.dim) if d != self.gripper]
        self.command_dim = config.dim  # raw actions and commands
        self.action_dim = config.dim + (g is None)  # targets: the arm, then the gripper (or a constant)
        self.stats: dict[str, list[float]] | None = None

    # ------------------------------------------------------------------- statistics

    def fit(self, samples: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        stats = RunningStats(self.command_dim)
        for actions, _ in samples:
            stats.update(self._checked(actions))
        self.stats = stats.result()

    def fit_statistics(self, stats: dict[str, list[float]]) -> bool:
        """Take the dataset's own statistics when they hold what the normalization needs."""
        if self.config.statistics != "dataset":
            return False
        need = NEEDS[self.config.normalization]
        if not all(k in stats and len(stats[k]) == self.command_dim for k in need):
            return False
        self.stats = {k: [float(v) for v in stats[k]] for k in need}
        return True

    def _checked(self, actions: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape[-1] != self.command_dim:
            raise ValueError(f"--action-space continuous: the {self.source!r} actions have {actions.shape[-1]} "
                             f"dimensions, the space {self.command_dim}; pass --action-space.dim {actions.shape[-1]}")
        return actions

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(centre, half range) of the arm dimensions: target = (x - centre) / half."""
        if self.stats is None:
            raise RuntimeError("Continuous needs statistics: call fit() on the training data, or load_state_dict() "
                               "from a checkpoint")
        arm = self.arm_dims
        if self.config.normalization == "meanstd":
            centre = np.asarray(self.stats["mean"])[arm]
            half = np.asarray(self.stats["std"])[arm] * self.config.clip_std
        else:
            lo, hi = NEEDS[self.config.normalization]
            low, high = np.asarray(self.stats[lo])[arm], np.asarray(self.stats[hi])[arm]
            centre, half = (low + high) / 2, (high - low) / 2
        return centre, np.maximum(half, 1e-8)  # a constant dimension must not divide by zero

    # ------------------------------------------------------------------- encode / decode

    def encode(self, actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
        actions = self._checked(actions)
        centre, half = self._affine()
        arm = np.clip((actions[..., self.arm_dims] - centre) / half, -1, 1)
        if self.gripper is None:
            gripper = np.ones((*arm.shape[:-1], 1))
        else:
            gripper = actions[..., self.gripper:self.gripper + 1] > self.config.gripper_threshold
        return np.concatenate([arm, gripper], axis=-1).astype(np.float32)

    def decode(self, targets: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
        t = np.asarray(targets, dtype=np.float64)
        centre, half = self._affine()
        out = np.empty((*t.shape[:-1], self.command_dim), np.float64)
        out[..., self.arm_dims] = np.clip(t[..., :-1], -1, 1) * half + centre
        if self.gripper is not None:
            out[..., self.gripper] = np.where(t[..., -1] >= 0.5, self.config.gripper_open, self.config.gripper_closed)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats} if self.stats is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"stats"}
        if unknown:
            raise ValueError(f"Continuous: unknown state keys {sorted(unknown)}; expected 'stats'")
        stats = state.get("stats")
        need = NEEDS[self.config.normalization]
        if stats is not None and not all(len(stats.get(k, ())) == self.command_dim for k in need):
            raise ValueError(f"Continuous: statistics {sorted(stats)} do not hold {list(need)} of "
                             f"{self.command_dim} dimensions each")
        self.stats = stats
