"""What the built-in heads share: config fields, token pooling, the recipe's action MLPs,
and the two online schemes (per frame, or over a window of the last T frames).

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (A-1 arm dims, then the gripper), F per-frame input size, H body output size.
"""

from __future__ import annotations

import abc
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

import robovla
from robovla import losses

Width = Annotated[int, Field(gt=0, le=65536)]
"""A layer width: at least 1, at most 65536 (a typo of 10**9 would otherwise try to allocate it)."""
Layers = Annotated[int, Field(gt=0, le=1024)]
"""A count of layers, heads or steps."""

# The recipe's arm and gripper MLPs (RoboVLMs MLPTanhHead / MLPSigmoidHead): 1024, 512, 256.
RECIPE_MLP = [1024, 512, 256]


class HeadConfig(robovla.ComponentConfig):
    """Fields every built-in head has."""

    tokens: Literal["flatten", "mean", "max"] = Field(
        "flatten", description="how a frame's K [LRN] features become one vector: flatten (K*D), or mean or max over K")
    mlp_widths: list[Width] = Field(
        RECIPE_MLP, max_length=32, description="hidden widths of the arm and gripper MLPs (the recipe: 1024, 512, 256)")
    arm_gripper_loss_ratio: float = Field(
        0.01, ge=0, description="weight of the gripper loss against the arm loss (0.01 as the recipe runs)")


class RegressionConfig(HeadConfig):
    """Fields of the heads that regress the arm actions."""

    arm_loss: Literal["huber", "mse"] = Field(
        "huber", description="arm regression loss: huber (the recipe as run) or mse (the recipe's concept guide)")
    huber_delta: float = Field(1.0, gt=0, description="huber: where the loss turns from quadratic to linear")


def mlp(n_in: int, widths: list[int], n_out: int, tanh: bool = False) -> nn.Sequential:
    """Linear-ReLU layers of ``widths``, then Linear to ``n_out`` (and tanh if asked)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    layers.append(nn.Linear(n_in, n_out))
    if tanh:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def frame_trunk(n_in: int, hidden: int) -> nn.Sequential:
    """The recipe's per-frame trunk (RoboVLMs FCDecoder): F -> F/2 -> ReLU -> H."""
    return nn.Sequential(nn.Linear(n_in, max(n_in // 2, 1)), nn.ReLU(), nn.Linear(max(n_in // 2, 1), hidden))


def init_linear(module: nn.Module) -> None:
    """The recipe's init: xavier-uniform Linear weights, zero biases (recurrent layers keep theirs)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ChunkHead(robovla.PolicyHead):
    """Base of the built-in heads: a body maps each frame's features to h [B, T, H]; the
    gripper MLP maps h to C logits [B, T, C, 1]; subclasses add the arm output.

    A per-frame head (``window = False``) steps by running :meth:`forward` on the frame and
    has no history. A window head (``window = True``) reads frames causally: step n equals
    ``forward`` on the last T frames at its last position, which the default :meth:`step`
    obtains by keeping the last T features in ``_frames`` and re-running ``forward`` on
    them; such a head declares ``history_attributes = ("_frames",)`` (a head that steps
    otherwise, like ``lstm``, declares what it keeps instead).
    """

    Config = HeadConfig
    window: bool = False

    def __init__(self, config: HeadConfig, dims: robovla.Dims, hidden: int):
        super().__init__(config, dims)
        if dims.A < 2:
            raise ValueError(f"{type(self).__name__} needs A >= 2 (arm dims, then the gripper), got Dims.A={dims.A}")
        self.arm_dims = dims.A - 1
        self.in_features = dims.K * dims.D if config.tokens == "flatten" else dims.D
        self.gripper_mlp = mlp(hidden, config.mlp_widths, dims.C)
        self._frames: torch.Tensor | None = None

    def frame_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T, K, D] -> one vector per frame [B, T, F], as ``tokens`` says."""
        d = self.dims
        if features.dim() != 4 or tuple(features.shape[2:]) != (d.K, d.D):
            raise ValueError(f"{type(self).__name__}: features must be [B, T, K={d.K}, D={d.D}], "
                             f"got {list(features.shape)}")
        if self.window and features.shape[1] > d.T:
            raise ValueError(f"{type(self).__name__}: a window of {features.shape[1]} frames is longer than "
                             f"T={d.T}; the head reads at most T frames")
        if self.config.tokens == "flatten":
            return features.flatten(2)
        return features.mean(2) if self.config.tokens == "mean" else features.amax(2)

    def gripper(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, H] -> gripper logits [B, T, C, 1]."""
        return self.gripper_mlp(h).unflatten(-1, (self.dims.C, 1))

    def gripper_open(self, prediction: robovla.Prediction) -> torch.Tensor:
        """The probability [B, T, C, 1] that the gripper command is +1 (open)."""
        return torch.sigmoid(prediction["gripper"])

    def reset(self) -> None:
        self._frames = None

    def one_frame(self, feature: torch.Tensor) -> torch.Tensor:
        """Check that ``step`` got one frame [B, 1, K, D] (and a batch size it can continue)."""
        d = self.dims
        if feature.dim() != 4 or feature.shape[1] != 1 or tuple(feature.shape[2:]) != (d.K, d.D):
            raise ValueError(f"{type(self).__name__}.step takes one frame [B, 1, K={d.K}, D={d.D}], "
                             f"got {list(feature.shape)}")
        if self._frames is not None and self._frames.shape[0] != feature.shape[0]:
            raise ValueError(f"{type(self).__name__}.step: batch size changed from {self._frames.shape[0]} to "
                             f"{feature.shape[0]} within an episode; call reset() first")
        return feature

    def remember(self, feature: torch.Tensor) -> torch.Tensor:
        """Append one frame [B, 1, ...] to the history; return the last (at most T) frames [B, n, ...]."""
        frames = torch.cat([self._frames, feature], 1) if self._frames is not None else feature
        self._frames = frames[:, -self.dims.T:]
        return self._frames

    def step(self, feature: torch.Tensor) -> robovla.Prediction:
        """feature [B, 1, K, D] -> the prediction for this frame, [B, 1, C, ...]."""
        feature = self.one_frame(feature)
        if not self.window:
            return self.forward(feature)
        return {k: v[:, -1:] for k, v in self.forward(self.remember(feature)).items()}


class RegressionHead(ChunkHead):
    """A body, then the recipe's two MLPs: arm [B, T, C, A-1] (tanh) and gripper logits
    [B, T, C, 1]; loss: masked Huber or MSE on the arm plus weighted gripper BCE."""

    Config = RegressionConfig

    def __init__(self, config: RegressionConfig, dims: robovla.Dims, hidden: int):
        super().__init__(config, dims, hidden)
        self.arm_mlp = mlp(hidden, config.mlp_widths, dims.C * self.arm_dims, tanh=True)

    @abc.abstractmethod
    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame vectors x [B, T, F] -> h [B, T, H] (causal over T for window heads)."""

    def outputs(self, h: torch.Tensor) -> robovla.Prediction:
        """h [B, T, H] -> {"arm": [B, T, C, A-1], "gripper": [B, T, C, 1] logits}."""
        return {"arm": self.arm_mlp(h).unflatten(-1, (self.dims.C, self.arm_dims)), "gripper": self.gripper(h)}

    def forward(self, features: torch.Tensor) -> robovla.Prediction:
        """features [B, T, K, D] -> {"arm": [B, T, C, A-1], "gripper": [B, T, C, 1] logits}."""
        return self.outputs(self.body(self.frame_features(features)))

    def loss(self, prediction, actions, action_mask):
        c = self.config
        return losses.chunk_loss(prediction["arm"], prediction["gripper"], actions, action_mask,
                                 arm_loss=c.arm_loss, huber_delta=c.huber_delta,
                                 gripper_weight=c.arm_gripper_loss_ratio)

    def actions(self, prediction, generator=None):
        """-> [B, T, C, A]: the arm as predicted, the gripper channel P(open) = sigmoid(logit)."""
        return torch.cat([prediction["arm"], self.gripper_open(prediction)], -1)
