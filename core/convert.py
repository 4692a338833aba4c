"""``robo-run convert``: checkpoints of other frameworks as robovla run folders.

    robo-run convert SOURCE CHECKPOINT --base HF_FOLDER_OR_ID --out RUN_DIR [--config SOURCE_CONFIG]

A converter (a plugin component, registered through ``register_converters`` beside the
backbones whose weights it maps) reads the source framework's tensors and its config, and
says which robovla run they are: a config layer (backbone, head, action space, window,
chunk), usually on top of a preset, and the tensors under robovla's names. The core reads
the checkpoint file, checks every tensor against the model that configuration builds (on
the meta device: names and shapes, nothing allocated), and writes a run folder that
``Policy.from_run``, ``robo-run eval``, ``robo-run serve`` and ``--train.init`` read:

    RUN_DIR/config.toml, action_stats.json, checkpoints/step-000000/ (model.safetensors,
    state.json), checkpoints/last

Files are read without running code: ``.safetensors``, or ``.ckpt``/``.pt``/``.pth``/``.bin``
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import abc
import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from robovla.config import ComponentConfig
from robovla.errors import RobovlaError

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class ConvertError(RobovlaError, ValueError):
    """A checkpoint or its config cannot be converted; the message says which part and why."""


@dataclass
class Conversion:
    """What a converter makes of a checkpoint."""

    config: dict[str, dict[str, Any]]  # a run-config layer, {section: {field: value}}, as a TOML file holds it
    weights: dict[str, Any]  # name in robovla's VLA state_dict -> tensor
    preset: str | None = None  # registry.toml preset the layer goes on top of (the recipe it reproduces)
    notes: list[str] = field(default_factory=list)  # what was read from where, and what was assumed


class Converter(abc.ABC):
    """Maps one framework's checkpoints onto robovla runs.

    The target backbone must build under ``torch.device("meta")`` without reading weights
    (the built-in Hugging Face backbones build from the base's config there), so that the
    core can check names and shapes for free.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    @abc.abstractmethod
    def convert(self, weights: dict[str, Any], base: str, source_config: dict[str, Any] | None) -> Conversion:
        """Tensors as :func:`read_weights` returns them, the Hugging Face id or folder of the
        base VLM (its tokenizer and architecture), and the source's own config (or None when
        none was given) -> a :class:`Conversion`. Raise :class:`ConvertError` naming every
        tensor that cannot be mapped."""


# ------------------------------------------------------------------------------- reading


def _deepspeed_fix(path: Path) -> str:
    out = f"{path.name.removesuffix('.ckpt')}.fp32.pt"
    return (f"{path} is a DeepSpeed ZeRO checkpoint folder: the weights are split into shards. Consolidate it into "
            f"one file first, then convert that file: `python {path}/zero_to_fp32.py {path} {out}` (the script "
            "DeepSpeed writes into every checkpoint folder), or in Python `from lightning.pytorch.utilities."
            f"deepspeed import convert_zero_checkpoint_to_fp32_state_dict; convert_zero_checkpoint_to_fp32_state_dict("
            f"'{path}', '{out}')`")


def read_weights(path: str | Path) -> dict[str, Any]:
    """Every tensor of a checkpoint file, by name: a plain state_dict (``.safetensors``, or a
    torch file), or a training checkpoint holding one under ``state_dict``, ``model_state_dict``,
    ``model`` or ``module``. Wrapper prefixes that hold every key (``module.`` of DDP and
    DeepSpeed, ``_forward_module.`` of Lightning) are removed; the rest are the source's names."""
    import torch

    path = Path(path).expanduser()
    if path.is_dir():
        if (path / "latest").is_file() or (path / "zero_to_fp32.py").is_file() or any(path.rglob("*model_states.pt")):
            raise ConvertError(_deepspeed_fix(path))
        raise ConvertError(f"{path} is a folder; give a checkpoint file (.safetensors, {', '.join(TORCH_SUFFIXES)})")
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as exc:
            raise ConvertError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle's and torch's errors for files that hold objects, or are not torch files
        raise ConvertError(
            f"{path}: torch.load(weights_only=True) refused it ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "robovla reads checkpoints without unpickling objects, which could run code. If the file is yours and "
            "you trust it, save its tensors alone where it was made: `torch.save(torch.load(FILE, "
            "weights_only=False)['state_dict'], 'weights.pt')`, then convert weights.pt") from None
    for _ in range(3):  # a training checkpoint: the state_dict sits under one of these keys
        if isinstance(data, dict) and not any(isinstance(v, torch.Tensor) for v in data.values()):
            inner = next((data[k] for k in ("state_dict", "model_state_dict", "model", "module") if k in data), None)
            if isinstance(inner, dict):
                data = inner
                continue
        break
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)} if isinstance(data, dict) else {}
    if not tensors:
        keys = list(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ConvertError(f"{path}: no tensors found (top-level keys: {keys}); expected a state_dict, or a "
                           "checkpoint holding one under state_dict or model_state_dict")
    for prefix in ("module.", "_forward_module."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_source_config(path: str | Path | None) -> dict[str, Any] | None:
    """The source framework's JSON config, or None."""
    if path is None:
        return None
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConvertError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConvertError(f"--config {path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"--config {path}: expected a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------- writing


def convert(source: str, checkpoint: str | Path, base: str, out: str | Path, config: str | Path | None = None,
            overrides: list[tuple[str, str | None]] = (), echo: Any = print) -> Path:
    """Convert ``checkpoint`` of framework ``source`` (a registered converter, e.g. the one
    ``robo-run plugins`` lists) into the run folder ``out``; returns ``out``. ``overrides``
    are run flags applied last, as ``[("train.window", "4")]`` (``--train.window 4``)."""
    import torch

    import robovla
    from robovla import checkpoint as ckpt
    from robovla import config as cfg
    from robovla import registry_file
    from robovla.cli import config_toml
    from robovla.vla import build

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out}: exists and is not an empty folder; choose a new run folder")
    if Path(base).expanduser().is_dir():  # the run folder must work from any working directory
        base = str(Path(base).expanduser().resolve())
    converter = robovla.create("converter", source, {})
    result = converter.convert(read_weights(checkpoint), base, read_source_config(config))
    layers: list[cfg.Layer] = []
    if result.preset:
        layers.append((f"preset {result.preset}", registry_file.preset(result.preset)))
    layers.append((f"{source} checkpoint {checkpoint}", result.config))
    run = cfg.compose(layers, list(overrides))
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # names and shapes only
        skeleton = build(run, init=False)
    weights = ckpt.checked_state(skeleton, result.weights, f"{source} checkpoint {checkpoint}")
    space = robovla.create("action_space", run.action_space.name, run.action_space.config)
    out.mkdir(parents=True, exist_ok=True)
    (out / ckpt.CONFIG).write_text(config_toml(run))
    (out / ckpt.STATS).write_text(json.dumps(space.state_dict(), indent=2))
    ckpt.save_weights(out, 0, weights, {"epoch": 0, "batch": 0, "config": run.to_dict(), "converted_from": {
        "source": source, "checkpoint": str(Path(checkpoint).expanduser().resolve()), "base": base,
        "config": None if config is None else str(Path(config).expanduser().resolve())}})
    count = sum(t.numel() for t in weights.values())
    for note in result.notes:
        echo(f"  {note}")
    echo(f"converted {len(weights)} tensors ({count:,} values) of {checkpoint} into {out}\n"
         f"  evaluate:  robo-run eval --run {out} --env ENV\n"
         f"  serve:     robo-run serve --run {out}\n"
         f"  fine-tune: robo-run --config {out / 'config.toml'} --train.init {out} --dataset.path DATA")
    return out


def main(argv: list[str]) -> int:
    from robovla.cli import parse_run_args
    from robovla.registry import registry

    names = [c.name for c in registry().components if c.kind == "converter" and c.error is None]
    p = argparse.ArgumentParser(
        prog="robo-run convert", allow_abbrev=False,
        description="Convert another framework's checkpoint into a robovla run folder (evaluate, serve or fine-tune "
                    "it like any run).",
        epilog="Run flags given after these (e.g. --train.window 4 --backbone.cameras gripper,static) override what "
               "the checkpoint and its config say, as in `robo-run train`.")
    p.add_argument("source", help=f"the framework that wrote the checkpoint: {', '.join(names) or '(none installed)'}")
    p.add_argument("checkpoint", help="the checkpoint file (.safetensors, .ckpt, .pt, .pth, .bin)")
    p.add_argument("--base", required=True, help="the base VLM the checkpoint was fine-tuned from: a Hugging Face "
                   "hub id or a local folder (its tokenizer and architecture)")
    p.add_argument("--out", required=True, help="the run folder to write (new, or an empty folder)")
    p.add_argument("--config", default=None, help="the source framework's config of the run (JSON): window, "
                   "chunk, cameras and normalization are read from it; without it they are the recipe's")
    args, rest = p.parse_known_args(argv)
    _, flags, _ = parse_run_args(rest)
    convert(args.source, args.checkpoint, args.base, args.out, args.config, flags)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
