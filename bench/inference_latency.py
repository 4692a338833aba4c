"""Control-step latency of a policy at batch 1: history caching against re-encoding the window.

    python bench/inference_latency.py [--backbones kosmos,paligemma] [--sizes tiny,small]
                                      [--heads scaled,recipe] [--steps 24] [--repeats 3]
                                      [--device cpu] [--quick] [--json]

Same model, same process, same frames. ``cached`` is :meth:`robovla.Policy.act`: one VLM
pass over the new frame, the head stepping its own history (the LSTM re-reads its last T
features once the window is full). ``recompute`` re-encodes the whole window of the last T
frames every step (the VLM over T frames, then the head's forward over them), what a policy
without a feature history must do. Both are timed in steady state (after T warm-up steps),
interleaved in rounds so that machine noise hits them alike; the median step time of each
and their ratio are printed.

Models: the backbone at the named size with random weights, both cameras at CALVIN's sizes
(static 200, gripper 84 px), and the lstm head (T=8, C=10) either as the recipe builds it
for Kosmos-2 (``recipe``: LSTM 1024 x 4 layers, MLPs 1024-512-256, 41M parameters at
D=2048) or in the recipe's proportions to the backbone's hidden size D (``scaled``: LSTM
D/2 x 4 layers, MLPs D/2-D/4-D/8; at full size the two are the same head). Both modes pay
the head's exact sliding window (T LSTM row-steps a step); with the recipe's head on a tiny
backbone that head dominates. ``--quick`` runs kosmos tiny, scaled head, a few steps (what
the test suite runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import robovla
from robovla.env import Observation
from robovla.head import Dims
from robovla.vla import VLA


def policy_for(backbone: str, size: str, head: str, device: str) -> robovla.Policy:
    """Backbone ``size`` (tiny, small, or full with random weights), both cameras, and the lstm
    head (T=8, C=10) as the recipe builds it or in its proportions to D (module docstring)."""
    options = {"cameras": ["gripper", "static"], **({"weights": "random"} if size == "full" else {"size": size})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bb = robovla.create("backbone", backbone, options)
        d = bb.hidden_size
        config = {} if head == "recipe" else {"hidden_size": d // 2, "mlp_widths": [d // 2, d // 4, d // 8]}
        vla = VLA(bb, robovla.create("head", "lstm", config, dims=Dims(D=d, T=8, C=10))).to(device)
    return robovla.Policy(vla, robovla.create("action_space", "rel-world", {}))


def frames(n: int, seed: int = 0) -> list[Observation]:
    rng = np.random.default_rng(seed)
    return [Observation({"static": rng.integers(0, 256, (200, 200, 3), dtype=np.uint8),
                         "gripper": rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)},
                        rng.normal(size=15)) for _ in range(n)]


def recompute_step(policy: robovla.Policy, window: list[Observation], instruction: str) -> np.ndarray:
    """The whole window [1, T] through the VLM and the head; the last step's first action, decoded."""
    vla = policy.vla
    images = {cam: torch.stack([x[cam][0] for x in (policy._images([o]) for o in window)], 1)
              for cam in policy.cameras}  # camera -> uint8 [1, T, S, S, 3]
    with torch.no_grad():
        chunk = vla.head.actions(vla.head(vla.features(images, [instruction])))[0, -1]  # [C, A]
    return policy.action_space.decode(chunk[0].float().cpu().numpy().astype(np.float64), window[-1].robot_obs)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(policy: robovla.Policy, steps: int, repeats: int, device: str) -> dict[str, float]:
    t = policy.vla.head.dims.T
    stream = frames(t + steps)
    instruction = "push the sliding door to the left side"
    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    for _ in range(repeats):
        policy.reset()
        for o in stream[:t]:  # warm-up: fill the history
            policy.act(o, instruction)
        sync(device)
        start = time.perf_counter()
        for o in stream[t:]:
            policy.act(o, instruction)
        sync(device)
        times["cached"].append((time.perf_counter() - start) / steps)
        recompute_step(policy, stream[:t], instruction)  # warm-up
        sync(device)
        start = time.perf_counter()
        for i in range(t, t + steps):
            recompute_step(policy, stream[i - t + 1:i + 1], instruction)
        sync(device)
        times["recompute"].append((time.perf_counter() - start) / steps)
    cached, full = statistics.median(times["cached"]), statistics.median(times["recompute"])
    return {"cached_ms": 1e3 * cached, "recompute_ms": 1e3 * full, "speedup": full / cached}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="kosmos,paligemma", help="comma-separated backbone names")
    parser.add_argument("--sizes", default="tiny,small", help="comma-separated: tiny, small, full (random weights)")
    parser.add_argument("--heads", default="scaled,recipe", help="comma-separated: scaled, recipe (docstring)")
    parser.add_argument("--steps", type=int, default=24, help="timed steps per round, after T warm-up steps")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="kosmos tiny, scaled head, 4 steps, 1 round (the test "
                                                            "suite's run)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbones, args.sizes, args.heads, args.steps, args.repeats = "kosmos", "tiny", "scaled", 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for backbone in args.backbones.split(","):
        for size in args.sizes.split(","):
            for head in args.heads.split(","):
                policy = policy_for(backbone, size, head, args.device)
                rows.append({"backbone": backbone, "size": size, "head": head, "device": args.device,
                             "parameters": sum(p.numel() for p in policy.vla.parameters()),
                             "head_parameters": sum(p.numel() for p in policy.vla.head.parameters()),
                             **measure(policy, args.steps, args.repeats, args.device)})
                del policy
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'backbone':<10} {'size':<6} {'head':<7} {'params':>13} {'head params':>12} {'cached ms':>10} "
              f"{'recompute ms':>13} {'speed-up':>9}")
        for r in rows:
            print(f"{r['backbone']:<10} {r['size']:<6} {r['head']:<7} {r['parameters']:>13,} {r['head_parameters']:>12,} "
                  f"{r['cached_ms']:>10.2f} {r['recompute_ms']:>13.2f} {r['speedup']:>8.2f}x")
    return rows


if __name__ == "__main__":
    main()
