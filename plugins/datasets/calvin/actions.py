"""CALVIN action spaces: ``rel-world``, ``rel-tcp`` and ``abs-world``.

Action vectors are [dx, dy, dz, droll, dpitch, dyaw, gripper] (A = 7). CALVIN's stored
``rel_actions`` are world-frame deltas: position difference clipped to +-0.02 m and
divided by 0.02, per-component wrapped Euler difference clipped to +-0.05 rad and divided
by 0.05 (calvin_env ``to_relative_action``). Euler angles follow pybullet: extrinsic x-y-z,
R = Rz(yaw) Ry(pitch) Rx(roll). robot_obs[0:3] is the TCP position, [3:6] its Euler angles.

Normalization of the six arm dims (the gripper is {-1, 1} on disk, {0, 1} as a target):
``clip`` (the recipe: clip to +-clip_bound, divide by it), ``minmax`` or ``quantile``
(q01/q99) from statistics fitted in one streaming pass. Decoding clips to [-1, 1], undoes
the normalization and the frame change, and gives a gripper command of exactly -1 or +1.
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Literal

import numpy as np
from pydantic import Field

import robovla
from robovla.stats import RunningStats

POS_STEP = 0.02  # metres per unit of rel_actions[0:3]
ORN_STEP = 0.05  # radians per unit of rel_actions[3:6]


# ------------------------------------------------------------------------ rotations


def wrap(angle: np.ndarray) -> np.ndarray:
    """Angles into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def euler_to_matrix(euler: np.ndarray) -> np.ndarray:
    """pybullet Euler [..., 3] (extrinsic xyz) -> rotation matrices [..., 3, 3] = Rz Ry Rx."""
    a, b, c = np.moveaxis(np.asarray(euler, dtype=np.float64), -1, 0)
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rows = [
        [cc * cb, cc * sb * sa - sc * ca, cc * sb * ca + sc * sa],
        [sc * cb, sc * sb * sa + cc * ca, sc * sb * ca - cc * sa],
        [-sb, cb * sa, cb * ca],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_euler(matrix: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> pybullet Euler [..., 3] with pitch in [-pi/2, pi/2]."""
    m = np.asarray(matrix, dtype=np.float64)
    pitch = np.arctan2(-m[..., 2, 0], np.hypot(m[..., 0, 0], m[..., 1, 0]))
    roll = np.arctan2(m[..., 2, 1], m[..., 2, 2])
    yaw = np.arctan2(m[..., 1, 0], m[..., 0, 0])
    return np.stack([roll, pitch, yaw], axis=-1)


def world_to_tcp(rel: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
    """CALVIN world-frame rel actions [..., 7] -> the same motion in the TCP frame, same scaling.

    Position: R_t^T dp. Orientation: the rotation R_t^T R(e_t + de) that carries the TCP to
    its target, as Euler angles. The gripper is unchanged.
    """
    rel = np.asarray(rel, dtype=np.float64)
    rot = euler_to_matrix(robot_obs[..., 3:6])
    pos = np.einsum("...ji,...j->...i", rot, rel[..., :3])  # R^T dp (the step size cancels)
    target = euler_to_matrix(robot_obs[..., 3:6] + rel[..., 3:6] * ORN_STEP)
    orn = matrix_to_euler(np.swapaxes(rot, -1, -2) @ target) / ORN_STEP
    return np.concatenate([pos, orn, rel[..., 6:]], axis=-1)


def tcp_to_world(rel_tcp: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
    """The exact inverse of :func:`world_to_tcp`: TCP-frame actions -> CALVIN rel actions."""
    rel_tcp = np.asarray(rel_tcp, dtype=np.float64)
    rot = euler_to_matrix(robot_obs[..., 3:6])
    pos = np.einsum("...ij,...j->...i", rot, rel_tcp[..., :3])
    target = matrix_to_euler(rot @ euler_to_matrix(rel_tcp[..., 3:6] * ORN_STEP))
    # Every rotation has a second Euler form (roll + pi, pi - pitch, yaw + pi); past pitch
    # +-pi/2 the nearer one to the current angles is the delta that was meant.
    other = np.stack([target[..., 0] + np.pi, np.pi - target[..., 1], target[..., 2] + np.pi], axis=-1)
    deltas = [wrap(t - robot_obs[..., 3:6]) for t in (target, other)]
    nearer = np.abs(deltas[1]).max(-1, keepdims=True) < np.abs(deltas[0]).max(-1, keepdims=True)
    orn = np.where(nearer, deltas[1], deltas[0]) / ORN_STEP
    return np.concatenate([pos, orn, rel_tcp[..., 6:]], axis=-1)


# ---------------------------------------------------------------------- action spaces


class _CalvinActions(robovla.ActionSpace):
    """Shared part: arm normalization and the gripper; subclasses give the arm's frame."""

    source: ClassVar[str] = "rel_actions"

    class Config(robovla.ComponentConfig):
        normalization: Literal["clip", "minmax", "quantile"] = Field(
            "clip", description="arm normalization: clip to +-clip_bound (the recipe), min/max or q01/q99 from statistics")
        clip_bound: float = Field(0.65, gt=0, description="with normalization=clip: arm values are clipped to +-bound, then divided by it")

    def __init__(self, config: Any):
        super().__init__(config)
        self.stats: dict[str, list[float]] | None = None

    def arm(self, actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
        """Raw actions [..., 7] -> the six arm values this space normalizes."""
        return np.asarray(actions, dtype=np.float64)[..., :6]

    def unarm(self, arm: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`arm`: six arm values -> the environment's six arm values."""
        return arm

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        if self.config.normalization == "clip":
            b = self.config.clip_bound
            return np.full(6, -b), np.full(6, b)
        if self.stats is None:
            raise RuntimeError(f"{type(self).__name__} with normalization={self.config.normalization!r} needs "
                               "statistics: call fit() on the training data, or load_state_dict() from a checkpoint")
        lo, hi = ("min", "max") if self.config.normalization == "minmax" else ("q01", "q99")
        low, high = np.asarray(self.stats[lo]), np.asarray(self.stats[hi])
        return low, np.maximum(high, low + 1e-8)  # a constant dimension must not divide by zero

    def fit(self, samples: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        stats = RunningStats(6)
        for actions, robot_obs in samples:
            stats.update(self.arm(actions, robot_obs))
        self.stats = stats.result()

    def encode(self, actions: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
        low, high = self._bounds()
        arm = 2 * (np.clip(self.arm(actions, robot_obs), low, high) - low) / (high - low) - 1
        gripper = (np.asarray(actions)[..., 6:7] > 0).astype(np.float64)
        return np.concatenate([arm, gripper], axis=-1).astype(np.float32)

    def decode(self, targets: np.ndarray, robot_obs: np.ndarray) -> np.ndarray:
        low, high = self._bounds()
        t = np.asarray(targets, dtype=np.float64)
        arm = (np.clip(t[..., :6], -1, 1) + 1) / 2 * (high - low) + low
        gripper = np.where(t[..., 6:7] >= 0.5, 1.0, -1.0)
        return np.concatenate([self.unarm(arm, robot_obs), gripper], axis=-1)

    def state_dict(self) -> dict[str, Any]:
        return {"stats": self.stats} if self.stats is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"stats"}
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown state keys {sorted(unknown)}; expected 'stats'")
        self.stats = state.get("stats")


class RelWorld(_CalvinActions):
    """CALVIN's rel_actions as stored: world-frame deltas already scaled to [-1, 1]."""


class RelTcp(_CalvinActions):
    """CALVIN's rel_actions re-expressed in the TCP frame (and back when decoding)."""

    def arm(self, actions, robot_obs):
        return world_to_tcp(actions, robot_obs)[..., :6]

    def unarm(self, arm, robot_obs):
        padded = np.concatenate([arm, np.zeros(arm.shape[:-1] + (1,))], axis=-1)
        return tcp_to_world(padded, robot_obs)[..., :6]


class AbsWorld(_CalvinActions):
    """Absolute TCP target pose (CALVIN's ``actions``): position and Euler angles, world frame.

    Positions need fitted statistics, so the default normalization here is min/max. Euler
    angles are first unwrapped into angle_center +- pi: CALVIN's roll sits near +-pi, where a
    plain [-pi, pi) range would split one pose into two far-apart targets.
    """

    source: ClassVar[str] = "actions"

    class Config(_CalvinActions.Config):
        normalization: Literal["clip", "minmax", "quantile"] = Field(
            "minmax", description="arm normalization: min/max (default) or q01/q99 from statistics, or clip to +-clip_bound")
        angle_center: tuple[float, float, float] = Field(
            (np.pi, 0.0, 0.0), description="roll, pitch, yaw around which angles are unwrapped (+- pi); CALVIN's roll is near pi")

    def arm(self, actions, robot_obs):
        arm = np.asarray(actions, dtype=np.float64)[..., :6].copy()
        center = np.asarray(self.config.angle_center)
        arm[..., 3:6] = wrap(arm[..., 3:6] - center) + center
        return arm

    def unarm(self, arm, robot_obs):
        arm = np.array(arm, dtype=np.float64)
        arm[..., 3:6] = wrap(arm[..., 3:6])
        return arm
