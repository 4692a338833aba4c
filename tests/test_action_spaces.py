"""CALVIN action spaces: frame changes, normalizations, statistics, decoding."""

import numpy as np
import pytest

import robovla
from robovla.batch import ROBOT_OBS_DIM
from robovla.stats import RunningStats
from robovla_plugins.datasets.calvin.actions import (ORN_STEP, euler_to_matrix, matrix_to_euler, tcp_to_world,
                                                      world_to_tcp, wrap)


def axis_rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def reference_matrix(euler) -> np.ndarray:
    """pybullet's extrinsic x-y-z: rotate about fixed x, then y, then z, i.e. Rz @ Ry @ Rx."""
    return axis_rotation(2, euler[2]) @ axis_rotation(1, euler[1]) @ axis_rotation(0, euler[0])


def random_poses(n: int, rng) -> np.ndarray:
    obs = np.zeros((n, ROBOT_OBS_DIM))
    obs[:, :3] = rng.uniform(-0.5, 0.5, (n, 3))
    obs[:, 3] = rng.choice([np.pi - 1e-3, -np.pi + 1e-3, 3.09, -3.12], n) + rng.uniform(-0.05, 0.05, n)
    obs[:, 3] = wrap(np.where(rng.random(n) < 0.3, rng.uniform(-np.pi, np.pi, n), obs[:, 3]))
    obs[:, 4] = rng.uniform(-1.2, 1.2, n)  # away from gimbal lock at +-pi/2
    obs[:, 5] = rng.uniform(-np.pi, np.pi, n)
    return obs


def test_euler_convention_matches_an_independent_composition():
    rng = np.random.default_rng(0)
    for euler in rng.uniform(-np.pi, np.pi, (200, 3)) * [1, 0.45, 1]:
        np.testing.assert_allclose(euler_to_matrix(euler), reference_matrix(euler), atol=1e-12)
        np.testing.assert_allclose(matrix_to_euler(reference_matrix(euler)), euler, atol=1e-9)


def test_tcp_round_trip_over_10k_poses_including_roll_near_pi():
    rng = np.random.default_rng(1)
    obs = random_poses(10_000, rng)
    rel = np.concatenate([rng.uniform(-1, 1, (10_000, 6)), rng.choice([-1.0, 1.0], (10_000, 1))], axis=1)
    back = tcp_to_world(world_to_tcp(rel, obs), obs)
    assert np.abs(back - rel).max() < 1e-6
    assert (np.abs(np.abs(obs[:, 3]) - np.pi) < 0.06).sum() > 3000  # many rolls close to +-pi


def test_world_to_tcp_against_rotation_matrices():
    rng = np.random.default_rng(2)
    obs = random_poses(100, rng)
    rel = rng.uniform(-1, 1, (100, 7))
    got = world_to_tcp(rel, obs)
    for i in range(100):
        r_t = reference_matrix(obs[i, 3:6])
        np.testing.assert_allclose(got[i, :3], r_t.T @ rel[i, :3], atol=1e-12)  # position in the TCP frame
        target = reference_matrix(obs[i, 3:6] + rel[i, 3:6] * ORN_STEP)
        np.testing.assert_allclose(reference_matrix(got[i, 3:6] * ORN_STEP), r_t.T @ target, atol=1e-9)
    assert np.array_equal(got[:, 6], rel[:, 6])


def test_clip_normalization_is_the_recipe_and_decoding_gives_exact_gripper():
    space = robovla.create("action_space", "rel-world")
    raw = np.array([[0.65, -1.0, 0.13, 0.0, 0.3, -0.2, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    enc = space.encode(raw, None)
    np.testing.assert_allclose(enc[0], [1, -1, 0.2, 0, 0.3 / 0.65, -0.2 / 0.65, 0], atol=1e-6)
    assert enc.dtype == np.float32 and enc[1, 6] == 1.0
    dec = space.decode(np.array([[2.0, -0.5, 0, 0, 0, 0, 0.49], [0, 0, 0, 0, 0, 0, 0.93]]), None)
    np.testing.assert_allclose(dec[:, :6], [[0.65, -0.325, 0, 0, 0, 0], [0] * 6], atol=1e-12)
    assert dec[:, 6].tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("name", ["rel-world", "rel-tcp"])
def test_statistics_normalizations_fit_in_one_pass_and_travel(name):
    rng = np.random.default_rng(3)
    obs = random_poses(2000, rng)
    rel = np.concatenate([rng.normal(0, 0.3, (2000, 6)), rng.choice([-1.0, 1.0], (2000, 1))], axis=1)
    space = robovla.create("action_space", name, {"normalization": "quantile"})
    with pytest.raises(RuntimeError, match="needs statistics: call fit"):
        space.encode(rel, obs)
    space.fit((rel[i:i + 100], obs[i:i + 100]) for i in range(0, 2000, 100))
    arm = space.arm(rel, obs)
    np.testing.assert_allclose(space.stats["q01"], np.quantile(arm, 0.01, axis=0), atol=1e-12)
    np.testing.assert_allclose(space.stats["max"], arm.max(0))
    np.testing.assert_allclose(space.stats["std"], arm.std(0), atol=1e-9)
    enc = space.encode(rel, obs)
    assert enc[:, :6].min() == -1 and enc[:, :6].max() == 1
    inside = ((arm > space.stats["q01"]) & (arm < space.stats["q99"])).all(1)
    np.testing.assert_allclose(space.decode(enc, obs)[inside, :6], rel[inside, :6], atol=1e-6)  # invertible inside
    restored = robovla.create("action_space", name, {"normalization": "quantile"})
    restored.load_state_dict(space.state_dict())
    np.testing.assert_array_equal(restored.encode(rel, obs), enc)


def test_abs_world_reads_absolute_poses_with_min_max():
    space = robovla.create("action_space", "abs-world")
    assert space.source == "actions" and space.config.normalization == "minmax"
    poses = np.array([[0.1, -0.2, 0.5, 3.0, 0.0, 1.5, 1.0], [0.3, 0.2, 0.6, 3.1, 0.1, 1.6, -1.0]])
    space.fit([(poses, np.zeros((2, ROBOT_OBS_DIM)))])
    enc = space.encode(poses, None)
    np.testing.assert_allclose(enc[:, :6], [[-1] * 6, [1] * 6], atol=1e-6)
    np.testing.assert_allclose(space.decode(enc, None), poses, atol=1e-6)


def test_running_stats_reservoir_keeps_quantiles_close_on_large_streams():
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(50_000, 2))
    stats = RunningStats(2, reservoir=5_000)
    for chunk in np.array_split(rows, 37):
        stats.update(chunk)
    result = stats.result()
    assert result["count"] == [50_000.0]
    np.testing.assert_allclose(result["mean"], rows.mean(0), atol=1e-12)
    np.testing.assert_allclose(result["q99"], np.quantile(rows, 0.99, axis=0), atol=0.1)


def test_tcp_round_trip_past_gimbal_lock_picks_the_nearer_euler_form():
    obs = np.zeros(ROBOT_OBS_DIM)
    obs[3:6] = [3.0, 1.55, 1.5]  # pitch + 0.05 * dpitch crosses pi/2
    rel = np.array([0, 0, 0, 0, 1, 0, 1.0])
    np.testing.assert_allclose(tcp_to_world(world_to_tcp(rel, obs), obs), rel, atol=1e-6)


def test_abs_world_keeps_a_roll_near_pi_in_one_piece():
    rng = np.random.default_rng(5)
    roll = wrap(np.pi + rng.normal(0, 0.04, 500))  # both signs, like CALVIN's TCP
    poses = np.stack([rng.uniform(-0.2, 0.2, 500), rng.uniform(-0.2, 0.2, 500), np.full(500, 0.5), roll,
                      np.zeros(500), np.full(500, 1.5), np.ones(500)], axis=1)
    space = robovla.create("action_space", "abs-world")
    space.fit([(poses, np.zeros((500, ROBOT_OBS_DIM)))])
    enc = space.encode(poses, None)
    decoded = space.decode(enc.mean(0, keepdims=True), None)[0]
    assert abs(wrap(decoded[3] - np.pi)) < 0.05  # the mean target is still a roll near pi
    np.testing.assert_allclose(wrap(space.decode(enc, None)[:, 3] - roll), 0, atol=1e-6)
