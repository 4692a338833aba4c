"""``discrete``: each arm dimension quantized into bins, predicted by classification.

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (A-1 arm dims, then the gripper), n bins.

The normalized range [low, high] of every arm dim is cut into n equal bins (256 by
default, as RoboVLMs' action tokenizer); a target falls into the bin that holds it
(values outside the range into the end bins). The head predicts logits [B, T, C, A-1, n]
from each frame (the recipe's per-frame trunk, then an MLP), trained by cross-entropy;
decoding takes the most likely bin's centre. The gripper, binary already, keeps its
logit and BCE like the other heads (BCE is the two-class cross-entropy). The bins are the
head's own: nothing depends on, or is added to, the VLM's vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator

import robovla
from robovla import losses
from robovla_plugins.heads.common import ChunkHead, HeadConfig, Width, frame_trunk, init_linear, mlp


class DiscreteHead(ChunkHead):
    """Per frame: features [B, T, K*D] -> trunk -> h [B, T, hidden] -> arm logits
    [B, T, C, A-1, bins] and gripper logits [B, T, C, 1]."""

    class Config(HeadConfig):
        hidden_size: Width = Field(1024, description="trunk output size, the input of the arm and gripper MLPs")
        bins: int = Field(256, ge=2, le=65536, description="bins per arm dimension (RoboVLMs: 256)")
        low: float = Field(-1.0, allow_inf_nan=False,
                           description="lower end of the binned range of the normalized arm actions")
        high: float = Field(1.0, allow_inf_nan=False,
                            description="upper end of the binned range of the normalized arm actions")

        @field_validator("high")
        @classmethod
        def _range_is_ordered(cls, high: float, info: ValidationInfo) -> float:
            low = info.data.get("low")
            if low is not None and not high > low:
                raise ValueError(f"high must be greater than low ({low})")
            return high

    test_config = {"hidden_size": 32, "mlp_widths": [32], "bins": 16}

    def __init__(self, config: Config, dims: robovla.Dims):
        super().__init__(config, dims, config.hidden_size)
        self.trunk = frame_trunk(self.in_features, config.hidden_size)
        self.arm_mlp = mlp(config.hidden_size, config.mlp_widths, dims.C * self.arm_dims * config.bins)
        init_linear(self)
        width = (config.high - config.low) / config.bins
        self.register_buffer("centres", config.low + width * (torch.arange(config.bins) + 0.5), persistent=False)

    def forward(self, features: torch.Tensor) -> robovla.Prediction:
        """features [B, T, K, D] -> {"arm_logits": [B, T, C, A-1, bins], "gripper": [B, T, C, 1]}."""
        h = self.trunk(self.frame_features(features))
        arm = self.arm_mlp(h).unflatten(-1, (self.dims.C, self.arm_dims, self.config.bins))
        return {"arm_logits": arm, "gripper": self.gripper(h)}

    def bin_of(self, arm: torch.Tensor) -> torch.Tensor:
        """Arm values [...] -> bin index [...] (long), out-of-range values in the end bins."""
        c = self.config
        index = torch.floor((arm - c.low) / (c.high - c.low) * c.bins)
        return index.nan_to_num(0).clamp(0, c.bins - 1).long()

    def decode(self, arm_logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, C, A-1, bins] -> the most likely bin's centre [B, T, C, A-1]."""
        return self.centres.to(arm_logits.dtype)[arm_logits.argmax(-1)]

    def loss(self, prediction, actions, action_mask):
        """Masked cross-entropy over the arm bins (mean over the arm dims) plus the weighted
        gripper BCE; ``arm_l1`` is measured on the decoded bin centres."""
        targets = losses.masked_targets(actions, action_mask)
        logits = prediction["arm_logits"]
        ce = F.cross_entropy(logits.flatten(0, -2), self.bin_of(targets[..., :-1]).flatten(), reduction="none")
        arm_loss = losses.masked_mean(ce.view(logits.shape[:-1]).mean(-1), action_mask)
        gripper_loss = losses.gripper_bce(prediction["gripper"], actions, action_mask)
        metrics = losses.action_metrics(self.decode(logits.detach()), prediction["gripper"][..., 0] >= 0,
                                        actions, action_mask)
        return losses.combine(arm_loss, gripper_loss, self.config.arm_gripper_loss_ratio, metrics)

    def actions(self, prediction, generator=None):
        """-> [B, T, C, A]: arm dims at their most likely bin's centre, the gripper P(open)."""
        return torch.cat([self.decode(prediction["arm_logits"]), self.gripper_open(prediction)], -1)
