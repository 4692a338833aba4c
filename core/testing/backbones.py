"""Conformance checks for backbones, run on every registered backbone.

Each backbone is built from its ``test_config`` (a small offline instance) inside a
:class:`robovla.vla.VLA` with K = 2 [LRN] tokens, and read out on a window of random frames
at the size it asks for (:data:`ANY_SIZE` pixels for one that takes any size). Shape letters:
B batch, T window, K [LRN] tokens, D hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from robovla.registry import Component
from robovla.testing import check

B, T, K = 2, 2, 2
ANY_SIZE = 48  # frame side for a backbone whose image_size is None
SHORT, LONG = "lift the red block", "push the sliding door all the way to the left side"


_BUILT: dict[tuple[str, str], nn.Module] = {}


def build(component: Component) -> nn.Module:
    """A fresh VLA of the component (identity head, K [LRN] tokens) in eval mode."""
    from robovla.vla import VLA

    cls = component.load()
    torch.manual_seed(0)
    return VLA(cls(cls.Config.model_validate(cls.test_config)), nn.Identity(), lrn_tokens=K).eval()


def built(component: Component) -> nn.Module:
    """:func:`build`, once per test session (checks that change the model build their own)."""
    key = (component.plugin.name if component.plugin else "", component.name)
    if key not in _BUILT:
        _BUILT[key] = build(component)
    return _BUILT[key]


def frames(vla: nn.Module, b: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = vla.backbone.image_size or ANY_SIZE
    return {cam: torch.randint(0, 256, (b, T, size, size, 3), generator=g, dtype=torch.uint8)
            for cam in vla.backbone.cameras}


@check("backbone")
def lrn_states_have_the_shape_and_no_nan(component: Component) -> None:
    """features are [B, T, K, D], finite, and the K [LRN] states differ."""
    vla = built(component)
    with torch.no_grad():
        out = vla.features(frames(vla), [SHORT, LONG])
    d = vla.backbone.hidden_size
    assert tuple(out.shape) == (B, T, K, d), f"{component.name}: features {tuple(out.shape)}, expected {(B, T, K, d)}"
    assert torch.isfinite(out).all(), f"{component.name}: non-finite [LRN] states"
    assert not torch.allclose(out[:, :, 0], out[:, :, 1]), f"{component.name}: the {K} [LRN] states are equal"


@check("backbone")
def lrn_state_reads_image_and_instruction(component: Component) -> None:
    """Changing the image, or the instruction, changes the [LRN] state."""
    vla = built(component)
    images = frames(vla, b=1)
    with torch.no_grad():
        base = vla.features(images, [SHORT])
        for cam in vla.backbone.cameras:
            other = dict(images, **{cam: 255 - images[cam]})
            assert (vla.features(other, [SHORT]) - base).abs().max() > 1e-4, \
                f"{component.name}: the [LRN] state ignores the {cam} camera"
        assert (vla.features(images, [LONG]) - base).abs().max() > 1e-4, \
            f"{component.name}: the [LRN] state ignores the instruction"


@check("backbone")
def lrn_state_is_the_same_alone_and_in_a_padded_batch(component: Component) -> None:
    """A sample alone and beside a longer instruction (so padded) give the same state within 1e-5."""
    vla = built(component)
    images = frames(vla)
    with torch.no_grad():
        batched = vla.features(images, [SHORT, LONG])
        alone = vla.features({cam: x[:1] for cam, x in images.items()}, [SHORT])
    gap = (batched[:1] - alone).abs().max().item()
    assert gap <= 1e-5, f"{component.name}: padding changes the [LRN] state by {gap:.2e} (> 1e-5)"


@check("backbone")
def gradients_reach_lrn_and_every_trainable_weight(component: Component) -> None:
    """One backward pass from the [LRN] states reaches [LRN] and every trainable weight, finite."""
    vla = built(component)
    vla.zero_grad(set_to_none=True)
    vla.features(frames(vla), [SHORT, LONG]).square().mean().backward()
    missing = [n for n, p in vla.named_parameters() if p.requires_grad and p.grad is None]
    bad = [n for n, p in vla.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    vla.zero_grad(set_to_none=True)
    assert not missing, f"{component.name}: no gradient reaches {missing[:8]}{' ...' if len(missing) > 8 else ''}"
    assert not bad, f"{component.name}: non-finite gradients in {bad[:8]}"


@check("backbone")
def lora_adapters_on_the_default_targets_learn(component: Component) -> None:
    """LoRA on the backbone's default targets: adapters exist, only they train in the backbone,
    and their B matrices get non-zero gradients ([LRN] too)."""
    from robovla.config import LoraConfig, TrainConfig
    from robovla.finetune import setup

    vla = build(component)
    setup(vla, TrainConfig(), LoraConfig(enabled=True, r=2, alpha=4, dropout=0.0))
    trainable = [n for n, p in vla.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), (
        f"{component.name}: under LoRA the backbone trains {trainable[:5]} (expected adapters only, and some)")
    vla.features(frames(vla), [SHORT, LONG]).square().mean().backward()
    dead = [n for n, p in vla.backbone.named_parameters() if "lora_B" in n and (p.grad is None or not p.grad.any())]
    assert not dead, f"{component.name}: no gradient on LoRA B matrices {dead[:5]}"
    assert vla.lrn.grad is not None and vla.lrn.grad.any(), f"{component.name}: no gradient on [LRN]"
