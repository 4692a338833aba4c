"""The PolicyHead interface: [LRN] features in, a chunk of actions out.

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (6 arm + 1 gripper).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from robovla.config import ComponentConfig

Prediction = dict[str, torch.Tensor]
"""What a head predicts, e.g. ``{"arm": [B, T, C, 6], "gripper": [B, T, C, 1]}``; keys are the head's own."""


@dataclass(frozen=True)
class Dims:
    """The sizes a head is built for, named by the shape letters."""

    D: int  # feature size (the backbone's hidden size)
    K: int = 1  # [LRN] tokens per frame
    T: int = 8  # window
    C: int = 10  # chunk
    A: int = 7  # action dim


class PolicyHead(nn.Module, abc.ABC):
    """Maps [LRN] features [B, T, K, D] to action chunks [B, T, C, A].

    Training calls :meth:`forward` on a whole window and :meth:`loss`; online control calls
    :meth:`reset` once per episode and :meth:`step` once per frame, the head keeping its
    own history (LSTM state, last T features), so that one control step costs one VLM
    pass and one head step. ``step`` over a sequence must equal ``forward`` on it.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig, dims: Dims):
        super().__init__()
        self.config = config
        self.dims = dims

    @abc.abstractmethod
    def forward(self, features: torch.Tensor) -> Prediction:
        """features [B, T, K, D] -> prediction for every step of the window."""

    @abc.abstractmethod
    def loss(self, prediction: Prediction, actions: torch.Tensor,
             action_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Targets [B, T, C, A] and mask bool [B, T, C] -> (scalar loss, metrics).

        Masked positions must not change the loss. Every head reports the same metric keys
        (``arm_l1``, ``gripper_acc`` among them) so that ablations compare directly.
        """

    @abc.abstractmethod
    def actions(self, prediction: Prediction) -> torch.Tensor:
        """Prediction -> normalized actions [B, T, C, A], gripper in {-1, +1}."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the online history (call at the start of each episode)."""

    @abc.abstractmethod
    def step(self, feature: torch.Tensor) -> Prediction:
        """One online step: feature [B, 1, K, D] -> prediction for that step ([B, 1, C, ...])."""
