"""``robo-run pretrain``: make a backbone's own pre-trained weights.

    robo-run pretrain --backbone NAME OUT [--OPTION VALUE ...] [--json]

A backbone that can pre-train itself says so with two class attributes: ``PretrainOptions``
(a pydantic model, whose fields become this command's flags) and a classmethod
``pretrain(options, out)`` that trains, writes a folder ``--backbone.path OUT`` loads, and
returns a record of what it did (JSON-able; ``final`` holds the last measurements). The
Kosmos-2 plugin's is grounding pre-training on the synthetic task's scenes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robovla.errors import ConfigError, RobovlaError
from robovla.flags import add_option_flags, read_options


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="robo-run pretrain", description=(
        "Pre-train a backbone and write it as a folder that --backbone.path loads. `robo-run pretrain --backbone "
        "NAME --help` lists that backbone's options."))
    p.add_argument("out", type=Path, help="the new folder for the weights (new or empty)")
    p.add_argument("--backbone", required=True, help="the backbone plugin that pre-trains (e.g. kosmos)")
    p.add_argument("--json", action="store_true", help="print the record as JSON for machines")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backbone")
    known = pre.parse_known_args(argv)[0]
    if known.backbone is None:
        p.parse_args(argv)  # --help, or the error that --backbone is required
    from robovla.registry import get_component

    cls = get_component("backbone", known.backbone).load()
    options_model = getattr(cls, "PretrainOptions", None)
    if not callable(getattr(cls, "pretrain", None)) or options_model is None:
        raise RobovlaError(f"backbone {known.backbone!r} cannot pre-train (its class defines no `pretrain` and "
                           "`PretrainOptions`); choose one that can, e.g. --backbone kosmos")
    add_option_flags(p, options_model)
    args = p.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ConfigError([f"OUT {args.out}: exists and is not an empty folder; pretrain writes its weights there: "
                           "pass a new or empty folder"], header="cannot parse the command line")
    record = cls.pretrain(read_options(args, options_model), args.out)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    final = record.get("final", {})
    shown = ", ".join(f"{k} {v}" for k, v in final.items())
    print(f"{args.out}: pre-trained {known.backbone} ({shown}); record in {args.out / 'pretrain.json'}\n"
          f"train a policy on it: robo-run --backbone {known.backbone} --backbone.path {args.out} ...")
    return 0
