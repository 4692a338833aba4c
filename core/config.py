"""Run configuration: the core sections, component configs, and how sources compose.

A run config has one section per chosen component (``backbone``, ``head``, ``dataset``,
``action_space``; each holds ``name`` plus that component's own fields) and the core
sections ``train``, ``fabric`` and ``lora``. Sources apply in this order, later wins:

1. field defaults,
2. a preset from registry.toml (``--preset NAME``; registry.toml names the default one),
3. a TOML file (``--config FILE``, e.g. a saved ``config.toml``),
4. command-line flags (``--head lstm``, ``--train.lr 1e-4``).

When a later source picks a different component (``--backbone paligemma`` over a preset
that used kosmos), the earlier fields of that section are dropped: they belonged to the
other component. Validation collects every problem and raises one :class:`ConfigError`
whose lines use the command-line spelling and say which source gave the value.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from robovla.errors import ConfigError, RobovlaError, UnknownNameError, unknown
from robovla.flags import NONE, coerce_cli, is_bool, shown
from robovla.preflight import MAX_RUN_NAME, check_run_name

RUN_KINDS = ("backbone", "head", "dataset", "action_space")
"""The component sections of a training run, in the order they are resolved."""


class ComponentConfig(BaseModel):
    """Base of every config model: unknown fields are errors, every field is described.

    A component declares ``class Config(ComponentConfig)`` with fields written as
    ``size: int = Field(256, description="...")``; the description becomes ``--help``.
    """

    # floats are finite everywhere: an inf or nan learning rate, bound or weight only fails later, deep in a run
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        bad = [n for n, f in cls.model_fields.items() if not (f.description or "").strip()]
        if bad:
            raise TypeError(f"{cls.__module__}.{cls.__qualname__}: fields {bad} have no description; "
                            "write them as Field(default, description='...')")
        if "name" in cls.model_fields:
            raise TypeError(f"{cls.__module__}.{cls.__qualname__}: 'name' is reserved (it holds the "
                            "component's registered name in a run config); rename the field")


MAX_SEED = 2**32 - 1  # numpy's legacy seeding and most simulators take 32-bit seeds


class TrainConfig(ComponentConfig):
    """What to train and for how long."""

    run_name: str | None = Field(None, description="run folder name under output_dir (one folder name, at most "
                                                   f"{MAX_RUN_NAME} characters); none: <backbone>-<head>-<date>-<time>")
    output_dir: Path = Field(Path("runs"), description="folder that holds the run folders")
    seed: int = Field(123, ge=0, le=MAX_SEED, description="random seed (each process adds its rank)")
    window: int = Field(8, ge=1, le=1024, description="T: history frames per training sample")
    chunk: int = Field(10, ge=1, le=1024, description="C: future actions predicted per step (the current one first)")
    batch_size: int = Field(8, ge=1, le=65536, description="samples per device per step (before gradient accumulation)")
    epochs: float = Field(5, gt=0, le=1e6, description="passes over the training windows")
    max_steps: int | None = Field(
        None, ge=1, le=10**9, description="stop after this many optimizer steps (overrides epochs)")
    max_minutes: float | None = Field(None, gt=0, le=1e7, description="also stop when training has run this "
                                      "long (wall clock, not counting setup and evaluation)")
    init: str | None = Field(None, description="start from the weights of this run folder or checkpoint folder "
                                               "(RUN_DIR or RUN_DIR/checkpoints/step-N; a converted checkpoint too), "
                                               "with a fresh optimizer and schedule; none: the backbone's own weights")
    lr: float = Field(2e-5, gt=0, le=1, description="AdamW peak learning rate")
    weight_decay: float = Field(
        0.0, ge=0, le=10, description="AdamW weight decay; never applied to norms, biases and [LRN]")
    schedule: Literal["constant", "cosine"] = Field("constant", description="learning-rate shape after warmup")
    warmup_epochs: float = Field(
        0.25, ge=0, le=1e6, description="linear warmup length in epochs (added to warmup_steps)")
    warmup_steps: int = Field(0, ge=0, le=10**9, description="linear warmup length in steps (added to warmup_epochs)")
    min_lr_scale: float = Field(0.01, ge=0, le=1, description="cosine schedule floor, as a fraction of lr")
    grad_accum: int = Field(1, ge=1, le=65536, description="micro-batches accumulated per optimizer step")
    grad_clip: float | None = Field(
        1.0, gt=0, le=1e6, description="clip the global gradient norm to this; none: no clipping")
    val_every: int | None = Field(None, ge=1, le=10**9, description="validate every N steps; none: at each epoch end")
    log_every: int = Field(10, ge=1, le=10**9, description="write training metrics every N steps")
    checkpoint_every: int = Field(500, ge=1, le=10**9, description="save a checkpoint every N steps (and at the end)")
    num_workers: int = Field(2, ge=0, le=256, description="data-loading worker processes per device")
    lrn_tokens: int = Field(
        1, ge=1, le=64, description="K: learned [LRN] tokens per frame whose final states the head reads")
    train_vision: bool = Field(True, description="train the vision tower (full fine-tuning; under LoRA only "
                                                 "adapters train in the backbone)")
    train_text_embedding: bool = Field(True, description="train the text embedding (full fine-tuning)")
    freeze_decoder_layers: int = Field(
        0, ge=0, le=10_000, description="freeze the first N decoder layers (full fine-tuning)")
    gradient_checkpointing: bool = Field(False, description="recompute backbone activations in the backward pass "
                                                            "(less memory, about a third more compute)")
    augment: bool = Field(True, description="random shift of the training images, as the recipe (pad 10 px static, "
                                            "4 px gripper, then crop back)")
    ablate: Literal["none", "image", "instruction"] = Field(
        "none", description="ablation: hide the images (black frames) or the instruction (empty), in training and "
                            "evaluation alike")
    val_path: str = Field("auto", description="validation split folder; auto: the dataset path's sibling "
                                              "validation/ when there is one; none: no validation")
    val_batches: int | None = Field(
        50, ge=1, le=10**9, description="batches per validation pass; none: the whole split")
    cache: str = Field("auto", description="frame cache folder; auto: robovla_cache/ inside each split folder; "
                                           "none: read the dataset's files directly")
    eval_env: str | None = Field(None, description="after training, evaluate closed loop in this environment "
                                                   "(e.g. synthetic); writes eval.json")
    eval_episodes: int = Field(100, ge=1, le=1_000_000, description="closed-loop evaluation episodes")
    eval_seed: int = Field(
        10_000, ge=0, le=MAX_SEED, description="first seed of the evaluation episodes (apart from training seeds)")
    threads: int | None = Field(None, ge=1, le=1024, description="torch threads per process; none: torch's "
                                "default (cores / processes when several share a CPU)")
    wandb_project: str | None = Field(None, description="also log to this Weights & Biases project (needs wandb)")

    _run_name = pydantic.field_validator("run_name")(classmethod(lambda cls, v: check_run_name(v)))


class FabricConfig(ComponentConfig):
    """Where and how to run, passed to Lightning Fabric."""

    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = Field("auto", description="device type")
    devices: Annotated[int, Field(
        ge=1, le=1024)] | Literal["auto"] = Field("auto", description="devices per node, or auto")
    num_nodes: int = Field(1, ge=1, le=100_000, description="machines taking part in the run")
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp", "deepspeed"] = Field(
        "auto", description="distribution strategy")
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = Field(
        "32-true", description="numeric precision; bf16-mixed on GPUs that support it")


class LoraConfig(ComponentConfig):
    """Low-rank adaptation of the backbone through PEFT; [LRN] and the head stay fully trained."""

    enabled: bool = Field(False, description="train LoRA adapters instead of all backbone weights")
    r: int = Field(64, ge=1, le=65536, description="adapter rank")
    alpha: int = Field(16, ge=1, le=65536, description="adapter scale numerator (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    targets: list[str] | Literal["all-linear"] | None = Field(
        None, description="module names or patterns to adapt; none: the backbone's default targets")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="which biases to train")


SECTIONS: dict[str, type[ComponentConfig]] = {"train": TrainConfig, "fabric": FabricConfig, "lora": LoraConfig}
META = "meta"  # written into saved configs (versions, providers); ignored when read back


def flag(section: str, field: str | None = None) -> str:
    """The command-line spelling: ``flag("action_space", "low") == "--action-space.low"``."""
    return f"--{section.replace('_', '-')}" + (f".{field}" if field else "")


class Choice(typing.NamedTuple):
    """A chosen component: its registered name and its validated config."""

    name: str
    config: ComponentConfig


class RunConfig(typing.NamedTuple):
    """A resolved, validated run configuration."""

    backbone: Choice
    head: Choice
    dataset: Choice
    action_space: Choice
    train: TrainConfig
    fabric: FabricConfig
    lora: LoraConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data, TOML-ready: paths become strings, None becomes "none" (TOML has no null)."""
        out = {}
        for key in self._fields:
            value = getattr(self, key)
            body = {"name": value.name, **value.config.model_dump(mode="json")} if isinstance(value, Choice) \
                else value.model_dump(mode="json")
            out[key] = spell_none(body)
        return out


def spell_none(value: Any) -> Any:
    """None -> "none" at any depth (TOML has no null); see :func:`read_none` for the way back."""
    if isinstance(value, dict):
        return {k: spell_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [spell_none(v) for v in value]
    return NONE if value is None else value


def read_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: read_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [read_none(v) for v in value]
    return None if isinstance(value, str) and value.lower() == NONE else value


# --------------------------------------------------------------------------- composing


Layer = tuple[str, dict[str, dict[str, Any]]]  # (source label, {section: {field: value}})


class Dropped(typing.NamedTuple):
    """Fields of one source that a later source's choice of another component discarded."""
    section: str
    old: tuple[str, str]  # (component name, source label)
    new: tuple[str, str]  # likewise
    values: dict[str, Any]


def merge(layers: list[Layer], dropped: list[Dropped] | None = None,
          ) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """Merge sources (later wins) and remember which source set each value; fields discarded
    because a later source chose another component are appended to ``dropped``."""
    data: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    for label, layer in layers:
        for section, values in layer.items():
            if section == META:
                continue
            if not isinstance(values, dict):
                data[section] = values  # reported by validate()
                origin[(section, "")] = label
                continue
            current = data.get(section)
            other = current.get("name") not in (None, values["name"]) if "name" in values and isinstance(current, dict) else False
            if other and dropped is not None and len(current) > 1:
                dropped.append(Dropped(section, (current["name"], origin[(section, "name")]), (values["name"], label),
                                       {k: v for k, v in current.items() if k != "name"}))
            if not isinstance(current, dict) or other:
                for key in current if other else ():
                    del origin[(section, key)]
                current = data[section] = {}  # another component: its predecessor's fields do not apply
            for field_name, value in values.items():
                current[field_name] = value
                origin[(section, field_name)] = label
    return data, origin


def cli_layer(flags: list[tuple[str, str | None]], models: dict[str, type[BaseModel]]) -> tuple[dict, list[str]]:
    """``[("train.lr", "1e-4"), ("head", "lstm")]`` -> ``{"train": {"lr": "1e-4"}, "head": {"name": "lstm"}}``.

    Values stay strings for pydantic to convert, except lists, which it cannot. A bare flag
    (value None) means true for a yes/no field and is a problem anywhere else.
    """
    layer: dict[str, dict[str, Any]] = {}
    problems = []
    for key, text in flags:
        section, _, field_name = key.replace("-", "_").partition(".")
        if section in SECTIONS and not field_name:
            first = next(iter(SECTIONS[section].model_fields))
            problems.append(f"{flag(section)}: is a section, not a component; set its fields, e.g. "
                            f"{flag(section, first)} VALUE")
            continue
        field_name = field_name or "name"
        model = models.get(section)
        info = model.model_fields.get(field_name) if model is not None else None
        if text is None:
            if info is not None and is_bool(info.annotation):
                text = "true"
            elif model is not None and (info is not None or field_name == "name"):
                problems.append(f"{flag(section, None if field_name == 'name' else field_name)}: needs a value")
                continue
            else:
                text = "true"  # an unknown section or field: reported by validate()
        layer.setdefault(section, {})[field_name] = coerce_cli(info.annotation, text) if info else text
    return layer, problems


def _problems(exc: pydantic.ValidationError, section: str, model: type[BaseModel], origin: dict) -> list[str]:
    """One line per problem, spelled as flags; the branches of a union become one line."""
    by_field: dict[str, list[dict]] = {}
    for err in exc.errors():
        by_field.setdefault(str(err["loc"][0]) if err["loc"] else "", []).append(err)
    out = []
    for field_name, errs in by_field.items():
        src = origin.get((section, field_name))
        src = f" (from {src})" if src else ""
        first = errs[0]
        if first["type"] == "extra_forbidden":
            valid = list(model.model_fields)
            out.append(f"{flag(section, field_name)}: {unknown('field', field_name, valid)}{src}")
        elif len(errs) > 1 and all(len(e["loc"]) > 1 and isinstance(e["loc"][1], str) for e in errs):
            branches = "; ".join(f"as {e['loc'][1]}: {e['msg']}" for e in errs)
            out.append(f"{flag(section, field_name)}: got {shown(first['input'])}{src}, which fits no "
                       f"allowed type ({branches})")
        elif first["type"] == "missing" and field_name in model.model_fields:
            where = flag(section, field_name)
            out.append(f"{where}: required, and no source sets it; pass {where} VALUE "
                       f"({model.model_fields[field_name].description})")
        else:
            for err in errs:
                where = flag(section, ".".join(str(p) for p in err["loc"]))
                out.append(f"{where}: {err['msg']}, got {shown(err['input'])}{src}")
    return out


def _optional(model: type[BaseModel], field_name: str) -> bool:
    info = model.model_fields.get(field_name)
    return info is not None and type(None) in typing.get_args(info.annotation)


def validate_section(section: str, model: type[ComponentConfig], values: dict[str, Any],
                     origin: dict | None = None) -> tuple[ComponentConfig | None, list[str]]:
    """Validate one section; returns (config, []) or (None, problems)."""
    values = {k: read_none(v) if _optional(model, k) or isinstance(v, (dict, list)) else v
              for k, v in values.items()}
    try:
        return model.model_validate(values), []
    except pydantic.ValidationError as exc:
        return None, _problems(exc, section, model, origin or {})


def validate_component(kind: str, name: str, model: type[ComponentConfig], values: dict[str, Any]) -> ComponentConfig:
    """Validate a component's config or raise ConfigError (used by :func:`robovla.create`)."""
    config, problems = validate_section(kind, model, values)
    if problems:
        raise ConfigError(problems, header=f"invalid config for {kind} {name!r}")
    return config


def component_models(data: dict[str, dict[str, Any]], origin: dict | None = None) -> tuple[dict[str, type[BaseModel]], list[str]]:
    """The config model of each chosen component in ``data``, and the problems finding them."""
    from robovla.registry import get_component

    models: dict[str, type[BaseModel]] = dict(SECTIONS)
    problems = []
    for kind in RUN_KINDS:
        if kind in data and not isinstance(data[kind], dict):
            continue  # reported by validate() as not a table
        name = (data.get(kind) or {}).get("name")
        what = kind.replace("_", " ")
        if name is None:
            problems.append(f"{flag(kind)}: no {what} chosen; pass {flag(kind)} NAME")
            continue
        try:
            models[kind] = get_component(kind, str(name)).load().Config
        except UnknownNameError as exc:
            src = (origin or {}).get((kind, "name"), "defaults")
            problems.append(f"{flag(kind)} {name} (from {src}): {exc}\nFix: install a plugin that provides "
                            f"{what} {name!r}, or choose another with {flag(kind)} NAME; `robo-run plugins` "
                            "lists what is installed")
        except RobovlaError as exc:
            from robovla.registry import summary

            problems.append(f"{flag(kind)} {name}: {summary(str(exc))}")
    return models, problems


def validate(data: dict[str, dict[str, Any]], origin: dict[tuple[str, str], str] | None = None,
             problems: list[str] = ()) -> RunConfig:
    """Check merged data against the chosen components and core sections; raise once,
    with ``problems`` found earlier (e.g. while parsing flags) listed first."""
    origin = origin or {}
    models, found = component_models(data, origin)
    problems = list(problems) + found
    known = list(SECTIONS) + list(RUN_KINDS)
    for section, value in data.items():
        src = origin.get((section, ""), next((v for (s, _), v in origin.items() if s == section), "?"))
        if section not in known:
            valid = [flag(k) for k in known]
            problems.append(f"{flag(section)}: {unknown('section', flag(section), valid)} (from {src})")
        elif not isinstance(value, dict):
            example = f'name = "{value}"' if section in RUN_KINDS else "field = value"
            problems.append(f"{flag(section)}: expected a table of fields, got {value!r} (from {src}); "
                            f"write it as [{section}] with {example} under it")
    parts: dict[str, Any] = {}
    for section, model in models.items():
        values = dict(data[section]) if isinstance(data.get(section), dict) else {}
        name = values.pop("name", None) if section in RUN_KINDS else None
        config, found = validate_section(section, model, values, origin)
        problems += found
        parts[section] = Choice(str(name), config) if section in RUN_KINDS else config
    if problems:
        raise ConfigError(problems)
    return RunConfig(**parts)


def resolve(preset: str | None = None, config_file: str | Path | None = None,
            flags: list[tuple[str, str | None]] = (), notes: list[str] | None = None) -> RunConfig:
    """Compose defaults, preset, config file and flags into a validated :class:`RunConfig`.

    ``preset`` None means registry.toml's default preset; ``"none"`` means no preset. ``notes``
    receives what a later source discarded (:func:`discarded`), for the command to print.
    """
    from robovla import registry_file

    layers: list[Layer] = []
    if preset is None:
        preset = registry_file.default_preset()
    if preset and preset.lower() != NONE:
        layers.append((f"preset {preset}", registry_file.preset(preset)))
    if config_file is not None:
        layers.append((f"config file {config_file}", registry_file.read_toml(Path(config_file), "--config")))
    return compose(layers, flags, notes)


def compose(layers: list[Layer], flags: list[tuple[str, str | None]] = (), notes: list[str] | None = None,
            ) -> RunConfig:
    """``layers`` (later wins), then ``flags``, into a :class:`RunConfig`; ``notes`` gets :func:`discarded`'s."""
    choices = {k.replace("-", "_"): {"name": v} for k, v in flags if "." not in k and v is not None}
    models, _ = component_models(merge(layers + [("command line", choices)])[0])
    layer, problems = cli_layer(list(flags), models)
    dropped: list[Dropped] = []
    layers = layers + [("command line", layer)]
    data, origin = merge(layers, dropped)
    (notes if notes is not None else []).extend(discarded(data, origin, dropped, models, layers))
    return validate(data, origin, problems=problems)


def discarded(data: dict, origin: dict, dropped: list[Dropped], models: dict[str, type[BaseModel]],
              layers: list[Layer]) -> list[str]:
    """Notes on what composing discards: a component's fields a later choice replaced (and those the
    new one has too, now at its defaults), and a ``json_schema_extra={"same_source_as": OTHER}`` field
    set by an older source than the one giving OTHER another value (removed from ``data``)."""
    notes, order = [], [label for label, _ in layers]
    for d in dropped:
        listed = ", ".join(f"{flag(d.section, k)} {shown(v, 30)}" for k, v in d.values.items())
        notes.append(f"{flag(d.section)} {d.new[0]} (from {d.new[1]}) replaces {d.old[0]} (from {d.old[1]}), "
                     f"so {d.old[1]}'s settings for {d.old[0]} do not apply: {listed}")
        model = models.get(d.section)
        shared = {k: model.model_fields[k] for k in d.values if model is not None and k in model.model_fields
                  and k not in data.get(d.section, {})}
        if shared:
            now = ", ".join(f"{flag(d.section, k)} {shown(f.get_default(call_default_factory=True), 30)}"
                            for k, f in shared.items())
            notes.append(f"{flag(d.section)} {d.new[0]} uses its defaults instead: {now}; "
                         f"set them with {flag(d.section)}.FIELD VALUE")
    for section, model in models.items():
        for name, info in model.model_fields.items():
            other = info.json_schema_extra.get("same_source_as") if isinstance(info.json_schema_extra, dict) else None
            if other is None or (section, name) not in origin or (section, other) not in origin:
                continue
            mine, theirs = origin[(section, name)], origin[(section, other)]
            value, before = read_none(data[section].get(name)), dict(layers)[mine].get(section, {}).get(other)
            same = str(Path(str(before)).expanduser()) == str(Path(str(data[section][other])).expanduser())
            if order.index(mine) < order.index(theirs) and value not in (None, info.default) and not same:
                del data[section][name]
                notes.append(f"{flag(section, name)} {shown(value, 30)} (from {mine}) goes with {mine}'s own "
                             f"{flag(section, other)} and is dropped, since {flag(section, other)} now comes from "
                             f"{theirs}; pass {flag(section, name)} {shown(value, 30)} to keep it")
    return notes
