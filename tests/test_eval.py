"""robo-run eval: offline metrics on the validation split and closed-loop evaluation (the
long-horizon protocol and single-task episodes), with JSON reports and PNG charts."""

import json

import numpy as np
import pytest
import torch

from robovla.cli import main
from robovla.evaluation import ARM
from robovla.loader import Preprocess, make_loader
from robovla.policy import Policy
from robovla.windows import WindowDataset

from helpers import TINY_CNN_LSTM, synth_split, train_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    training = synth_split(tmp_path_factory.mktemp("synth"), episodes=4)
    return train_tiny(tmp_path_factory.mktemp("runs"), "cnn", training, *TINY_CNN_LSTM, steps=3)


def test_offline_and_long_horizon_reports(run, capsys):
    argv = ["eval", "--run", str(run), "--env", "synthetic", "--env.max_steps", "12", "--sequences", "5",
            "--envs", "2", "--batch-size", "1000", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "validation windows" in out and "average length:" in out and "1/5:" in out
    folder = run / "eval" / "step-000003"
    offline = json.loads((folder / "offline.json").read_text())
    # the same numbers as the head's own loss and metrics on the whole split in one batch
    policy = Policy.from_run(run)
    from robovla.data import open_dataset
    from robovla import config as cfg

    config = cfg.resolve(cfg.NONE, run / "config.toml", [("train.val_path", "auto")])
    windows = WindowDataset(open_dataset(config, "val"), policy.action_space, 4, 3)
    batch = next(iter(make_loader(windows, len(windows), shuffle=False, num_workers=0, drop_last=False,
                                  preprocess=Preprocess(image_size=32, train=False))))
    with torch.no_grad():
        loss, metrics = policy.vla.head.loss(policy.vla(batch), batch.actions, batch.action_mask)
    assert offline["windows"] == len(windows) == sum(t["windows"] for t in offline["per_task"].values())
    assert offline["loss"] == pytest.approx(float(loss), rel=1e-5)
    assert offline["arm_l1"] == pytest.approx(float(metrics["arm_l1"]), rel=1e-5)
    assert offline["gripper_acc"] == pytest.approx(float(metrics["gripper_acc"]), rel=1e-5)
    assert list(offline["arm_l1_per_dim"]) == list(ARM)
    assert offline["arm_l1"] == pytest.approx(np.mean(list(offline["arm_l1_per_dim"].values())))
    assert offline["arm_l1_per_dim"]["z"] < offline["arm_l1_per_dim"]["x"]  # the task never moves in z
    assert set(offline["per_task"]) <= {"reach_red_block", "reach_green_block", "reach_blue_block",
                                        "reach_yellow_block"}
    chains = json.loads((folder / "long_horizon.json").read_text())
    assert chains["sequences"] == 5 and chains["steps_per_task"] == 12 and chains["env"] == "synthetic"
    assert list(chains["chain_sr"]) == ["1", "2", "3", "4", "5"]
    assert chains["avg_len"] == pytest.approx(sum(chains["chain_sr"].values()))
    assert [r["index"] for r in chains["results"]] == list(range(5)) and chains["execution"] == "first"
    for name in ("offline.png", "long_horizon.png"):
        assert (folder / name).read_bytes()[:4] == b"\x89PNG" and (folder / name).stat().st_size > 10_000


def test_single_task_episodes_and_execution_flag(run, tmp_path, capsys):
    argv = ["eval", "--run", str(run), "--closed-loop", "--env", "synthetic", "--protocol", "episodes",
            "--episodes", "3", "--steps", "5", "--execute", "ensemble:0.1", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "episodes.json").read_text())
    assert report["episodes"] == 3 and report["max_steps"] == 5 and report["execution"] == "ensemble:0.1"
    assert not (tmp_path / "offline.json").exists() and (tmp_path / "episodes.png").is_file()
    assert "3 episodes, at most 5 steps each" in capsys.readouterr().out


def test_eval_errors_name_the_fix(run, capsys):
    assert main(["eval", "--run", str(run), "--closed-loop"]) == 2
    assert "--closed-loop: name an env with --env NAME" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--closed-loop", "--env", "synthetic", "--env.max_steps", "many"]) == 2
    assert "max_steps" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--closed-loop", "--env", "synthetc"]) == 2
    assert "did you mean 'synthetic'?" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--closed-loop", "--env", "synthetic", "--envs", "0"]) == 2
    assert "--envs: must be >= 1" in capsys.readouterr().err
    assert main(["eval", "--run", str(run), "--offline", "--split", str(run / "nowhere")]) == 1
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_shards_merge_into_the_whole_evaluation(run, tmp_path, capsys):
    common = ["eval", "--run", str(run), "--closed-loop", "--env", "synthetic", "--sequences", "5", "--steps", "12",
              "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    for i in (0, 1):
        assert main([*common, "--shard", f"{i}/2", "--out", str(tmp_path / "parts")]) == 0
    shards = sorted((tmp_path / "parts").glob("long_horizon-shard-*.json"))
    assert [p.name for p in shards] == ["long_horizon-shard-0-of-2.json", "long_horizon-shard-1-of-2.json"]
    assert [r["index"] for r in json.loads(shards[1].read_text())["results"]] == [1, 3]
    assert main(["eval", "--merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    whole = json.loads((tmp_path / "whole" / "long_horizon.json").read_text())
    merged = json.loads((tmp_path / "merged" / "long_horizon.json").read_text())
    for key in ("results", "avg_len", "chain_sr", "task_info", "sequences", "mean_steps"):
        assert merged[key] == whole[key], key  # the same chains, with the same seeds
    assert merged["merged"] == 2 and (tmp_path / "merged" / "long_horizon.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--merge", str(shards[0]), str(shards[0])]) == 1
    assert "appear in more than one report" in capsys.readouterr().err
    assert main([*common, "--shard", "2/2"]) == 2
    assert "expected I/N with 0 <= I < N" in capsys.readouterr().err
