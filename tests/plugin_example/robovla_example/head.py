"""A linear policy head: each frame's [LRN] features map straight to an action chunk."""

import torch
from pydantic import Field
from torch import nn

import robovla
from robovla.losses import chunk_loss


class LinearHead(robovla.PolicyHead):
    """features [B, T, K, D] -> arm [B, T, C, A-1] (tanh) and gripper logits [B, T, C, 1]."""

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
        # robovla's shared loss: masked arm MSE + weighted gripper BCE, and the standard metrics
        return chunk_loss(prediction["arm"], prediction["gripper"], actions, action_mask,
                          arm_loss="mse", gripper_weight=self.config.gripper_weight)

    def actions(self, prediction, generator=None):
        # the gripper channel is P(open); the action space turns it into the +-1 command
        return torch.cat([prediction["arm"], torch.sigmoid(prediction["gripper"])], dim=-1)

    def reset(self):
        pass  # no history: each frame stands alone

    def step(self, feature):
        return self.forward(feature)
