"""``robo-run data``: check a dataset's files and compute its statistics.

    robo-run data check PATH [--dataset NAME] [--window T] [--json]
    robo-run data stats PATH [--dataset NAME] [--json]
    robo-run data synth --out DIR [--episodes N] [--seed S] [--dataset NAME]
    robo-run data cache PATH [--out DIR] [--dataset NAME]
    robo-run data export --to FORMAT PATH OUT [--dataset NAME] [--OPTION VALUE ...]

The dataset reader is a plugin (``--dataset``, default: the default preset's dataset) and
is built with ``path = PATH``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from robovla import registry_file
from robovla.errors import ConfigError, RobovlaError
from robovla.flags import capable_plugin, new_folder, read_options
from robovla.frame_cache import CACHE_DIR
from robovla.registry import create, get_component

STATS_FILE = "robovla_stats.json"
WINDOW_MAX = 1024  # as --train.window
EPISODES_MAX = 100_000  # as --dataset.synthesize
SEED_END = 2 ** 32  # numpy's seeds


def _within(args: argparse.Namespace, flag: str, low: int, high: int, what: str) -> None:
    """Refuse ``--flag`` outside [low, high] as a usage error naming the flag."""
    value = getattr(args, flag)
    if not low <= value <= high:
        raise ConfigError([f"--{flag} {value}: {what} is an integer from {low} to {high}; pass one in that range"],
                          header="cannot parse the command line")


def _parser(name: str, help: str, path: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"robo-run data {name}", description=help)
    if path:
        p.add_argument("path", type=Path, help="the dataset folder (for CALVIN: a training/ or validation/ folder)")
    default = (registry_file.preset(registry_file.default_preset()).get("dataset") or {}).get("name")
    p.add_argument("--dataset", default=default, help=f"dataset reader plugin (default: {default})")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    return p


def _open(args: argparse.Namespace) -> Any:
    if not args.dataset:
        raise RobovlaError("no dataset reader chosen; pass --dataset NAME (robo-run plugins lists them)")
    return create("dataset", args.dataset, {"path": str(args.path)})


def cmd_check(argv: list[str]) -> int:
    p = _parser("check", "Validate a dataset's files and report every problem with its file and key.")
    p.add_argument("--window", type=int, default=8, help="T, to count the training samples (default 8)")
    args = p.parse_args(argv)
    _within(args, "window", 1, WINDOW_MAX, "the window T (frames per training sample)")
    from robovla.windows import sample_counts

    dataset = _open(args)
    problems = dataset.check()
    try:
        counts = dataset.describe()
        counts["samples"] = int(sample_counts(dataset.segments(), args.window).sum())
    except RobovlaError:  # what made it unreadable is among the problems
        counts = {}
    try:
        mapping = dataset.mapping()
    except RobovlaError:  # among the problems too
        mapping = {}
    report = {"frames": counts.get("frames"), "segments": counts.get("segments"),
              "annotations": counts.get("annotations"), "samples": counts.get("samples"), "mapping": mapping,
              "problems": [{"file": q.file, "key": q.key, "message": q.message} for q in problems]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.path}: " + ", ".join(f"{v} {k}" for k, v in report.items()
                                           if k not in ("problems", "mapping") and v is not None)
              + f" (window {args.window})")
        width = max(map(len, mapping), default=0)
        for part, source in mapping.items():
            print(f"  {part:<{width}} <- {source}")
        for q in problems:
            print(f"  {q.file}" + (f" [{q.key}]" if q.key else "") + f": {q.message}")
        print(f"{len(problems)} problem{'s' * (len(problems) != 1)}")
    return 1 if problems else 0


def cmd_stats(argv: list[str]) -> int:
    args = _parser("stats", f"Per-dimension statistics of robot_obs and the actions of the annotated frames; "
                            f"written to PATH/{STATS_FILE}.").parse_args(argv)
    from tqdm import tqdm

    from robovla.frame_cache import frame_blocks, merged_ranges
    from robovla.stats import RunningStats

    dataset = _open(args)
    blocks = list(frame_blocks(merged_ranges(dataset.segments())))
    stats: dict[str, RunningStats] = {}
    with tqdm(total=sum(b - a + 1 for a, b in blocks), unit="frame", desc="stats", file=sys.stderr) as bar:
        for a, b in blocks:
            frames = dataset.load(a, b)
            for key, rows in [("robot_obs", frames.robot_obs), *frames.actions.items()]:
                stats.setdefault(key, RunningStats(rows.shape[-1])).update(rows)
            bar.update(b - a + 1)
    result = {key: s.result() for key, s in stats.items()}
    (args.path / STATS_FILE).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key, r in result.items():
        print(f"{key} ({int(r['count'][0])} frames)")
        print(f"  {'dim':>3} " + " ".join(f"{c:>10}" for c in ("mean", "std", "min", "q01", "q99", "max")))
        for d in range(len(r["mean"])):
            print(f"  {d:>3} " + " ".join(f"{r[c][d]:>10.4f}" for c in ("mean", "std", "min", "q01", "q99", "max")))
    print(f"written to {args.path / STATS_FILE}")
    return 0


def cmd_synth(argv: list[str]) -> int:
    p = _parser("synth", "Write the dataset format's synthetic task (a dataset capability: `synthesize`).",
                path=False)
    p.add_argument("--out", type=Path, required=True, help="folder to write (training/ and validation/ inside)")
    p.add_argument("--episodes", type=int, default=200, help="training episodes (default 200)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same files (default 0)")
    args = p.parse_args(argv)
    _within(args, "episodes", 1, EPISODES_MAX, "the number of training episodes")
    _within(args, "seed", 0, SEED_END - 1, "the seed")
    new_folder(f"--out {args.out}", args.out, "synth writes a new dataset there and would mix it with (or "
               "overwrite) what is there")
    cls = get_component("dataset", args.dataset).load()
    if not callable(getattr(cls, "synthesize", None)):
        raise RobovlaError(f"dataset {args.dataset!r} has no synthetic task (its class defines no `synthesize`)")
    counts = cls.synthesize(args.out, args.episodes, args.seed)
    print(json.dumps(counts) if args.json else "\n".join(
        f"{args.out / split}: {c['episodes']} episodes, {c['frames']} frames" for split, c in counts.items()))
    return 0


def cmd_cache(argv: list[str]) -> int:
    p = _parser("cache", "Build the frame cache of the frames the dataset's windows touch (also built on first use).")
    p.add_argument("--out", type=Path, default=None, help=f"cache folder (default: PATH/{CACHE_DIR})")
    args = p.parse_args(argv)
    from robovla.frame_cache import CacheFolderError, CachedDataset, cache_folder

    try:
        cache_folder(args.out or args.path / CACHE_DIR)  # refused before the dataset is read
    except CacheFolderError as exc:
        raise CacheFolderError(f"{'--out ' if args.out else 'the default cache folder '}{exc}") from None
    cached = CachedDataset(_open(args), args.out or args.path / CACHE_DIR)  # builds under a lock unless current
    size = sum(f.stat().st_size for f in cached.folder.iterdir())
    state = "built" if cached.built else "up to date"
    print(f"{cached.folder}: {state}, {len(cached.arrays['robot_obs'])} frames, {size / 2**20:.1f} MiB")
    return 0


def cmd_export(argv: list[str]) -> int:
    """Write a split in another dataset format: the format's dataset class writes it (a dataset
    capability: a classmethod ``write(source, out, options, source_name)`` and the options model
    ``WriteOptions``, whose fields become this command's flags)."""
    p = _parser("export", "Write a dataset split in another format (--to lerobot: a LeRobotDataset v3.0, one "
                "episode per language-annotated segment, its instruction the task).")
    p.add_argument("out", type=Path, help="the new dataset folder (new or empty)")
    p.add_argument("--to", required=True, help="the dataset format to write (a dataset plugin that can write, "
                   "e.g. lerobot); `robo-run data export --to FORMAT --help` lists its options")
    name, writer, options_model = capable_plugin(p, argv, "--to", "dataset", "write", "WriteOptions")
    args = p.parse_args(argv)
    new_folder(f"OUT {args.out}", args.out, "export writes a new dataset there")
    options = read_options(args, options_model)
    counts = writer.write(_open(args), args.out, options, args.dataset)
    print(json.dumps(counts) if args.json else f"{args.out}: {counts['episodes']} episodes, {counts['frames']} frames"
          f", {counts.get('tasks', '?')} tasks, as dataset {name!r}; train on it with --dataset {name} "
          f"--dataset.path {args.out}")
    return 0


COMMANDS = {"check": cmd_check, "stats": cmd_stats, "synth": cmd_synth, "cache": cmd_cache, "export": cmd_export}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[1] if argv else __doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        from robovla.errors import unknown

        raise unknown("data command", argv[0], COMMANDS)
    return COMMANDS[argv[0]](argv[1:])
