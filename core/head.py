"""The PolicyHead interface: [LRN] features in, a chunk of actions out.

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (6 arm + 1 gripper).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from robovla.config import ComponentConfig

Prediction = dict[str, torch.Tensor]
"""What a head predicts, e.g. ``{"arm": [B, T, C, 6], "gripper": [B, T, C, 1]}``; keys are the
head's own, every value has B and T as its first two axes (so ``v[:, t:t+1]`` is step t)."""


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
    pass and one head step. ``step`` over a sequence must equal ``forward`` on it: the
    n-th step after :meth:`reset` equals ``forward`` over the window of the last T frames
    (frames 1..n while n <= T, frames n-T+1..n after), at its last frame.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    test_config: ClassVar[dict[str, Any]] = {}
    """Config values that build a small instance offline in seconds (robovla.testing uses them)."""
    history_attributes: ClassVar[tuple[str, ...]] = ()
    """Names of the instance attributes that hold the online history (what :meth:`reset`
    clears and :meth:`step` advances). :meth:`save_history` and :meth:`load_history` swap
    them, which is how one head keeps a separate history for each of several episodes
    (robovla.Policy); a head with history must list them (a conformance check tests it). A
    head whose steps read each frame alone lists none: the Policy then runs the VLM only
    when it needs a new chunk (``chunk:k`` execution)."""
    dims: Dims

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

        Targets are normalized: arm dims in about [-1, 1], the gripper dim (last) in {0, 1}
        (1 = open). Masked positions must not change the loss. Every head reports the same
        metric keys (``arm_l1``, ``gripper_acc`` among them; :mod:`robovla.losses` computes
        the standard set) so that ablations compare directly.
        """

    @abc.abstractmethod
    def actions(self, prediction: Prediction, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prediction -> normalized actions [B, T, C, A]: arm dims as the targets are
        normalized, the gripper channel the probability in [0, 1] that the command is +1
        (open); the action space decodes >= 0.5 to +1, else -1.

        Heads that sample (e.g. flow matching) draw their noise from ``generator`` (the
        global RNG when None), so the same generator state gives the same actions.
        """

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the online history (call at the start of each episode)."""

    @abc.abstractmethod
    def step(self, feature: torch.Tensor) -> Prediction:
        """One online step: feature [B, 1, K, D] -> prediction for that step ([B, 1, C, ...])."""

    def save_history(self) -> dict[str, Any]:
        """The current online history (the ``history_attributes``), to :meth:`load_history` later.

        :meth:`step` must not change the saved objects in place (replace, do not mutate)."""
        return {name: getattr(self, name) for name in self.history_attributes}

    def load_history(self, history: dict[str, Any]) -> None:
        """Continue from a history :meth:`save_history` returned (after a :meth:`reset`, for a new one)."""
        for name in self.history_attributes:
            setattr(self, name, history[name])
