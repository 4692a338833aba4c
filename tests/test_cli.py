"""robo-run: commands, help, output formats, exit codes, and no torch where none is needed."""

import json
import os
import sys

import pytest

from robovla import registry_file
from robovla.cli import main

from helpers import EXAMPLE, clean_env, fake_distribution, run
from toy import PRESETS, Toy


@pytest.fixture
def toy(robovla_plugin, monkeypatch):
    robovla_plugin(Toy(), name="toy", distribution="toy-dist", version="9.9")
    monkeypatch.setattr(registry_file, "load", lambda: PRESETS)


def test_plugins_lists_components_with_provenance(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out) if r["distribution"] == "robovla-example"]
    assert rows == [
        {"kind": "head", "name": "example-linear", "distribution": "robovla-example", "version": "0.1.0",
         "module": "robovla_example.head", "entry_point": "example = robovla_example", "status": "ok", "error": None},
        {"kind": "action_space", "name": "example-clip", "distribution": "robovla-example", "version": "0.1.0",
         "module": "robovla_example.action_space", "entry_point": "example = robovla_example", "status": "ok",
         "error": None},
    ]
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "MODULE", "STATUS"]
    assert ["head", "example-linear", "robovla-example", "0.1.0", "robovla_example.head", "ok"] in \
        [line.split() for line in table]


def test_config_prints_toml_that_reads_back_to_the_same_run(toy, capsys, tmp_path):
    assert main(["config", "--train.lr", "3e-4", "--lora.targets", "q_proj,v_proj", "--train.grad_clip", "none"]) == 0
    text = capsys.readouterr().out
    assert '[backbone]\nname = "toy"\npath = "tiny"\nlayers = 6\n' in text
    assert 'lr = 0.0003' in text and 'grad_clip = "none"' in text and 'targets = [\n    "q_proj",\n    "v_proj",\n]' in text
    assert 'backbone = "toy-dist 9.9 (toy)"' in text and 'head = "robovla-example 0.1.0 (robovla_example.head)"' in text
    saved = tmp_path / "config.toml"
    saved.write_text(text)
    assert main(["config", "--config", str(saved)]) == 0
    assert capsys.readouterr().out == text


def test_train_names_each_missing_component(capsys):
    # the real registry.toml: the default preset names kosmos, lstm, calvin and rel-world, all built in
    assert main(["--train.lr", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "--dataset.path: required, and no source sets it; pass --dataset.path VALUE" in err  # calvin needs a path
    assert "unknown backbone" not in err
    assert main(["--head", "nosuch", "--backbone", "nosuch-either"]) == 2
    err = capsys.readouterr().err
    assert "robo-run train: error: invalid configuration (3 problems)" in err
    for flag, name in [("backbone", "nosuch-either"), ("head", "nosuch")]:
        assert f"--{flag} {name} (from command line): unknown {flag} {name!r}" in err
    assert "example-linear" in err and "`robo-run plugins` lists what is installed" in err


def test_help_lists_commands_choices_and_fields(toy, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ["plugins    list registered components",
                 "--train.lr                       AdamW peak learning rate (default: 2e-05)",
                 "--lora.targets", "--fabric.precision"]:
        assert text in out
    line = next(x for x in out.splitlines() if x.startswith("  --head NAME "))
    assert {"lstm", "mlp", "gpt", "discrete", "flow", "example-linear"} <= set(line.split("one of: ")[1].split(", "))
    line = next(x for x in out.splitlines() if x.startswith("  --backbone NAME "))
    assert "the backbone; one of: " in line and {"toy", "other", "kosmos"} <= set(line.split("one of: ")[1].split(", "))
    assert main(["config", "--backbone", "toy", "--head", "example-linear", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--backbone.layers                decoder layers (default: 2; preset toy-recipe: 6)" in out
    assert "--train.batch_size               samples per device per step (before gradient accumulation) " \
           "(default: 8)" in out
    assert "--head.gripper_weight            weight of the gripper BCE against the arm MSE (default: 0.01)" in out
    assert main(["config", "--dataset", "toy-data", "--help"]) == 0
    assert "--dataset.path                   split folder (required; preset toy-recipe: /data/from-preset)" in \
        capsys.readouterr().out


def test_presets_and_errors_exit_codes(capsys):
    assert main(["presets", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)
    assert presets["calvin-kosmos-lstm"]["train"]["lr"] == 2e-5
    assert main(["tran"]) == 2
    assert "unknown command 'tran'; did you mean 'train'?" in capsys.readouterr().err
    assert main(["--preset", "calvin-kosmo-lstm"]) == 2
    assert "unknown preset 'calvin-kosmo-lstm'; did you mean 'calvin-kosmos-lstm'?" in capsys.readouterr().err
    assert main(["eval", "--run", "nowhere"]) == 2
    assert "--run nowhere: no config.toml there; give a run folder" in capsys.readouterr().err
    assert main(["data", "chek", "x"]) == 2
    assert "unknown data command 'chek'; did you mean 'check'?" in capsys.readouterr().err


def test_help_and_plugins_import_no_torch(tmp_path):
    """With the example plugin installed as an entry point, listing it must not import torch."""
    site = tmp_path / "site"
    site.mkdir()
    fake_distribution(site, "robovla-example", "0.1.0", {}, {"example": "robovla_example"})
    env = clean_env(PYTHONPATH=os.pathsep.join([str(site), str(EXAMPLE)]))
    for args in (["--help"], ["plugins"], ["plugins", "--json"]):
        code = (f"import sys; from robovla.cli import main; rc = main({args!r}); "
                "assert 'robovla_example' in sys.modules, 'the plugin was not loaded'; "
                "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
        result = run([sys.executable, "-c", code], env=env)
        assert result.returncode == 0, (args, result.stderr)
        assert "example-linear" in result.stdout
