"""``flow``: a flow-matching head for the arm chunk, conditioned on each frame's features.

Shape letters: B batch, T window, K [LRN] tokens per frame, D feature size, C chunk,
A action dim (A-1 arm dims, then the gripper), H condition size.

Flow matching (rectified flow, as in modern VLAs such as pi0; RoboVLMs ships no such head)
learns a velocity field v(x, s | h) that transports Gaussian noise x0 (s = 0) to the arm
chunk x1 [C, A-1] (s = 1) along straight lines x_s = (1 - s) x0 + s x1. Training draws
x0 ~ N(0, I) and, per frame, s from pi0's schedule (s = 0.999 (1 - u), u ~ Beta(1.5, 1):
more weight on the noisy end, never exactly s = 1) and regresses v onto x1 - x0 (masked
MSE, the ``arm_loss``); sampling integrates dx/ds = v from noise at s = 0 to s = 1 with
``sample_steps`` Euler steps.
The condition h [B, T, H] comes from the recipe's per-frame trunk; the gripper, binary,
is a logit from h with the usual BCE. Chunk positions past the episode end (masked) are
given the target 0 before interpolation, so that their stored values reach nothing.

Randomness: training draws from the global RNG (seeded per rank by the trainer).
Sampling happens in :meth:`FlowHead.actions`, which draws its noise from the generator it
is given (the global RNG when None): the same generator state gives the same actions, and
online steps, which are per frame, equal the batched forward exactly.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

import robovla
from robovla import losses
from robovla_plugins.heads.common import ChunkHead, HeadConfig, Layers, Width, frame_trunk, init_linear, mlp

# sin/cos features of the flow time s in [0, 1] at geometric frequencies 1..10 rad per unit of
# s: the velocity field is smooth in s, and higher frequencies made it slower to learn.
TIME_FEATURES = 32
TIME_MAX_FREQUENCY = 10.0


def time_features(s: torch.Tensor) -> torch.Tensor:
    """Flow time s [...] -> sinusoidal features [..., TIME_FEATURES]."""
    freqs = torch.exp(torch.linspace(0, math.log(TIME_MAX_FREQUENCY), TIME_FEATURES // 2, device=s.device,
                                     dtype=s.dtype))
    angles = s[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], -1)


def training_times(shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Flow times s [shape] for training, pi0's schedule: s = 0.999 (1 - u), u ~ Beta(1.5, 1)
    (drawn by inversion, u = r^(2/3) with r ~ U(0, 1)), so P(s > x) = (1 - x / 0.999)^1.5."""
    return 0.999 * (1 - torch.rand(shape, dtype=dtype, device=device) ** (2 / 3))


class FlowHead(ChunkHead):
    """Per frame: features [B, T, K*D] -> condition h [B, T, hidden]; a velocity MLP on (h,
    x_s [C*(A-1)], features of s) transports noise to the arm chunk [B, T, C, A-1];
    gripper logits [B, T, C, 1] from h."""

    class Config(HeadConfig):
        hidden_size: Width = Field(1024, description="size of the per-frame condition h")
        velocity_widths: list[Width] = Field(
            [1024, 1024, 1024], description="hidden widths of the velocity MLP")
        sample_steps: Layers = Field(10, description="Euler steps from noise to the action chunk")

    test_config = {"hidden_size": 32, "mlp_widths": [32], "velocity_widths": [256, 256]}

    def __init__(self, config: Config, dims: robovla.Dims):
        super().__init__(config, dims, config.hidden_size)
        self.chunk_size = dims.C * self.arm_dims
        self.trunk = frame_trunk(self.in_features, config.hidden_size)
        self.velocity_mlp = mlp(config.hidden_size + self.chunk_size + TIME_FEATURES, config.velocity_widths,
                                self.chunk_size)
        init_linear(self)

    def forward(self, features: torch.Tensor) -> robovla.Prediction:
        """features [B, T, K, D] -> {"condition": [B, T, hidden], "gripper": [B, T, C, 1]}."""
        h = self.trunk(self.frame_features(features))
        return {"condition": h, "gripper": self.gripper(h)}

    def velocity(self, condition: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """condition [B, T, H], x [B, T, C, A-1], s [B, T] -> velocity [B, T, C, A-1]."""
        inputs = torch.cat([condition, x.flatten(2), time_features(s)], -1)
        return self.velocity_mlp(inputs).unflatten(-1, (self.dims.C, self.arm_dims))

    def sample(self, condition: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Euler-integrate from ``noise`` [B, T, C, A-1] at s = 0 to the chunk at s = 1."""
        x, n = noise, self.config.sample_steps
        for i in range(n):
            s = torch.full(x.shape[:2], i / n, dtype=x.dtype, device=x.device)
            x = x + self.velocity(condition, x, s) / n
        return x

    def noise(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Standard normal noise [B, T, C, A-1] for a condition [B, T, H]."""
        shape = (*condition.shape[:2], self.dims.C, self.arm_dims)
        return torch.randn(shape, generator=generator, dtype=condition.dtype, device=condition.device)

    def loss(self, prediction, actions, action_mask):
        """Masked flow-matching MSE (``arm_loss``) plus the weighted gripper BCE; ``arm_l1``
        is measured on a chunk sampled with the global RNG."""
        h = prediction["condition"]
        x1 = losses.masked_targets(actions, action_mask)[..., :-1]
        x0 = self.noise(h)
        s = training_times(h.shape[:2], h.dtype, h.device)
        xs = (1 - s[..., None, None]) * x0 + s[..., None, None] * x1
        error = (self.velocity(h, xs, s) - (x1 - x0)).pow(2).mean(-1)
        arm_loss = losses.masked_mean(error, action_mask)
        gripper_loss = losses.gripper_bce(prediction["gripper"], actions, action_mask)
        with torch.no_grad():
            arm = self.sample(h.detach(), self.noise(h))
        metrics = losses.action_metrics(arm, prediction["gripper"][..., 0] >= 0, actions, action_mask)
        return losses.combine(arm_loss, gripper_loss, self.config.arm_gripper_loss_ratio, metrics)

    def actions(self, prediction, generator=None):
        """-> [B, T, C, A]: a sampled arm chunk (noise from ``generator``), the gripper P(open)."""
        h = prediction["condition"]
        return torch.cat([self.sample(h, self.noise(h, generator)), self.gripper_open(prediction)], -1)
