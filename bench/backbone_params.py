"""Parameters per group of the built-in backbones at full size, full fine-tuning and LoRA.

    python bench/backbone_params.py [--lora-r 64] [--lora-targets default|all-linear]

The published architectures with random weights, built on the meta device (no memory, a
few seconds): Kosmos-2 (kosmos-2-patch14-224) and PaLI-Gemma (paligemma-3b-pt-224), each
with [LRN]; heads are counted by bench/head_params.py.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import robovla
from robovla import finetune
from robovla.config import LoraConfig, TrainConfig
from robovla.vla import VLA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora-r", type=int, default=64, help="LoRA rank (the recipe's configs say 64)")
    parser.add_argument("--lora-targets", choices=["default", "all-linear"], default="default",
                        help="default: the language model's attention and MLP projections")
    args = parser.parse_args()
    targets = None if args.lora_targets == "default" else "all-linear"
    for name in ("kosmos", "paligemma"):
        for lora in (False, True):
            with torch.device("meta"):
                vla = VLA(robovla.create("backbone", name, {"weights": "random"}), nn.Identity())
                finetune.setup(vla, TrainConfig(), LoraConfig(enabled=lora, r=args.lora_r, targets=targets))
            print(f"\n{name}, {'LoRA r=%d (%s)' % (args.lora_r, args.lora_targets) if lora else 'full fine-tuning'}:")
            print("\n".join("  " + line for line in finetune.summary(vla)))


if __name__ == "__main__":
    main()
