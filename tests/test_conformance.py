"""The plugin kit's conformance checks: run on every registered component, and shown to fail."""

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
from pydantic import Field

import robovla
from robovla import testing
from robovla.batch import ROBOT_OBS_DIM
from robovla.dataset import Frames, Problem, Segment
from robovla.env import Chain, Observation
from robovla.testing import action_spaces, datasets, envs, heads
from robovla.testing import test_conformance  # noqa: F401  (parametrized over the registry)


def test_checks_cover_the_registered_components():
    ids = {(c.kind, c.name, fn.__name__) for c, fn in testing.cases()}
    assert ("head", "example-linear", "usable") in ids
    assert ("action_space", "example-clip", "config_round_trips_through_toml") in ids
    expected = len(testing.CHECKS["head"]) + len(testing.CHECKS["action_space"])
    assert len(testing.cases("robovla-example")) == expected == 16  # 3 for every kind; 7 head, 3 action space checks
    for kind, module, count in [("action_space", action_spaces, 3), ("env", envs, 3), ("dataset", datasets, 2)]:
        own = [fn.__name__ for fn in testing.CHECKS[kind] if fn.__module__ == module.__name__]
        assert len(own) == count
        assert {(kind, name, fn) for name in robovla.list_components(kind) for fn in own} <= ids
    assert {("action_space", "example-clip", "action_space_bounds"), ("env", "synthetic", "env_chains_are_fixed"),
            ("dataset", "calvin", "dataset_windows_lie_within_annotations")} <= ids


class Incomplete(robovla.ActionSpace):
    """Implements encode but not decode."""

    def encode(self, actions, robot_obs):
        return actions


class Undocumented(robovla.ActionSpace):
    def encode(self, actions, robot_obs):
        return actions

    def decode(self, targets, robot_obs):
        return targets


class LaxConfig(robovla.ActionSpace):
    """Its Config allows unknown fields."""

    class Config(robovla.ComponentConfig):
        model_config = {"extra": "allow"}
        bound: float = Field(1.0, description="a bound")

    encode = decode = lambda self, a, o: a


class Hooks:
    @robovla.hookimpl
    def register_action_spaces(self, register):
        register("incomplete", Incomplete)
        register("undocumented", Undocumented)
        register("lax", LaxConfig)


@pytest.mark.parametrize("name, check, message", [
    ("incomplete", testing.usable, "leaves abstract methods \\['decode'\\] unimplemented"),
    ("undocumented", testing.usable, "give Undocumented a docstring"),
    ("lax", testing.config_strict_and_documented, "must keep extra='forbid'"),
])
def test_checks_fail_on_bad_components(robovla_plugin, name, check, message):
    robovla_plugin(Hooks(), name="bad", distribution="bad-dist")
    with pytest.raises(AssertionError, match=message):
        check(robovla.get_component("action_space", name))


def test_distribution_filter_is_forgiving_about_spelling_but_not_about_names():
    assert testing.cases("ROBOVLA_example") == testing.cases("robovla-example")
    with pytest.raises(pytest.UsageError, match="no installed distribution of that name.*robovla-example"):
        testing.cases("robovla-exampel")


def test_fixture_never_removes_a_plugin_it_did_not_add(robovla_plugin):
    robovla_plugin(Hooks(), name="first")
    with pytest.raises(ValueError, match="registered already"):
        robovla_plugin(Hooks(), name="first")
    assert robovla.get_component("action_space", "lax")  # the first registration is intact


# ------------------------------------------------ action spaces, envs, datasets: good and bad


class Scaled(robovla.ActionSpace):
    """The arm divided by its largest fitted magnitude, clipped to [-1, 1]; the gripper -1/+1 <-> 0/1."""

    def __init__(self, config):
        super().__init__(config)
        self.scale = 1.0

    def fit(self, samples):
        self.scale = 2 * max(float(np.abs(actions[..., :6]).max()) for actions, _ in samples)

    def arm(self, actions):
        return np.clip(actions[..., :6] / self.scale, -1, 1)

    def encode(self, actions, robot_obs):
        actions = np.asarray(actions, dtype=np.float64)
        return np.concatenate([self.arm(actions), actions[..., 6:] > 0], -1).astype(np.float32)

    def decode(self, targets, robot_obs):
        targets = np.asarray(targets, dtype=np.float64)
        return np.concatenate([np.clip(targets[..., :6], -1, 1) * self.scale,
                               np.where(targets[..., 6:] >= 0.5, 1.0, -1.0)], -1)

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, state):
        self.scale = state["scale"]


class FlipsOnDecode(Scaled):
    """decode flips the arm's sign, as a frame mistake would."""

    def decode(self, targets, robot_obs):
        commands = super().decode(targets, robot_obs)
        commands[..., :6] *= -1
        return commands


class ForgetsItsScale(Scaled):
    """Fits a scale but leaves it out of state_dict."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        robovla.ActionSpace.load_state_dict(self, state)


class Unclipped(Scaled):
    """encode does not clip, so actions past the fitted ones leave [-1, 1]."""

    def arm(self, actions):
        return actions[..., :6] / self.scale


class Dot(robovla.Env):
    """A dot at a seeded pixel of a 16x16 image; commands move it one pixel per step."""

    tasks = ("touch",)

    def reset(self, state=None):
        self.pos = self.start(0 if state is None else state)
        return self.observe()

    def start(self, seed):
        return np.random.default_rng(seed).integers(0, 16, 2)

    def observe(self):
        image = np.zeros((16, 16, 3), np.uint8)
        image[tuple(self.pos)] = 255
        return Observation({"static": image}, np.r_[self.pos, np.zeros(ROBOT_OBS_DIM - 2)])

    def start_task(self, task):
        return "touch the dot"

    def step(self, command):
        self.pos = np.clip(self.pos + np.sign(command[:2]).astype(int), 0, 15)
        return self.observe()

    def task_success(self):
        return False

    def chains(self, n):
        return [Chain(i, ("touch", "touch")) for i in range(n)]


class FixedStart(Dot):
    """reset ignores the seed: one start for all."""

    def start(self, seed):
        return np.array([3, 4])


class UnseededStart(Dot):
    """reset ignores the seed: every reset moves the dot on."""

    resets = itertools.count(1)

    def start(self, seed):
        k = next(self.resets)
        return np.array([5 * k % 16, 7 * k % 16])


class SharedClient(Dot):
    """Like calvin_env's simulator, whose second instance in a process lacks the robot's base:
    only the first instance built in a process draws a pixel at the corner."""

    built = itertools.count()

    def __init__(self, config):
        super().__init__(config)
        self.first = next(self.built) == 0

    def observe(self):
        observation = super().observe()
        observation.images["static"][0, 0] = 40 * self.first
        return observation


class PerInstanceChains(Dot):
    """Each instance numbers its chains from its own offset."""

    instances = itertools.count(1)

    def __init__(self, config):
        super().__init__(config)
        self.offset = 100 * next(self.instances)

    def chains(self, n):
        return [Chain(self.offset + i, ("touch",)) for i in range(n)]


class Arrays(robovla.Dataset):
    """Episodes of 10 frames in one npz file per split; one segment per episode."""

    class Config(robovla.ComponentConfig):
        path: Path = Field(description="the split folder")

    cameras = ("static",)

    @classmethod
    def synthesize(cls, out, episodes, seed):
        rng = np.random.default_rng(seed)
        (out / "training").mkdir(parents=True)
        n = 10 * episodes
        np.savez(out / "training" / "frames.npz", robot_obs=rng.normal(size=(n, ROBOT_OBS_DIM)),
                 actions=rng.uniform(-1, 1, (n, 7)))
        return {"training": {"episodes": episodes, "frames": n}}

    def arrays(self):
        with np.load(self.config.path / "frames.npz") as npz:
            return {k: npz[k] for k in npz.files}

    def segments(self):
        return [Segment(s, s + 9, "reach") for s in range(0, len(self.arrays()["robot_obs"]), 10)]

    def load(self, start, end):
        arrays = self.arrays()
        rows = slice(start, end + 1)
        obs = arrays["robot_obs"][rows]
        shade = (obs[:, :1, None, None] * 40 + 128).clip(0, 255).astype(np.uint8)
        return Frames({"static": np.broadcast_to(shade, (len(obs), 8, 8, 3))}, obs, {"actions": arrays["actions"][rows]})

    def check(self):
        return []


class SegmentPastFrames(Arrays):
    """Its last segment runs two frames past the last frame."""

    def segments(self):
        *first, last = super().segments()
        return [*first, Segment(last.start, last.end + 2, last.instruction)]


class ReadsFromZero(Arrays):
    """load ignores start: every range is read from frame 0."""

    def load(self, start, end):
        return super().load(0, end - start)


class FlagsItsOwnData(Arrays):
    """check() reports a problem in the frames its own synthesize() wrote."""

    def check(self):
        return [Problem(str(self.config.path / "frames.npz"), "robot_obs", "values out of range")]


def mlp_claiming_a_history():
    """The per-frame mlp head declaring a history it does not have."""
    mlp = robovla.get_component("head", "mlp").load()
    return type("ClaimsHistory", (mlp,), {"history_attributes": ("_frames",), "__doc__": "mlp, wrongly declared"})


def stateful_linear():
    """A head that keeps the previous frame in its step but declares no history."""
    base = robovla.get_component("head", "example-linear").load()

    class HidesHistory(base):
        """example-linear, adding the previous frame's feature to each step's."""

        def reset(self):
            super().reset()
            self._previous = None

        def step(self, features):
            previous, self._previous = self._previous, features
            return super().step(features if previous is None else features + previous)

    return HidesHistory


class Checked:
    @robovla.hookimpl
    def register_heads(self, register):
        register("claims-history", mlp_claiming_a_history())
        register("hides-history", stateful_linear())

    @robovla.hookimpl
    def register_action_spaces(self, register):
        for name, cls in [("scaled", Scaled), ("flips", FlipsOnDecode), ("forgets", ForgetsItsScale),
                          ("unclipped", Unclipped)]:
            register(name, cls)

    @robovla.hookimpl
    def register_envs(self, register):
        for name, cls in [("dot", Dot), ("fixed-start", FixedStart), ("unseeded", UnseededStart),
                          ("per-instance-chains", PerInstanceChains), ("shared-client", SharedClient)]:
            register(name, cls)

    @robovla.hookimpl
    def register_datasets(self, register):
        for name, cls in [("arrays", Arrays), ("past-frames", SegmentPastFrames), ("from-zero", ReadsFromZero),
                          ("flags-own", FlagsItsOwnData)]:
            register(name, cls)


@pytest.mark.parametrize("kind, name, module", [("action_space", "scaled", action_spaces), ("env", "dot", envs),
                                                ("dataset", "arrays", datasets)])
def test_new_checks_pass_on_good_components(robovla_plugin, kind, name, module):
    robovla_plugin(Checked(), name="checked", distribution="checked-dist")
    component = robovla.get_component(kind, name)
    own = [fn for fn in testing.CHECKS[kind] if fn.__module__ == module.__name__]
    assert len(own) >= 2
    for fn in own:
        fn(component)


@pytest.mark.parametrize("kind, name, check, message", [
    ("head", "claims-history", heads.head_declares_a_history_exactly_when_it_reads_the_past,
     "does not read earlier frames, but it declares history_attributes = \\('_frames',\\)"),
    ("head", "hides-history", heads.head_declares_a_history_exactly_when_it_reads_the_past,
     "reads earlier frames, but it declares history_attributes = \\(\\)"),
    ("action_space", "flips", action_spaces.action_space_round_trip, "encode\\(decode\\(targets\\)\\) differs"),
    ("action_space", "forgets", action_spaces.action_space_state_dict_round_trip,
     "a fresh space encodes differently.*state_dict\\(\\) must hold every fitted statistic"),
    ("action_space", "unclipped", action_spaces.action_space_bounds, "targets of actions 10 times larger span"),
    ("env", "fixed-start", envs.env_same_seed_same_start, "seeds \\[0, 1, 2, 3\\] all give the same start"),
    ("env", "unseeded", envs.env_same_seed_same_start, "reset\\(0\\) on two instances differs in the static image"),
    ("env", "per-instance-chains", envs.env_chains_are_fixed, "chains\\(3\\) differs between two instances"),
    ("dataset", "past-frames", datasets.dataset_windows_lie_within_annotations,
     "segment 1 \\(10, 21\\) spans 12 frame ids, but load gives .*'robot_obs': 10"),
    ("dataset", "from-zero", datasets.dataset_windows_lie_within_annotations,
     "frames \\(3, 8\\) load differently alone and as part of segment 0 \\(0, 9\\)"),
    ("dataset", "flags-own", datasets.dataset_checks_its_own_synthetic_data,
     "(?s)check\\(\\) reports 1 problem\\(s\\) in the training split.*values out of range"),
])
def test_new_checks_fail_on_bad_components(robovla_plugin, kind, name, check, message):
    robovla_plugin(Checked(), name="checked", distribution="checked-dist")
    with pytest.raises(AssertionError, match=message):
        check(robovla.get_component(kind, name))


def test_the_worker_check_catches_state_shared_within_a_process(robovla_plugin):
    robovla_plugin(Checked(), name="checked", distribution="checked-dist")
    SharedClient(SharedClient.Config())  # the first "simulator" of this process
    with pytest.raises(AssertionError, match="reset\\(0\\) differs in the static image between this process and "
                                             "a worker process"):
        envs.env_runs_in_a_worker_process(robovla.get_component("env", "shared-client"))


def test_env_checks_run_on_the_calvin_env_over_a_stand_in_simulator(tmp_path):
    calvin = robovla.get_component("env", "calvin")
    for fn in testing.CHECKS["env"]:
        if fn.__module__ == envs.__name__:
            fn(calvin, {"path": tmp_path, "simulator": "fake_calvin:get_env"})


@pytest.mark.skipif(importlib.util.find_spec("calvin_env") is not None, reason="calvin_env is installed here")
def test_env_checks_skip_an_env_whose_simulator_is_not_installed(tmp_path):
    with pytest.raises(pytest.skip.Exception, match="needs the module 'calvin_env', which is not installed"):
        envs.env_same_seed_same_start(robovla.get_component("env", "calvin"), {"path": tmp_path})
