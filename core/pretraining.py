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

from robovla.flags import capable_plugin, new_folder, read_options


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="robo-run pretrain", description=(
        "Pre-train a backbone and write it as a folder that --backbone.path loads. `robo-run pretrain --backbone "
        "NAME --help` lists that backbone's options."))
    p.add_argument("out", type=Path, help="the new folder for the weights (new or empty)")
    p.add_argument("--backbone", required=True, help="the backbone plugin that pre-trains (e.g. kosmos)")
    p.add_argument("--json", action="store_true", help="print the record as JSON for machines")
    name, cls, options_model = capable_plugin(p, argv, "--backbone", "backbone", "pretrain", "PretrainOptions")
    args = p.parse_args(argv)
    new_folder(f"OUT {args.out}", args.out, "pretrain writes its weights there")
    record = cls.pretrain(read_options(args, options_model), args.out)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    final = record.get("final", {})
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items())
    print(f"{args.out}: pre-trained {name} ({shown}); record in {args.out / 'pretrain.json'}\n"
          f"train a policy on it: robo-run --backbone {name} --backbone.path {args.out} ...")
    return 0
