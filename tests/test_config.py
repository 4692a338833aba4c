"""Configuration: sources and their order, flag parsing, validation messages."""

import pytest
from pydantic import Field

import robovla
from robovla import config as cfg
from robovla import registry_file
from robovla.cli import parse_run_args
from robovla.errors import ConfigError, UnknownNameError

from toy import PRESETS, Toy


@pytest.fixture
def toy(robovla_plugin, monkeypatch):
    robovla_plugin(Toy(), name="toy", distribution="toy-dist", version="9.9")
    monkeypatch.setattr(registry_file, "load", lambda: PRESETS)


def resolve(*argv, preset=None, config_file=None):
    _, flags, _ = parse_run_args(list(argv))
    return cfg.resolve(preset, config_file, flags)


def test_sources_apply_in_order_defaults_preset_file_flags(toy, tmp_path):
    run = resolve()  # the default preset from registry.toml's [defaults]
    assert (run.backbone.name, run.backbone.config.layers, run.backbone.config.path) == ("toy", 6, "tiny")
    assert str(run.dataset.config.path) == "/data/from-preset" and run.action_space.config.bound == 0.65
    assert (run.train.lr, run.train.chunk, run.fabric.precision) == (2e-5, 10, "32-true")
    file = tmp_path / "run.toml"
    file.write_text('[backbone]\nlayers = 3\n[train]\nlr = 1e-3\nchunk = 5\ngrad_clip = "none"\n')
    run = resolve("--train.lr", "5e-4", "--dataset.path=/data/flag", config_file=file)
    assert (run.backbone.config.layers, run.train.lr, run.train.chunk, run.train.grad_clip) == (3, 5e-4, 5, None)
    assert str(run.dataset.config.path) == "/data/flag"


def test_choosing_another_component_drops_the_earlier_fields(toy):
    run = resolve("--backbone", "other", "--backbone.width", "32")
    assert run.backbone == cfg.Choice("other", run.backbone.config) and run.backbone.config.width == 32


def test_flag_values_are_coerced_per_field_type(toy):
    run = resolve("--lora.targets", "q_proj, v_proj", "--train.max_steps", "none", "--lora.enabled")
    assert run.lora.targets == ["q_proj", "v_proj"] and run.train.max_steps is None and run.lora.enabled
    assert resolve("--lora.targets", '["a", "b.*"]').lora.targets == ["a", "b.*"]
    assert resolve("--lora.targets", "all-linear", "--lora.enabled", "false").lora == \
        cfg.LoraConfig(targets="all-linear", enabled=False)
    assert resolve("--fabric.devices", "2").fabric.devices == 2


def test_every_problem_is_reported_once_with_flag_spelling_and_source(toy, tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text('[train]\nwindow = 0\n[optim]\nlr = 1\n')
    with pytest.raises(ConfigError) as err:
        resolve("--head", "lstn", "--train.lr", "fast", "--backbone.layer", "3",
                "--lora.targets", "7", config_file=file)
    problems = err.value.problems
    assert problems[0].startswith("--head lstn (from command line): unknown head 'lstn'; did you mean 'lstm'? "
                                  "Valid: discrete, example-linear, flow, gpt, lstm, mlp")
    assert "--optim: unknown section '--optim'. Valid: --action-space, --backbone, --dataset, --fabric, --head, " \
        "--lora, --train (from config file" in problems[1]
    assert "--train.window: Input should be greater than or equal to 1, got 0 (from config file" in problems[2]
    assert problems[3] == "--train.lr: Input should be a valid number, unable to parse string as a number, got 'fast' (from command line)"
    assert problems[4] == ("--backbone.layer: unknown field 'layer'; did you mean 'layers'? Valid: layers, path "
                           "(from command line)")
    assert len(problems) == 5, problems  # --lora.targets 7 is a valid one-element list
    assert str(err.value).startswith("invalid configuration (5 problems):\n  --head lstn")


def test_missing_components_and_required_fields_are_named(toy):
    with pytest.raises(ConfigError) as err:
        resolve(preset="broken-recipe")
    assert err.value.problems[:2] == ["--backbone: no backbone chosen; pass --backbone NAME",
                                      "--head: no head chosen; pass --head NAME"]
    assert any(p.startswith("--train.lrr: unknown field 'lrr'; did you mean 'lr'?") for p in err.value.problems)
    with pytest.raises(ConfigError, match="--dataset.path: required, and no source sets it; pass --dataset.path VALUE"):
        resolve("--dataset", "toy-data", preset="broken-recipe")
    with pytest.raises(UnknownNameError, match="unknown preset 'toy-recipes'; did you mean 'toy-recipe'"):
        resolve(preset="toy-recipes")


def test_bare_flags_are_true_only_for_yes_no_fields(toy):
    assert resolve("--lora.enabled", "--train.lr", "1e-3").lora.enabled is True
    with pytest.raises(ConfigError) as err:
        resolve("--train.run_name", "--head", "--lora", "true", "--train.lr")
    assert err.value.problems[:4] == [
        "--train.run_name: needs a value",
        "--head: needs a value",
        "--lora: is a section, not a component; set its fields, e.g. --lora.enabled VALUE",
        "--train.lr: needs a value",
    ]


def test_sections_that_are_not_tables(toy, tmp_path):
    file = tmp_path / "flat.toml"
    file.write_text('backbone = "toy"\ntrain = [1, 2]\n')
    with pytest.raises(ConfigError) as err:
        resolve("--train.lr", "0.3", config_file=file)  # a later source adds to the non-table section
    assert err.value.problems == [
        f'--backbone: expected a table of fields, got \'toy\' (from config file {file}); write it as '
        '[backbone] with name = "toy" under it',
    ]
    run = resolve("--backbone", "toy", "--train.lr", "2e-5", config_file=file)  # both replaced by tables
    assert run.backbone.name == "toy" and run.train.lr == 2e-5


def test_no_preset_starts_from_field_defaults(toy):
    run = resolve("--backbone", "toy", "--head", "example-linear", "--dataset", "toy-data", "--dataset.path", "/d",
                  "--action-space", "example-clip", preset="none")
    assert (run.backbone.config.layers, run.action_space.config.bound, run.train.batch_size) == (2, 0.65, 8)


def test_config_files_with_errors_name_the_file(toy, tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[train\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"broken.toml: not valid TOML: .*line 1"):
        resolve(config_file=bad)
    with pytest.raises(ConfigError, match="nowhere.toml: no such file"):
        resolve(config_file=tmp_path / "nowhere.toml")
    with pytest.raises(ConfigError, match=r"--config .*: is a folder; give a TOML file"):
        resolve(config_file=tmp_path)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[train]\nrun_name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"latin.toml: is not UTF-8 text \('utf-8' codec can't decode byte 0xe9"):
        resolve(config_file=latin)


@pytest.mark.parametrize("argv, message", [
    (["lstm"], "'lstm': expected a flag such as --head NAME"),
    (["--preset"], "--preset: needs a value"),
    (["--config=", "--head", "x"], "--config: needs a value"),
])
def test_malformed_command_lines(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_args(argv)


def test_component_configs_must_describe_fields_and_not_use_name():
    with pytest.raises(TypeError, match=r"fields \['size'\] have no description"):
        class NoDescription(robovla.ComponentConfig):
            size: int = 3
    with pytest.raises(TypeError, match="'name' is reserved"):
        class NamedField(robovla.ComponentConfig):
            name: str = Field("x", description="a name")


def test_the_shipped_presets_validate_their_core_sections():
    presets = registry_file.presets()
    assert registry_file.default_preset() in presets
    for name, table in presets.items():
        assert table["description"].strip()
        for section, model in cfg.SECTIONS.items():
            _, problems = cfg.validate_section(section, model, table.get(section, {}))  # as a config file is read
            assert not problems, (name, problems)
        assert set(table) <= {"description", *cfg.SECTIONS, *cfg.RUN_KINDS}, name
        assert all(table[k]["name"] for k in cfg.RUN_KINDS), name
