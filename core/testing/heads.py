"""Conformance checks for policy heads, run on every registered head.

Each check builds the head with its ``test_config`` at small sizes (:data:`DIMS`, K > 1 on
purpose) and a fixed batch of random features and targets in the normalized form of the
batch contract: arm dims in [-0.9, 0.9], the gripper in {0, 1}, and an action mask that
cuts chunks off at episode ends. Shape letters: B batch, T window, K [LRN] tokens per
frame, D feature size, C chunk, A action dim.
"""

from __future__ import annotations

import torch

from robovla.head import Dims, PolicyHead, Prediction
from robovla.registry import Component, create
from robovla.testing import check, name

DIMS = Dims(D=16, K=2, T=4, C=3, A=7)
B = 2
REQUIRED_METRICS = ("arm_l1", "gripper_acc")
OVERFIT_STEPS = 500  # at most; the check stops as soon as the loss is down by 90%
OVERFIT_LR = 3e-3


def build(component: Component, dims: Dims = DIMS, seed: int = 0) -> PolicyHead:
    """The head at its ``test_config``, with a seeded initialization (the global RNG is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create("head", component.name, dict(component.load().test_config), dims=dims)


def batch(dims: Dims = DIMS, b: int = B, frames: int | None = None, seed: int = 0):
    """(features [B, frames, K, D], actions [B, T, C, A], action_mask [B, T, C]).

    Sample i's episode ends ``i * (C - 1)`` frames before the last chunk target would, so
    sample 0 is unmasked and later ones lose the tails of their last chunks.
    """
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, frames or dims.T, dims.K, dims.D, generator=g)
    arm = torch.rand(b, dims.T, dims.C, dims.A - 1, generator=g) * 1.8 - 0.9
    gripper = (torch.rand(b, dims.T, dims.C, 1, generator=g) > 0.5).float()
    t = torch.arange(dims.T)[:, None]
    c = torch.arange(dims.C)[None, :]
    last = torch.tensor([dims.T + dims.C - 2 - i * (dims.C - 1) for i in range(b)])
    mask = (t + c)[None] <= last[:, None, None]
    return features, torch.cat([arm, gripper], -1), mask


def seeded_loss(head: PolicyHead, prediction: Prediction, actions: torch.Tensor, mask: torch.Tensor):
    """The loss with the global RNG seeded, so that heads that sample in the loss compare
    (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return head.loss(prediction, actions, mask)


@check("head")
def head_output_shapes(component: Component) -> None:
    """forward gives [B, T, ...] tensors, actions [B, T, C, A] with the gripper a probability,
    and loss a finite scalar with the shared metric keys."""
    head = build(component)
    features, actions, mask = batch()
    prediction = head(features)
    assert isinstance(prediction, dict) and prediction, f"{name(component)}: forward must return a dict of tensors"
    for key, value in prediction.items():
        assert isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == (B, DIMS.T), (
            f"{name(component)}: prediction[{key!r}] must be a tensor [B={B}, T={DIMS.T}, ...], got "
            f"{getattr(value, 'shape', type(value))}")
    out = head.actions(prediction)
    assert tuple(out.shape) == (B, DIMS.T, DIMS.C, DIMS.A), (
        f"{name(component)}: actions must be [B, T, C, A] = {[B, DIMS.T, DIMS.C, DIMS.A]}, got {list(out.shape)}")
    assert torch.isfinite(out).all(), f"{name(component)}: actions are not finite"
    assert ((out[..., -1] >= 0) & (out[..., -1] <= 1)).all(), (
        f"{name(component)}: the gripper channel of actions must be P(open) in [0, 1]")
    loss, metrics = head.loss(prediction, actions, mask)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad, (
        f"{name(component)}: loss must be a finite scalar that requires grad, got {loss!r}")
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    assert not missing, f"{name(component)}: metrics lack {missing}; robovla.losses computes the standard set"
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, (
            f"{name(component)}: metric {key!r} must be a detached scalar tensor")
    assert 0 <= metrics["gripper_acc"] <= 1 and metrics["arm_l1"] >= 0


@check("head")
def head_ignores_masked_targets(component: Component) -> None:
    """Changing the targets where action_mask is False changes neither loss nor metrics;
    changing them where it is True changes the loss."""
    head = build(component)
    features, actions, mask = batch()
    prediction = head(features)
    loss, metrics = seeded_loss(head, prediction, actions, mask)
    other = actions.clone()
    other[~mask] = torch.tensor([7.0] * (DIMS.A - 1) + [0.0])
    other[..., -1] = torch.where(mask, actions[..., -1], 1 - actions[..., -1])
    loss2, metrics2 = seeded_loss(head, prediction, other, mask)
    torch.testing.assert_close(loss2, loss, msg=lambda m: f"{name(component)}: masked targets changed the loss: {m}")
    for key in metrics:
        torch.testing.assert_close(metrics2[key], metrics[key],
                                   msg=lambda m, k=key: f"{name(component)}: masked targets changed {k!r}: {m}")
    shifted = actions.clone()
    shifted[..., :-1] = torch.where(mask[..., None], -actions[..., :-1], actions[..., :-1])
    assert not torch.equal(seeded_loss(head, prediction, shifted, mask)[0], loss), (
        f"{name(component)}: the loss did not change when the unmasked targets did")


@check("head")
def head_gradients_reach_every_parameter(component: Component) -> None:
    """One backward pass of the loss gives every trainable parameter a finite, nonzero gradient."""
    head = build(component).train()
    features, actions, mask = batch()
    loss, _ = seeded_loss(head, head(features), actions, mask)
    loss.backward()
    missing = [n for n, p in head.named_parameters() if p.requires_grad and
               (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any())]
    assert not missing, f"{name(component)}: no (or a non-finite) gradient reaches {missing}"


@check("head")
def head_steps_equal_the_batched_forward(component: Component) -> None:
    """After reset, step n equals forward on the window of the last T frames at its last
    frame (frames 1..T at position n while n <= T), over 2T+1 steps; the same generator
    state gives the same actions; reset forgets the history."""
    head = build(component).eval()
    frames = 2 * DIMS.T + 1
    features, _, _ = batch(frames=frames)
    T = DIMS.T
    with torch.no_grad():
        head.reset()
        first = None
        for n in range(1, frames + 1):
            got = head.step(features[:, n - 1:n])
            window = features[:, :T] if n <= T else features[:, n - T:n]
            at = n - 1 if n <= T else T - 1
            want = {k: v[:, at:at + 1] for k, v in head(window).items()}
            assert set(got) == set(want), f"{name(component)}: step gives keys {sorted(got)}, forward {sorted(want)}"
            for key in want:
                torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=lambda m, k=key: (
                    f"{name(component)}: step {n} differs from forward on the last T frames in {k!r}: {m}"))
            torch.testing.assert_close(
                head.actions(got, generator=torch.Generator().manual_seed(n)),
                head.actions(want, generator=torch.Generator().manual_seed(n)), atol=1e-5, rtol=1e-5,
                msg=lambda m: f"{name(component)}: step {n}: same prediction and generator, other actions: {m}")
            first = got if first is None else first
        head.reset()
        again = head.step(features[:, :1])
        for key in first:
            torch.testing.assert_close(again[key], first[key], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{name(component)}: reset() did not forget the history: {m}")


@check("head")
def head_keeps_separate_histories(component: Component) -> None:
    """Two episodes stepped in turn, each history swapped in with load_history and out with
    save_history, give what each gives stepped alone (over 2T+1 steps): the head lists every
    attribute of its online history in ``history_attributes``."""
    head = build(component).eval()
    frames = 2 * DIMS.T + 1
    episodes = [batch(frames=frames, seed=s)[0] for s in (1, 2)]  # [B, frames, K, D] each
    with torch.no_grad():
        alone = []
        for features in episodes:
            head.reset()
            alone.append([head.step(features[:, n:n + 1]) for n in range(frames)])
        histories = []
        for _ in episodes:
            head.reset()
            histories.append(head.save_history())
        for n in range(frames):
            for e, features in enumerate(episodes):
                head.load_history(histories[e])
                got = head.step(features[:, n:n + 1])
                histories[e] = head.save_history()
                for key, want in alone[e][n].items():
                    torch.testing.assert_close(got[key], want, atol=1e-6, rtol=1e-6, msg=lambda m: (
                        f"{name(component)}: episode {e}, step {n + 1}, stepped in turn with another episode, "
                        f"differs from stepping it alone; list every attribute step() keeps in "
                        f"history_attributes (now {type(head).history_attributes}): {m}"))


@check("head")
def head_declares_a_history_exactly_when_it_reads_the_past(component: Component) -> None:
    """Frame 3 stepped after frames 1 and 2 against frame 3 right after a reset: a head whose
    step reads earlier frames lists them in ``history_attributes``, and a per-frame head lists
    none (the Policy then runs the VLM once per chunk under ``chunk:K``, not at every step)."""
    head = build(component).eval()
    features = batch(frames=3, seed=3)[0]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        head.reset()
        for n in range(2):
            head.step(features[:, n:n + 1])
        torch.manual_seed(7)  # a head that samples draws the same noise for frame 3 both times
        after = head.step(features[:, 2:3])
        head.reset()
        torch.manual_seed(7)
        alone = head.step(features[:, 2:3])
    reads = any(not torch.allclose(after[k], alone[k], atol=1e-6, rtol=1e-6) for k in alone)
    declared = type(head).history_attributes
    assert bool(declared) == reads, (
        f"{name(component)}: its step {'reads' if reads else 'does not read'} earlier frames, but it declares "
        f"history_attributes = {declared}; " + ("list the attributes step() keeps" if reads else
                                                "declare () so that chunked execution skips the VLM"))


@check("head")
def head_overfits_one_batch(component: Component) -> None:
    """Adam on one fixed small batch brings the loss down by 90% within a few hundred steps."""
    head = build(component).train()
    features, actions, mask = batch()
    optimizer = torch.optim.Adam(head.parameters(), lr=OVERFIT_LR)

    def measured() -> float:
        with torch.no_grad():
            return float(seeded_loss(head, head(features), actions, mask)[0])

    start = measured()
    torch.manual_seed(0)
    for step in range(1, OVERFIT_STEPS + 1):
        loss, _ = head.loss(head(features), actions, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0 and measured() <= 0.1 * start:
            return
    assert False, (f"{name(component)}: the loss on one fixed batch went from {start:.4g} to {measured():.4g} "
                   f"in {OVERFIT_STEPS} Adam steps (lr {OVERFIT_LR}); a head should get below 10% of the start")
