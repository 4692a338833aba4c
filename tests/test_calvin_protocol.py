"""CALVIN's long-horizon protocol: the hash, the 1000 official sequences, the start scenes,
the validation sentences and the 34-task oracle on calvin_env info dicts."""

import copy
import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from robovla.batch import ROBOT_OBS_DIM
from robovla_plugins.datasets.calvin import protocol as cp
from robovla_plugins.datasets.calvin.protocol import task_achieved

from fake_calvin import BLOCKS, LINKS, ROBOT, TABLE, block, make_info, yaw_quaternion

EXAMPLE = {"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_left",
           "blue_block": "table", "pink_block": "slider_right", "grasped": 0}  # calvin.md 4.3


def test_fnv1_32_is_pyhash_with_seed_0_over_utf16le():
    assert cp.fnv1_32("dict_values([1, 1, 'left', 'open', 'slider_left', 'table', 'slider_right', 0])") == 2138410836
    assert cp.fnv1_32("") == 0  # h starts at 0, not at FNV's offset basis
    assert cp.fnv1_32("a") == 97 * 16777619  # bytes 0x61 0x00: h = 0x61, then h * prime ^ 0


def test_the_1000_official_sequences():
    seqs = cp.sequences()
    text = json.dumps([[state, list(tasks)] for state, tasks in seqs], sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == cp.SEQUENCES_SHA256
    assert [tasks for _, tasks in seqs[:3]] == [
        ("rotate_blue_block_right", "move_slider_right", "lift_red_block_slider", "place_in_slider",
         "turn_off_lightbulb"),
        ("turn_off_led", "push_into_drawer", "lift_blue_block_drawer", "place_in_slider", "close_drawer"),
        ("lift_pink_block_slider", "place_in_slider", "open_drawer", "rotate_red_block_right", "lift_red_block_table")]
    assert seqs[0][0] == {**EXAMPLE, "blue_block": "table"} and list(seqs[0][0]) == list(cp.STATE_VALUES)
    assert seqs[2][0] == {"led": 0, "lightbulb": 1, "slider": "right", "drawer": "closed", "red_block": "table",
                          "blue_block": "slider_right", "pink_block": "slider_left", "grasped": 0}
    counts = Counter(t for _, tasks in seqs for t in tasks)  # calvin.md 4.2
    assert [counts[t] for t in ("place_in_slider", "open_drawer", "push_into_drawer")] == [398, 379, 138]
    assert len(counts) == 34
    assert all(cp.feasible(state, tasks) for state, tasks in seqs)
    seqs[0][0]["led"] = 5  # callers get copies
    assert cp.sequences()[0][0]["led"] == 1


def test_the_sampler_reproduces_the_frozen_chains_and_leaves_the_global_rng_alone():
    np.random.seed(7)
    before = np.random.get_state()
    cp._sequences.cache_clear()
    cp.sequences()
    cp.initial_scene_obs(EXAMPLE)
    states = cp.initial_states()
    assert len(states) == 192 and sum(cp._counts(1000)[:40]) == 240
    for i in (0, 184, 136):  # the cheapest states to sample, and the first
        assert cp.sample_chains(states[i], 6 if i < 40 else 5, i) == cp._frozen()[i]
    after = np.random.get_state()
    assert after[0] == before[0] and (after[1] == before[1]).all() and after[2:] == before[2:]


@pytest.mark.slow
def test_the_sampler_reproduces_every_frozen_chain():  # ~20 s: 7.1 million draws
    for i, (state, count) in enumerate(zip(cp.initial_states(), cp._counts(1000))):
        assert cp.sample_chains(state, count, i) == cp._frozen()[i], i


def test_other_counts_are_calvins_draws_for_that_count():
    seqs = cp.sequences(128)  # the training-time rollout: one chain for each of the first 128 states
    assert len(seqs) == 128 and sorted(cp.initial_states().index(s) for s, _ in seqs) == list(range(128))
    assert all(tasks == cp._frozen()[cp.initial_states().index(s)][0] for s, tasks in seqs)


def test_initial_scene_obs_and_robot_obs():
    expected = [0.28, 0.22, 0, 0.088, 1, 1, -0.240852, 0.092404, 0.46099, 0, 0, 1.885941, 0.229995, -0.119995,
                0.45999, 0, 0, 1.488143, 0.070342, 0.092404, 0.46099, 0, 0, 1.468399]
    np.testing.assert_allclose(cp.initial_scene_obs(EXAMPLE), expected, atol=1e-5)
    shuffled = dict(sorted(EXAMPLE.items()))  # as read back from JSON with sort_keys: same hash, same scene
    np.testing.assert_array_equal(cp.initial_scene_obs(shuffled), cp.initial_scene_obs(EXAMPLE))
    both = {**EXAMPLE, "red_block": "table", "pink_block": "slider_left"}
    obs = cp.initial_scene_obs(both)  # red and blue take the two table spots, one each
    assert {tuple(np.round(obs[6:9], 3)), tuple(np.round(obs[12:15], 3))} == {(0.05, -0.12, 0.46), (0.23, -0.12, 0.46)}
    assert cp.NEUTRAL_ROBOT_OBS.shape == (ROBOT_OBS_DIM,) and cp.NEUTRAL_ROBOT_OBS[14] == 1
    with pytest.raises(ValueError, match=r"missing key 'led'.*red_block='shelf'"):
        cp.initial_scene_obs({**{k: v for k, v in EXAMPLE.items() if k != "led"}, "red_block": "shelf"})


def test_tasks_categories_and_sentences():
    assert len(cp.TASKS) == 34 and list(cp.TASKS)[:2] == ["rotate_red_block_right", "rotate_red_block_left"]
    assert list(cp.TASKS)[-3:] == ["turn_on_led", "turn_off_led", "push_into_drawer"]
    assert set(cp.CATEGORIES) == set(cp.VALIDATION_INSTRUCTIONS) == set(cp.ORACLE) == set(cp.TASKS)
    assert len(set(cp.VALIDATION_INSTRUCTIONS.values())) == 34
    assert cp.VALIDATION_INSTRUCTIONS["lift_pink_block_drawer"] == "Take the pink block from the drawer"
    assert cp.VALIDATION_INSTRUCTIONS["turn_off_led"] == "press the button to turn off the led light"
    assert cp.CATEGORIES["stack_block"] == 10 and cp.CATEGORIES["lift_red_block_slider"] == 5


# ---------------------------------------------------------------------------- the oracle


def info(red=None, **kwargs):
    """An info dict; ``red`` replaces the red block, the others stay on the table top."""
    blocks = {name: block((0.1 * i, -0.1, 0.46)) for i, name in enumerate(BLOCKS)}
    if red is not None:
        blocks["block_red"] = red
    return make_info(blocks, **kwargs)


def achieved(start, end):
    """The tasks the oracle says were achieved between two info dicts."""
    return {task for task in cp.TASKS if task_achieved(task, start, end)}


def tilted(x, z):
    """(x, y, z, w) of Rz(z) Rx(x), degrees: the product of the two half-angle quaternions."""
    (cx, cz), (sx, sz) = np.cos(np.radians([x, z]) / 2), np.sin(np.radians([x, z]) / 2)
    return (cz * sx, sz * sx, sz * cx, cz * cx)


def test_rotate_needs_60_to_180_degrees_about_z_in_place_and_not_held():
    start = info(block((0, -0.1, 0.46)))
    assert achieved(start, start) == set()
    left, right = yaw_quaternion(np.radians(90)), yaw_quaternion(np.radians(-70))
    assert achieved(start, info(block((0, -0.1, 0.46), orn=left))) == {"rotate_red_block_left"}
    assert achieved(start, info(block((0.02, -0.1, 0.46), orn=right))) == {"rotate_red_block_right"}
    assert achieved(start, info(block((0, -0.1, 0.46), orn=tilted(x=20, z=90)))) == {"rotate_red_block_left"}
    for end in (block((0, -0.1, 0.46), orn=yaw_quaternion(np.radians(50))),  # too little
                block((0.15, -0.1, 0.46), orn=yaw_quaternion(np.radians(90))),  # moved too far
                block((0, -0.1, 0.5), ((ROBOT, 10),), yaw_quaternion(np.radians(90))),  # still held
                block((0, -0.1, 0.46), orn=tilted(x=40, z=90))):
        assert not achieved(start, info(end)) & {"rotate_red_block_left", "rotate_red_block_right"}, end


def test_push_needs_10_cm_along_x_keeping_the_surface():
    start = info(block((0, -0.1, 0.46)))
    assert achieved(start, info(block((0.12, -0.1, 0.46)))) == {"push_red_block_right"}
    assert achieved(start, info(block((-0.12, -0.1, 0.46), ((TABLE, -1), (ROBOT, 10))))) == {"push_red_block_left"}
    assert achieved(start, info(block((0.08, -0.1, 0.46)))) == set()
    assert achieved(start, info(block((0.12, -0.1, 0.46), ((TABLE, LINKS["plank_link"]),)))) == set()  # lost the top
    assert achieved(info(block((0, -0.1, 0.5), ((ROBOT, 10),))), info(block((0.12, -0.1, 0.46)))) == set()


def test_slider_and_drawer_need_their_joint_moved_past_the_threshold():
    assert achieved(info(slide=0.0), info(slide=0.16)) == {"move_slider_left"}
    assert achieved(info(slide=0.28), info(slide=0.1)) == {"move_slider_right"}
    assert achieved(info(slide=0.0), info(slide=0.14)) == set()
    assert achieved(info(drawer=0.0), info(drawer=0.13)) == {"open_drawer"}
    assert achieved(info(drawer=0.22), info(drawer=0.05)) == {"close_drawer"}
    assert achieved(info(drawer=0.0), info(drawer=0.11)) == set()


@pytest.mark.parametrize("where, link, rise", [("table", "base_link", 0.05), ("slider", "plank_link", 0.03),
                                               ("drawer", "drawer_link", 0.05)])
def test_lift_needs_the_start_surface_the_rise_and_only_the_robot_at_the_end(where, link, rise):
    start = info(block((0, -0.1, 0.46), ((TABLE, LINKS[link]),)))
    held = ((ROBOT, 10),)
    assert achieved(start, info(block((0, -0.1, 0.46 + rise + 0.005), held))) == {f"lift_red_block_{where}"}
    assert achieved(start, info(block((0, -0.1, 0.46 + rise - 0.005), held))) == set()
    assert achieved(start, info(block((0, -0.1, 0.6), ((ROBOT, 10), (TABLE, LINKS[link]))))) == set()


def test_place_needs_the_one_held_block_let_go_onto_the_shelf_or_into_the_drawer():
    red = BLOCKS["block_red"]
    start = info(block((0, 0, 0.6), ((ROBOT, 10),)), robot_touching=((red, -1),))
    on = {name: info(block((0, 0.1, 0.46), ((TABLE, LINKS[link]),)))
          for name, link in (("slider", "plank_link"), ("drawer", "drawer_link"), ("table", "base_link"))}
    assert achieved(start, on["slider"]) == {"place_in_slider"}
    assert achieved(start, on["drawer"]) == {"place_in_drawer"}
    assert achieved(start, on["table"]) == set()
    still = copy.deepcopy(on["slider"])
    still["robot_info"] = info(robot_touching=((red, -1),))["robot_info"]
    assert achieved(start, still) == set()  # not let go
    two = info(block((0, 0, 0.6), ((ROBOT, 10),)), robot_touching=((red, -1), (TABLE, -1)))
    assert achieved(two, on["slider"]) == set()


def test_lights_need_their_logical_state_to_flip():
    assert achieved(info(lightbulb=0), info(lightbulb=1)) == {"turn_on_lightbulb"}
    assert achieved(info(lightbulb=1, led=1), info(lightbulb=1, led=0)) == {"turn_off_led"}
    assert achieved(info(led=1), info(led=1)) == set()


def test_push_into_drawer_needs_a_block_going_from_the_table_top_to_the_drawer():
    start = info(block((0, -0.1, 0.46)))
    into = block((0, -0.3, 0.35), ((TABLE, LINKS["drawer_link"]),))
    assert achieved(start, info(into)) == {"push_into_drawer"}
    touched = block((0, -0.3, 0.35), ((TABLE, LINKS["drawer_link"]), (ROBOT, 10)))
    assert achieved(start, info(touched)) == {"push_into_drawer"}  # as in CALVIN: its robot test never fails
    assert achieved(info(block((0, -0.1, 0.46), ((TABLE, -1), (ROBOT, 10)))), info(into)) == set()


def test_stack_and_unstack_need_block_contacts_only_and_calm_blocks():
    blue = BLOCKS["block_blue"]
    on_blue = block((0.1, -0.1, 0.5), ((blue, -1),))
    assert achieved(info(), info(on_blue)) == {"stack_block"}
    assert achieved(info(on_blue), info()) == {"unstack_block"}
    assert achieved(info(), info(block((0.1, -0.1, 0.5), ((blue, -1), (TABLE, -1))))) == set()
    fast = block((0.1, -0.1, 0.5), ((blue, -1),), vel=1.5)
    assert achieved(info(), info(fast)) == set()
    assert achieved(info(fast), info()) == set()  # CALVIN checks the start's velocity when unstacking


def test_an_unknown_task_names_the_closest():
    with pytest.raises(KeyError, match="did you mean 'open_drawer'"):
        task_achieved("open_drawr", info(), info())
