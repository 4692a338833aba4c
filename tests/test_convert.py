"""robo-run convert and --train.init: RoboVLMs checkpoints written from tiny robovla models
under RoboVLMs' names (Lightning .ckpt, plain .pt, LoRA), every refusal with its reason, and
fine-tuning from a run's weights."""

import json
import re

import pytest
import torch

import robovla
from robovla import checkpoint, finetune
from robovla.cli import main
from robovla.convert import ConvertError, convert, read_weights
from robovla.errors import RobovlaError
from robovla.head import Dims
from robovla.vla import VLA, build
from robovla_plugins.backbones.robovlms import FAMILIES, HEAD_RULES

from helpers import TINY_TRAINING, synth_split, train_tiny

INSTRUCTIONS = ["open the drawer", "push the red block to the left"]


def robovlms_names(family: str, state: dict) -> dict:
    """robovla's VLA state_dict under RoboVLMs' names (the converter's mapping, inverted)."""
    rules = [(new, old) for old, new in next(f for f in FAMILIES if f.backbone == family).rules + tuple(HEAD_RULES)]
    out = {}
    for name, tensor in state.items():
        if name == "lrn":
            out["action_token"] = tensor.reshape(-1)
            continue
        ours, theirs = next((n, o) for n, o in sorted(rules, key=lambda r: -len(r[0])) if name.startswith(n))
        out[theirs + name[len(ours):]] = tensor
    return out


@pytest.fixture(scope="module")
def tiny_vla(tmp_path_factory):
    """family -> (base folder, VLA with an LSTM head over T=4, C=3, its state under RoboVLMs' names)."""
    made = {}

    def get(family: str):
        if family not in made:
            torch.manual_seed(1)
            backbone = robovla.create("backbone", family, {"size": "tiny", "cameras": ["static"]})
            base = tmp_path_factory.mktemp(family) / "base"
            backbone.save_pretrained(base)
            head = robovla.create("head", "lstm", {"hidden_size": 16, "num_layers": 2, "mlp_widths": [24, 20]},
                                  dims=Dims(D=backbone.hidden_size, K=1, T=4, C=3))
            vla = VLA(backbone, head).eval()
            with torch.no_grad():
                vla.lrn.normal_(std=0.05)
            made[family] = base, vla, robovlms_names(family, vla.state_dict())
        return made[family]

    return get


def frames(b=2, t=4):
    return {"static": torch.randint(0, 256, (b, t, 48, 48, 3), generator=torch.Generator().manual_seed(2),
                                    dtype=torch.uint8)}


def robovlms_config(**extra):
    return {"robovlm_name": "RoboKosMos", "model": "kosmos", "window_size": 4, "fwd_pred_next_n": 3,
            "use_hand_rgb": False, "norm_action": True, "norm_min": -0.65, "norm_max": 0.65, **extra}


def same_outputs(run_dir, vla, atol=0.0):
    policy = robovla.Policy.from_run(run_dir)
    with torch.no_grad():
        ours = policy.vla.head(policy.vla.features(frames(), INSTRUCTIONS))
        theirs = vla.head(vla.features(frames(), INSTRUCTIONS))
    for key in ("arm", "gripper"):
        assert (ours[key] - theirs[key]).abs().max().item() <= atol, key


@pytest.mark.parametrize("family", ["kosmos", "paligemma"])
def test_a_lightning_checkpoint_converts_into_a_run_that_predicts_the_same(family, tiny_vla, tmp_path, capsys):
    base, vla, state = tiny_vla(family)
    ckpt = tmp_path / "epoch=4-step=100.ckpt"  # what RoboVLMs' Lightning trainer writes: the VLA as `model`
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 4, "global_step": 100,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-5}]}],
                "hyper_parameters": {"configs": {"window_size": 4}}}, ckpt)
    assert main(["convert", "robovlms", str(ckpt), "--base", str(base), "--out", str(tmp_path / "run"),
                 "--train.window", "4", "--fabric.precision", "32-true"]) == 0
    out = capsys.readouterr().out
    assert "window: 8 (no --config" in out and "cameras: static" in out and "fine-tune: robo-run" in out
    run = robovla.config.resolve("none", tmp_path / "run" / "config.toml", [])
    assert (run.backbone.name, run.head.name, run.train.window, run.train.chunk) == (family, "lstm", 4, 3)
    assert (run.head.config.hidden_size, run.head.config.num_layers, run.head.config.mlp_widths) == (16, 2, [24, 20])
    assert run.backbone.config.resize == "bicubic" and run.action_space.config.clip_bound == 0.65
    state_json = json.loads((checkpoint.last(tmp_path / "run") / "state.json").read_text())
    assert state_json["step"] == 0 and state_json["converted_from"]["source"] == "robovlms"
    same_outputs(tmp_path / "run", vla)


def test_settings_come_from_robovlms_config_and_lora_adapters_are_merged(tiny_vla, tmp_path):
    base, vla, state = tiny_vla("kosmos")
    rng = torch.Generator().manual_seed(3)
    lora = {}
    layers = [k[: -len(".weight")] for k in state if k.endswith(("q_proj.weight", "fc1.weight"))]
    for layer in layers:  # W = base + (alpha / r) B A, stored the way PEFT and RoboVLMs store it
        weight = state[f"{layer}.weight"]
        a, b = torch.randn(4, weight.shape[1], generator=rng), torch.randn(weight.shape[0], 4, generator=rng)
        lora[f"{layer}.base_layer.weight"] = weight - (8 / 4) * b @ a
        lora[f"{layer}.lora_A.default.weight"], lora[f"{layer}.lora_B.default.weight"] = a, b
        if f"{layer}.bias" in state:
            lora[f"{layer}.base_layer.bias"] = state[f"{layer}.bias"]
    rest = {k: v for k, v in state.items() if not any(k.startswith(f"{layer}.") for layer in layers)}
    weights = {**rest, **lora, **{f"model.base_model.model.{k[len('backbone.'):]}": v  # RoboVLMs' second copy
                                  for k, v in lora.items()}}
    torch.save(weights, tmp_path / "lora.pt")
    with pytest.raises(ConvertError, match="needs train_setup.lora_alpha; pass RoboVLMs' config"):
        convert("robovlms", tmp_path / "lora.pt", str(base), tmp_path / "a", echo=lambda *_: None)
    config = robovlms_config(use_hand_rgb=True, arm_gripper_loss_ratio=0.05, learning_rate=1e-4,
                             train_setup={"lora_enable": True, "lora_r": 4, "lora_alpha": 8},
                             train_dataset={"data_dir": "/data/calvin/task_D_D/training"})
    (tmp_path / "project.json").write_text(json.dumps(config))
    notes = []
    convert("robovlms", tmp_path / "lora.pt", str(base), tmp_path / "b", tmp_path / "project.json", echo=notes.append)
    assert any(f"merged {len(layers)} LoRA adapters (r [4], lora_alpha 8)" in n for n in notes)
    run = robovla.config.resolve("none", tmp_path / "b" / "config.toml", [])
    assert run.backbone.config.cameras == ["gripper", "static"] and run.train.window == 4 and run.train.lr == 1e-4
    assert run.head.config.arm_gripper_loss_ratio == 0.05 and str(run.dataset.config.path).startswith("/data/calvin")
    merged = robovla.Policy.from_run(tmp_path / "b").vla.state_dict()
    for layer in layers:
        name = f"backbone.model.{layer[len('backbone.'):]}.weight"
        torch.testing.assert_close(merged[name], state[f"{layer}.weight"], atol=1e-5, rtol=1e-5)


def test_what_cannot_be_converted_is_refused_by_name(tiny_vla, tmp_path):
    base, vla, state = tiny_vla("kosmos")
    quiet = {"echo": lambda *_: None}

    def attempt(weights, name, config=None, **kw):
        torch.save(weights, tmp_path / f"{name}.pt")
        if config is not None:
            (tmp_path / f"{name}.json").write_text(json.dumps(config))
        return convert("robovlms", tmp_path / f"{name}.pt", kw.get("base", str(base)), tmp_path / name,
                       None if config is None else tmp_path / f"{name}.json", **quiet)

    with pytest.raises(ConvertError, match=r"tensors without a robovla counterpart \(1\): vision_resampler\.x"):
        attempt({**state, "vision_resampler.x": torch.zeros(2)}, "resampler")
    with pytest.raises(ConvertError, match="act_head.type = 'GPTDecoder'"):
        attempt(state, "gpt", robovlms_config(act_head={"type": "GPTDecoder"}))
    with pytest.raises(ConvertError, match="fwd_pred_next_n = 10 in the config, but the head predicts 3"):
        attempt(state, "chunk", robovlms_config(fwd_pred_next_n=10))
    with pytest.raises(ConvertError, match="the config names .*'paligemma'.*but the tensors are RoboKosMos's"):
        attempt(state, "family", robovlms_config(robovlm_name="RoboPaligemma", model="paligemma"))
    with pytest.raises(ConvertError, match="no action_token"):
        attempt({k: v for k, v in state.items() if k != "action_token"}, "no-lrn")
    other = tmp_path / "other-base"  # a base of another size: every shape that differs is named
    robovla.create("backbone", "kosmos", {"size": "small"}).save_pretrained(other)
    with pytest.raises(RobovlaError, match=r"does not fit the model:\n  shapes differ \(\d+\): \n    lrn \[1, 64\], "
                                           r"the model's \[1, 256\]\n    backbone.model.text_model"):
        attempt(state, "shapes", base=str(other))
    assert not (tmp_path / "shapes").exists()  # nothing written on a refusal

    deepspeed = tmp_path / "epoch=0-step=10.ckpt"
    (deepspeed / "checkpoint").mkdir(parents=True)
    (deepspeed / "latest").write_text("checkpoint")
    (deepspeed / "checkpoint" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ConvertError, match=r"DeepSpeed ZeRO checkpoint folder.*zero_to_fp32\.py.*convert_zero"):
        read_weights(deepspeed)
    torch.save({"state_dict": state, "args": argparse_namespace()}, tmp_path / "pickled.pt")
    with pytest.raises(ConvertError, match=r"weights_only=True\) refused it.*could run code"):
        read_weights(tmp_path / "pickled.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConvertError, match="not a readable safetensors file"):
        read_weights(tmp_path / "broken.safetensors")
    with pytest.raises(robovla.UnknownNameError, match="unknown converter 'robovlm'; did you mean 'robovlms'"):
        convert("robovlm", tmp_path / "resampler.pt", str(base), tmp_path / "x", **quiet)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="exists and is not an empty folder"):
        convert("robovlms", tmp_path / "resampler.pt", str(base), tmp_path / "full", **quiet)


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=1e-4)


def test_fine_tuning_starts_from_a_converted_run_and_reports_mismatches(tiny_vla, tmp_path, capsys):
    from safetensors.torch import load_file

    base, vla, state = tiny_vla("kosmos")
    torch.save(state, tmp_path / "policy.pt")
    run_dir = convert("robovlms", tmp_path / "policy.pt", str(base), tmp_path / "converted",
                      overrides=[("train.window", "4")], echo=lambda *_: None)
    run = robovla.config.resolve("none", run_dir / "config.toml", [("train.init", str(run_dir))])
    with torch.random.fork_rng():
        start = build(run).eval()  # what training starts from: the converted weights
    same_outputs(run_dir, start)
    training = synth_split(tmp_path / "data")
    assert main(["eval", "--run", str(run_dir), "--split", str(training.parent / "validation"), "--batches", "2",
                 "--env", "synthetic", "--protocol", "episodes", "--episodes", "2", "--no-progress"]) == 0
    offline = json.loads((run_dir / "eval" / "step-000000" / "offline.json").read_text())
    episodes = json.loads((run_dir / "eval" / "step-000000" / "episodes.json").read_text())
    assert offline["windows"] > 0 and episodes["episodes"] == 2  # evaluated like any run
    tuned = train_tiny(tmp_path, "tuned", training, "--config", str(run_dir / "config.toml"),
                       "--train.init", str(run_dir), steps=3)
    assert robovla.config.resolve("none", tuned / "config.toml", []).train.init == str(run_dir)
    before = load_file(checkpoint.last(run_dir) / "model.safetensors")
    after = load_file(tuned / "checkpoints" / "step-000003" / "model.safetensors")
    moved = [k for k in before.keys() & after.keys() if not torch.equal(before[k], after[k])]  # tied: one name each
    assert {"lrn", "head.lstm.weight_ih_l0", "backbone.model.vision_model.model.post_layernorm.weight"} <= set(moved)

    argv = ["--config", str(run_dir / "config.toml"), "--dataset.path", str(training), *TINY_TRAINING,
            "--train.output_dir", str(tmp_path), "--train.init", str(run_dir)]
    capsys.readouterr()
    assert main([*argv, "--train.run_name", "wider", "--head.hidden_size", "32"]) == 1
    error = capsys.readouterr().err
    assert re.search(r"--train\.init \S+step-000000 does not fit the model:\n  shapes differ \(10\): \n(    head\.\S+ "
                     r".*\n)*    head\.lstm\.weight_ih_l0 \[64, 64\], the model's \[128, 64\]\n", error)
    assert main([*argv, "--train.run_name", "nowhere", "--train.init", str(tmp_path / "data")]) == 1
    assert "neither a run folder (with checkpoints/) nor a checkpoint folder" in capsys.readouterr().err
    with pytest.raises(checkpoint.CheckpointError, match="holds weights but no optimizer state"):
        checkpoint.resumable(run_dir)  # what --resume checks first (this run's dataset path is not here)


def test_init_from_a_lora_run_merges_its_adapters(tmp_path):
    training = synth_split(tmp_path / "data")
    flags = ["--backbone", "kosmos", "--backbone.size", "tiny", "--backbone.cameras", "static", "--head", "lstm",
             "--head.hidden_size", "16", "--head.num_layers", "1", "--head.mlp_widths", "16"]
    lora = train_tiny(tmp_path, "lora", training, *flags, "--lora.enabled", "--lora.r", "4")
    source = robovla.Policy.from_run(lora).vla
    finetune.merge_lora(source)
    run = robovla.config.resolve("none", lora / "config.toml", [("lora.enabled", "false"), ("train.init", str(lora))])
    with torch.random.fork_rng():
        full = build(run).eval()
    with torch.no_grad():
        torch.testing.assert_close(full.features(frames(), INSTRUCTIONS), source.features(frames(), INSTRUCTIONS))
    assert not any("lora_" in name for name, _ in full.named_parameters())
