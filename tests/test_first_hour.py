"""A newcomer's first hour: a mistyped demo path writes nothing, a later choice names what it drops, preflight
catches wrong data before a run folder exists, a failed start leaves nothing, --resume trains on or says it is done,
a run ends with loss.png and the commands to use it, help lists choices, and serve ignores unread cameras."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import struct
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydantic
import pytest
import torch

import robovla
from robovla import checkpoint, logs
from robovla import config as cfg
from robovla import train as train_module
from robovla.cli import main, next_commands, parse_run_args

from helpers import TINY_CNN_LSTM, TINY_TRAINING, synth_split
from test_hostile_runs import fingerprint, tiny_argv
from test_serve import episode, request

GRIPPER = ["--backbone.cameras", "gripper", "--train.log_every", "1"]  # one camera; a metrics row every step
NOTE = "robo-run: note: "
BACKBONE, HEAD = TINY_CNN_LSTM[:TINY_CNN_LSTM.index("--head")], TINY_CNN_LSTM[TINY_CNN_LSTM.index("--head"):]


def png_size(path: Path) -> tuple[int, int]:  # (width, height), from a PNG's IHDR chunk
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic task and one four-step gripper-only run (checkpoints at 2 and 4), trained once;
    what it printed, and each loss.png as it stood when a checkpoint was saved."""
    out = tmp_path_factory.mktemp("first-hour")
    training = synth_split(out / "task")
    saves = []

    def plotted(run_dir):
        made = logs.plot(run_dir)
        saves.append((checkpoint.last(run_dir).name, max(r[0] for r in logs.read(run_dir)), png_size(made)))
        return made

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(train_module, "plot", plotted)
        assert main(tiny_argv(training, out, "gripper", *GRIPPER)) == 0
    return SimpleNamespace(run=out / "gripper", training=training, stdout=stdout.getvalue(), saves=saves)


def copied(trained, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained.run, tmp_path / "run", symlinks=True))


# ---------------------------------------------------------------- 1. the demo's path and synthesize
def test_a_mistyped_demo_path_writes_nothing_and_names_the_nearest_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo's runs/demo would land here
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # and its own ~/.cache/robovla/... here
    (tmp_path / "tmp").mkdir()
    (tmp_path / "tmp" / "task_D_D").mkdir()
    before = fingerprint(tmp_path)
    typo = tmp_path / "tmp" / "typo" / "training"
    assert main(["--preset", "demo", "--dataset.path", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"{NOTE}--dataset.synthesize 400 (from preset demo) goes with preset demo's own --dataset.path and is " \
           "dropped, since --dataset.path now comes from command line; pass --dataset.synthesize 400 to keep it" in err
    assert f"--dataset.path {typo}: no such folder; the nearest existing folder is {tmp_path / 'tmp'}, which holds " \
           "task_D_D/; point it at a CALVIN split folder" in err
    assert "Traceback" not in err
    assert fingerprint(tmp_path) == before


def test_synthesize_goes_with_the_path_of_its_own_source(tmp_path):
    path = str(tmp_path / "mine" / "training")
    notes: list[str] = []
    assert cfg.resolve("demo", None, [], notes).dataset.config.synthesize == 400 and notes == []  # its own path
    own = str(Path("~/.cache/robovla/synthetic-reach-400/training").expanduser())  # the same path, given again
    assert cfg.resolve("demo", None, [("dataset.path", own)], notes).dataset.config.synthesize == 400 and notes == []
    _, flags, _ = parse_run_args(["--dataset.path", path, "--dataset.synthesize", "7"])
    run = cfg.resolve("demo", None, flags, notes)
    assert run.dataset.config.synthesize == 7 and str(run.dataset.config.path) == path and notes == []
    _, flags, _ = parse_run_args(["--dataset.path", path])
    assert cfg.resolve("demo", None, flags, notes).dataset.config.synthesize is None and len(notes) == 1
    file = tmp_path / "run.toml"
    file.write_text(f'[dataset]\nname = "calvin"\npath = "{path}"\n')
    notes.clear()
    assert cfg.resolve("demo", file, [], notes).dataset.config.synthesize is None
    assert notes == [f"--dataset.synthesize 400 (from preset demo) goes with preset demo's own --dataset.path and is "
                     f"dropped, since --dataset.path now comes from config file {file}; pass --dataset.synthesize 400 "
                     "to keep it"]
    file.write_text(f'[dataset]\nname = "calvin"\npath = "{path}"\nsynthesize = 3\n')  # both from the file: kept
    notes.clear()
    assert cfg.resolve("demo", file, [], notes).dataset.config.synthesize == 3 and notes == []


# ---------------------------------------------------------------- 2. what a later choice drops
def test_a_later_head_choice_names_the_preset_values_it_drops_and_the_defaults_it_uses(capsys):
    assert main(["config", "--preset", "demo", "--head", "mlp"]) == 0
    captured = capsys.readouterr()
    notes = [line[len(NOTE):] for line in captured.err.splitlines() if line.startswith(NOTE)]
    assert len(notes) == 2, captured.err
    assert notes[0].startswith("--head mlp (from command line) replaces lstm (from preset demo), so preset demo's "
                               "settings for lstm do not apply: ")
    assert "--head.hidden_size 128" in notes[0] and "--head.arm_gripper_loss_ratio 0.1" in notes[0]
    assert notes[1].startswith("--head mlp uses its defaults instead: ") and notes[1].endswith("--head.FIELD VALUE")
    head = tomllib.loads(captured.out)["head"]
    assert head["name"] == "mlp" and head["arm_gripper_loss_ratio"] == 0.01
    assert "--head.arm_gripper_loss_ratio 0.01" in notes[1] and f"--head.hidden_size {head['hidden_size']}" in notes[1]
    assert main(["config", "--preset", "demo", "--head", "lstm"]) == 0  # the same head: nothing dropped
    assert NOTE not in capsys.readouterr().err
    assert main(["config", "--preset", "demo", "--head", "nosuch"]) == 2  # invalid: its error alone
    err = capsys.readouterr().err
    assert NOTE not in err and err.startswith("robo-run config: error: invalid configuration (1 problem):")
    assert "--head nosuch (from command line): unknown head 'nosuch'" in err


# ---------------------------------------------------------------- 3. preflight, before any folder
@pytest.mark.parametrize("case", ["action array", "task folder", "validation split", "broken validation"])
def test_preflight_refuses_the_wrong_data_before_the_run_folder_exists(trained, tmp_path, capsys, case):
    task, training = trained.training.parent, str(trained.training)
    broken = tmp_path / "validation"  # a validation split without its annotations
    broken.mkdir()
    for name in ("ep_lens.npy", "ep_start_end_ids.npy", "scene_info.npy"):
        shutil.copy(task / "validation" / name, broken)
    path, extra, message = {
        "action array": (training, ["--action-space", "rel-world", "--dataset.action_keys", "actions"],
                         "--action-space rel-world: reads the dataset's 'rel_actions' actions, but dataset 'calvin' "
                         "loads only ['actions']; load them (e.g. --dataset.action_keys rel_actions)"),
        "task folder": (str(task), [],
                        f"({task} is a task folder holding training/ and validation/: pass --dataset.path "
                        f"{task / 'training'})"),
        "validation split": (str(task / "validation"), ["--train.val_path", "auto"],
                             f"--dataset.path {task / 'validation'}: is a validation split, and --train.val_path auto "
                             f"would validate on that same folder; train on {task / 'training'}, or pass "
                             "--train.val_path none"),
        "broken validation": (training, ["--train.val_path", str(broken)],
                              f"--train.val_path {broken}: the validation split does not open: "
                              f"{broken / 'lang_annotations' / 'auto_lang_ann.npy'}: missing"),
    }[case]
    capsys.readouterr()
    assert main(tiny_argv(path, tmp_path, "new", *GRIPPER, *extra)) == 2
    err = capsys.readouterr().err
    assert "robo-run train: error: cannot start training (1 problem):" in err and message in err, err
    assert not (tmp_path / "new").exists()


def test_a_validation_split_trains_as_training_data_without_validation(trained, tmp_path, capsys):
    validation = trained.training.parent / "validation"
    assert main(tiny_argv(validation, tmp_path, "on-val", *GRIPPER, "--train.max_steps", "2")) == 0  # val_path none
    assert checkpoint.last(tmp_path / "on-val").name == "step-000002"


# ---------------------------------------------------------------- 4. a failed start leaves no folder
class StaticOnly:
    """A cnn-pool whose config has no ``cameras`` field: it always reads the static camera."""

    @robovla.hookimpl
    def register_backbones(self, register):
        from robovla.prompt import PromptConfig
        from robovla_plugins.backbones.cnn_pool import CNNPool, CNNPoolConfig

        fields = {n: (f.annotation, f) for n, f in CNNPoolConfig.model_fields.items() if n not in ("cameras", "prompt")}

        class StaticReader(CNNPool):
            Config = pydantic.create_model("StaticReaderConfig", __base__=PromptConfig, **fields)

            def __init__(self, config):
                super().__init__(CNNPoolConfig(**config.model_dump(), cameras=["static"]))

        register("static-reader", StaticReader)


def test_a_backbone_reading_a_camera_the_data_lacks_fails_and_leaves_no_run_folder(trained, tmp_path, capsys,
                                                                                   robovla_plugin):
    robovla_plugin(StaticOnly(), name="static-only")
    argv = ["--backbone", "static-reader", *HEAD, "--dataset.path", str(trained.training), "--dataset.cameras",
            "gripper", "--train.output_dir", str(tmp_path), "--train.run_name", "blind", *TINY_TRAINING]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--backbone static-reader: reads cameras ['static'], but dataset 'calvin' provides ['gripper'] (no " \
           "['static']); load them (e.g. --dataset.cameras)" in err, err
    assert f"the run failed before its first checkpoint; removed config.toml from {tmp_path / 'blind'}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "blind").exists()


# ---------------------------------------------------------------- 5. --resume
def test_resuming_a_finished_run_says_so_and_changes_nothing(trained, tmp_path, capsys):
    run = copied(trained, tmp_path)
    before = fingerprint(run)
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 0
    assert capsys.readouterr().out == (
        f"robo-run: {run} finished at step 4 of 4 (step-000004); nothing to resume. Train it longer with "
        f"`robo-run --resume {run} --train.max_steps 8`, or evaluate it with `robo-run eval --run {run}`\n")
    assert fingerprint(run) == before


@pytest.mark.parametrize("flags, message", [
    (["--train.max-steps", "2"], "--train.max-steps 2: the run would stop after 2 steps, before its 4; resuming may "
                                 "only raise its length"),  # the dash spelling, as for a new run
    (["--train.lr", "1"], "--resume continues a run with its saved config.toml; drop --train.lr (start a new run to "
                          "change the configuration; on resume only the run's length, --train.max_steps, "
                          "--train.epochs, --train.max_minutes, may change)"),
    (["--train.epochs", "10"], "--train.epochs 10.0: this run stops at --train.max_steps 4, which overrides epochs; "
                               "raise --train.max_steps instead"),
])
def test_resume_refuses_what_it_cannot_change(trained, tmp_path, capsys, flags, message):
    run = copied(trained, tmp_path)
    before = fingerprint(run)
    capsys.readouterr()
    assert main(["--resume", str(run), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robo-run train: error: cannot resume (1 problem):") and message in err, err
    assert fingerprint(run) == before


def test_the_printed_train_longer_command_resumes_to_twice_the_steps(trained, tmp_path, capsys):
    run = copied(trained, tmp_path)
    command = next(line for line in trained.stdout.splitlines() if "# train it longer" in line).split("#")[0].split()
    assert command == ["robo-run", "--resume", str(trained.run), "--train.max_steps", "8"]
    before = (run / "metrics.csv").read_text()
    assert main([a.replace(str(trained.run), str(run)) for a in command[1:]]) == 0
    assert checkpoint.last(run).name == "step-000008"
    assert tomllib.loads((run / "config.toml").read_text())["train"]["max_steps"] == 8
    after = (run / "metrics.csv").read_text()
    assert after.startswith(before) and sorted({r[0] for r in logs.read(run) if r[0] > 4}) == [5, 6, 7, 8]
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 0
    assert f"{run} finished at step 8 of 8 (step-000008)" in capsys.readouterr().out


# ---------------------------------------------------------------- 6. after a run
def test_loss_png_is_drawn_at_every_checkpoint(trained):
    assert trained.saves[0] == ("step-000002", 2, (1200, 600))  # the curves so far, beside the first checkpoint
    assert set(trained.saves[1:]) == {("step-000004", 4, (1200, 600))}
    assert png_size(trained.run / "loss.png") == (1200, 600)


def test_loss_png_shows_the_loss_and_its_arm_and_gripper_terms(tmp_path, monkeypatch):
    rows = ["step,split,key,value"] + [f"{s},train,{k},{v / s}" for s in (1, 2, 3)
                                       for k, v in (("loss", 1.0), ("arm_loss", 0.5), ("gripper_loss", 0.7),
                                                    ("lr", 1e-3))] + ["3,val,loss,0.4", "3,val,arm_loss,0.3"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    import matplotlib.figure

    drawn = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (
        drawn.append([(ax.get_title(), [len(line.get_xdata()) for line in ax.get_lines()]) for ax in fig.axes]),
        real(fig, *a, **k))[1])
    assert logs.plot(tmp_path) == tmp_path / "loss.png"
    assert drawn == [[(f"{tmp_path.name}: loss", [3, 1]), ("arm loss", [3, 1]), ("gripper loss", [3]), ("", [3])]]
    assert png_size(tmp_path / "loss.png") == (1200, 600)
    assert not (tmp_path / ".loss.png.tmp").exists()


def test_a_run_ends_with_the_commands_to_use_it(trained):
    run = trained.run
    lines = trained.stdout.rstrip("\n").splitlines()[-5:]
    assert lines[0] == f"run saved in {run}. Next:"
    rows = [line.split("  # ") for line in lines[1:]]
    assert [(c.strip(), w) for c, w in rows] == [
        (f"robo-run eval --run {run}", "offline metrics"),  # no --train.eval_env: no closed loop either
        (f"robo-run serve --run {run}", "a policy server (robovla.client.PolicyClient)"),
        (f"robo-run --resume {run} --train.max_steps 8", "train it longer"),
        (f"python -c 'import robovla; print(robovla.Policy.from_run(\"{run}\"))'", "the policy in Python")]
    assert len({line.index("  # ") for line in lines[1:]}) == 1  # the comments line up
    longer = cfg.resolve("none", run / "config.toml", [("train.max_steps", "9")])  # as if stopped by max_minutes
    assert re.search(rf"\n  robo-run --resume {re.escape(str(run))} +# train on to its end \(it stopped at step 4\)\n",
                     next_commands(longer, run))
    text = repr(robovla.Policy.from_run(run))
    assert text.startswith(f"Policy({run} (step-000004), backbone cnn-pool, head lstm, cameras ['gripper'], image "
                           "size 32, window 4, chunk 3, execution "), text


def test_a_missing_tensorboard_is_said_once_when_the_logs_open(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import fails, installed or not
    opened = logs.Logs.open(tmp_path, True)
    opened.log(1, "train", {"loss": 0.5})
    opened.close()
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1
    assert f"note: tensorboard is not installed, so this run logs to {tmp_path / 'metrics.csv'} and loss.png only" \
           in err
    assert logs.read(tmp_path) == [(1, "train", "loss", 0.5)]
    logs.Logs.open(tmp_path, False).close()  # other ranks: no sinks, no note
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- 7. writing the synthetic task
def test_the_synthetic_task_is_written_with_a_progress_bar_and_an_estimate(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--episodes", "3"]) == 0
    err = capsys.readouterr().err
    assert "writing training/: 100%" in err and "3/3" in err and "episode/s" in err
    assert "writing validation/: 100%" in err and "10/10" in err
    split = tmp_path / "y" / "training"
    robovla.create("dataset", "calvin", {"path": str(split), "synthesize": 2})
    err = capsys.readouterr().err
    said = re.search(rf"--dataset.synthesize 2: writing the synthetic reach task into {re.escape(str(split.parent))} "
                     r"\(training/ and validation/, about (\d+) MB; once\)", err)
    written = sum(f.stat().st_size for f in split.parent.rglob("*") if f.is_file()) / 1e6
    assert said and "writing training/: 100%" in err and 0.8 < int(said.group(1)) / written < 1.25, (said, written)
    assert len(robovla.create("dataset", "calvin", {"path": str(split), "synthesize": 2}).segments()) > 0
    assert "writing" not in capsys.readouterr().err  # written once


# ---------------------------------------------------------------- 8. help
def test_help_lists_the_data_tools_and_each_fixed_fields_choices(capsys):
    assert main(["--help"]) == 0
    lines = [line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    text = {words[0]: words[1] for words in lines if len(words) == 2}
    assert text["data"].startswith("dataset tools: ") and "synth" in text["data"] and "cache" in text["data"]
    assert text["--train.schedule"].endswith("(constant, cosine; default: constant)")
    assert text["--fabric.devices"].endswith("(default: auto)"), text  # a number or auto: no list of choices
    assert "(auto, cpu, cuda" in text["--fabric.accelerator"] and text["--fabric.accelerator"].endswith("auto)")


def test_config_without_a_dataset_path_says_how_to_set_it_and_points_to_the_demo(capsys):
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert "--dataset.path: required, and no source sets it; pass --dataset.path VALUE" in err
    assert "`robo-run --preset demo` writes a synthetic task and trains on it" in err
    assert main(["config", "--preset", "calvin-kosmos-lstm"]) == 2  # a preset named: no pointer to another
    err = capsys.readouterr().err
    assert "--dataset.path: required, and no source sets it" in err and "robo-run --preset demo" not in err


# ---------------------------------------------------------------- 9. the server and other cameras
@pytest.fixture(scope="module")
def served(trained):
    from robovla.server import PolicyServer

    dataset = robovla.create("dataset", "calvin", {"path": str(trained.training)})
    (obs,), text = episode(dataset, 0, 1)
    with PolicyServer(robovla.Policy.from_run(trained.run), port=0) as server:
        yield SimpleNamespace(server=server, obs=obs, text=text)


def act(served, images: dict) -> tuple[int, object]:
    """One act in a fresh session of seed 0, with these camera images."""
    from robovla.wire import NPZ, decode_action, encode_observation

    status, made = request(served.server, "POST", "/sessions", b'{"seed": 0}')
    assert status == 201
    body = encode_observation(images, served.obs.robot_obs, served.text)
    status, answer = request(served.server, "POST", f"/sessions/{made['session']}/act", body, {"Content-Type": NPZ})
    return status, (decode_action(answer) if status == 200 else answer)


def test_the_server_ignores_cameras_the_policy_does_not_read(served):
    from robovla.wire import MAX_SKIPPED

    status, meta = request(served.server, "GET", "/metadata")
    assert status == 200 and meta["cameras"] == ["gripper"] and meta["image_fields"] == ["image.gripper"]
    assert meta["other_cameras"] == f"ignored (up to {MAX_SKIPPED} other image.* fields, left unread)"
    images = served.obs.images
    status, alone = act(served, {"gripper": images["gripper"]})
    assert status == 200 and alone.shape == (7,)
    status, both = act(served, {"static": images["static"], "gripper": images["gripper"]})
    assert status == 200 and np.array_equal(both, alone)
    status, odd = act(served, {"gripper": images["gripper"], "static": np.full((3, 5), np.nan)})  # left unread
    assert status == 200 and np.array_equal(odd, alone)
    status, answer = act(served, {"static": images["static"]})
    assert status == 400 and "missing field(s) ['image.gripper']" in answer["error"], answer
    extra = {f"cam{i}": np.zeros((2, 2, 3), np.uint8) for i in range(MAX_SKIPPED)}
    status, many = act(served, {"gripper": images["gripper"], **extra})
    assert status == 200 and np.array_equal(many, alone)
    status, answer = act(served, {"gripper": images["gripper"], **extra, "one_more": images["static"]})
    assert status == 400 and f"the act request holds {MAX_SKIPPED + 1} fields image.* that are not read; at most " \
                             f"{MAX_SKIPPED} are ignored, so send only what /metadata lists" in answer["error"]


def test_the_client_sends_only_the_cameras_the_policy_reads(served, monkeypatch):
    from robovla import client as client_module
    from robovla.client import PolicyClient

    sent = []
    real = client_module.encode_observation
    monkeypatch.setattr(client_module, "encode_observation",
                        lambda images, *a: (sent.append(sorted(images)), real(images, *a))[1])
    host, port = served.server.httpd.server_address[:2]
    with PolicyClient(f"http://{host}:{port}") as policy:
        command = policy.act(dict(served.obs.images), served.obs.robot_obs, served.text)
    assert sorted(served.obs.images) == ["gripper", "static"] and sent == [["gripper"]]
    assert np.array_equal(command, act(served, {"gripper": served.obs.images["gripper"]})[1])


# ---------------------------------------------------------------- 10. the head's action size
class FourDims:
    """An action space of four dimensions (three arm values and the gripper)."""

    @robovla.hookimpl
    def register_action_spaces(self, register):
        class Four(robovla.ActionSpace):
            action_dim = 4
            source = "rel_actions"

            def encode(self, actions, robot_obs):
                return np.asarray(actions, np.float32)

            def decode(self, targets, robot_obs):
                return np.asarray(targets, np.float64)

        register("four", Four)


def test_the_head_is_built_with_the_action_spaces_size(robovla_plugin, trained, tmp_path, capsys):
    from robovla.cli import resolve
    from robovla.vla import build

    robovla_plugin(FourDims(), name="four-dims")
    for head in (HEAD, ["--head", "mlp", "--head.hidden_size", "32", "--head.mlp_widths", "32"]):
        vla = build(resolve([*BACKBONE, *head, "--action-space", "four", "--dataset.path", str(tmp_path),
                             *TINY_TRAINING]))
        d = vla.head.dims
        assert d.A == 4 and tuple(vla.head.actions(vla.head(torch.randn(2, d.T, d.K, d.D))).shape) == (2, d.T, d.C, 4)
    capsys.readouterr()  # the synthetic task's actions have 7 values: preflight says so
    assert main(tiny_argv(trained.training, tmp_path, "four", *GRIPPER, "--action-space", "four")) == 2
    assert "--action-space four: decodes 4 action dimensions, but the dataset's 'rel_actions' actions have 7; choose " \
           "an action space of that size" in capsys.readouterr().err
    assert not (tmp_path / "four").exists()
