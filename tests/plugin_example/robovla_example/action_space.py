"""Clip-and-scale actions: arm deltas clipped to +-bound and scaled to [-1, 1]."""

import numpy as np
from pydantic import Field

import robovla


class ClipActions(robovla.ActionSpace):
    """Arm [..., :6] clipped to +-bound then divided by it; the gripper [..., 6] -1/+1 <-> 0/1."""

    class Config(robovla.ComponentConfig):
        bound: float = Field(0.65, gt=0, description="arm values are clipped to +-bound, then scaled by 1/bound")

    def encode(self, actions, robot_obs):
        out = np.array(actions, dtype=np.float32)
        out[..., :6] = np.clip(out[..., :6], -self.config.bound, self.config.bound) / self.config.bound
        out[..., 6] = (out[..., 6] > 0).astype(np.float32)  # the target: 1 = open
        return out

    def decode(self, targets, robot_obs):
        out = np.array(targets, dtype=np.float32)
        out[..., :6] = np.clip(out[..., :6], -1, 1) * self.config.bound
        out[..., 6] = np.where(out[..., 6] >= 0.5, 1.0, -1.0)  # P(open) -> the +-1 command
        return out
