"""The ``calvin`` env over a fake simulator (tests/fake_calvin.py, through --env.simulator):
resets to chain states, commands reach the simulator as copies, the oracle judges scripted
subtasks, and a missing calvin_env says how to install it."""

import json
import sys
import types

import numpy as np
import pytest

import robovla
from robovla_plugins.datasets.calvin import protocol as cp
from robovla_plugins.datasets.calvin.sim import CalvinSimError

from fake_calvin import BUTTON, DRAWER_HANDLE, SLIDE_HANDLE

FAKE = "fake_calvin:get_env"
UP = np.array([0, 0, 0.1])
STATE = {"led": 0, "lightbulb": 0, "slider": "right", "drawer": "closed", "red_block": "table",
         "blue_block": "slider_left", "pink_block": "slider_right", "grasped": 0}


@pytest.fixture
def env(tmp_path):
    env = robovla.create("env", "calvin", {"path": tmp_path, "simulator": FAKE})
    yield env
    env.close()
    assert env.sim.closed


def drive(env, obs, goal, gripper=1.0):
    """Full-speed commands (rel_actions units) until the TCP is at ``goal``; the last observation."""
    for _ in range(100):
        delta = (np.asarray(goal) - obs.robot_obs[:3]) / 0.02
        if np.abs(delta).max() < 1e-6:
            return obs
        obs = env.step(np.array([*np.clip(delta, -1, 1), 0, 0, 0, gripper]))
    raise AssertionError(f"the TCP did not reach {goal}")


def grip(env, gripper):
    """One command that only opens (+1) or closes (-1) the gripper."""
    return env.step([0, 0, 0, 0, 0, 0, gripper])


def test_reset_to_a_chain_state_gives_its_scene_and_the_neutral_robot(env, tmp_path):
    assert env.sim.built_with == {"path": tmp_path, "obs_space": {"rgb_obs": ["rgb_static", "rgb_gripper"],
                                                                  "depth_obs": []}, "show_gui": False, "use_egl": False}
    chain = env.chains(3)[2]
    obs = env.reset(chain.state)
    robot_obs, scene_obs = env.sim.resets[-1]
    np.testing.assert_array_equal(robot_obs, cp.NEUTRAL_ROBOT_OBS)
    np.testing.assert_array_equal(scene_obs, cp.initial_scene_obs(chain.state))
    np.testing.assert_array_equal(env.sim.get_obs()["scene_obs"], scene_obs)
    np.testing.assert_array_equal(obs.robot_obs, cp.NEUTRAL_ROBOT_OBS)
    assert {c: img.shape for c, img in obs.images.items()} == {"static": (200, 200, 3), "gripper": (84, 84, 3)}
    env.reset(197)  # a seed picks start state seed % 192
    np.testing.assert_array_equal(env.sim.get_obs()["scene_obs"], cp.initial_scene_obs(cp.initial_states()[5]))
    with pytest.raises(ValueError, match="drawer='ajar'"):
        env.reset({**chain.state, "drawer": "ajar"})
    with pytest.raises(CalvinSimError, match="start state"):
        env.reset("open")


def test_chains_are_the_official_sequences(env):
    chains = env.chains(1000)
    assert [(c.state, c.tasks) for c in chains] == cp.sequences()
    assert json.loads(json.dumps(chains[0].state)) == chains[0].state
    assert env.tasks == tuple(cp.TASKS) and len(env.tasks) == 34  # before a reset
    for chain in chains[:20]:  # after one: the tasks feasible from the start state
        env.reset(chain.state)
        assert chain.tasks[0] in env.tasks and len(env.tasks) < 34
        drawer = {"open": "close_drawer", "closed": "open_drawer"}[chain.state["drawer"]]
        assert drawer in env.tasks and {"open_drawer", "close_drawer"} - {drawer} - set(env.tasks)
    with pytest.raises(ValueError, match="1 to 1000"):
        env.chains(1001)


def test_commands_reach_the_simulator_as_copies(env):
    env.reset(STATE)
    command = np.array([1.0, 0, 0, 0, 0, 0.5, 1])
    before = command.copy()
    env.step(command)
    np.testing.assert_array_equal(command, before)  # the simulator scaled its own copy in place
    np.testing.assert_allclose(env.sim.received[-1], [0.02, 0, 0, 0, 0, 0.025, 1])
    obs = env.step([0, 1, 0, 0, 0, 0, -1])  # a list, gripper closed
    np.testing.assert_allclose(obs.robot_obs[:3], cp.NEUTRAL_ROBOT_OBS[:3] + [0.02, 0.02, 0])
    assert obs.robot_obs[14] == -1


@pytest.mark.parametrize("command", [np.zeros(6), [0, 0, 0, 0, 0, 0, 0.5], [0, 0, 0, 0, 0, 0, 0],
                                     [np.nan, 0, 0, 0, 0, 0, 1], [[0, 0, 0, 0, 0, 0, 1]]])
def test_bad_commands_raise_before_the_simulator(env, command):
    env.reset(STATE)
    with pytest.raises(ValueError, match="gripper exactly -1 or \\+1"):
        env.step(command)
    assert env.sim.received == []


def achieved(env):
    """Every task the oracle sees achieved since the current subtask began."""
    now = env.sim.get_info()
    return {task for task in cp.TASKS if cp.task_achieved(task, env.start_info, now)}


def test_scripted_subtasks_succeed_one_after_another_and_nothing_else_does(env):
    obs = env.reset(STATE)
    assert env.start_task("open_drawer") == "pull the handle to open the drawer"
    obs = drive(env, drive(env, obs, DRAWER_HANDLE + UP), DRAWER_HANDLE)
    obs = drive(env, obs, DRAWER_HANDLE - [0, 0.1, 0])
    assert not env.task_success()  # 0.10 of the 0.12 needed
    obs = drive(env, obs, DRAWER_HANDLE - [0, 0.15, 0])
    assert env.task_success() and achieved(env) == {"open_drawer"}

    assert env.start_task("turn_on_led") == "press the button to turn on the led light"  # no reset in between
    assert not env.task_success()
    obs = drive(env, drive(env, obs, BUTTON + UP), BUTTON)
    assert env.task_success() and achieved(env) == {"turn_on_led"}

    env.start_task("move_slider_left")
    obs = drive(env, drive(env, obs, SLIDE_HANDLE + UP), SLIDE_HANDLE)
    obs = drive(env, obs, SLIDE_HANDLE - [0.2, 0, 0])
    assert env.task_success() and achieved(env) == {"move_slider_left"}

    red = env.sim.get_obs()["scene_obs"][6:9]
    obs = drive(env, obs, red + UP)
    env.start_task("lift_red_block_table")
    obs = drive(env, grip(env, -1), red + UP, gripper=-1)  # closing above it grasps nothing
    assert not env.task_success()
    obs = drive(env, grip(env, 1), red)
    obs = drive(env, grip(env, -1), red + UP, gripper=-1)  # grasp, lift 10 cm
    assert env.task_success() and achieved(env) == {"lift_red_block_table"}

    env.start_task("rotate_red_block_left")
    grip(env, 1)  # the block drops back onto the table, not rotated
    assert not env.task_success() and achieved(env) == set()


def test_task_misuse_and_unknown_tasks_raise(env):
    env.reset(STATE)
    with pytest.raises(CalvinSimError, match="start_task"):
        env.task_success()
    with pytest.raises(KeyError, match="did you mean 'close_drawer'"):
        env.start_task("close_drawr")


def test_a_missing_calvin_env_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "calvin_env", None)  # importing it now fails as if not installed
    with pytest.raises(CalvinSimError, match=r"(?s)calvin_env, which is not installed.*--recurse-submodules.*"
                                             r"pip install -e calvin_env/tacto"):
        robovla.create("env", "calvin", {"path": tmp_path})
    for name in ("calvin_env", "calvin_env.envs", "calvin_env.envs.play_table_env"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    with pytest.raises(CalvinSimError, match="no .hydra/merged_config.yaml there"):
        robovla.create("env", "calvin", {"path": tmp_path})


@pytest.mark.parametrize("spec, message", [("fake_calvin", "expected 'module:function'"),
                                           ("fake_calvin:nope", "has no function 'nope'"),
                                           ("no_such_module_xyz:get_env", "pip install no_such_module_xyz")])
def test_a_bad_simulator_names_what_is_wrong(tmp_path, spec, message):
    with pytest.raises(CalvinSimError, match=message):
        robovla.create("env", "calvin", {"path": tmp_path, "simulator": spec})


def test_config_defaults_and_options_reach_the_simulator(tmp_path):
    config = robovla.get_component("env", "calvin").load().Config(path="/data/task_D_D/validation")
    assert (config.max_steps, config.use_egl, config.cameras) == (360, False, ["static", "gripper"])
    env = robovla.create("env", "calvin", {"path": tmp_path, "simulator": FAKE, "cameras": ["gripper"], "use_egl": True})
    assert env.sim.built_with["obs_space"]["rgb_obs"] == ["rgb_gripper"] and env.sim.built_with["use_egl"] is True
    assert list(env.reset(0).images) == ["gripper"]
