"""Closed-loop evaluation at scale: envs in worker processes, chains that fail without ending
the evaluation, workers that die, resuming after a kill, --env.FIELD flags and videos.

Two envs: the synthetic reach task (safe in-process, so it runs both ways) and CALVIN's env
over the fake simulator (tests/fake_calvin.py), which runs in worker processes.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import robovla
from robovla.cli import main
from robovla.closed_loop import env_spec
from robovla.env_workers import EnvPool, EnvSpec
from robovla.eval_log import EvalLog, EvalLogError
from robovla.policy import Policy
from robovla.rollout import MAX_RERUNS, evaluate, long_horizon, table
from robovla_plugins.datasets.calvin.synthetic import CHAIN_SEEDS, SyntheticReach

from helpers import ROBO_RUN, ROOT, TINY_CNN_LSTM, clean_env, synth_split, train_tiny
from test_rollout import ScriptedVLA

FAKE = {"simulator": "fake_calvin:get_env", "max_steps": 15}


class Drift:
    """A policy-like object whose commands depend only on each episode's seed: uniform arm
    motions, the gripper open or closed; ``nan_for`` chain indices get NaN commands."""

    def __init__(self, nan_for=()):
        self.rng, self.nan_for, self.chain = {}, set(nan_for), {}

    def reset(self, key, seed=0):
        self.rng[key], self.chain[key] = np.random.default_rng(seed), seed // 101  # seed = index * 101 + subtask

    def drop(self, key):
        self.rng.pop(key, None)

    def act_batch(self, observations, instructions, keys):
        out = []
        for key in keys:
            a = self.rng[key].uniform(-1, 1, 7)
            a[6] = 1.0 if a[6] > 0 else -1.0
            out.append(np.full(7, np.nan) if self.chain[key] in self.nan_for else a)
        return np.stack(out)


def calvin_spec(tmp_path):
    return EnvSpec("calvin", {"path": str(tmp_path), **FAKE})


@pytest.fixture
def space():
    return robovla.create("action_space", "rel-world", {"clip_bound": 1.0})


def scripted(space):
    return Policy(ScriptedVLA(space, read_instruction=False), space)  # succeeds on some subtasks, not all


# --------------------------------------------------------------------------- workers


def test_n_workers_give_the_per_chain_results_of_one(space, tmp_path):
    synthetic = EnvSpec("synthetic", {"max_steps": 20})
    chains = robovla.create("env", "synthetic").chains(8)
    with EnvPool(synthetic, 1, processes=False) as one:
        alone = long_horizon(scripted(space), one, chains, progress=False)
    with EnvPool(synthetic, 4, processes=True) as four:
        assert len(set(four.pids)) == 4 and os.getpid() not in four.pids
        together = long_horizon(scripted(space), four, chains, progress=False)
    assert together == alone and 0 < alone["avg_len"] < 5  # some subtasks succeed, some fail
    with EnvPool(synthetic, 3, processes=True) as three:
        episodes = evaluate(scripted(space), three, episodes=6, seed=3, progress=False)
    assert episodes == evaluate(scripted(space), robovla.create("env", "synthetic", {"max_steps": 20}), episodes=6,
                                seed=3, progress=False)

    calvin = calvin_spec(tmp_path)
    with EnvPool(calvin, 1, processes=True) as one:
        chains = one.ask(0, "chains", 6)
        alone = long_horizon(Drift(), one, chains, progress=False)
    with EnvPool(calvin, 4, processes=True) as four:
        together = long_horizon(Drift(), four, chains, progress=False)
    assert together == alone and alone["sequences"] == 6
    assert [r["tasks"] for r in alone["results"]] == [list(c.tasks) for c in chains]


class Killer:
    """Wraps a policy; at its ``at``-th call it kills the worker of slot 0 (or, with ``every``
    set, at the ``at``-th step of every run of that chain; the test runs one worker)."""

    def __init__(self, policy, pool, at=3, every=None):
        self.policy, self.pool, self.at, self.every, self.calls, self.killed = policy, pool, at, every, 0, []
        self.steps, self.seed = {}, {}

    def reset(self, key, seed=0):
        self.steps[key], self.seed[key] = 0, seed
        self.policy.reset(key, seed=seed)

    def drop(self, key):
        self.policy.drop(key)

    def act_batch(self, observations, instructions, keys):
        self.calls += 1
        for key in keys:
            self.steps[key] += 1
        chain = self.every in keys and self.steps[self.every] == self.at  # the policy's keys: chain numbers
        if (self.every is None and self.calls == self.at) or (self.every is not None and chain):
            self.killed.append(self.pool.pids[0])
            os.kill(self.pool.pids[0], signal.SIGKILL)
        return self.policy.act_batch(observations, instructions, keys)


@pytest.mark.parametrize("which", ["synthetic", "calvin"])
def test_a_worker_killed_mid_chain_is_restarted_and_the_chain_rerun(space, tmp_path, which):
    spec = EnvSpec("synthetic", {"max_steps": 20}) if which == "synthetic" else calvin_spec(tmp_path)
    make = (lambda: scripted(space)) if which == "synthetic" else Drift
    with EnvPool(spec, 1, processes=False) as inline:
        chains = inline.ask(0, "chains", 5)
        expected = long_horizon(make(), inline, chains, progress=False)
    with EnvPool(spec, 2, processes=True) as pool:
        killer = Killer(make(), pool, at=4)
        got = long_horizon(killer, pool, chains, progress=False)
        assert pool.restarts == 1 and killer.killed and pool.pids[0] != killer.killed[0]
    assert got == expected  # the chain ran again from its start, with its seeds


def test_a_chain_that_kills_its_worker_every_time_is_recorded_as_failed(tmp_path):
    spec = calvin_spec(tmp_path)
    with EnvPool(spec, 1, processes=False) as inline:
        chains = inline.ask(0, "chains", 3)
        expected = long_horizon(Drift(), inline, chains, progress=False)
    with EnvPool(spec, 1, processes=True) as pool:
        killer = Killer(Drift(), pool, at=2, every=1)
        got = long_horizon(killer, pool, chains, progress=False)
        assert pool.restarts == MAX_RERUNS + 1 and len(killer.killed) == MAX_RERUNS + 1
    failed = got["results"][1]
    assert failed["completed"] == 0 and "SIGKILL" in failed["error"]
    assert f"run {MAX_RERUNS + 1} times" in failed["error"]
    assert got["errors"] == {"count": 1, "by_index": {"1": failed["error"]}}
    assert [got["results"][i] for i in (0, 2)] == [expected["results"][i] for i in (0, 2)]


def test_a_worker_that_cannot_build_its_env_says_why(tmp_path):
    spec = EnvSpec("calvin", {"path": str(tmp_path), "simulator": "fake_calvin:no_such_function"})
    with pytest.raises(robovla.RobovlaError, match="cannot be built in its worker process: .*no function "
                                                   "'no_such_function'"):
        EnvPool(spec, 2, processes=True)


# ------------------------------------------------------------------------ bad chains


@pytest.mark.parametrize("which", ["synthetic", "calvin"])
def test_nan_commands_and_env_errors_fail_their_chains_not_the_evaluation(tmp_path, which):
    spec = EnvSpec("synthetic", {"max_steps": 20}) if which == "synthetic" else calvin_spec(tmp_path)
    with EnvPool(spec, 2, processes=True) as pool:
        chains = pool.ask(0, "chains", 6)
        clean = long_horizon(Drift(), pool, chains, progress=False)
        got = long_horizon(Drift(nan_for={1, 4}), pool, chains, progress=False)
    assert got["sequences"] == 6 and got["errors"]["count"] == 2 and set(got["errors"]["by_index"]) == {"1", "4"}
    for i in (1, 4):
        r = got["results"][i]
        assert r["completed"] == 0 and r["steps"] == [0] and r["success"] == [False]
        assert r["error"].startswith("the policy's command is not finite: [nan")
    assert [got["results"][i] for i in (0, 2, 3, 5)] == [clean["results"][i] for i in (0, 2, 3, 5)]

    class HalfGripper(Drift):  # the calvin env raises: the gripper is not -1 or +1
        def act_batch(self, observations, instructions, keys):
            out = super().act_batch(observations, instructions, keys)
            out[:, 6] = 0.5
            return out

    with EnvPool(spec, 2, processes=True) as pool:
        bad = long_horizon(HalfGripper(), pool, chains[:2], progress=False)
    assert bad["errors"]["count"] == 2 and bad["avg_len"] == 0.0
    expected = "a CALVIN command is [7]" if which == "calvin" else "ValueError: a command is [7]"
    assert expected in bad["results"][0]["error"]


# ---------------------------------------------------------------------- robo-run eval


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    training = synth_split(tmp_path_factory.mktemp("synth"), episodes=4)
    return train_tiny(tmp_path_factory.mktemp("runs"), "cnn", training, *TINY_CNN_LSTM, steps=3)


def eval_args(run, out, *extra, env=("--env", "synthetic")):
    return ["eval", "--run", str(run), "--closed-loop", *env, "--env.max_steps", "25",
            "--sequences", "16", "--envs", "2", "--no-progress", "--out", str(out), *extra]


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("which", ["synthetic", "calvin"])
def test_resume_after_sigkill_gives_the_uninterrupted_report(run, tmp_path, capsys, which):
    env = ("--env", "synthetic") if which == "synthetic" else \
        ("--env", "calvin", "--env.path", str(tmp_path), "--env.simulator", FAKE["simulator"])
    assert main(eval_args(run, tmp_path / "whole", env=env)) == 0
    whole = json.loads((tmp_path / "whole" / "long_horizon.json").read_text())
    assert whole["sequences"] == 16 and whole["workers"] == ("inline" if which == "synthetic" else "processes")
    log = lines(tmp_path / "whole" / "long_horizon.jsonl")
    assert json.loads(log[0])["evaluation"]["env"] == which and json.loads(log[-1]) == {"finished": 16}
    assert sorted(json.loads(x)["index"] for x in log[1:-1]) == list(range(16))

    out = tmp_path / "killed"
    argv = [str(ROBO_RUN), *eval_args(run, out, "--workers", "process", env=env)]
    process = subprocess.Popen(argv, env=clean_env(PYTHONPATH=str(ROOT / "tests")), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(lines(out / "long_horizon.jsonl")) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # waiting for the event: two chains written down
    process.send_signal(signal.SIGKILL)
    stderr = process.communicate()[1]
    before = lines(out / "long_horizon.jsonl")
    assert process.returncode == -signal.SIGKILL and 3 <= len(before) < 17, (process.returncode, len(before), stderr)
    assert not (out / "long_horizon.json").exists()

    capsys.readouterr()
    assert main(eval_args(run, out, env=env)) == 1  # starting over would lose the chains done
    assert "did not end; continue it with --resume" in capsys.readouterr().err
    assert main(eval_args(run, out, "--resume", "--seed", "7", env=env)) == 2
    assert "seed: 10000 there, 7 now" in capsys.readouterr().err
    assert main(eval_args(run, out, "--resume", "--envs", "3", env=env)) == 0
    assert f"resuming {out / 'long_horizon.jsonl'}: {len(before) - 1} results there" in capsys.readouterr().err
    resumed = json.loads((out / "long_horizon.json").read_text())
    assert {**resumed, "workers": None} == {**whole, "workers": None}
    assert lines(out / "long_horizon.jsonl")[:len(before)] == before  # kept, then the rest appended


def test_a_finished_evaluation_starts_over_and_a_broken_log_names_its_line(run, tmp_path, capsys):
    identity = {"protocol": "long-horizon", "seed": 1}
    path = tmp_path / "x.jsonl"
    with EvalLog(path, identity) as log:
        log.add({"index": 0, "completed": 1})
        with pytest.raises(EvalLogError, match="another robo-run eval is writing"):
            EvalLog(path, identity)
        log.finish(1)
    with EvalLog(path, identity) as log:  # finished: a new evaluation replaces it
        assert log.done == {}
    assert lines(path) == [json.dumps({"evaluation": identity})]
    path.write_text(lines(path)[0] + '\n{"index": 3, "completed": 2}\n{"index": 4, "compl')  # cut by a kill
    with EvalLog(path, identity, resume=True) as log:
        assert list(log.done) == [3]
    assert lines(path)[-1] == '{"index": 3, "completed": 2}'
    path.write_text(lines(path)[0] + "\n[1, 2]\n")
    with pytest.raises(EvalLogError, match=r"x.jsonl, line 2: not a result"):
        EvalLog(path, identity, resume=True)
    path.write_text("hello\n")
    with pytest.raises(EvalLogError, match=r"x.jsonl, line 1: not JSON"):
        EvalLog(path, identity, resume=True)
    with EvalLog(path, identity, overwrite=True) as log:
        assert log.done == {}


# ---------------------------------------------------------------------------- flags


def test_env_list_fields_parse_like_every_section_and_reach_the_env(run, tmp_path, capsys):
    spec = env_spec("calvin", [("env.path", str(tmp_path)), ("env.cameras", "static"), ("env.simulator",
                                                                                        FAKE["simulator"])])
    assert spec.config["cameras"] == ["static"]
    env = spec.build()
    assert env.sim.built_with["obs_space"] == {"rgb_obs": ["rgb_static"], "depth_obs": []}
    assert set(env.reset(0).images) == {"static"}
    assert env_spec("calvin", [("env.path", "x"), ("env.use_egl", None)]).config["use_egl"] is True  # bare yes/no

    argv = ["eval", "--run", str(run), "--closed-loop", "--env", "calvin", f"--env.path={tmp_path}",
            "--env.cameras", "static,gripper", "--env.simulator", FAKE["simulator"], "--env.max-steps", "3",
            "--sequences", "2", "--no-progress", "--out", str(tmp_path / "out")]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "long_horizon.json").read_text())
    assert report["env_config"]["cameras"] == ["static", "gripper"] and report["steps_per_task"] == 3
    assert report["workers"] == "processes"
    for flags, message in [(["--env.cameras", "top"], "--env.cameras.0: Input should be 'static' or 'gripper'"),
                           (["--env.max_steps", "many"], "--env.max_steps: Input should be a valid integer"),
                           (["--env.colour", "red"], "--env.colour: unknown field 'colour'"),
                           (["--env.max_steps"], "--env.max_steps: needs a value")]:
        assert main([*argv[:6], *flags, "--env.path", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err, flags
    assert main([*argv, "--workers", "inline", "--envs", "2"]) == 2
    assert "is not safe to run several times in one process" in capsys.readouterr().err


# --------------------------------------------------------------------------- videos


def test_record_writes_playable_videos_one_frame_per_step(run, tmp_path, capsys):
    av = pytest.importorskip("av")
    out = tmp_path / "out"
    assert main(eval_args(run, out, "--record", "2", "--sequences", "3")) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "long_horizon.json").read_text())
    assert [v["index"] for v in report["videos"]] == [0, 1] and "videos (2):" in text
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["long_horizon-0000.mp4", "long_horizon-0001.mp4"]
    for video, result in zip(report["videos"], report["results"]):
        with av.open(str(out / video["file"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == sum(result["steps"]) == video["frames"] > 0
        assert frames[0].shape == (244, 400, 3)  # the two cameras side by side, over the text band
    assert (out / "long_horizon.png").read_bytes()[:4] == b"\x89PNG"


def test_record_without_pyav_says_how_to_install_it(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    assert main(eval_args(run, tmp_path, "--record", "1")) == 1
    assert 'pip install "robovla[video]"' in capsys.readouterr().err
    assert not (tmp_path / "long_horizon.jsonl").exists()


class Glitchy(SyntheticReach):
    """The synthetic env, but reset(13) raises, reset(CHAIN_SEEDS + 3) gives a NaN robot_obs and,
    from the 3rd step after reset(CHAIN_SEEDS + 2), robot_obs is NaN (a physics blow-up)."""

    def reset(self, state=None):
        if state == 13:
            raise RuntimeError("the simulator lost its connection")
        self.steps, self.glitch = 0, state == CHAIN_SEEDS + 2
        observation = super().reset(state)
        if state == CHAIN_SEEDS + 3:
            observation.robot_obs = np.full(15, np.nan)
        return observation

    def step(self, command):
        observation = super().step(command)
        self.steps += 1
        if self.glitch and self.steps >= 3:
            observation.robot_obs = np.full(15, np.nan)
        return observation


def test_env_faults_in_reset_and_observations_fail_single_episodes_and_chains(space):
    config = SyntheticReach.Config(max_steps=20)
    report = evaluate(scripted(space), [Glitchy(config), Glitchy(config)], episodes=6, seed=10, progress=False)
    bad = report["results"][3]
    assert report["episodes"] == 6 and report["errors"]["by_index"] == {"3": bad["error"]}
    assert bad["task"] == "(no task)" and not bad["success"] and "lost its connection" in bad["error"]
    assert "(no task)" in report["per_task"] and "(no task)" in table(report)

    chains = SyntheticReach(config).chains(5)
    clean = long_horizon(scripted(space), SyntheticReach(config), chains, progress=False)
    got = long_horizon(scripted(space), [Glitchy(config), Glitchy(config)], chains, progress=False)
    assert got["errors"]["count"] == 2 and "robot_obs" in got["results"][2]["error"]
    assert got["results"][2]["error"].startswith("the env's observation is unusable")
    assert sum(got["results"][2]["steps"]) == 3  # the step that returned NaN was the last
    assert got["results"][3]["steps"] == [0] and "robot_obs" in got["results"][3]["error"]  # NaN from reset
    assert [got["results"][i] for i in (0, 1, 4)] == [clean["results"][i] for i in (0, 1, 4)]
    for n in (1, 4):  # whatever runs beside a broken chain, and whichever chain runs first
        assert long_horizon(scripted(space), [Glitchy(config) for _ in range(n)], chains, progress=False) == got
    assert long_horizon(scripted(space), Glitchy(config), chains, progress=False,
                        done={0: got["results"][0], 1: got["results"][1]}) == got  # a resumed one


class BrokenBuild(SyntheticReach):
    def __init__(self, config):
        super().__init__(config)
        {}["calibration"]  # a bug in an env's constructor


def test_an_env_that_cannot_be_built_in_its_worker_shows_where(tmp_path):
    with pytest.raises(robovla.RobovlaError, match=r"(?s)cannot be built in its worker process: KeyError: "
                                                   r"'calibration'\n.*Traceback.*in __init__"):
        EnvPool(EnvSpec(BrokenBuild, {}), 2, processes=True)


class HangsOnce(SyntheticReach):
    """The synthetic env, whose 3rd step after reset(CHAIN_SEEDS + 1) never returns, the first time."""

    def __init__(self, config):
        super().__init__(config)
        self.steps = 0

    def reset(self, state=None):
        self.steps, self.hang = 0, state == CHAIN_SEEDS + 1
        return super().reset(state)

    def step(self, command):
        self.steps += 1
        marker = os.environ.get("ROBOVLA_TEST_HANG_MARKER")
        if self.hang and self.steps == 3 and marker and not os.path.exists(marker):
            open(marker, "w").close()
            threading.Event().wait()  # forever
        return super().step(command)


def test_a_hung_worker_is_stopped_and_its_chain_rerun(space, tmp_path, monkeypatch):
    monkeypatch.setenv("ROBOVLA_TEST_HANG_MARKER", str(tmp_path / "hung"))  # spawned workers inherit it
    chains = SyntheticReach(SyntheticReach.Config(max_steps=20)).chains(3)
    expected = long_horizon(scripted(space), SyntheticReach(SyntheticReach.Config(max_steps=20)), chains,
                            progress=False)
    with EnvPool(EnvSpec(HangsOnce, {"max_steps": 20}), 2, processes=True, timeout=5) as pool:
        got = long_horizon(scripted(space), pool, chains, progress=False)
        assert pool.restarts == 1 and (tmp_path / "hung").exists()
    assert got == expected
