"""Closed-loop evaluation (robovla.rollout) on the synthetic reach task: single-task episodes
and the long-horizon protocol's chains.

The scripted policies below read a camera as a VLA would get it (uint8 [1, 1, H, W, 3]) and
the instruction: they find the TCP and the named block in the image, turn them into the
expert's command, and hand it on encoded by the action space, so a run checks images,
instruction, head stepping and decoding together.
"""

import re

import numpy as np
import pytest
import torch
from torch import nn

import robovla
from robovla.config import ComponentConfig
from robovla.policy import Policy
from robovla.rollout import chart, evaluate, long_horizon, table
from robovla.vla import VLA
from robovla_plugins.datasets.calvin.synthetic import COLOURS, TABLE, SyntheticReach, expert


class ScriptedHead:
    """Passes the feature [B, 1, 1, A] on as a one-action chunk [B, 1, 1, A]; counts calls."""

    history_attributes = ()  # each step stands alone

    def __init__(self):
        self.resets = self.steps = 0

    def reset(self):
        self.resets += 1

    def step(self, feature):
        self.steps += 1
        return {"action": feature}

    def actions(self, prediction, generator=None):
        return prediction["action"]


class ScriptedVLA(nn.Module):
    """The expert, driven by what a VLA sees: the static camera (the table from above, where
    the TCP's cross never hides a block's corners) and the instruction. ``read_instruction=False``
    heads for the first colour (in COLOURS order) on the table, whatever the instruction names."""

    def __init__(self, action_space, cameras=("static",), read_instruction=True):
        super().__init__()
        self.lrn = nn.Parameter(torch.zeros(1))
        self.backbone = type("Backbone", (), {"cameras": cameras, "image_size": None, "resize_filter": "bilinear"})()
        self.head, self.space, self.read_instruction = ScriptedHead(), action_space, read_instruction
        self.instructions = []

    def features(self, images, instructions):
        return torch.cat([self.one(images["static"][b, 0].numpy(), instruction)
                          for b, instruction in enumerate(instructions)])  # [B, 1, 1, A]

    def one(self, image, instruction):
        self.instructions.append(instruction)
        image = image.astype(np.int16)  # [H, W, 3]
        r, g, b = image.transpose(2, 0, 1)
        shown = {name: (np.abs(r - c[0]) <= 8) & (np.abs(g - c[1]) <= 8) & (np.abs(b - c[2]) <= 8)
                 for name, c in [*COLOURS.items(), ("open", (255, 255, 255)), ("closed", (90, 90, 90))]}

        def where(mask):  # world (x, y) of the middle of the mask's pixels
            rows, cols = np.nonzero(mask)
            u = np.array([(cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2]) / len(image)
            return np.array([u[0] * 2 - 1, 1 - u[1] * 2]) * TABLE * 1.1  # the static view spans +-1.1 TABLE

        named = [c for c in COLOURS if re.search(rf"\b{c}\b", instruction)]
        colour = named[0] if self.read_instruction else next(c for c in COLOURS if shown[c].any())
        tcp = where(shown["open"] | shown["closed"])  # the TCP's cross, white when open, grey when closed
        target = self.space.encode(expert(tcp, where(shown[colour])), np.zeros(15))  # gripper as P(open)
        return torch.tensor(target, dtype=torch.float32).view(1, 1, 1, -1)


@pytest.fixture
def space():
    return robovla.create("action_space", "rel-world", {"clip_bound": 1.0})


@pytest.fixture
def env():
    return robovla.create("env", "synthetic")


def test_expert_succeeds_and_ignoring_the_instruction_does_not(space, env):
    policy = ScriptedVLA(space)
    result = evaluate(Policy(policy, space), env, episodes=100, seed=1, progress=False)
    assert result["success_rate"] >= 0.99, result["success_rate"]
    assert result["episodes"] == 100 and result["max_steps"] == 60 and len(result["results"]) == 100
    assert sum(t["episodes"] for t in result["per_task"].values()) == 100
    assert set(result["per_task"]) <= {f"reach_{c}_block" for c in COLOURS} and len(result["per_task"]) == 4
    steps = [r["steps"] for r in result["results"]]
    assert result["mean_steps"] == pytest.approx(np.mean(steps)) and 5 < result["mean_steps"] < 40
    assert policy.head.resets == 100 and policy.head.steps == sum(steps)  # one head step per control step
    # the instruction of each episode is its task's, and the one the policy was shown
    assert all(r["task"].split("_")[1] in r["instruction"] for r in result["results"])
    assert set(policy.instructions) == {r["instruction"] for r in result["results"]}

    blind = evaluate(Policy(ScriptedVLA(space, read_instruction=False), space), env, episodes=100, seed=1, progress=False)
    assert 0.15 <= blind["success_rate"] <= 0.40, blind["success_rate"]  # measured: 0.32
    failed = [r["steps"] for r in blind["results"] if not r["success"]]
    assert failed and set(failed) == {60}  # a failure runs to max_steps


def test_evaluation_is_deterministic_given_the_seed(space, env):
    runs = [evaluate(Policy(ScriptedVLA(space), space), env, episodes=12, seed=s, progress=False)["results"]
            for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert [r["seed"] for r in runs[0]] == list(range(5, 17))
    assert [(r["seed"], r["task"]) for r in runs[0]] != [(r["seed"], r["task"]) for r in runs[2]]
    # each episode is its own: episode e of a longer run is episode e of a shorter one
    assert evaluate(Policy(ScriptedVLA(space), space), env, episodes=3, seed=5, progress=False)["results"] == runs[0][:3]


class RecordingEnv(SyntheticReach):
    """The synthetic env, keeping every command it is sent."""

    commands: list

    def step(self, command):
        self.commands.append(np.array(command))
        return super().step(command)


def test_a_real_vla_steps_its_head_in_eval_mode(space):
    cls = robovla.get_component("backbone", "cnn-pool").load()
    torch.manual_seed(0)
    backbone = cls(cls.Config.model_validate(cls.test_config))
    dims = robovla.Dims(D=backbone.hidden_size, T=2, C=3)
    for name in ("lstm", "flow"):  # flow samples: the generator seeded per episode makes it repeatable
        head = robovla.create("head", name, robovla.get_component("head", name).load().test_config, dims=dims)
        vla = VLA(backbone, head)
        runs = []
        for _ in range(2):
            env = RecordingEnv(SyntheticReach.Config())
            env.commands = []
            result = evaluate(Policy(vla, space), env, episodes=2, seed=3, max_steps=4, progress=False)
            runs.append(np.stack(env.commands))
            assert not vla.training and all(p.grad is None for p in vla.parameters())
        steps = sum(r["steps"] for r in result["results"])
        assert runs[0].shape == (steps, 7) and np.array_equal(runs[0], runs[1])
        assert set(np.unique(runs[0][:, 6])) <= {-1.0, 1.0} and np.abs(runs[0][:, :6]).max() <= 1.0


def test_errors_say_what_is_missing(space, env):
    with pytest.raises(ValueError, match=r"no image for camera\(s\) \['wrist'\]; the policy reads \['static', 'wrist'\] "
                                         r"and got \['gripper', 'static'\]"):
        evaluate(Policy(ScriptedVLA(space, cameras=("static", "wrist")), space), env, episodes=1, progress=False)
    bare = SyntheticReach(ComponentConfig())  # an env whose config has no max_steps
    with pytest.raises(ValueError, match="no config.max_steps; pass max_steps="):
        evaluate(Policy(ScriptedVLA(space), space), bare, episodes=1, progress=False)
    assert evaluate(Policy(ScriptedVLA(space), space), bare, episodes=2, max_steps=80, progress=False)["max_steps"] == 80
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        evaluate(Policy(ScriptedVLA(space), space), env, episodes=0, progress=False)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        evaluate(Policy(ScriptedVLA(space), space), env, episodes=1, max_steps=0, progress=False)


# ------------------------------------------------------------------------ long horizon


def test_long_horizon_chains_of_the_synthetic_env(space, tmp_path):
    env = robovla.create("env", "synthetic")
    chains = env.chains(30)
    assert chains == env.chains(30) and chains[:5] == env.chains(5)  # fixed, in a fixed order
    assert all(len(c.tasks) == 5 and all(a != b for a, b in zip(c.tasks, c.tasks[1:])) for c in chains)

    vla = ScriptedVLA(space)
    report = long_horizon(Policy(vla, space), env, chains, progress=False)
    assert report["sequences"] == 30 and report["steps_per_task"] == 60
    assert report["avg_len"] >= 4.8, report["avg_len"]  # the expert chains its reaches (measured: 5.0)
    sr = [report["chain_sr"][str(k)] for k in range(1, 6)]
    assert sr == sorted(sr, reverse=True) and report["avg_len"] == pytest.approx(sum(sr))  # avg len = sum of SR_k
    attempted = sum(min(r["completed"] + 1, 5) for r in report["results"])
    assert sum(v["total"] for v in report["task_info"].values()) == attempted
    assert sum(v["success"] for v in report["task_info"].values()) == sum(r["completed"] for r in report["results"])
    assert vla.head.resets == attempted  # the policy is reset at every subtask
    # subtasks after the first start where the last one ended: at a block, gripper closed
    assert [r["index"] for r in report["results"]] == list(range(30))

    blind = long_horizon(Policy(ScriptedVLA(space, read_instruction=False), space), env, chains, progress=False)
    assert blind["avg_len"] < 1.0, blind["avg_len"]  # at most one of the five reaches goes to its block
    failed = [r for r in blind["results"] if r["completed"] < 5]
    assert failed and all(r["steps"][-1] == 60 for r in failed)  # a failure uses up the subtask's steps

    text = table(report)
    assert "average length: " in text and "reach_red_block" in text
    png = chart(report, tmp_path / "lh.png", title="scripted")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_chains_run_side_by_side_give_the_same_results(space):
    chains = robovla.create("env", "synthetic").chains(7)
    alone = long_horizon(Policy(ScriptedVLA(space, read_instruction=False), space),
                         robovla.create("env", "synthetic"), chains, progress=False)
    envs = [robovla.create("env", "synthetic") for _ in range(3)]
    together = long_horizon(Policy(ScriptedVLA(space, read_instruction=False), space), envs, chains, progress=False)
    assert together == alone


def test_long_horizon_errors(space, env):
    policy = Policy(ScriptedVLA(space), space)
    with pytest.raises(ValueError, match="at least one chain"):
        long_horizon(policy, env, [], progress=False)
    with pytest.raises(ValueError, match="at least one env"):
        long_horizon(policy, [], env.chains(1), progress=False)
    with pytest.raises(NotImplementedError, match="defines no long-horizon chains"):
        robovla.Env.chains(env, 3)
