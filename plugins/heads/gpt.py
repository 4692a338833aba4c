"""``gpt``: a causal transformer over the window (RoboVLMs GPTDecoder).

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (A-1 arm dims, then the gripper).

Each frame's features are projected to the model width and given a learned position
(0..T-1, counted from the window's first frame); pre-norm GPT blocks with causal
self-attention read the window, so step t sees frames 1..t; the arm and gripper MLPs
predict a chunk at every step. Online, the head keeps the last T features and re-runs the
window each step, taking the last output: exactly the batched forward on those frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

import robovla
from robovla_plugins.heads.common import Layers, RegressionConfig, RegressionHead, Width, init_linear


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP, both residual."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, W] -> [B, T, W]; position t attends to positions <= t."""
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(y.transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class GPTHead(RegressionHead):
    """Causal transformer over the window [B, T, K*D] with learned positions -> h [B, T,
    hidden] -> arm [B, T, C, A-1] (tanh) and gripper logits [B, T, C, 1]."""

    class Config(RegressionConfig):
        hidden_size: Width = Field(1024, description="transformer width (features are projected to it)")
        num_layers: Layers = Field(8, description="transformer blocks (RoboVLMs GPTDecoder: 8)")
        num_heads: Layers = Field(8, description="attention heads; must divide hidden_size")
        dropout: float = Field(0.0, ge=0, lt=1, description="dropout on attention and block outputs")

        @field_validator("num_heads")
        @classmethod
        def _heads_divide_width(cls, heads: int, info: ValidationInfo) -> int:
            width = info.data.get("hidden_size")
            if width is not None and width % heads:
                raise ValueError(f"num_heads must divide hidden_size ({width})")
            return heads

    test_config = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "mlp_widths": [32]}
    window = True
    history_attributes = ("_frames",)  # the last T features, re-run every step

    def __init__(self, config: Config, dims: robovla.Dims):
        super().__init__(config, dims, config.hidden_size)
        self.proj = nn.Linear(self.in_features, config.hidden_size)
        self.positions = nn.Parameter(torch.zeros(dims.T, config.hidden_size))
        self.blocks = nn.ModuleList(Block(config.hidden_size, config.num_heads, config.dropout)
                                    for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        init_linear(self)
        nn.init.normal_(self.positions, std=0.02)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, F] (T at most the window) -> h [B, T, hidden], causal over T."""
        h = self.proj(x) + self.positions[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.norm(h)
