"""A linear policy head: each frame's [LRN] features map straight to an action chunk."""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

import robovla


class LinearHead(robovla.PolicyHead):
    """features [B, T, K, D] -> arm [B, T, C, 6] (tanh) and gripper logits [B, T, C, 1]."""

    class Config(robovla.ComponentConfig):
        gripper_weight: float = Field(0.01, ge=0, description="weight of the gripper BCE against the arm MSE")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.proj = nn.Linear(dims.K * dims.D, dims.C * dims.A)

    def forward(self, features):
        b, t = features.shape[:2]
        out = self.proj(features.flatten(2)).view(b, t, self.dims.C, self.dims.A)
        return {"arm": torch.tanh(out[..., :-1]), "gripper": out[..., -1:]}

    def loss(self, prediction, actions, action_mask):
        m = action_mask.float()
        n = m.sum().clamp(min=1)
        arm = ((prediction["arm"] - actions[..., :-1]).pow(2).mean(-1) * m).sum() / n
        target = (actions[..., -1] > 0).float()
        logits = prediction["gripper"][..., 0]
        grip = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * m).sum() / n
        metrics = {
            "arm_l1": ((prediction["arm"] - actions[..., :-1]).abs().mean(-1) * m).sum().detach() / n,
            "gripper_acc": (((logits > 0).float() == target).float() * m).sum().detach() / n,
        }
        return arm + self.config.gripper_weight * grip, metrics

    def actions(self, prediction):
        gripper = torch.where(prediction["gripper"] >= 0, 1.0, -1.0)
        return torch.cat([prediction["arm"], gripper], dim=-1)

    def reset(self):
        pass  # no history: each frame stands alone

    def step(self, feature):
        return self.forward(feature)
