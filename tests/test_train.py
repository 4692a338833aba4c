"""The training loop: every backbone with every head through one command line, the recipe
presets, checkpoints that survive SIGKILL, exact resumption, signals and CPU DDP."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import robovla
from robovla import checkpoint
from robovla.cli import main
from robovla.loader import Preprocess, make_loader
from robovla.registry_file import tomllib
from robovla.vla import build as build_model
from robovla.windows import WindowDataset

from helpers import ROBO_RUN, clean_env

TINY = ["--train.window", "4", "--train.chunk", "3", "--train.batch_size", "2", "--train.num_workers", "0",
        "--fabric.accelerator", "cpu", "--fabric.precision", "32-true", "--train.log_every", "1"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--episodes", "6", "--seed", "3"]) == 0
    return out / "training"


def losses(run_dir: Path, split: str = "train", key: str = "loss") -> dict[int, float]:
    rows = [r.split(",") for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    return {int(s): float(v) for s, sp, k, v in rows if sp == split and k == key}


def flags(kind: str, values: dict) -> list[str]:
    out = []
    for field, value in values.items():
        out += [f"--{kind}.{field}", json.dumps(value) if isinstance(value, list) else str(value)]
    return out


def tiny(kind: str, name: str) -> list[str]:
    """Flags that build component ``name`` small, from what it declares for tests."""
    cls = robovla.get_component(kind, name).load()
    return [f"--{kind}", name, *flags(kind, cls.test_config)]


@pytest.mark.parametrize("backbone", robovla.list_components("backbone"))
def test_every_backbone_trains_with_every_head_through_one_command_line(backbone, synth, tmp_path, capsys):
    for head in robovla.list_components("head"):
        run = tmp_path / head
        argv = [*tiny("backbone", backbone), *tiny("head", head), "--dataset.path", str(synth), *TINY,
                "--train.max_steps", "3", "--train.val_batches", "1", "--train.output_dir", str(tmp_path),
                "--train.run_name", head]
        assert main(argv) == 0, capsys.readouterr().err
        got = losses(run)
        assert sorted(got) == [1, 2, 3] and all(math.isfinite(v) for v in got.values()), (backbone, head)
        assert checkpoint.last(run).name == "step-000003" and losses(run, "val")  # validated at the end
        assert (run / "loss.png").stat().st_size > 1000 and (run / "action_stats.json").is_file()
        saved = tomllib.loads((run / "config.toml").read_text())
        assert saved["backbone"]["name"] == backbone and saved["head"]["name"] == head
        assert saved["meta"]["head"].split()[0] in ("robovla", "robovla-example")


def test_validation_once_per_step_then_closed_loop_from_the_saved_run(synth, tmp_path, capsys):
    from robovla.rollout import evaluate

    argv = [*tiny("backbone", "cnn-pool"), "--head", "mlp", "--dataset.path", str(synth), *TINY,
            "--train.max_steps", "4", "--train.val_every", "2", "--train.val_batches", "1",
            "--train.eval_env", "synthetic", "--train.eval_episodes", "2", "--train.output_dir", str(tmp_path),
            "--train.run_name", "run"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("plugins: robovla-") and "(backbones, calvin, heads, lerobot)" in out.splitlines()[0]
    run = tmp_path / "run"
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    keys = [tuple(r.split(",")[:3]) for r in rows]
    assert len(keys) == len(set(keys))  # no step logged twice, the last one included
    assert sorted(losses(run, "val")) == [2, 4]
    # the evaluation read the saved run back: the same episodes from Policy.from_run give the same report
    report = json.loads((run / "eval.json").read_text())
    env = robovla.create("env", "synthetic", {})
    again = evaluate(robovla.Policy.from_run(run), env, episodes=2, seed=10_000, progress=False)
    env.close()
    assert report == json.loads(json.dumps(again)) and report["episodes"] == 2


@pytest.mark.parametrize("backbone", robovla.list_components("backbone"))
def test_every_backbone_with_the_lstm_head_fits_16_windows(backbone, synth):
    from robovla.config import resolve

    run = resolve("none", None, [(k.lstrip("-"), v) for k, v in zip(tiny("backbone", backbone)[::2],
                                                                      tiny("backbone", backbone)[1::2])]
                  + [("head", "lstm"), ("head.hidden_size", "64"), ("head.num_layers", "1"),
                     ("dataset", "calvin"), ("dataset.path", str(synth)), ("action_space", "rel-world"),
                     ("train.window", "4"), ("train.chunk", "3")])
    vla = build_model(run)
    space = robovla.create("action_space", "rel-world")
    windows = WindowDataset(robovla.create("dataset", "calvin", {"path": synth}), space, 4, 3)
    batch = next(iter(make_loader(windows, 16, preprocess=Preprocess(vla.backbone.image_size, train=False),
                                  shuffle=True, num_workers=0)))
    optimizer = torch.optim.AdamW([p for p in vla.parameters() if p.requires_grad], lr=1e-3)
    vla.eval()  # dropout off: the fit is deterministic (with dropout, Kosmos-2's plateau lasts 130 to 540 steps)
    first = None
    for step in range(600):
        loss, _ = vla.loss(batch)
        value = float(loss.detach())
        first = value if first is None else first
        if value < 0.05 * first:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert value < 0.05 * first, f"{backbone}: loss {value:.4f} after {step} steps, from {first:.4f}"


def test_recipe_presets_hold_the_values_the_reference_ran(capsys):
    # reference/robovlms.md section 5, adapted to Fabric (bf16-mixed instead of DeepSpeed fp16)
    for preset, backbone, batch in [("calvin-kosmos-lstm", "kosmos", 41), ("calvin-paligemma-lstm", "paligemma", 4)]:
        assert main(["config", "--preset", preset, "--dataset.path", "/data/task_ABCD_D/training"]) == 0
        c = tomllib.loads(capsys.readouterr().out)
        assert c["backbone"]["name"] == backbone and c["backbone"]["cameras"] == ["gripper", "static"]
        assert (c["head"]["name"], c["head"]["hidden_size"], c["head"]["num_layers"]) == ("lstm", 1024, 4)
        assert (c["head"]["arm_loss"], c["head"]["huber_delta"], c["head"]["arm_gripper_loss_ratio"]) == \
            ("huber", 1.0, 0.01)
        assert c["action_space"] == {"name": "rel-world", "normalization": "clip", "clip_bound": 0.65}
        t = c["train"]
        assert (t["lr"], t["weight_decay"], t["schedule"], t["warmup_epochs"], t["warmup_steps"]) == \
            (2e-5, 0.0, "constant", 0.25, 0)
        assert (t["epochs"], t["window"], t["chunk"], t["batch_size"], t["seed"], t["num_workers"]) == \
            (5, 8, 10, batch, 123, 16)
        assert (t["grad_clip"], t["grad_accum"], t["train_vision"], t["train_text_embedding"]) == \
            ("none", 1, True, True)
        assert c["lora"]["enabled"] is False and c["fabric"]["precision"] == "bf16-mixed"
    assert main(["config", "--backbone", "kosmos", "--head", "lstm", "--dataset.path", "/d"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["train"]["batch_size"] == 41  # the bare command: Kosmos recipe


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(ROBO_RUN), *argv], cwd=cwd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll ``predicate`` while ``proc`` runs; ``timeout`` only bounds a hung run."""
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def robo_run(argv: list[str], cwd: Path) -> None:
    done = subprocess.run([str(ROBO_RUN), *argv], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def kill_then_resume(argv: list[str], tmp_path: Path, at_least: int) -> Path:
    """Train ``argv`` as run "whole", and as run "killed": SIGKILL to its whole process group
    (launcher and ranks) once a checkpoint of step ``at_least`` or later is saved, then
    ``--resume``. Returns the checkpoint the resumed run started from."""
    robo_run([*argv, "--train.run_name", "whole"], tmp_path)
    run = tmp_path / "killed"
    killed = subprocess.Popen([str(ROBO_RUN), *argv, "--train.run_name", "killed"], cwd=tmp_path, env=clean_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (run / "checkpoints" / "last").exists() and
             checkpoint.last(run).name >= f"step-{at_least:06d}", killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    folder = checkpoint.last(run)
    robo_run(["--resume", str(run)], tmp_path)
    return folder


def test_sigkill_then_resume_gives_the_uninterrupted_losses(synth, tmp_path):
    # tiny Kosmos-2 has dropout: equal losses need the RNG state restored as well
    argv = [*tiny("backbone", "kosmos"), "--head", "lstm", "--head.hidden_size", "32", "--head.num_layers", "1",
            "--dataset.path", str(synth), *TINY, "--train.max_steps", "24", "--train.checkpoint_every", "5",
            "--train.val_path", "none", "--train.output_dir", str(tmp_path)]
    resumed_from = kill_then_resume(argv, tmp_path, at_least=10)
    assert 10 <= int(resumed_from.name.split("-")[1]) < 24
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 25))
    assert got == expected  # step by step, to the digit


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(synth, tmp_path):
    argv = [*tiny("backbone", "kosmos"), "--head", "mlp", "--dataset.path", str(synth), *TINY,
            "--train.max_steps", "100000", "--train.checkpoint_every", "100000", "--train.val_path", "none",
            "--train.output_dir", str(tmp_path), "--train.run_name", "stopped"]
    proc = start(argv, tmp_path)
    wait_for(lambda: (tmp_path / "stopped" / "metrics.csv").is_file() and
             len(losses(tmp_path / "stopped")) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-3000:]
    state = json.loads((checkpoint.last(tmp_path / "stopped") / "state.json").read_text())
    assert state["step"] >= 3 and "robo-run --resume" in err and "SIGINT" in err


KILLER = """
import sys, torch
from robovla import checkpoint
model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(16)])  # about 17 MB per checkpoint
optimizer = torch.optim.AdamW(model.parameters())
model(torch.ones(1, 512)).sum().backward()
optimizer.step()
step = 0
while True:
    step += 1
    checkpoint.save(sys.argv[1], step, model, optimizer, {"epoch": 0, "batch": step})
    print(step, flush=True)
"""


def test_sigkill_while_writing_never_leaves_last_at_an_incomplete_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILLER)
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):  # lands at different moments of a write
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env=clean_env(),
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline(), "the writer died before its first save"  # a line: a save completed
        began = time.perf_counter()
        assert proc.stdout.readline(), "the writer died"
        time.sleep(fraction * (time.perf_counter() - began))  # a fraction of one write into the next
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        folder = checkpoint.last(tmp_path / "run")  # at least two saves completed
        model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(16)])
        state = checkpoint.load(folder, model, torch.optim.AdamW(model.parameters()))
        assert folder.name == f"step-{state['step']:06d}" and (folder / "rng-0.json").is_file()
        checkpoint.clean(tmp_path / "run")
        assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_two_process_ddp_on_cpu_splits_the_batch_and_keeps_ranks_equal(synth, tmp_path):
    base = [*tiny("backbone", "kosmos"), "--head", "mlp", "--dataset.path", str(synth), *TINY,
            "--train.epochs", "1", "--train.val_batches", "2", "--train.output_dir", str(tmp_path)]
    for devices in ("1", "2"):
        done = subprocess.run([str(ROBO_RUN), *base, "--fabric.devices", devices, "--fabric.strategy",
                               "ddp_spawn" if devices == "2" else "auto", "--train.run_name", f"d{devices}"],
                              cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((checkpoint.last(tmp_path / "d1") / "state.json").read_text())
    two = json.loads((checkpoint.last(tmp_path / "d2") / "state.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # each rank reads half of every global batch: half the steps per epoch (rank weights are
    # compared inside the run, which fails if they differ)
    assert two["steps_per_epoch"] == one["steps_per_epoch"] // 2 and two["step"] == two["steps_per_epoch"]
    assert math.isfinite(losses(tmp_path / "d2", "val")[two["step"]])


def test_two_process_sigkill_then_resume_gives_the_uninterrupted_losses(synth, tmp_path):
    # tiny Kosmos-2 has dropout, drawn differently on each rank: every rank's RNG state must come back
    argv = [*tiny("backbone", "kosmos"), "--head", "lstm", "--head.hidden_size", "32", "--head.num_layers", "1",
            "--dataset.path", str(synth), *TINY, "--train.max_steps", "12", "--train.checkpoint_every", "4",
            "--train.val_path", "none", "--fabric.devices", "2", "--fabric.strategy", "ddp_spawn",
            "--train.output_dir", str(tmp_path)]
    resumed_from = kill_then_resume(argv, tmp_path, at_least=4)
    assert 4 <= int(resumed_from.name.split("-")[1]) < 12
    assert sorted(p.name for p in resumed_from.glob("rng-*.json")) == ["rng-0.json", "rng-1.json"]
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(got) == list(range(1, 13))
    assert got == expected  # step by step, to the digit


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_is_read_in_one_process(synth, tmp_path, capsys):
    """FSDP writes a torch.distributed.checkpoint of {"model", "optimizer"}: Policy.from_run and
    --train.init gather it, so that evaluation works the same after any strategy."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    argv = [*tiny("backbone", "cnn-pool"), "--head", "mlp", "--dataset.path", str(synth), *TINY,
            "--train.max_steps", "2", "--train.val_path", "none", "--train.output_dir", str(tmp_path),
            "--train.run_name", "run"]
    assert main(argv) == 0, capsys.readouterr().err
    whole = checkpoint.last(tmp_path / "run")
    sharded = whole.parent / "step-000003"
    sharded.mkdir()
    state = json.loads((whole / checkpoint.STATE).read_text())
    state.pop("files")  # the checksums are of the whole checkpoint's files
    (sharded / checkpoint.STATE).write_text(json.dumps({**state, "step": 3}))
    dcp.save({"model": load_file(whole / checkpoint.FULL)}, checkpoint_id=sharded / checkpoint.SHARDED)
    a = robovla.Policy.from_run(tmp_path / "run", whole.name).vla.state_dict()
    b = robovla.Policy.from_run(tmp_path / "run", sharded.name).vla.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = build_model(checkpoint_run(tmp_path / "run"), init=False)
    assert checkpoint.init_weights(model, sharded) == sharded
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())
    with pytest.raises(robovla.RobovlaError, match="restored by the strategy that wrote it"):
        checkpoint.load(sharded, model, torch.optim.AdamW(model.parameters()))


def checkpoint_run(run_dir: Path):
    from robovla import config as cfg

    return cfg.resolve(cfg.NONE, checkpoint.run_config(run_dir, str(run_dir)), [])


def test_resume_refuses_other_flags_and_missing_folders(tmp_path, capsys):
    assert main(["--resume", str(tmp_path), "--train.lr", "1"]) == 2
    assert "drop --train.lr" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path)]) == 2
    assert "no config.toml there" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.last(tmp_path / "empty")
