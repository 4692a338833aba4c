"""robo-run eval and serve given careless or hostile flags, each case run for real on a trained
run: another run's checkpoint (by path, through ``..``, through a symlink) is refused naming
--checkpoint and listing the run's own; out-of-range --batches/--steps, a bad --execute, a
--device this machine lacks and an unbindable --host are usage errors naming the flag, with
no traceback, refused before any file is written."""

import math
import shutil

import pytest
import torch

from robovla.checkpoint import CheckpointError
from robovla.cli import main
from robovla.policy import Execution, ExecutionError, Policy, checkpoint_folder

from helpers import TINY_CNN_LSTM, synth_split, train_tiny

STEP = "step-000003"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run ``j`` and ``r7``, another run with a checkpoint of the same name (a copy of j's folder)."""
    training = synth_split(tmp_path_factory.mktemp("synth"), episodes=4)
    run = train_tiny(tmp_path_factory.mktemp("runs"), "j", training, *TINY_CNN_LSTM, steps=3)
    other = run.parent / "r7"
    shutil.copytree(run, other, symlinks=True)
    return run, other


def escapes(run, other):
    """``--checkpoint`` values naming something that is not one of ``run``'s checkpoints."""
    (run / "checkpoints" / "theirs").unlink(missing_ok=True)
    (run / "checkpoints" / "theirs").symlink_to(other / "checkpoints" / STEP)
    return {"another run's folder": str(other / "checkpoints" / STEP),
            "another run's last": str(other / "checkpoints" / "last"),
            "dot-dot to another run": f"../../{other.name}",
            "dot-dot to its checkpoint": f"../../{other.name}/checkpoints/{STEP}",
            "a symlink inside to another run": "theirs",
            "the run folder itself": str(run),
            "the checkpoints folder": str(run / "checkpoints"),
            "a folder in a checkpoint": str(run / "checkpoints" / STEP / "nested"),
            "no such name": "step-999999"}


@pytest.mark.parametrize("command", ["eval", "serve"])
def test_another_runs_checkpoint_is_refused_naming_the_flag(runs, command, capsys):
    run, other = runs
    (run / "checkpoints" / STEP / "nested").mkdir(exist_ok=True)
    for case, value in escapes(run, other).items():
        argv = [command, "--run", str(run), "--checkpoint", value]
        argv += ["--offline", "--no-progress"] if command == "eval" else ["--port", "0"]
        assert main(argv) == 2, case
        err = capsys.readouterr().err
        assert f"--checkpoint {value!r}: " in err and "Traceback" not in err, (case, err)
        assert f"give a checkpoint name under {run / 'checkpoints'} (last, {STEP})" in err, (case, err)
        assert "--run of the run it belongs to" in err and "state.json" not in err, (case, err)
        assert not (run / "eval").exists() and not (other / "eval").exists(), case  # no report filed
    (run / "checkpoints" / STEP / "nested").rmdir()


def test_from_run_takes_only_the_runs_own_checkpoints(runs):
    run, other = runs
    for case, value in escapes(run, other).items():
        with pytest.raises(CheckpointError, match=r"^checkpoint .*--run of the run it belongs to"):
            Policy.from_run(run, checkpoint=value)
    folder = (run / "checkpoints" / STEP).resolve()
    for value in (STEP, "last", folder, f"{run}/checkpoints/../checkpoints/{STEP}"):
        assert checkpoint_folder(run, value) == folder, value
    policy = Policy.from_run(run, checkpoint="last")
    assert policy.info["checkpoint"] == STEP and policy.info["run"] == str(run)


def test_eval_files_its_report_under_the_step_a_name_resolves_to(runs, capsys):
    run, _ = runs
    out = run / "eval"
    try:
        assert main(["eval", "--run", str(run), "--checkpoint", "last", "--offline", "--no-progress"]) == 0
        assert sorted(p.name for p in out.iterdir()) == [STEP]
        assert (out / STEP / "offline.json").is_file()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    capsys.readouterr()


# (argv after --run RUN, the flag the error names, what it says); each is exit 2 before a model loads
USAGE = [
    (["eval", "--offline", "--batches", "0"], "--batches: must be >= 1, got 0"),
    (["eval", "--offline", "--batches", "-3"], "--batches: must be >= 1, got -3"),
    (["eval", "--closed-loop", "--env", "synthetic", "--protocol", "episodes", "--steps", "0"],
     "--steps: must be >= 1, got 0"),
    (["eval", "--offline", "--execute", "chunk:0"], "--execute chunk:0: chunk:0: execute at least 1 action"),
    (["eval", "--offline", "--execute", "ensemble:-1"], "--execute ensemble:-1: ensemble:-1.0: the decay must be"),
    (["eval", "--offline", "--execute", "ensemble:nan"], "--execute ensemble:nan: ensemble:nan: the decay must be"),
    (["eval", "--offline", "--execute", "sometimes"], "--execute sometimes: execution 'sometimes': use first"),
    (["eval", "--offline", "--device", "cuda"], "--device cuda: this machine has no usable CUDA GPU"),
    (["eval", "--offline", "--device", "banana"], "--device 'banana': not a torch device"),
    (["serve", "--port", "0", "--execute", "chunk:0"], "--execute chunk:0: chunk:0: execute at least 1 action"),
    (["serve", "--port", "0", "--execute", "ensemble:-1"], "--execute ensemble:-1: ensemble:-1.0: the decay"),
    (["serve", "--port", "0", "--execute", "ensemble:nan"], "--execute ensemble:nan: ensemble:nan: the decay"),
    (["serve", "--port", "0", "--device", "cuda"], "--device cuda: this machine has no usable CUDA GPU"),
    (["serve", "--port", "0", "--device", "cuda:1"], "--device cuda:1: this machine has no usable CUDA GPU"),
]


@pytest.mark.parametrize("argv, message", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_bad_flags_are_usage_errors_before_the_model_loads(runs, argv, message, monkeypatch, capsys):
    run, _ = runs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU

    def loads(*args, **kwargs):
        raise AssertionError("the model loaded before the flags were checked")

    monkeypatch.setattr(Policy, "from_run", loads)
    assert main([argv[0], "--run", str(run), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (run / "eval").exists()


@pytest.mark.parametrize("command", ["eval", "serve"])
def test_a_chunk_longer_than_the_models_is_a_usage_error(runs, command, capsys):
    run, _ = runs
    argv = [command, "--run", str(run), "--execute", "chunk:4"]
    assert main(argv + (["--offline", "--no-progress"] if command == "eval" else ["--port", "0"])) == 2
    err = capsys.readouterr().err
    assert "--execute chunk:4: chunk:4: a chunk holds only C=3 actions" in err and "Traceback" not in err, err
    assert not (run / "eval").exists()


def test_execution_errors_are_robovla_errors():
    for text, message in (("chunk:0", "execute at least 1"), ("ensemble:-1", "finite number >= 0"),
                          ("ensemble:nan", "finite number >= 0"), ("chunk:x", "use first, chunk:K")):
        with pytest.raises(ExecutionError, match=message):
            Execution.parse(text)
    assert Execution.parse("ensemble:0.5").decay == 0.5 and math.isclose(Execution.parse("ensemble").decay, 0.01)


@pytest.mark.parametrize("host, message", [
    ("999.1.1.1", "--host 999.1.1.1: cannot resolve it to an address"),
    ("192.0.2.1", "--host 192.0.2.1: not an address of this machine, so it cannot be bound"),
])
def test_a_host_that_cannot_be_bound_names_host(runs, host, message, capsys):
    run, _ = runs
    assert main(["serve", "--run", str(run), "--host", host, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert message in err and "--port" not in err and "Traceback" not in err, err
