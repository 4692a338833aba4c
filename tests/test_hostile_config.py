"""A careless or hostile command line: every flag set ends in a clear error naming the flag.

Each case is a real command line run through ``robovla.cli.main`` in this process: the
error goes to stderr with exit code 2 (or 1), names the flag at fault, and no traceback is
printed. Field bounds are exercised through ``robo-run config`` (the same validation as a
run); checks that need the data or the machine through ``robo-run train``, which refuses
them in preflight, before a process, a model or a file is made (the output folder stays
empty). ``{data}``, ``{out}`` and the other names in braces are files planted by the
``planted`` fixture.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from robovla import preflight
from robovla.cli import main

from helpers import TINY_CNN_LSTM, TINY_TRAINING

CONFIG = ["config", "--preset", "demo"]
TRAIN = ["train", *TINY_CNN_LSTM, "--dataset.path", "{data}", "--train.output_dir", "{out}", *TINY_TRAINING]
LONG = "a" * 5000
RUN_NAME = "--train.run_name: Value error, "

# (command line, what stderr must name): field bounds, checked by `robo-run config`
FIELDS = [
    (["--train.lr", "inf"], "--train.lr: Input should be a finite number"),
    (["--train.lr", "nan"], "--train.lr: Input should be a finite number"),
    (["--train.lr", "-inf"], "--train.lr: Input should be a finite number"),
    (["--train.lr", "0"], "--train.lr: Input should be greater than 0"),
    (["--train.lr", "-1e-4"], "--train.lr: Input should be greater than 0"),
    (["--train.lr", "5"], "--train.lr: Input should be less than or equal to 1"),
    (["--train.lr", "fast"], "--train.lr: Input should be a valid number"),
    (["--train.lr", "1e999"], "--train.lr: Input should be a finite number"),
    (["--train.warmup_epochs", "inf"], "--train.warmup_epochs: Input should be a finite number"),
    (["--train.warmup_epochs", "nan"], "--train.warmup_epochs: Input should be a finite number"),
    (["--train.warmup_epochs", "-1"], "--train.warmup_epochs: Input should be greater than or equal to 0"),
    (["--train.warmup_steps", "-5"], "--train.warmup_steps: Input should be greater than or equal to 0"),
    (["--train.seed", "-1"], "--train.seed: Input should be greater than or equal to 0"),
    (["--train.seed", str(2**32)], "--train.seed: Input should be less than or equal to 4294967295"),
    (["--train.seed", "1" + "0" * 40], "--train.seed: Input should be less than or equal to 4294967295"),
    (["--train.seed", "1.5"], "--train.seed: Input should be a valid integer"),
    (["--train.eval_seed", "-3"], "--train.eval_seed: Input should be greater than or equal to 0"),
    (["--train.window", "100000"], "--train.window: Input should be less than or equal to 1024"),
    (["--train.window", "0"], "--train.window: Input should be greater than or equal to 1"),
    (["--train.window", "-8"], "--train.window: Input should be greater than or equal to 1"),
    (["--train.chunk", "0"], "--train.chunk: Input should be greater than or equal to 1"),
    (["--train.chunk", "100000"], "--train.chunk: Input should be less than or equal to 1024"),
    (["--train.batch_size", "0"], "--train.batch_size: Input should be greater than or equal to 1"),
    (["--train.batch_size", "1000000000"], "--train.batch_size: Input should be less than or equal to 65536"),
    (["--train.epochs", "0"], "--train.epochs: Input should be greater than 0"),
    (["--train.epochs", "inf"], "--train.epochs: Input should be a finite number"),
    (["--train.max_steps", "0"], "--train.max_steps: Input should be greater than or equal to 1"),
    (["--train.max_steps", "1" + "0" * 30], "--train.max_steps: Input should be less than or equal to 1000000000"),
    (["--train.max_minutes", "0"], "--train.max_minutes: Input should be greater than 0"),
    (["--train.max_minutes", "nan"], "--train.max_minutes: Input should be a finite number"),
    (["--train.weight_decay", "-0.1"], "--train.weight_decay: Input should be greater than or equal to 0"),
    (["--train.weight_decay", "nan"], "--train.weight_decay: Input should be a finite number"),
    (["--train.min_lr_scale", "2"], "--train.min_lr_scale: Input should be less than or equal to 1"),
    (["--train.grad_clip", "0"], "--train.grad_clip: Input should be greater than 0"),
    (["--train.grad_clip", "inf"], "--train.grad_clip: Input should be a finite number"),
    (["--train.grad_accum", "0"], "--train.grad_accum: Input should be greater than or equal to 1"),
    (["--train.log_every", "0"], "--train.log_every: Input should be greater than or equal to 1"),
    (["--train.checkpoint_every", "-1"], "--train.checkpoint_every: Input should be greater than or equal to 1"),
    (["--train.val_every", "0"], "--train.val_every: Input should be greater than or equal to 1"),
    (["--train.val_batches", "0"], "--train.val_batches: Input should be greater than or equal to 1"),
    (["--train.num_workers", "-1"], "--train.num_workers: Input should be greater than or equal to 0"),
    (["--train.num_workers", "100000"], "--train.num_workers: Input should be less than or equal to 256"),
    (["--train.threads", "0"], "--train.threads: Input should be greater than or equal to 1"),
    (["--train.lrn_tokens", "0"], "--train.lrn_tokens: Input should be greater than or equal to 1"),
    (["--train.lrn_tokens", "100000"], "--train.lrn_tokens: Input should be less than or equal to 64"),
    (["--train.eval_episodes", "0"], "--train.eval_episodes: Input should be greater than or equal to 1"),
    (["--train.freeze_decoder_layers", "-1"], "--train.freeze_decoder_layers: Input should be greater than or equal"),
    (["--train.schedule", "linear"], "--train.schedule: Input should be 'constant' or 'cosine'"),
    (["--train.ablate", "everything"], "--train.ablate: Input should be 'none', 'image' or 'instruction'"),
    (["--train.augment", "maybe"], "--train.augment: Input should be a valid boolean"),
    (["--train.run_name", LONG], RUN_NAME + "is 5000 characters long; the limit is 128"),
    (["--train.run_name", "run-\udcff"], RUN_NAME + "'run-\\udcff' is not valid text (it holds a lone surrogate)"),
    (["--train.run_name", "../../x"], RUN_NAME + "'../../x' is not a single folder name"),
    (["--train.run_name", "/tmp/abs"], RUN_NAME + "'/tmp/abs' is not a single folder name"),
    (["--train.run_name", "a/b"], RUN_NAME + "'a/b' is not a single folder name"),
    (["--train.run_name", "a\\b"], RUN_NAME + "'a\\\\b' is not a single folder name"),
    (["--train.run_name", ".."], RUN_NAME + "'..' is not a single folder name"),
    (["--train.run_name", "."], RUN_NAME + "'.' is not a single folder name"),
    (["--train.run_name", "   "], RUN_NAME + "is empty"),
    (["--train.run_name", "tab\there"], RUN_NAME + "'tab\\there' holds unprintable characters ['\\t']"),
    (["--train.run_name", "nul\x00byte"], RUN_NAME + "'nul\\x00byte' holds unprintable characters"),
    (["--train.run_name", "new\nline"], RUN_NAME + "'new\\nline' holds unprintable characters"),
    (["--train.run_name", "esc\x1b[2J"], RUN_NAME + "'esc\\x1b[2J' holds unprintable characters"),
    (["--train.run_name", "zero\u200bwidth"], RUN_NAME + "'zero\\u200bwidth' holds unprintable characters"),
    (["--fabric.devices", "0"], "--fabric.devices: got '0'"),
    (["--fabric.devices", "-1"], "--fabric.devices: got '-1'"),
    (["--fabric.devices", "100000"], "--fabric.devices: got '100000'"),
    (["--fabric.devices", "many"], "--fabric.devices: got 'many'"),
    (["--fabric.num_nodes", "0"], "--fabric.num_nodes: Input should be greater than or equal to 1"),
    (["--fabric.accelerator", "tpu"], "--fabric.accelerator: Input should be 'auto', 'cpu', 'cuda', 'gpu' or 'mps'"),
    (["--fabric.strategy", "horovod"], "--fabric.strategy: Input should be"),
    (["--fabric.precision", "64-true"], "--fabric.precision: Input should be"),
    (["--lora.r", "0"], "--lora.r: Input should be greater than or equal to 1"),
    (["--lora.alpha", "-16"], "--lora.alpha: Input should be greater than or equal to 1"),
    (["--lora.dropout", "1"], "--lora.dropout: Input should be less than 1"),
    (["--lora.dropout", "nan"], "--lora.dropout: Input should be a finite number"),
    (["--lora.bias", "some"], "--lora.bias: Input should be 'none', 'all' or 'lora_only'"),
    (["--backbone.image_size", "100000"], "--backbone.image_size: Input should be less than or equal to 1024"),
    (["--backbone.image_size", "0"], "--backbone.image_size: Input should be greater than 0"),
    (["--backbone.image_size", "81"], "--backbone: Value error, image_size 81 must be divisible by 2**3"),
    (["--backbone.channels", "0,1"], "--backbone.channels.0: Input should be greater than 0"),
    (["--backbone.channels", ",".join(["2"] * 20)], "--backbone.channels: List should have at most 10 items"),
    (["--backbone.hidden_size", "1000000000"], "--backbone.hidden_size: Input should be less than or equal to 65536"),
    (["--backbone.cameras", "thermal"], "--backbone.cameras.0: Input should be 'gripper' or 'static'"),
    (["--backbone.cameras", "[]"], "--backbone.cameras: List should have at least 1 item"),
    (["--backbone.prompt", "no slot"], "--backbone.prompt"),
    (["--backbone.prompt", "{instruction}" + LONG * 3], "--backbone.prompt: String should have at most 10000"),
    (["--head.hidden_size", "0"], "--head.hidden_size: Input should be greater than 0"),
    (["--head.hidden_size", "1000000000"], "--head.hidden_size: Input should be less than or equal to 65536"),
    (["--head.num_layers", "100000"], "--head.num_layers: Input should be less than or equal to 1024"),
    (["--head.dropout", "1.5"], "--head.dropout: Input should be less than 1"),
    (["--head.mlp_widths", "0"], "--head.mlp_widths.0: Input should be greater than 0"),
    (["--head.huber_delta", "inf"], "--head.huber_delta: Input should be a finite number"),
    (["--head.arm_gripper_loss_ratio", "nan"], "--head.arm_gripper_loss_ratio: Input should be a finite number"),
    (["--head.arm_loss", "l7"], "--head.arm_loss: Input should be 'huber' or 'mse'"),
    (["--head.wings", "2"], "--head.wings: unknown field 'wings'"),
    (["--action-space.clip_bound", "0"], "--action-space.clip_bound: Input should be greater than 0"),
    (["--action-space.clip_bound", "inf"], "--action-space.clip_bound: Input should be a finite number"),
    (["--action-space.normalization", "zscore"], "--action-space.normalization: Input should be"),
    (["--dataset.synthesize", "0"], "--dataset.synthesize: Input should be greater than or equal to 1"),
    (["--dataset.cameras", "depth"], "--dataset.cameras.0: Input should be 'static' or 'gripper'"),
    (["--dataset.cameras", "gripper,gripper"], "--dataset.cameras: Value error, gripper listed more than once"),
    (["--dataset.synthesize", "1000000000"], "--dataset.synthesize: Input should be less than or equal to 100000"),
    (["--dataset.synthesize_seed", "-1"], "--dataset.synthesize_seed: Input should be greater than or equal to 0"),
    (["--train.nosuch", "1"], "--train.nosuch: unknown field 'nosuch'"),
    (["--trian.lr", "1e-3"], "--trian: unknown section '--trian'; did you mean '--train'?"),
    (["--head", "lstn"], "--head lstn (from command line): unknown head 'lstn'; did you mean 'lstm'?"),
    (["--backbone", "kosmoss"], "unknown backbone 'kosmoss'; did you mean 'kosmos'?"),
    (["--train", "x"], "--train: is a section, not a component"),
    (["--train.lr"], "--train.lr: needs a value"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["stray"], "'stray': expected a flag such as --head NAME"),
]

# --config FILE: refused before reading anything that is not a small regular TOML file
FILES = [
    (["--config", "/dev/zero"], "--config /dev/zero: is a character device"),
    (["--config", "{fifo}"], "is a named pipe (FIFO)"),
    (["--config", "{huge}"], "is 2000000 bytes; a config file is at most 1048576 bytes"),
    (["--config", "{out}"], "is a folder; give a TOML file"),
    (["--config", "{missing}"], "no such file"),
    (["--config", "{binary}"], "is not UTF-8 text"),
    (["--config", "{deep}"], "nests tables or arrays too deeply to read"),
    (["--config", "{bad_values}"], "--train.lr: Input should be a finite number"),
]

# checks that need the data or this machine: `robo-run train` refuses them before any work
RUNS = [
    (["--train.cache", "/proc/robovla-cache"], "--train.cache /proc/robovla-cache: cannot be written"),
    (["--train.cache", "{afile}"], "--train.cache {afile}: is a file, not a folder"),
    (["--train.cache", "{afile}/sub"], "--train.cache {afile}/sub: would be inside {afile}, which is a file"),
    (["--train.val_path", "{missing}"], "--train.val_path {missing}: no such folder"),
    (["--train.val_path", "{afile}"], "--train.val_path {afile}: no such folder"),
    (["--train.output_dir", "/proc/robovla-runs"], "--train.output_dir /proc/robovla-runs: cannot be written"),
    (["--train.output_dir", "{afile}"], "--train.output_dir {afile}: is a file, not a folder"),
    (["--train.output_dir", "{afile}/runs"], "--train.output_dir {afile}/runs: would be inside {afile}"),
    (["--train.output_dir", "{dangling}/runs"], "--train.output_dir {dangling}/runs: {dangling} is a broken symbolic"),
    (["--dataset.path", "{missing}"], "--dataset.path {missing}: no such folder"),
    (["--backbone.cameras", "static", "--dataset.cameras", "gripper"],
     "--backbone.cameras: backbone 'cnn-pool' reads ['static'], but dataset 'calvin' provides only ['gripper']"),
    (["--dataset.tasks", "reach_blue_block"],
     "--dataset.tasks: unknown task 'reach_blue_block'; did you mean 'reach_red_block'? Valid: reach_green_block, "
     "reach_red_block, reach_yellow_block"),
    (["--dataset.tasks", "open_drawer,reach_red_block"], "--dataset.tasks: unknown task 'open_drawer'"),
    (["--train.window", "1000"], "--train.batch_size 2, --train.window 1000: the training split gives 0 windows"),
    (["--train.batch_size", "5000"], "fewer than one global batch of 5000; lower --train.batch_size"),
    (["--fabric.devices", "64"], "--fabric.devices 64: on the CPU every device is a separate training process"),
    (["--fabric.devices", "1024"], "--fabric.devices 1024: on the CPU every device is a separate training process"),
    (["--fabric.accelerator", "cuda"], "--fabric.accelerator cuda: no CUDA GPU is visible here"),
    (["--fabric.accelerator", "gpu"], "--fabric.accelerator gpu: no CUDA GPU is visible here"),
    (["--train.init", "{missing}"], "--train.init {missing}: no such run or checkpoint folder"),
    (["--train.eval_env", "gym"], "--train.eval_env gym: unknown env 'gym'"),
    (["--train.run_name", "{afile_name}", "--train.output_dir", "{tmp}"], "--train.run_name afile: "),
    (["--fabric.strategy", "fsdp"], "--fabric.strategy fsdp: FSDP runs on GPUs only"),
    (["--fabric.precision", "16-mixed"], "--fabric.precision 16-mixed: float16 mixed precision runs on GPUs only"),
    (["--fabric.strategy", "deepspeed"], "--fabric.strategy deepspeed: the deepspeed package is not installed"),
    (["--fabric.num_nodes", "2"], "--fabric.num_nodes 2: none of MASTER_ADDR, NODE_RANK"),
    (["--train.wandb_project", "demo"], "--train.wandb_project demo: the wandb package is not installed"),
    (["--overwrite", "--resume", "{out}"], "--overwrite starts the run over and --resume continues it"),
    (["--accept-changes"], "--accept-changes only applies to --resume RUN_DIR"),
]
CASES = ([pytest.param("config", CONFIG + flags, text, id=f"config{i}") for i, (flags, text) in enumerate(FIELDS)]
         + [pytest.param("config", CONFIG + flags, text, id=f"file{i}") for i, (flags, text) in enumerate(FILES)]
         + [pytest.param("train", TRAIN + flags, text, id=f"train{i}") for i, (flags, text) in enumerate(RUNS)])


def plant(tmp: os.PathLike) -> dict[str, str]:
    """Write the files the cases name: a tiny dataset, a FIFO, a huge and a binary config, ..."""
    from pathlib import Path

    from helpers import synth_split

    tmp = Path(tmp)
    files = {"tmp": tmp, "data": synth_split(tmp / "task", episodes=4, seed=5), "out": tmp / "runs",
             "fifo": tmp / "config.fifo", "huge": tmp / "huge.toml", "binary": tmp / "binary.toml",
             "deep": tmp / "deep.toml", "bad_values": tmp / "bad.toml", "afile": tmp / "afile",
             "missing": tmp / "no-such-thing", "dangling": tmp / "dangling"}
    files["out"].mkdir()
    os.mkfifo(files["fifo"])
    files["huge"].write_bytes(b"#" * 2_000_000)
    files["binary"].write_bytes(b"\xff\xfe\x00[train]")
    files["deep"].write_text("x = " + "[" * 100_000)
    files["bad_values"].write_text("[train]\nlr = inf\n")
    files["afile"].write_text("not a folder\n")
    files["dangling"].symlink_to(tmp / "gone")
    return {**{k: str(v) for k, v in files.items()}, "afile_name": "afile"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, str]:
    return plant(tmp_path_factory.mktemp("hostile"))


def fill(text: str, files: dict[str, str]) -> str:
    for key, value in files.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("command, argv, expected", CASES)
def test_a_hostile_command_line_is_a_clear_error(command, argv, expected, planted, capsys):
    if "--fabric.accelerator" in argv and argv[argv.index("--fabric.accelerator") + 1] in ("cuda", "gpu"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU: the run would start")
    if "--fabric.devices" in argv and command == "train" and \
            preflight.cpu_cores() >= int(argv[argv.index("--fabric.devices") + 1]):
        pytest.skip("this machine has that many cores")
    for package in ("deepspeed", "wandb"):
        if any(package in a for a in argv) and importlib.util.find_spec(package) is not None:
            pytest.skip(f"{package} is installed here")
    if "--fabric.num_nodes" in argv and any(v in os.environ for v in preflight.CLUSTER_VARIABLES):
        pytest.skip("this process runs in a cluster environment")
    argv = [fill(a, planted) for a in argv]
    before = sorted(os.listdir(planted["out"]))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code in (1, 2), (code, out[-2000:], err[-2000:])
    assert fill(expected, planted) in err, err
    error = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("robo-run: note: "))
    assert error.startswith(f"robo-run {command}: error: "), err  # notes on what a flag replaced may come first
    assert "Traceback" not in out + err
    assert sorted(os.listdir(planted["out"])) == before  # refused before any work: nothing written


def test_the_table_holds_at_least_100_flag_sets():
    assert len(CASES) >= 100


def test_edge_values_that_are_valid_pass(capsys):
    ok = ["--train.lr", "1", "--train.seed", str(2**32 - 1), "--train.run_name", "r" * 128, "--train.window", "1024",
          "--fabric.devices", "1", "--backbone.image_size", "1024", "--train.warmup_epochs", "0"]
    assert main(CONFIG + ok) == 0, capsys.readouterr().err
    assert main(CONFIG + ["--train.run_name", "essai-été_2024.v2"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert 'run_name = "essai-été_2024.v2"' in out
