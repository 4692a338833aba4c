"""``lstm``: the recipe's policy head (RoboVLMs LSTMDecoder), an LSTM over the window of
[LRN] features, then per step the arm and gripper MLPs.

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (A-1 arm dims, then the gripper).

Batched semantics: the LSTM runs over the window from a zero state and predicts at every
step (step t sees frames 1..t); the loss covers every step. Online stepping keeps the
last T features and the LSTM state: while at most T frames have passed it advances the
state by one step (the same computation as the batched run); once more than T have
passed it re-runs the LSTM over the last T features from a zero state and takes the last
output, so that, like the batched forward, only the last T frames count. That is also
what RoboVLMs does at inference.
"""

from __future__ import annotations

import torch
from pydantic import Field, PositiveInt
from torch import nn

import robovla
from robovla_plugins.heads.common import RegressionConfig, RegressionHead, init_linear


class LSTMHead(RegressionHead):
    """LSTM over the window [B, T, K*D] -> h [B, T, hidden] -> arm [B, T, C, A-1] (tanh) and
    gripper logits [B, T, C, 1]. At full size (D=2048, hidden 1024, 4 layers, C=10) it has
    the recipe's 41.2M parameters."""

    class Config(RegressionConfig):
        hidden_size: PositiveInt = Field(1024, description="LSTM hidden size (the recipe: 1024)")
        num_layers: PositiveInt = Field(4, description="stacked LSTM layers (the recipe: 4)")
        dropout: float = Field(0.0, ge=0, lt=1, description="dropout between LSTM layers (the recipe: 0)")

    tiny_config = {"hidden_size": 32, "num_layers": 2, "mlp_widths": [32]}
    window = True
    history_attributes = ("_frames", "_state")

    def __init__(self, config: Config, dims: robovla.Dims):
        super().__init__(config, dims, config.hidden_size)
        self.lstm = nn.LSTM(self.in_features, config.hidden_size, num_layers=config.num_layers,
                            dropout=config.dropout if config.num_layers > 1 else 0.0, batch_first=True)
        init_linear(self)  # the MLPs; nn.LSTM keeps PyTorch's init, as in the recipe
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, F] -> LSTM outputs [B, T, hidden], from a zero state."""
        return self.lstm(x)[0]

    def reset(self) -> None:
        super().reset()
        self._state = None

    def step(self, feature: torch.Tensor) -> robovla.Prediction:
        """feature [B, 1, K, D] -> {"arm": [B, 1, C, A-1], "gripper": [B, 1, C, 1]}."""
        x = self.frame_features(self.one_frame(feature))  # [B, 1, F]
        passed = 1 if self._frames is None else self._frames.shape[1] + 1
        window = self.remember(x)  # the last (at most T) per-frame vectors [B, n, F]
        if passed <= self.dims.T:  # still inside the first window: one more LSTM step
            h, self._state = self.lstm(x, self._state)
        else:  # the oldest frame drops out, which only a fresh run over the window can express
            h, self._state = self.lstm(window)[0][:, -1:], None
        return self.outputs(h)
