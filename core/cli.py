"""``robo-run``: the command line.

    robo-run [train] [--preset NAME] [--config FILE] [--backbone NAME] [--backbone.FIELD VALUE] ...
    robo-run config  [same flags]         print the resolved configuration as TOML
    robo-run plugins [--json]             every registered component and broken plugin
    robo-run presets [--json]             the named recipes in registry.toml
    robo-run data ...                     check, describe, synthesize and cache datasets
    robo-run eval --run RUN_DIR ...       offline metrics and closed-loop evaluation of a run
    robo-run serve --run RUN_DIR ...      a policy server for a run (HTTP, numpy payloads)
    robo-run convert SOURCE CKPT ...      another framework's checkpoint as a run folder
    robo-run pretrain --backbone NAME OUT  pre-train a backbone's own weights

Nothing here imports torch: commands import what they need when they run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

from robovla import config as cfg
from robovla import preflight
from robovla.flags import read_flag
from robovla import registry_file
from robovla.errors import ConfigError, RobovlaError, UnknownNameError
from robovla.registry import registry, summary

RUN_FLAGS = ("--preset", "--config", "--resume")
SWITCHES = ("--overwrite", "--accept-changes")
"""Yes/no run flags that take no value and are not part of the saved config."""


# ------------------------------------------------------------------ run-flag grammar


def parse_run_args(argv: list[str]) -> tuple[dict[str, str], list[tuple[str, str | None]], bool]:
    """Split ``argv`` into (--preset/--config/--resume and switches, [(section.field, value)], wants_help).

    Accepted forms: ``--head lstm``, ``--train.lr 1e-4``, ``--train.lr=1e-4``, and a bare
    ``--lora.enabled`` (followed by another flag or nothing), whose value is None here and
    means true for a yes/no field.
    """
    run: dict[str, str] = {}
    flags: list[tuple[str, str | None]] = []
    wants_help = False
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            wants_help, i = True, i + 1
            continue
        if not token.startswith("--") or token == "--":
            raise ConfigError([f"{token!r}: expected a flag such as --head NAME or --train.lr 1e-4"],
                              header="cannot parse the command line")
        if token in SWITCHES:
            run[token[2:]], i = "true", i + 1
            continue
        key, value_or_none, i = read_flag(argv, i)
        if f"--{key}" in RUN_FLAGS:
            if not value_or_none:
                raise ConfigError([f"--{key}: needs a value"], header="cannot parse the command line")
            run[key] = value_or_none
        else:
            flags.append((key, value_or_none))
    return run, flags, wants_help


def resolve(argv: list[str]) -> cfg.RunConfig:
    """The run ``argv`` describes; what a later source discarded is printed first (stderr), so that
    a preset's setting never disappears unsaid (``--preset demo --head mlp`` drops the demo's head)."""
    run, flags, _ = parse_run_args(argv)
    notes: list[str] = []
    try:
        resolved = cfg.resolve(run.get("preset"), run.get("config"), flags, notes)  # invalid: its errors alone
    except ConfigError as exc:
        if any(p.startswith("--dataset.path: required") for p in exc.problems) and "preset" not in run:
            hint = (f"(the default preset, {registry_file.default_preset()}, trains on CALVIN data you name with "
                    "--dataset.path; to try robovla without data, `robo-run --preset demo` writes a synthetic task "
                    "and trains on it)")
            raise ConfigError([p + "\n" + hint if p.startswith("--dataset.path: required") else p
                               for p in exc.problems]) from None
        raise
    if preflight.first_process():
        for note in notes:
            print(f"robo-run: note: {note}", file=sys.stderr)
    return resolved


# ------------------------------------------------------------------------- help text


def _field_lines(section: str, model: type, preset: tuple[str, dict]) -> list[str]:
    """One line per field: flag, description, default, and the preset's value where it sets one."""
    label, values = preset
    lines = []
    for name, info in model.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        where = "required" if info.is_required() else f"default: {default}"
        choices = literal_choices(info.annotation)
        where = f"{', '.join(map(str, choices))}; {where}" if choices else where
        if values.get(section, {}).get(name, default) != default:
            where += f"; {label}: {values[section][name]}"
        lines.append(f"  {cfg.flag(section, name):<32} {info.description} ({where})")
    return lines


def literal_choices(annotation: Any) -> list[Any]:
    """The values a field with a fixed set accepts (a Literal, optional or in a list), or [] for an
    open type (``int | Literal["auto"]`` is open)."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return list(args)
    if origin in (list, tuple, set):
        return literal_choices(args[0]) if args else []
    if origin in (typing.Union, types.UnionType):
        parts = [literal_choices(a) for a in args if a is not type(None)]
        return [v for p in parts for v in p] if parts and all(parts) else []
    return []


def run_help(command: str, argv: list[str]) -> str:
    """Help for ``train``/``config``: components and their choices, then every field."""
    run, flags, _ = parse_run_args([a for a in argv if a not in ("-h", "--help")])
    chosen = {k.replace("-", "_"): v for k, v in flags if "." not in k and v is not None}
    name = run.get("preset") or registry_file.default_preset()
    preset = (f"preset {name}", registry_file.preset(name)) if name and name != cfg.NONE else ("", {})
    reg = registry()
    out = [f"usage: robo-run {command} [--preset NAME] [--config FILE] [--KIND NAME] [--SECTION.FIELD VALUE ...]",
           "", "Sources, later wins: defaults < --preset (default: "
           f"{registry_file.default_preset()}) < --config FILE.toml < flags.", "",
           "  --preset NAME                    a named recipe from registry.toml (robo-run presets); none: no preset",
           "  --config FILE                    a TOML file, e.g. a run's config.toml",
           "  --resume RUN_DIR                 continue a stopped run from its last checkpoint, with its config.toml",
           "  --accept-changes                 with --resume: accept a config.toml or process count that differs "
           "from the checkpoint's (the resumed run is then not exact)",
           "  --overwrite                      start over in an existing run folder (deletes its checkpoints and logs)",
           "", "components:"]
    for kind in cfg.RUN_KINDS:
        names = [c.name for c in reg.components if c.kind == kind and c.error is None]
        what = ", ".join(names) if names else "(none installed)"
        out.append(f"  {cfg.flag(kind) + ' NAME':<32} the {kind.replace('_', ' ')}; one of: {what}")
    for kind in cfg.RUN_KINDS:
        if kind in chosen:
            model = reg.get(kind, chosen[kind]).load().Config
            out += ["", f"{kind} {chosen[kind]!r}:"] + (_field_lines(kind, model, preset) or ["  (no fields)"])
    if not chosen:
        out += ["", "Add --backbone NAME (or another component) to --help to list its fields."]
    for section, model in cfg.SECTIONS.items():
        out += ["", f"{section}: {model.__doc__.splitlines()[0]}"] + _field_lines(section, model, preset)
    return "\n".join(out)


# ------------------------------------------------------------------------- commands


def config_toml(run: cfg.RunConfig) -> str:
    """The resolved configuration as TOML, with robovla's and each component's version under [meta]."""
    import tomli_w

    from robovla import __version__

    reg = registry()
    meta: dict[str, Any] = {"robovla": __version__}
    for kind in cfg.RUN_KINDS:
        c = reg.get(kind, getattr(run, kind).name)
        meta[kind] = f"{c.plugin.distribution} {c.plugin.version} ({c.module})"
    return tomli_w.dumps({**run.to_dict(), cfg.META: meta})


def cmd_config(argv: list[str]) -> int:
    sys.stdout.write(config_toml(resolve(argv)))
    return 0


def cmd_train(argv: list[str]) -> int:
    run_args, flags, _ = parse_run_args(argv)
    resume = run_args.get("resume")
    overwrite, accept_changes = "overwrite" in run_args, "accept-changes" in run_args
    if overwrite and resume is not None:
        raise ConfigError(["--overwrite starts the run over and --resume continues it; pass one of them"],
                          header="cannot parse the command line")
    if accept_changes and resume is None:
        raise ConfigError(["--accept-changes only applies to --resume RUN_DIR"], header="cannot parse the command line")
    if resume is not None:
        from robovla import runs

        extra = [f"--{k}" for k in run_args if k not in ("resume", "accept-changes")] + \
            [f"--{k}" for k, _ in flags if k.replace("-", "_") not in runs.EXTEND]
        if extra:
            raise ConfigError([f"--resume continues a run with its saved config.toml; drop {', '.join(extra)} "
                               "(start a new run to change the configuration; on resume only the run's length, "
                               f"{', '.join('--' + k for k in runs.EXTEND)}, may change)"], header="cannot resume")
        run, finished = runs.resumed(Path(resume), flags, accept_changes)
        if finished:
            print(f"robo-run: {finished}")
            return 0
    else:
        run = resolve(argv)
    preflight.check(run, resuming=resume is not None)  # before any process, model or cache: every problem at once
    from robovla.train import Interrupted, train

    try:
        run_dir = train(run, config_toml(run), resume=None if resume is None else Path(resume), overwrite=overwrite,
                        accept_changes=accept_changes)
    except Interrupted as exc:
        print(f"robo-run: {exc}", file=sys.stderr)
        return 128 + exc.signum
    if preflight.first_process():
        print(next_commands(run, run_dir))
    return 0


def next_commands(run: cfg.RunConfig, run_dir: Path) -> str:
    """What one does with a run that ended, as commands to copy."""
    import shlex

    from robovla import checkpoint

    folder = shlex.quote(str(run_dir))  # a folder name with spaces still pastes as one argument
    state = checkpoint.read_state(checkpoint.last(run_dir))
    ended = state["step"] >= (run.train.max_steps or math.ceil(run.train.epochs * state.get("steps_per_epoch", 0)))
    longer = f"--train.max_steps {2 * run.train.max_steps}" if run.train.max_steps else \
        f"--train.epochs {2 * run.train.epochs:g}"
    python = f"import robovla; print(robovla.Policy.from_run({json.dumps(str(run_dir))}))"
    rows = [(f"robo-run eval --run {folder}" + (f" --env {run.train.eval_env}" if run.train.eval_env else ""),
             "offline metrics" + (" and closed-loop evaluation" if run.train.eval_env else "")),
            (f"robo-run serve --run {folder}", "a policy server (robovla.client.PolicyClient)"),
            (f"robo-run --resume {folder} {longer}", "train it longer") if ended else
            (f"robo-run --resume {folder}", f"train on to its end (it stopped at step {state['step']})"),
            (f"python -c {shlex.quote(python)}", "the policy in Python")]
    width = max(len(command) for command, _ in rows)
    return "\n".join([f"run saved in {run_dir}. Next:"] + [f"  {c:<{width}}  # {w}" for c, w in rows])


def plugin_rows() -> list[dict[str, Any]]:
    """One row per component, plus one per broken plugin (kind "plugin")."""
    from robovla import plugins
    from robovla.registry import broken_report

    reg = registry()
    rows = [dict(kind=c.kind, name=c.name, distribution=c.plugin.distribution, version=c.plugin.version,
                 module=c.module, entry_point=c.plugin.entry_point, status=c.status, error=c.error)
            for c in reg.components]
    for key, error in reg.errors.items():
        info = plugins.info(key)
        rows.append(dict(kind="plugin", name=info.entry_point.split(" = ")[0] or info.distribution,
                         distribution=info.distribution, version=info.version, module=info.module,
                         entry_point=info.entry_point, status="error", error=broken_report(info, error)))
    for name in plugins.unmatched:
        rows.append(dict(kind="plugin", name=name, distribution=name, version="", module="", entry_point="",
                         status="missing", error=f"ROBOVLA_PLUGINS names {name!r}, but no installed distribution "
                         f"has an entry point of that name in group 'robovla'. Fix: install it, or remove it "
                         "from ROBOVLA_PLUGINS"))
    return rows


def cmd_plugins(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="robo-run plugins", description="List registered components and broken plugins.")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    args = p.parse_args(argv)
    rows = plugin_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["kind", "name", "distribution", "version", "module", "status"]
    table = [[str(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
    for line in [[c.upper() for c in cols]] + table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    if not rows:
        print("(no plugins installed)")
    shown = set()
    for r in rows:  # each problem once: the message and the fix; the traceback is in --json
        text = summary(r["error"] or "").removesuffix("\n(robo-run plugins --json shows the traceback)")
        if text and text not in shown:
            shown.add(text)
            print(f"\n{r['kind']} {r['name']} [{r['distribution']}]: {text}")
    return 0


def cmd_presets(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="robo-run presets", description="List the named recipes in registry.toml.")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    args = p.parse_args(argv)
    presets = registry_file.presets()
    if args.json:
        print(json.dumps(presets, indent=2))
        return 0
    default = registry_file.default_preset()
    for name, table in presets.items():
        mark = " (default)" if name == default else ""
        print(f"{name}{mark}\n  {table.get('description', '')}")
    return 0


def cmd_data(argv: list[str]) -> int:
    from robovla import data_commands

    return data_commands.main(argv)


def cmd_eval(argv: list[str]) -> int:
    from robovla import evaluation

    return evaluation.main(argv)


def cmd_convert(argv: list[str]) -> int:
    from robovla import convert

    return convert.main(argv)


def cmd_serve(argv: list[str]) -> int:
    from robovla import server

    return server.main(argv)


def cmd_pretrain(argv: list[str]) -> int:
    from robovla import pretraining

    return pretraining.main(argv)


def cmd_export(argv: list[str]) -> int:
    from robovla import sharing

    return sharing.main_export(argv)


def cmd_push(argv: list[str]) -> int:
    from robovla import sharing

    return sharing.main_push(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (cmd_train, "train a policy (the default command)"),
    "config": (cmd_config, "print the resolved configuration as TOML"),
    "plugins": (cmd_plugins, "list registered components and broken plugins"),
    "presets": (cmd_presets, "list the named recipes in registry.toml"),
    "data": (cmd_data, "dataset tools: check, stats, synth (the synthetic task), cache (the frame cache)"),
    "eval": (cmd_eval, "evaluate a run: offline metrics, closed loop (CALVIN long-horizon protocol)"),
    "serve": (cmd_serve, "serve a run's policy over HTTP (numpy payloads, one state per session)"),
    "convert": (cmd_convert, "convert another framework's checkpoint (e.g. RoboVLMs) into a run folder"),
    "export": (cmd_export, "export a run as a folder to share: weights, config, reports and a model card"),
    "push": (cmd_push, "export a run and upload it to a Hugging Face hub model repo"),
    "pretrain": (cmd_pretrain, "pre-train a backbone's own weights (kosmos: grounding on the synthetic scenes)"),
}


def main_help() -> str:
    from robovla import __version__

    lines = [f"robo-run {__version__}: vision-language models as robot policies", "",
             "usage: robo-run [COMMAND] [FLAGS]   (no command means train)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `robo-run COMMAND --help` for a command's flags. Flags of train and config:", ""]
    return "\n".join(lines) + run_help("train", [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "train"
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    elif argv and argv[0] in ("-V", "--version"):
        from robovla import __version__

        print(f"robo-run {__version__}")
        return 0
    elif argv and not argv[0].startswith("-"):
        print(f"robo-run: error: {_unknown_command(argv[0])}", file=sys.stderr)
        return 2
    try:
        if command != "plugins" and preflight.first_process():  # plugins shows it in its table
            for clash in registry().clashes:  # once per command, not once per process it launches
                print(f"robo-run: warning: {clash}", file=sys.stderr)
        if command in ("train", "config") and any(a in ("-h", "--help") for a in argv):
            print(main_help() if command == "train" and argv in (["-h"], ["--help"]) else run_help(command, argv))
            return 0
        return COMMANDS[command][0](argv)
    except (ConfigError, UnknownNameError) as exc:  # the command line or its files: usage errors
        print(f"robo-run {command}: error: {exc}", file=sys.stderr)
        return 2
    except RobovlaError as exc:
        print(f"robo-run {command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a real Ctrl-C (a plugin's own KeyboardInterrupt is contained where it runs)
        print(f"robo-run {command}: interrupted", file=sys.stderr)
        return 130


def _unknown_command(name: str) -> str:
    from robovla.errors import unknown

    return str(unknown("command", name, COMMANDS, "Run `robo-run --help` for the grammar."))


if __name__ == "__main__":
    sys.exit(main())
