"""``mlp``: a per-frame head with no history (RoboVLMs FCDecoder).

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (A-1 arm dims, then the gripper).

Each frame's features go through the recipe's trunk (F -> F/2 -> ReLU -> hidden) and
then the arm and gripper MLPs; frames never see each other, so an online step is the
forward pass on that frame alone.
"""

from __future__ import annotations

import torch
from pydantic import Field

import robovla
from robovla_plugins.heads.common import RegressionConfig, RegressionHead, Width, frame_trunk, init_linear


class MLPHead(RegressionHead):
    """Per frame: features [B, T, K*D] -> trunk -> h [B, T, hidden] -> arm [B, T, C, A-1]
    (tanh) and gripper logits [B, T, C, 1]."""

    class Config(RegressionConfig):
        hidden_size: Width = Field(1024, description="trunk output size, the input of the arm and gripper MLPs")

    test_config = {"hidden_size": 32, "mlp_widths": [32]}

    def __init__(self, config: Config, dims: robovla.Dims):
        super().__init__(config, dims, config.hidden_size)
        self.trunk = frame_trunk(self.in_features, config.hidden_size)
        init_linear(self)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, F] -> h [B, T, hidden], each frame on its own."""
        return self.trunk(x)
