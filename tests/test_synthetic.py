"""The synthetic reach task: CALVIN-format files that pass `data check`, and its Env."""

import json

import numpy as np
import pytest

import robovla
from robovla.batch import ROBOT_OBS_DIM
from robovla.cli import main
from robovla_plugins.datasets.calvin.synthetic import COLOURS, expert, make_scene

from calvin_files import FIRST


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--episodes", "24", "--seed", "5"]) == 0
    return out


def test_synthetic_files_pass_check_and_are_deterministic(task, tmp_path, capsys):
    capsys.readouterr()
    assert main(["data", "check", str(task / "training"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["problems"] == [] and report["annotations"] == report["segments"] == 24
    assert main(["data", "check", str(task / "validation"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["annotations"] == 10
    again = tmp_path / "again"
    main(["data", "synth", "--out", str(again), "--episodes", "24", "--seed", "5"])
    for name in ["episode_0358482.npz", "ep_start_end_ids.npy", "lang_annotations/auto_lang_ann.npy"]:
        assert (again / "training" / name).read_bytes() == (task / "training" / name).read_bytes()
    other = tmp_path / "other"
    main(["data", "synth", "--out", str(other), "--episodes", "2", "--seed", "6"])
    assert (other / "training/episode_0358482.npz").read_bytes() != (task / "training/episode_0358482.npz").read_bytes()


def test_synthetic_vectors_are_consistent_like_calvin(task):
    data = robovla.create("dataset", "calvin", {"path": task / "training"})
    segments = data.segments()
    assert segments[0].start == FIRST
    for seg in segments[:6]:
        colour = seg.task.removeprefix("reach_").removesuffix("_block")
        assert colour in COLOURS and colour in seg.instruction
        frames = data.load(seg.start, seg.end)
        obs, rel, absolute = frames.robot_obs, frames.actions["rel_actions"], frames.actions["actions"]
        assert obs.dtype == rel.dtype == absolute.dtype == np.float64
        np.testing.assert_allclose(obs[1:, :2] - obs[:-1, :2], rel[:-1, :2] * 0.02, atol=1e-12)  # TCP moves by rel
        np.testing.assert_allclose(absolute[:-1, :3], obs[1:, :3], atol=1e-12)  # action = next TCP pose
        assert set(rel[:, 6]) <= {-1.0, 1.0} and rel[-1, 6] == -1.0 and rel[0, 6] == 1.0  # closes at the end
        np.testing.assert_array_equal(obs[1:, 14], rel[:-1, 6])  # robot_obs[14]: the last gripper command
        assert np.abs(rel[:, :6]).max() <= 1.0


def run_policy(env, seed: int, choose_goal) -> bool:
    env.reset(seed)
    scene = env.scene
    env.start_task(scene.task)
    for _ in range(env.config.max_steps):
        env.step(expert(env.tcp, choose_goal(scene)))
        if env.task_success():
            return True
    return False


def test_expert_succeeds_and_ignoring_the_instruction_does_not():
    env = robovla.create("env", "synthetic")
    seeds = range(10_000, 10_200)
    expert_rate = np.mean([run_policy(env, s, lambda sc: sc.blocks[sc.target]) for s in seeds])
    first_rate = np.mean([run_policy(env, s, lambda sc: sc.blocks[0]) for s in seeds])
    assert expert_rate >= 0.99, expert_rate
    assert first_rate <= 0.40, first_rate


def test_env_checks_commands_and_tasks():
    env = robovla.create("env", "synthetic")
    obs = env.reset(3)
    assert obs.images["static"].shape == (200, 200, 3) and obs.images["gripper"].shape == (84, 84, 3)
    assert obs.robot_obs.shape == (ROBOT_OBS_DIM,) and len(env.tasks) == 3
    missing = next(f"reach_{c}_block" for c in COLOURS if c not in make_scene(1, 3).colours)
    with pytest.raises(ValueError, match="not feasible in this scene"):
        env.start_task(missing)
    assert env.start_task(env.tasks[1]).endswith(f"{make_scene(1, 3).colours[1]} block")
    with pytest.raises(ValueError, match="gripper exactly -1 or \\+1"):
        env.step(np.array([0, 0, 0, 0, 0, 0, 0.3]))


def test_environment_scenes_are_not_the_training_scenes(task):
    data = robovla.create("dataset", "calvin", {"path": task / "training"})
    env = robovla.create("env", "synthetic")
    written = [seg.instruction for seg in data.segments()]
    for seed in range(24):
        env.reset(seed)
        assert not np.array_equal(env.scene.blocks, make_scene(0, 5, seed).blocks)
    assert make_scene(0, 5, 0).instruction == written[0]  # the writer's key, for contrast
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 0, 0, 0, 0, 0, 1.0]))
