"""Hostile and careless run folders: a reused run name, tampered state.json, a config changed
between stop and --resume, flipped bytes, and a table of damaged files across a run folder,
each read through --resume and Policy.from_run (whichever reads it). Every case is an error
robovla raises (no traceback) that names the damaged file, and no file of the run changes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import robovla
from robovla import checkpoint
from robovla import runs as runs_module
from robovla.cli import main

from helpers import TINY_CNN_LSTM, TINY_TRAINING, synth_split

STEP = "checkpoints/step-000004"
LORA = ["--lora.enabled", "--lora.r", "4"]


def tiny_argv(synth: Path, out: Path, name: str, *extra: str) -> list[str]:
    """Four steps of the tiny CNN-LSTM (checkpoints at steps 2 and 4)."""
    return [*TINY_CNN_LSTM, "--dataset.path", str(synth), "--train.output_dir", str(out), "--train.run_name", name,
            *TINY_TRAINING, "--train.max_steps", "4", "--train.checkpoint_every", "2", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One full fine-tuning run and one LoRA run, trained once; tests copy them."""
    out = tmp_path_factory.mktemp("runs")
    synth = synth_split(out / "synth")
    assert main(tiny_argv(synth, out, "full")) == 0
    assert main(tiny_argv(synth, out, "lora", *LORA)) == 0
    return {"full": out / "full", "lora": out / "lora", "synth": synth, "out": out}


def fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's sha256, a link's target, a folder's mark."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# --------------------------------------------------------------------------- damage


def missing(p: Path) -> None:
    p.unlink()


def empty(p: Path) -> None:
    p.write_bytes(b"")


def truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])


def garbage(p: Path) -> None:
    p.write_bytes(bytes(range(256)) * 16)


def flipped(p: Path) -> None:
    """Up to 4 KB in the middle of the file inverted (a third of a small file)."""
    data = bytearray(p.read_bytes())
    n = min(4096, max(1, len(data) // 3))
    start = (len(data) - n) // 2
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    p.write_bytes(bytes(data))


def one_bit(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


def a_folder(p: Path) -> None:
    p.unlink()
    p.mkdir()


def json_list(p: Path) -> None:
    p.write_text("[1, 2, 3]")


def deep(p: Path) -> None:
    p.write_text("[" * 50_000 + "]" * 50_000)


def edit(**changes):
    """Change keys of a JSON object file (None removes the key)."""
    def apply(p: Path) -> None:
        data = json.loads(p.read_text())
        for key, value in changes.items():
            data.pop(key, None) if value is None else data.__setitem__(key, value)
        p.write_text(json.dumps(data))
    apply.__name__ = "edit " + ", ".join(f"{k}={v!r}" for k, v in changes.items())
    return apply


def tensors(change):
    """Rewrite a safetensors file through ``change(dict) -> dict`` (a valid file of other tensors)."""
    def apply(p: Path) -> None:
        from safetensors.torch import load_file, save_file

        save_file(change(load_file(p)), p)
    apply.__name__ = change.__name__
    return apply


def wrong_shapes(weights):
    name = next(k for k, v in weights.items() if v.ndim == 2)
    return {**weights, name: torch.zeros(weights[name].shape[0] + 1, weights[name].shape[1])}


def wrong_keys(weights):
    name = sorted(weights)[0]
    return {("renamed." + k if k == name else k): v for k, v in weights.items()}


def extra_key(weights):
    return {**weights, "not.in.the.model": torch.zeros(3)}


def optimizer(change):
    def apply(p: Path) -> None:
        torch.save(change(torch.load(p, weights_only=True)), p)
    apply.__name__ = change.__name__
    return apply


def moments_of_other_shapes(state):
    for entry in state["state"].values():
        entry["exp_avg"] = torch.zeros(entry["exp_avg"].numel() + 1)
    return state


def a_list(state):
    return [1, 2, 3]


class Payload:
    """A pickle that would create a marker file when unpickled."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def pickle_payload(p: Path) -> None:
    import pickle

    Payload.marker = p.parent / "PWNED"
    p.write_bytes(pickle.dumps({"state": {}, "param_groups": [Payload()]}))


def append(text: str):
    def apply(p: Path) -> None:
        p.write_text(p.read_text() + text)
    apply.__name__ = f"append {text.strip()!r}"
    return apply


def replace(old: str, new: str):
    def apply(p: Path) -> None:
        text = p.read_text()
        assert old in text
        p.write_text(text.replace(old, new, 1))
    apply.__name__ = f"{old!r} -> {new!r}"
    return apply


def link_to(target: str):
    def apply(p: Path) -> None:
        p.unlink()
        p.symlink_to(target)
    apply.__name__ = f"link to {target}"
    return apply


def regular_file(p: Path) -> None:
    p.unlink()
    p.write_text("step-000004")


def looped(p: Path) -> None:
    p.unlink()
    p.symlink_to("last")


def unrelated_folder(p: Path) -> None:
    (p.parent / "junk").mkdir()
    link_to("junk")(p)


def legacy(damage):
    """An older checkpoint (no checksums, no config record), then ``damage``."""
    def apply(p: Path) -> None:
        for folder in p.parents:
            if (folder / "checkpoints").is_dir():
                break
        state = folder / STEP / "state.json"
        data = json.loads(state.read_text())
        for key in ("files", "action_stats_sha256", "config"):
            data.pop(key, None)
        state.write_text(json.dumps(data))
        damage(p)
    apply.__name__ = f"legacy, {damage.__name__}"
    return apply


R, P = "resume", "policy"
BOTH = (R, P)
FILE_DAMAGE = (missing, empty, truncated, garbage, flipped)

# (run, file under the run folder, damage, read through, what the error says instead of the file's path, if not it)
CASES = (
    [("full", "config.toml", missing, BOTH, ": no config.toml")]
    + [("full", "config.toml", d, BOTH, None) for d in (empty, truncated, garbage, flipped)]
    + [("full", "config.toml", d, BOTH, None) for d in (
        append("\n[extra]\nkey = 1\n"), replace("batch_size = 2", 'batch_size = "two"'),
        replace("hidden_size = 32", "hidden_size = 48"))]
    + [("full", "action_stats.json", missing, BOTH, ": no action_stats.json")]
    + [("full", "action_stats.json", d, BOTH, None) for d in (
        empty, truncated, garbage, flipped, one_bit, json_list, deep, edit(unknown=1),
        edit(stats={"min": [math.nan] * 6}))]
    + [("full", f"{STEP}/state.json", d, BOTH, None) for d in (
        *FILE_DAMAGE, json_list, deep, edit(step=-1), edit(step="4"), edit(step=2), edit(step=True), edit(step=None),
        edit(epoch=-1), edit(batch=-5), edit(train_seconds=math.nan), edit(train_seconds=math.inf),
        edit(world_size=0), edit(files="x"), edit(files={"model.safetensors": "00"}),
        edit(files={"../../config.toml": "0" * 64}), edit(files={}), edit(config=[1]))]
    + [("full", f"{STEP}/model.safetensors", d, BOTH, None) for d in (
        *FILE_DAMAGE, one_bit, a_folder, tensors(wrong_shapes), tensors(wrong_keys), tensors(extra_key))]
    + [("full", f"{STEP}/optimizer.pt", d, (R,), None) for d in (
        *FILE_DAMAGE, a_folder, pickle_payload, optimizer(a_list), optimizer(moments_of_other_shapes))]
    + [("full", f"{STEP}/rng-0.json", d, (R,), None) for d in (
        *FILE_DAMAGE, json_list, edit(torch=None), edit(torch="!!!"), edit(torch="AAAA"), edit(numpy_pos="x"))]
    + [("full", "checkpoints/last", d, BOTH, None) for d in (
        missing, link_to("step-000099"), link_to("step-000004/state.json"), link_to("/tmp"), regular_file, looped,
        unrelated_folder)]
    + [("full", "metrics.csv", d, (R,), None) for d in (
        append("12,train,loss\n"), append("x,train,loss,1\n"), garbage)]
    + [("lora", f"{STEP}/trainable.safetensors", d, BOTH, None) for d in (
        *FILE_DAMAGE, tensors(wrong_shapes), tensors(wrong_keys))]
    + [("lora", f"{STEP}/adapter_config.json", d, BOTH, None) for d in (missing, garbage, json_list, edit(r=8))]
    # older checkpoints carry no checksums: what they hold is still checked when it is read
    + [("full", f"{STEP}/model.safetensors", legacy(missing), BOTH, f"/{STEP}: no weights (model.safetensors")]
    + [("full", f"{STEP}/model.safetensors", legacy(d), BOTH, None) for d in (
        empty, truncated, garbage, a_folder, tensors(wrong_shapes), tensors(wrong_keys))]
    + [("full", f"{STEP}/optimizer.pt", legacy(d), (R,), None) for d in (
        truncated, garbage, pickle_payload, optimizer(a_list), optimizer(moments_of_other_shapes))]
    + [("full", f"{STEP}/rng-0.json", legacy(d), (R,), None) for d in (garbage, edit(torch="AAAA"))]
    + [("full", "action_stats.json", legacy(d), BOTH, None) for d in (json_list, edit(stats={"min": [math.nan]}))]
    + [("lora", f"{STEP}/trainable.safetensors", legacy(d), BOTH, f"/{STEP}: no weights") for d in (missing,)]
    + [("lora", f"{STEP}/trainable.safetensors", legacy(d), BOTH, None) for d in (truncated, tensors(wrong_shapes))]
    + [("lora", f"{STEP}/adapter_config.json", legacy(d), BOTH, None) for d in (garbage,)]
)
IDS = [f"{run}:{file.split('/')[-1]}:{damage.__name__}" for run, file, damage, _, _ in CASES]


def damaged_copy(runs, tmp_path: Path, run: str, file: str, damage) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(runs[run], copy, symlinks=True)
    damage(copy / file)
    return copy


def read_through(how: str, copy: Path, capsys) -> str:
    """The error message of reading ``copy`` through --resume or Policy.from_run; fails the
    test on anything but a robovla error."""
    if how == R:
        capsys.readouterr()
        code = main(["--resume", str(copy), "--train.max_steps", "6"])  # finished at 4: resume means train on
        err = capsys.readouterr().err
        assert code in (1, 2) and err.startswith("robo-run train: error: "), err[-2000:]
        return err
    with pytest.raises(robovla.RobovlaError) as caught:
        robovla.Policy.from_run(copy)
    return str(caught.value)


@pytest.mark.parametrize("run, file, damage, via, instead", CASES, ids=IDS)
def test_a_damaged_file_is_an_error_naming_it_and_changes_nothing(runs, tmp_path, capsys, run, file, damage, via,
                                                                  instead):
    copy = damaged_copy(runs, tmp_path, run, file, damage)
    before = fingerprint(copy)
    for how in via:
        message = read_through(how, copy, capsys)
        assert f"{copy.name}/{file}" in message or (instead and copy.name + instead in message), f"{how}: {message}"
        assert fingerprint(copy) == before, how
    assert not (copy / STEP / "PWNED").exists()  # no pickle ran


def test_a_missing_full_model_is_reported_as_itself(runs, tmp_path):
    """Not as a missing trainable.safetensors (a LoRA file this run never had)."""
    copy = damaged_copy(runs, tmp_path, "full", f"{STEP}/model.safetensors", legacy(missing))
    with pytest.raises(checkpoint.DamagedError) as caught:
        robovla.Policy.from_run(copy)
    message = str(caught.value)
    assert "trainable.safetensors missing" not in message and "no weights (model.safetensors" in message


def test_a_flipped_byte_is_named_corrupted_with_the_earlier_checkpoint(runs, tmp_path, capsys):
    copy = damaged_copy(runs, tmp_path, "full", f"{STEP}/model.safetensors", one_bit)
    with pytest.raises(checkpoint.DamagedError) as caught:
        robovla.Policy.from_run(copy)
    step2 = copy / "checkpoints" / "step-000002"
    assert str(caught.value) == (
        f"{copy / STEP / 'model.safetensors'}: corrupted (its sha256 is not the one {copy / STEP / 'state.json'} "
        f"recorded when it was saved); fix: use the earlier checkpoint {step2} (serve or eval with --checkpoint "
        f"step-000002; to resume from it, point last at it: ln -sfn step-000002 {copy / 'checkpoints' / 'last'})")
    assert robovla.Policy.from_run(copy, "step-000002").info["step"] == 2  # the earlier one still serves
    assert main(["--resume", str(copy)]) == 1
    assert "model.safetensors: corrupted" in capsys.readouterr().err


def test_a_reused_run_name_is_refused_and_overwrite_removes_only_robovlas_files(runs, tmp_path, capsys):
    copy = tmp_path / "full"
    shutil.copytree(runs["full"], copy, symlinks=True)
    (copy / "eval" / "step-000004").mkdir(parents=True)
    (copy / "eval" / "step-000004" / "offline.json").write_text("{}")  # robovla's report
    (copy / "eval" / "for-the-paper.md").write_text("mine")  # the user's, in robovla's folders
    (copy / "checkpoints" / "keep-best").mkdir()
    (copy / "notes.txt").write_text("mine")
    before = fingerprint(copy)
    argv = tiny_argv(runs["synth"], tmp_path, "full")
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{copy} already holds a run (action_stats.json, checkpoints, config.toml, eval, loss.png, metrics.csv " \
           "and 1 more); continue it with `robo-run --resume" in err
    assert "--overwrite" in err and "another --train.run_name" in err and fingerprint(copy) == before
    assert main([*argv, "--overwrite", "--train.max_steps", "2"]) == 0
    out = capsys.readouterr().out
    assert f"--overwrite: removed checkpoints, config.toml, action_stats.json, metrics.csv, loss.png, eval from " \
           f"{copy}" in out
    assert (copy / "notes.txt").read_text() == "mine" and (copy / "eval" / "for-the-paper.md").read_text() == "mine"
    assert sorted(p.name for p in (copy / "eval").iterdir()) == ["for-the-paper.md"]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["keep-best", "last", "step-000002"]
    assert not (copy / runs_module.ASIDE).exists()
    rows = (copy / "metrics.csv").read_text().splitlines()[1:]
    assert {int(r.split(",")[0]) for r in rows} == {2}  # the new run's rows only (step 4's are gone)
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--train.init", str(copy)]) == 1
    assert f"--train.init {copy} is inside {copy}, which --overwrite would delete" in capsys.readouterr().err
    assert (copy / "notes.txt").is_file() and checkpoint.last(copy).name == "step-000002"


def test_a_tampered_step_is_refused_before_any_file_changes(runs, tmp_path, capsys):
    copy = damaged_copy(runs, tmp_path, "full", f"{STEP}/state.json", edit(step=-1))
    before = fingerprint(copy)
    assert main(["--resume", str(copy)]) == 1
    err = capsys.readouterr().err
    assert f"{copy / STEP / 'state.json'}: damaged or edited (step is -1, expected an integer >= 0; step is -1, " \
           "but the folder is step-000004)" in err
    assert fingerprint(copy) == before  # metrics.csv keeps every row


def test_config_drift_is_refused_with_the_fields_unless_accepted(runs, tmp_path, capsys):
    copy = damaged_copy(runs, tmp_path, "full", "config.toml", replace("batch_size = 2", "batch_size = 1"))
    replace("log_every = 10", "log_every = 1")(copy / "config.toml")  # bookkeeping: changes nothing computed
    (copy / "checkpoints" / "last").unlink()
    (copy / "checkpoints" / "last").symlink_to("step-000002")  # stopped at step 2 of 4
    before = fingerprint(copy)
    capsys.readouterr()
    assert main(["--resume", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "step-000002 was saved with another config or process count, so the resumed run would not be exact:\n" \
           "  train.batch_size: 2 -> 1\nfix: restore the saved values in " in err
    assert "--accept-changes" in err and fingerprint(copy) == before
    assert main(["--resume", str(copy), "--accept-changes"]) == 0
    assert "note: --accept-changes: resuming step-000002 with a change (saved -> now): train.batch_size: 2 -> 1" \
        in capsys.readouterr().out
    state = json.loads((checkpoint.last(copy) / "state.json").read_text())
    assert state["step"] == 4 and state["config"]["train"]["batch_size"] == 1


def test_an_older_checkpoint_without_records_resumes_with_a_notice(runs, tmp_path, capsys):
    copy = damaged_copy(runs, tmp_path, "full", f"{STEP}/state.json", legacy(lambda p: None))
    (copy / "checkpoints" / "last").unlink()
    (copy / "checkpoints" / "last").symlink_to("step-000002")
    state = copy / "checkpoints" / "step-000002" / "state.json"
    data = json.loads(state.read_text())
    data.pop("files"), data.pop("config"), data.pop("action_stats_sha256")
    state.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["--resume", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "was saved before robovla recorded a checkpoint's config and process count; resuming without " \
           "comparing them" in out
    assert json.loads((checkpoint.last(copy) / "state.json").read_text())["step"] == 4
    assert robovla.Policy.from_run(copy).info["step"] == 4


def test_another_process_count_is_drift_too(runs, tmp_path):
    from robovla import config as cfg
    from robovla.runs import DriftError, check_resume

    copy = damaged_copy(runs, tmp_path, "full", "config.toml", lambda p: None)
    run = cfg.resolve(cfg.NONE, copy / "config.toml", [])
    with pytest.raises(DriftError, match=r"(?s)step-000004 was saved with another config or process count.*\n"
                                         r"  processes \(--fabric.devices x --fabric.num_nodes\): 1 -> 2\n"
                                         r"fix: restore the saved values in \S+config.toml and run on 1 processes"):
        check_resume(run, copy, world_size=2)
    assert check_resume(run, copy, world_size=2, accept_changes=True) == [
        "note: --accept-changes: resuming step-000004 with a change (saved -> now): processes (--fabric.devices x "
        "--fabric.num_nodes): 1 -> 2"]


def test_a_damaged_init_checkpoint_is_refused_before_the_new_run_folder_exists(runs, tmp_path, capsys):
    copy = damaged_copy(runs, tmp_path, "full", f"{STEP}/model.safetensors", flipped)
    capsys.readouterr()
    assert main(tiny_argv(runs["synth"], tmp_path, "tuned", "--train.init", str(copy))) == 1
    assert f"{copy / STEP / 'model.safetensors'}: corrupted" in capsys.readouterr().err
    assert not (tmp_path / "tuned").exists()


def test_a_run_that_failed_before_its_first_save_leaves_no_folder_and_a_killed_one_is_named(runs, tmp_path, capsys):
    """A flag only the model can check (more frozen decoder layers than the backbone has) is a
    clear error at build time, and the half-made run folder goes with it, so the next try starts
    cleanly. A run killed before its first save (nothing can clean up) is refused by name as one
    without a checkpoint, and --overwrite restarts it."""
    argv = tiny_argv(runs["synth"], tmp_path, "early")
    capsys.readouterr()
    assert main([*argv, "--train.freeze_decoder_layers", "1000"]) == 2
    err = capsys.readouterr().err
    assert "--train.freeze_decoder_layers 1000: the backbone's decoder has 1 layers; freeze at most that many" in err
    assert "Traceback" not in err
    assert f"the run failed before its first checkpoint; removed config.toml from {tmp_path / 'early'}" in err
    assert not (tmp_path / "early").exists()
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.toml").write_text("# a run killed before its first save\n")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'early'} holds a run that saved no checkpoint (config.toml): it stopped before its first " \
           "save. Start it over with --overwrite" in err and "removed" not in err
    assert (tmp_path / "early" / "config.toml").read_text() == "# a run killed before its first save\n"  # refused: kept
    assert main([*argv, "--overwrite"]) == 0 and checkpoint.last(tmp_path / "early").name == "step-000004"


def test_library_callers_of_train_get_config_errors_naming_the_flag(runs, tmp_path):
    from robovla.cli import config_toml, resolve
    from robovla.errors import ConfigError
    from robovla.train import train

    run = resolve(tiny_argv(runs["synth"], tmp_path, "val", "--train.val_path", str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=f"--train.val_path {tmp_path / 'nowhere'}: no such folder; point it at"):
        train(run, config_toml(run), progress=False)
    run = resolve(tiny_argv(runs["synth"], tmp_path, "big", "--train.batch_size", "60000"))
    with pytest.raises(ConfigError, match=r"--train.batch_size 60000: the training split gives \d+ windows, fewer "
                                          r"than one global batch \(60000 x 1 processes\)"):
        train(run, config_toml(run), progress=False)


def test_a_config_edited_after_training_is_refused_where_it_changes_the_policy(runs, tmp_path):
    """An action-space bound changes what the weights' outputs mean and no shape catches it:
    serving or evaluating from the edited config.toml is refused, naming the field; an edit of
    a training-only field (the learning rate) leaves the policy as it was and is served."""
    from robovla.policy import Policy
    from robovla.runs import DriftError

    copy = tmp_path / "edited"
    shutil.copytree(runs["full"], copy, symlinks=True)
    text = (copy / "config.toml").read_text()
    assert "clip_bound = 0.65" in text
    (copy / "config.toml").write_text(text.replace("clip_bound = 0.65", "clip_bound = 0.3"))
    before = fingerprint(copy)
    with pytest.raises(DriftError) as caught:
        Policy.from_run(copy)
    assert f"{copy / 'config.toml'} no longer describes the policy {copy / STEP} was trained as (saved -> now):\n" \
           "  action_space.clip_bound: 0.65 -> 0.3\nfix: restore the saved values" in str(caught.value)
    assert fingerprint(copy) == before
    assert "\nlr = 0.01\n" in text
    (copy / "config.toml").write_text(text.replace("\nlr = 0.01\n", "\nlr = 0.02\n"))
    assert Policy.from_run(copy).info["step"] == 4


def test_overwrite_puts_the_earlier_run_back_when_the_new_one_fails_before_it_starts(runs, tmp_path, capsys):
    """--overwrite with a flag only the model can refuse: the earlier run's files are moved
    aside, not deleted, until the new run has started, so the failure leaves them as they were."""
    copy = tmp_path / "full"
    shutil.copytree(runs["full"], copy, symlinks=True)
    before = fingerprint(copy)
    argv = tiny_argv(runs["synth"], tmp_path, "full", "--overwrite", "--train.freeze_decoder_layers", "1000")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--train.freeze_decoder_layers 1000: the backbone's decoder has 1 layers" in err
    assert f"--overwrite: the new run failed before it started; the earlier run in {copy} is as it was" in err
    assert fingerprint(copy) == before


def test_a_run_folder_in_use_is_refused_to_a_second_robo_run(runs, tmp_path, capsys):
    """While one process holds a run folder (as a training run does), a second new run with
    --overwrite and a --resume are refused, and neither changes a file."""
    copy = tmp_path / "full"
    shutil.copytree(runs["full"], copy, symlinks=True)
    before = fingerprint(copy)
    capsys.readouterr()
    with runs_module.locked(copy):
        assert main(tiny_argv(runs["synth"], tmp_path, "full", "--overwrite")) == 1
        assert f"{copy}: another robo-run is using this run folder" in capsys.readouterr().err
        assert main(["--resume", str(copy), "--train.max_steps", "6"]) == 1
        assert f"{copy}: another robo-run is using this run folder" in capsys.readouterr().err
    assert fingerprint(copy) == before
    with runs_module.locked(copy):  # released by the refused commands and by the test's own holder
        pass


def test_a_last_copied_as_a_folder_gets_a_fix_that_works(runs, tmp_path):
    copy = tmp_path / "full"
    shutil.copytree(runs["full"], copy, symlinks=False)  # as cp -rL, rsync -L or a zip leave it
    last = copy / "checkpoints" / "last"
    assert last.is_dir() and not last.is_symlink()
    with pytest.raises(checkpoint.DamagedError) as caught:
        checkpoint.last(copy)
    assert f"fix: point it at a checkpoint: rm -r {last} && ln -s step-000004 {last}" in str(caught.value)


def test_a_damaged_config_toml_is_named_as_the_runs_file_not_as_a_flag(runs, tmp_path):
    from robovla.errors import ConfigError
    from robovla.policy import Policy

    copy = damaged_copy(runs, tmp_path, "full", "config.toml", lambda p: p.write_text("[backbone\nname = 1"))
    with pytest.raises(ConfigError) as caught:
        Policy.from_run(copy)
    assert f"  {copy / 'config.toml'}: not valid TOML" in str(caught.value) and "--config" not in str(caught.value)
