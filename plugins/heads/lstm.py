"""``lstm``: the recipe's policy head (RoboVLMs LSTMDecoder), an LSTM over the window of
[LRN] features, then per step the arm and gripper MLPs.

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (A-1 arm dims, then the gripper).

Batched semantics: the LSTM runs over the window from a zero state and predicts at every
step (step t sees frames 1..t); the loss covers every step. Online, step n must equal the
LSTM run from a zero state over the last T frames (frames 1..n while n <= T), which is what
RoboVLMs computes at inference by re-running the LSTM over its last T features every step
(T sequential LSTM steps per control step). Here the head keeps one LSTM state per window
that is still open instead, staggered: every frame opens a window from a zero state, one
batched LSTM step advances all open windows (at most T rows per sample) by the new frame,
the oldest open window gives the output, and a window closes after T frames. The result is
the same sliding window, at the cost of one LSTM step of T rows per control step.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

import robovla
from robovla_plugins.heads.common import Layers, RegressionConfig, RegressionHead, Width, init_linear


class LSTMHead(RegressionHead):
    """LSTM over the window [B, T, K*D] -> h [B, T, hidden] -> arm [B, T, C, A-1] (tanh) and
    gripper logits [B, T, C, 1]. At full size (D=2048, hidden 1024, 4 layers, C=10) it has
    the recipe's 41.2M parameters."""

    class Config(RegressionConfig):
        hidden_size: Width = Field(1024, description="LSTM hidden size (the recipe: 1024)")
        num_layers: Layers = Field(4, description="stacked LSTM layers (the recipe: 4)")
        dropout: float = Field(0.0, ge=0, lt=1, description="dropout between LSTM layers (the recipe: 0)")

    test_config = {"hidden_size": 32, "num_layers": 2, "mlp_widths": [32]}
    window = True
    history_attributes = ("_state",)

    def __init__(self, config: Config, dims: robovla.Dims):
        super().__init__(config, dims, config.hidden_size)
        self.lstm = nn.LSTM(self.in_features, config.hidden_size, num_layers=config.num_layers,
                            dropout=config.dropout if config.num_layers > 1 else 0.0, batch_first=True)
        init_linear(self)  # the MLPs; nn.LSTM keeps PyTorch's init, as in the recipe
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None  # open windows' (h, c) [layers, B, W, H]

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, F] -> LSTM outputs [B, T, hidden], from a zero state."""
        return self.lstm(x)[0]

    def reset(self) -> None:
        super().reset()
        self._state = None

    def step(self, feature: torch.Tensor) -> robovla.Prediction:
        """feature [B, 1, K, D] -> {"arm": [B, 1, C, A-1], "gripper": [B, 1, C, 1]}."""
        x = self.frame_features(self.one_frame(feature))  # [B, 1, F]
        b, layers, hidden = x.shape[0], self.config.num_layers, self.config.hidden_size
        if self._state is not None and self._state[0].shape[1] != b:
            raise ValueError(f"LSTMHead.step: batch size changed from {self._state[0].shape[1]} to {b} within an "
                             "episode; call reset() first")
        fresh = x.new_zeros(layers, b, 1, hidden)  # the window this frame opens
        h, c = (fresh, fresh) if self._state is None else (torch.cat([s, fresh], 2) for s in self._state)
        w = h.shape[2]  # open windows per sample, oldest first
        out, (h, c) = self.lstm(x.repeat_interleave(w, 0), (h.flatten(1, 2), c.flatten(1, 2)))  # rows (b, w)
        h, c = h.unflatten(1, (b, w)), c.unflatten(1, (b, w))  # [layers, B, W, H]
        oldest = out.unflatten(0, (b, w))[:, 0]  # [B, 1, H]: the window that has seen min(n, T) frames
        if w == self.dims.T:  # it has seen T frames: it closes
            h, c = h[:, :, 1:], c[:, :, 1:]
        self._state = (h, c)
        return self.outputs(oldest)
