"""Parameter counts of every registered policy head at full size.

    python bench/head_params.py [--D 2048] [--T 8] [--C 10]

Builds each head with its default config for Dims(D, K=1, T, C, A=7) (the recipe's sizes:
Kosmos-2 and PaLI-Gemma hidden 2048, window 8, chunk 10) and prints its trainable
parameters; for the ``lstm`` head also the ratio to the recipe's 41.2M (RoboVLMs
LSTMDecoder: LSTM 37.8M, arm MLP 1.72M, gripper MLP 1.71M).
"""

from __future__ import annotations

import argparse

import torch

import robovla

RECIPE_LSTM = 41.2e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--D", type=int, default=2048, help="feature size (the backbone's hidden size)")
    parser.add_argument("--T", type=int, default=8, help="window")
    parser.add_argument("--C", type=int, default=10, help="chunk")
    args = parser.parse_args()
    dims = robovla.Dims(D=args.D, T=args.T, C=args.C)
    print(f"Dims(D={dims.D}, K={dims.K}, T={dims.T}, C={dims.C}, A={dims.A}), default configs")
    print(f"{'head':<16} {'parameters':>13} {'millions':>9}  provider")
    for name in robovla.list_components("head"):
        with torch.device("meta"):  # sizes only: no memory, no initialization time
            head = robovla.create("head", name, dims=dims)
        count = sum(p.numel() for p in head.parameters() if p.requires_grad)
        note = f"  ({count / RECIPE_LSTM:.4f} x the recipe's 41.2M)" if name == "lstm" else ""
        provider = robovla.get_component("head", name).plugin.distribution
        print(f"{name:<16} {count:>13,} {count / 1e6:>9.2f}  {provider}{note}")


if __name__ == "__main__":
    main()
