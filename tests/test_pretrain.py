"""Grounding pre-training of Kosmos-2 (``robo-run pretrain``) and the bundled tiny Kosmos-2 it made."""

import json

import pytest
import torch

import robovla
from robovla.cli import main
from robovla.errors import UnknownNameError
from robovla_plugins.backbones.kosmos import Kosmos
from robovla_plugins.backbones.kosmos import pretrain as pt

from helpers import ROBO_RUN, run

# a model small enough to train 40 steps in seconds
SMALL = ["--steps", "40", "--eval-every", "20", "--eval-scenes", "10", "--batch-size", "8", "--warmup", "5",
         "--lr", "2e-3", "--text-width", "32", "--heads", "2", "--vision-width", "16", "--vision-layers", "1",
         "--image-size", "32", "--latent-queries", "8", "--single-block-steps", "10"]
BUNDLED = Kosmos.bundled["kosmos-2-tiny"]


def test_a_short_pretraining_lowers_the_loss_and_writes_a_folder_the_backbone_loads(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["pretrain", "--backbone", "kosmos", str(out), *SMALL, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record == json.loads((out / "pretrain.json").read_text())
    first, last = record["curve"]
    assert (first["step"], last["step"]) == (20, 40) and record["complete"] is True
    assert last["loss"] < 0.8 * first["loss"], record["curve"]  # language-model loss of steps 1-20, then 21-40
    assert 0 <= last["accuracy"] <= 1 and 0 < last["majority"] < 1
    assert record["options"]["text_width"] == 32 and record["parameters"] > 10_000

    backbone = robovla.create("backbone", "kosmos", {"path": str(out), "cameras": ["gripper"]})
    assert (backbone.image_size, backbone.image_tokens(), backbone.hidden_size) == (32, 8, 32)
    tokens = backbone.tokenize(["move to the red block"])
    words = backbone.tokenizer.convert_ids_to_tokens(tokens.ids[0].tolist())
    assert words == ["<grounding>", "an", "image", "of", "a", "robot", "move", "to", "the", "red", "block"]
    config = json.loads((out / "preprocessor_config.json").read_text())
    assert config["image_mean"] == list(pt.CLIP_MEAN) and config["size"] == {"height": 32, "width": 32}


def test_pretraining_is_reproducible_from_its_seed(tmp_path):
    options = pt.PretrainOptions(steps=6, eval_every=6, eval_scenes=4, batch_size=4, text_width=32, heads=2,
                                 vision_width=16, vision_layers=1, image_size=32, latent_queries=8)
    from safetensors.torch import load_file

    states = []
    for name in ("a", "b"):
        pt.pretrain(options, tmp_path / name, progress=False)
        states.append(load_file(tmp_path / name / "model.safetensors"))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = pt.pretrain(options.model_copy(update={"seed": 1}), tmp_path / "c", progress=False)
    key = "text_model.model.embed_tokens.weight"
    assert not torch.equal(load_file(tmp_path / "c" / "model.safetensors")[key], states[0][key])
    assert other["options"]["seed"] == 1


def test_the_bundled_weights_ground_colour_words_as_their_record_says():
    record = json.loads((BUNDLED / "pretrain.json").read_text())
    assert record["complete"] is True
    options = pt.PretrainOptions(**record["options"])
    backbone = robovla.create("backbone", "kosmos", {"path": "bundled:kosmos-2-tiny"})
    model, tokenizer = backbone.model.eval(), backbone.tokenizer
    measure = pt.Grounding(pt.Batcher(tokenizer, options.latent_queries), options.grid,
                           options.eval_scenes, options.image_size)
    found = measure(model)
    final = record["final"]
    assert found["majority"] == pytest.approx(final["majority"])
    assert found["accuracy"] == pytest.approx(final["accuracy"], abs=0.01)  # the same scenes, re-measured here
    assert found["accuracy"] > 3 * found["majority"]
    total = sum(f.stat().st_size for f in BUNDLED.iterdir())
    assert total < 5 * 2**20, f"the bundled folder is {total / 2**20:.1f} MB"


def test_bundled_names_and_random_weights_of_a_folder_architecture():
    with pytest.raises(UnknownNameError, match="unknown bundled kosmos checkpoint 'kosmos-2-tin'; did you mean "
                                               "'kosmos-2-tiny'"):
        robovla.create("backbone", "kosmos", {"path": "bundled:kosmos-2-tin"})
    torch.manual_seed(0)
    trained = robovla.create("backbone", "kosmos", {"path": "bundled:kosmos-2-tiny"})
    random = robovla.create("backbone", "kosmos", {"path": "bundled:kosmos-2-tiny", "weights": "random"})
    assert random.model.config.to_dict() == trained.model.config.to_dict()
    words = ["go to the blue block"]
    assert random.tokenize(words).ids.tolist() == trained.tokenize(words).ids.tolist()
    a, b = dict(trained.model.named_parameters()), dict(random.model.named_parameters())
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["text_model.model.embed_tokens.weight"], b["text_model.model.embed_tokens.weight"])
    assert trained.mean.flatten().tolist() == pytest.approx(list(pt.CLIP_MEAN))


def test_pretrain_refuses_what_it_cannot_do(tmp_path, capsys):
    assert main(["pretrain", "--backbone", "paligemma", str(tmp_path / "x")]) == 1
    assert ("backbone 'paligemma' cannot pretrain (its class defines no `pretrain` and `PretrainOptions`); choose one "
            "that can: --backbone kosmos") in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["pretrain", "--backbone", "kosmos", str(tmp_path / "full"), "--steps", "1"]) == 2
    assert "full: a folder that is not empty; pretrain writes its weights there" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main(["pretrain", "--backbone", "kosmos", str(tmp_path / "y"), "--steps", "many"]) == 2
    assert "--steps many: Input should be a valid integer" in capsys.readouterr().err
    assert main(["pretrain", "--backbone", "kosmos", str(tmp_path / "z"), "--image-size", "36", "--steps", "1"]) == 2
    assert "--image-size 36 is not a multiple of --patch-size 8" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_kosmos_learns_from_the_bundled_weights_and_not_from_random_ones(tmp_path):
    """The demo-kosmos preset, shortened to 300 steps and 30 closed-loop episodes: the bundled
    pre-trained weights already solve most episodes, the same architecture from random weights
    stays at the mean action. About 3 minutes on 2 cores."""
    reports = {}
    for name, extra in (("pretrained", []), ("random", ["--backbone.weights", "random"])):
        done = run([str(ROBO_RUN), "--preset", "demo-kosmos", "--train.max_steps", "300", "--train.val_every", "300",
                    "--train.checkpoint_every", "300", "--train.eval_episodes", "30", "--train.run_name", name,
                    "--train.output_dir", str(tmp_path), *extra])
        assert done.returncode == 0, done.stderr[-3000:]
        reports[name] = json.loads((tmp_path / name / "eval.json").read_text())
        assert reports[name]["episodes"] == 30 and reports[name]["errors"]["count"] == 0
    success = {name: report["success_rate"] for name, report in reports.items()}
    assert success["pretrained"] >= 0.7 and success["random"] <= 0.2, success
