"""Conformance checks for action spaces, run on every registered action space.

Each space is built from its Config defaults and fitted on a small generated stream, in
one streaming pass as the interface says: :data:`N` raw actions [N, A] (arm dims uniform in
[-1, 1], the gripper -1 or +1) with robot_obs [N, ROBOT_OBS_DIM] of a CALVIN-like arm (TCP
within 0.3 m of the origin, roll near pi, small pitch, any yaw). Shape letters: A action
dim, ``...`` any leading dims.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from robovla.action_space import ActionSpace
from robovla.batch import ROBOT_OBS_DIM
from robovla.registry import Component, create
from robovla.testing import check, name

N = 256  # generated samples; fitted in chunks of N // 4
OUTLIER_SCALE = 10.0  # the bounds check also encodes actions this many times larger than the fitted ones
ATOL = 1e-4  # targets are float32 in [-1, 1]


def build(component: Component) -> ActionSpace:
    """The space at its Config defaults (skips when some field has none)."""
    config = component.load().Config
    required = [n for n, f in config.model_fields.items() if f.is_required()]
    if required:
        pytest.skip(f"fields {required} have no default")
    return create("action_space", component.name, {})


def stream(dim: int, n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(actions [n, dim], robot_obs [n, ROBOT_OBS_DIM]), float64."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (n, dim))
    actions[:, -1] = rng.choice([-1.0, 1.0], n)
    obs = rng.uniform(-1, 1, (n, ROBOT_OBS_DIM))
    obs[:, 0:3] *= 0.3
    obs[:, 3] = (np.pi + rng.uniform(-0.3, 0.3, n) + np.pi) % (2 * np.pi) - np.pi
    obs[:, 4] = rng.uniform(-0.3, 0.3, n)
    obs[:, 5] = rng.uniform(-np.pi, np.pi, n)
    obs[:, -1] = rng.choice([-1.0, 1.0], n)
    return actions, obs


def fitted(component: Component) -> tuple[ActionSpace, np.ndarray, np.ndarray]:
    """(the space fitted on the generated stream, its actions, its robot_obs)."""
    space = build(component)
    actions, obs = stream(space.action_dim)
    step = N // 4
    space.fit((actions[i:i + step], obs[i:i + step]) for i in range(0, N, step))  # a generator: one pass
    return space, actions, obs


def close(got: np.ndarray, want: np.ndarray) -> float:
    """The largest absolute difference (inf when the shapes differ)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")


@check("action_space")
def action_space_round_trip(component: Component) -> None:
    """decode inverts encode: targets that encode gave come back from decode then encode, and
    commands that decode gave come back from encode then decode; leading dims are kept."""
    space, actions, obs = fitted(component)
    targets = space.encode(actions, obs)
    commands = space.decode(targets, obs)
    assert np.shape(commands) == np.shape(actions), (
        f"{name(component)}: decode gives {np.shape(commands)} for targets {np.shape(targets)}; commands are [..., A]")
    again = space.encode(commands, obs)
    gap = close(again, targets)
    assert gap <= ATOL, (f"{name(component)}: encode(decode(targets)) differs from the targets by {gap:.3g}; "
                         "decode must undo encode (the normalization, and any frame change with robot_obs)")
    gap = close(space.decode(again, obs), commands)
    assert gap <= ATOL, (f"{name(component)}: a command that decode gave changes by {gap:.3g} through encode "
                         "then decode; decode must undo encode")
    flat = np.std(np.asarray(targets, dtype=np.float64)[:, :-1], axis=0) == 0
    assert not flat.any(), (f"{name(component)}: arm dims {np.flatnonzero(flat).tolist()} get one target for "
                            f"{N} different actions; encode must keep what tells actions apart")
    batched = space.encode(actions.reshape(4, N // 4, -1), obs.reshape(4, N // 4, -1))
    assert np.shape(batched) == (4, N // 4, np.shape(targets)[-1]), (
        f"{name(component)}: encode on [4, {N // 4}, A] gives {np.shape(batched)}; encode and decode work on any "
        "leading dims [..., A]")
    gap = close(np.reshape(batched, np.shape(targets)), targets)
    assert gap <= 1e-6, (f"{name(component)}: encode on [4, {N // 4}, A] differs from encode on [{N}, A] by "
                         f"{gap:.3g}; each action is encoded with its own robot_obs, whatever the leading dims")


@check("action_space")
def action_space_state_dict_round_trip(component: Component) -> None:
    """state_dict() is JSON-ready, and a fresh space that loads it encodes and decodes
    exactly as the fitted one does."""
    space, actions, obs = fitted(component)
    state = space.state_dict()
    try:
        state = json.loads(json.dumps(state))
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"{name(component)}: state_dict() is not JSON-ready ({exc}); return lists and "
                             "Python numbers, not arrays") from None
    fresh = build(component)
    fresh.load_state_dict(state)
    targets = space.encode(actions, obs)
    try:
        got = fresh.encode(actions, obs)
    except Exception as exc:
        raise AssertionError(f"{name(component)}: a fresh space cannot encode after load_state_dict(state_dict()) "
                             f"({type(exc).__name__}: {exc}); state_dict() must hold every fitted statistic") from None
    assert np.array_equal(got, targets), (
        f"{name(component)}: after load_state_dict(state_dict()) a fresh space encodes differently (largest gap "
        f"{close(got, targets):.3g}); state_dict() must hold every fitted statistic")
    assert np.array_equal(fresh.decode(targets, obs), space.decode(targets, obs)), (
        f"{name(component)}: after load_state_dict(state_dict()) a fresh space decodes differently")


@check("action_space")
def action_space_bounds(component: Component) -> None:
    """Targets are finite float32 in [-1, 1], even for actions far outside the fitted ones;
    commands are finite with the gripper exactly -1 or +1, even for predictions outside [-1, 1]."""
    space, actions, obs = fitted(component)
    outliers = actions * OUTLIER_SCALE
    outliers[:, -1] = actions[:, -1]
    for what, raw in (("generated actions", actions), (f"actions {OUTLIER_SCALE:g} times larger", outliers)):
        targets = space.encode(raw, obs)
        assert isinstance(targets, np.ndarray) and targets.dtype == np.float32, (
            f"{name(component)}: encode must return a float32 array, got {getattr(targets, 'dtype', type(targets))}")
        assert np.isfinite(targets).all(), f"{name(component)}: encode gives non-finite targets for {what}"
        low, high = float(targets.min()), float(targets.max())
        assert low >= -1 and high <= 1, (
            f"{name(component)}: targets of {what} span [{low:.3g}, {high:.3g}], outside [-1, 1]; clip them "
            "(normalized targets are in [-1, 1] whatever the input)")
    rng = np.random.default_rng(1)
    predictions = rng.uniform(-3, 3, (N, space.action_dim))
    commands = np.asarray(space.decode(predictions, obs))
    assert np.isfinite(commands).all(), f"{name(component)}: decode gives non-finite commands for predictions in [-3, 3]"
    assert np.isin(commands[..., -1], (-1.0, 1.0)).all(), (
        f"{name(component)}: decoded grippers {sorted(set(commands[..., -1].tolist()))[:6]} are not exactly -1 or +1")
