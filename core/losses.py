"""The loss and metrics every policy head reports, written once so that ablations compare.

Shape letters: B batch, T window, C chunk, A action dim (A-1 arm dims, then the gripper).
Targets ``actions`` [B, T, C, A] are normalized: arm dims in about [-1, 1], the gripper
dim (last) in {0, 1} (1 = open, i.e. command +1). ``action_mask`` bool [B, T, C] is
False where the chunk runs past the episode end; those positions never reach a loss or a
metric. The recipe's loss (RoboVLMs, as run) is::

    loss = arm_loss + arm_gripper_loss_ratio * gripper_loss
    arm_loss     = masked mean of Huber(delta=1) over the arm dims   (or MSE)
    gripper_loss = masked mean of BCE-with-logits on the gripper dim

Every head returns the metric keys :data:`METRIC_KEYS` (detached scalars), so that a
table of runs with different heads lines up column by column.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

METRIC_KEYS = ("arm_loss", "gripper_loss", "arm_l1", "gripper_acc")
"""What :func:`chunk_loss` reports, and what every built-in head reports."""

ArmLoss = Literal["huber", "mse"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, T, C] over the True entries of ``mask`` [B, T, C]; 0 if none.

    Masked entries are selected away (not multiplied by 0), so a NaN or inf there cannot
    leak into the result.
    """
    mask = mask.bool()
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum() \
        / mask.sum().clamp(min=1)


def masked_targets(actions: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Targets [B, T, C, A] with masked positions set to 0, so that whatever is stored there
    (even NaN) reaches neither a loss value nor a gradient."""
    return torch.where(action_mask.bool()[..., None], actions, torch.zeros((), dtype=actions.dtype,
                                                                             device=actions.device))


def gripper_target(actions: torch.Tensor) -> torch.Tensor:
    """The gripper label {0., 1.} [B, T, C] from targets [B, T, C, A] (last dim in {0, 1})."""
    return (actions[..., -1] > 0.5).to(actions.dtype)


def arm_regression(arm: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor,
                   kind: ArmLoss = "huber", huber_delta: float = 1.0) -> torch.Tensor:
    """Masked arm loss: arm [B, T, C, A-1] against ``actions[..., :-1]``, mean over dims and
    unmasked positions. ``kind`` "huber" (the recipe, delta 1) or "mse"."""
    target = masked_targets(actions, action_mask)[..., :-1]
    if kind == "huber":
        per = F.huber_loss(arm, target, reduction="none", delta=huber_delta)
    elif kind == "mse":
        per = (arm - target).pow(2)
    else:
        raise ValueError(f"arm loss {kind!r} is not one of 'huber', 'mse'")
    return masked_mean(per.mean(-1), action_mask)


def gripper_bce(logits: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Masked BCE-with-logits: gripper logits [B, T, C, 1] against the {0, 1} label."""
    label = gripper_target(masked_targets(actions, action_mask))
    per = F.binary_cross_entropy_with_logits(logits[..., 0], label, reduction="none")
    return masked_mean(per, action_mask)


@torch.no_grad()
def action_errors(predicted: torch.Tensor, actions: torch.Tensor, action_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Errors of predicted actions [B, T, C, A] (gripper last: >= 0.5 is "open") against the
    targets, summed per window over its unmasked (t, c): ``count`` [B], ``l1`` and ``sq``
    [B, A-1] (per arm dim), ``right`` [B] (gripper hits). The one place the masked arm and
    gripper metrics are computed: training, validation and ``robo-run eval`` sum these."""
    mask = action_mask.bool()
    target = masked_targets(actions.float(), mask)
    predicted = torch.where(mask[..., None], predicted.float(), torch.zeros((), device=target.device))
    err = predicted[..., :-1] - target[..., :-1]
    right = ((predicted[..., -1] >= 0.5) == (gripper_target(target) > 0.5)) & mask
    return {"count": mask.sum((1, 2)).float(), "l1": err.abs().sum((1, 2)), "sq": err.square().sum((1, 2)),
            "right": right.sum((1, 2)).float()}


def error_metrics(errors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``arm_l1``, ``arm_mse`` (means over arm dims and unmasked positions) and
    ``gripper_acc`` of :func:`action_errors`'s sums (over any leading dims)."""
    n = errors["count"].sum().clamp(min=1)
    return {"arm_l1": errors["l1"].sum() / errors["l1"].shape[-1] / n,
            "arm_mse": errors["sq"].sum() / errors["sq"].shape[-1] / n, "gripper_acc": errors["right"].sum() / n}


@torch.no_grad()
def action_metrics(arm: torch.Tensor, gripper_open: torch.Tensor, actions: torch.Tensor,
                   action_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``arm_l1`` (mean |arm - target| over dims, masked) and ``gripper_acc`` (masked).

    arm [B, T, C, A-1] are predicted arm actions; ``gripper_open`` bool [B, T, C] says
    whether the prediction is "open" (probability >= 0.5, i.e. logit >= 0).
    """
    predicted = torch.cat([arm.float(), gripper_open.float()[..., None]], -1)
    metrics = error_metrics(action_errors(predicted, actions, action_mask))
    return {"arm_l1": metrics["arm_l1"], "gripper_acc": metrics["gripper_acc"]}


def combine(arm_loss: torch.Tensor, gripper_loss: torch.Tensor, gripper_weight: float,
            metrics: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(arm_loss + gripper_weight * gripper_loss, metrics with both terms added, detached)."""
    out = {"arm_loss": arm_loss.detach(), "gripper_loss": gripper_loss.detach(), **metrics}
    return arm_loss + gripper_weight * gripper_loss, {k: out[k] for k in METRIC_KEYS}


def chunk_loss(arm: torch.Tensor, gripper_logits: torch.Tensor, actions: torch.Tensor,
               action_mask: torch.Tensor, *, arm_loss: ArmLoss = "huber", huber_delta: float = 1.0,
               gripper_weight: float = 0.01) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The continuous heads' loss: arm [B, T, C, A-1], gripper logits [B, T, C, 1],
    targets [B, T, C, A], mask bool [B, T, C] -> (scalar loss, metrics :data:`METRIC_KEYS`).

    ``gripper_weight`` is the recipe's arm_gripper_loss_ratio (0.01 as run).
    """
    arm_term = arm_regression(arm, actions, action_mask, arm_loss, huber_delta)
    grip_term = gripper_bce(gripper_logits, actions, action_mask)
    metrics = action_metrics(arm.detach(), gripper_logits[..., 0] >= 0, actions, action_mask)
    return combine(arm_term, grip_term, gripper_weight, metrics)
