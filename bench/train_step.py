"""Training-step speed, memory and MFU of the recipe's models, on Lightning Fabric as in training.

    python bench/train_step.py [--backbones kosmos,paligemma] [--size full] [--precisions bf16-mixed,bf16-true]
                               [--modes full,lora] [--batch 8] [--window 8] [--steps 10] [--device cuda]
                               [--quick] [--json]

Each row builds the backbone (random weights; ``full`` is the published architecture) with
both cameras, the lstm head (T=8, C=10 unless told otherwise) and [LRN], sets up full
fine-tuning or LoRA (r=64 on the language model) as ``robo-run`` does, wraps model and AdamW
(fused on CUDA) with Fabric at the given precision, and times ``--steps`` optimizer steps on a
fixed batch of B windows after two warm-up steps (input already on the device: this is the
model's speed, bench/data_throughput.py is the loader's). Reported per row: step time,
samples/s, peak memory (CUDA only), the model FLOPs of one step (counted by
torch.utils.flop_counter on the same step: matmuls, convolutions and attention, forward and
backward), and MFU = FLOPs per step / step time / the matmul peak measured in the same run
(bf16 on CUDA, fp32 on CPU; 8192^3 products, best of 5). ``--quick`` is the CPU check the
test suite runs: kosmos tiny, B=2, T=2, 32-true, full and LoRA, 2 steps.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch


def matmul_peak(device: str, dtype: torch.dtype, n: int = 8192, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` n x n x n products in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_batch(b: int, t: int, c: int, size: int, device: str) -> Any:
    from robovla.batch import Batch

    g = torch.Generator().manual_seed(0)
    images = {cam: torch.randint(0, 256, (b, t, size, size, 3), generator=g, dtype=torch.uint8)
              for cam in ("gripper", "static")}
    actions = torch.cat([torch.rand(b, t, c, 6, generator=g) * 2 - 1, (torch.rand(b, t, c, 1, generator=g) > 0.5)
                         .float()], -1)
    words = ["open the drawer", "push the sliding door to the left side", "lift the red block from the table"]
    batch = Batch(images=images, instruction=[words[i % len(words)] for i in range(b)],
                  robot_obs=torch.zeros(b, t, 15), actions=actions, action_mask=torch.ones(b, t, c, dtype=torch.bool),
                  frame_mask=torch.ones(b, t, dtype=torch.bool))
    return batch.to(device)


def build(backbone: str, size: str, mode: str, t: int, c: int) -> Any:
    import robovla
    from robovla import finetune
    from robovla.config import LoraConfig, TrainConfig
    from robovla.head import Dims
    from robovla.vla import VLA

    options = {"cameras": ["gripper", "static"], **({"weights": "random"} if size == "full" else {"size": size})}
    torch.manual_seed(0)
    bb = robovla.create("backbone", backbone, options)
    vla = VLA(bb, robovla.create("head", "lstm", {}, dims=Dims(D=bb.hidden_size, T=t, C=c)))
    finetune.setup(vla, TrainConfig(window=t, chunk=c), LoraConfig(enabled=mode == "lora", r=64))
    return vla


def measure(backbone: str, size: str, precision: str, mode: str, args: argparse.Namespace, peak: float) -> dict:
    from lightning_fabric import Fabric
    from torch.utils.flop_counter import FlopCounterMode

    fabric = Fabric(accelerator="cuda" if args.device.startswith("cuda") else "cpu", devices=1, precision=precision)
    with fabric.init_module():
        vla = build(backbone, size, mode, args.window, args.chunk)
    params = [p for p in vla.parameters() if p.requires_grad]
    fused = {"fused": True} if args.device.startswith("cuda") else {}
    optimizer = torch.optim.AdamW(params, lr=1e-5, **fused)
    model, optimizer = fabric.setup(vla, optimizer)
    model.mark_forward_method("loss")
    batch = make_batch(args.batch, args.window, args.chunk, vla.backbone.image_size, str(fabric.device))

    def step() -> None:
        loss, _ = model.loss(batch)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    step()
    counter = FlopCounterMode(display=False)
    with counter:  # forward and backward of one step (the optimizer's elementwise work is not counted)
        loss, _ = model.loss(batch)
        fabric.backward(loss)
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else None
    return {"backbone": backbone, "size": size, "precision": precision, "mode": mode, "batch": args.batch,
            "window": args.window, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "parameters": sum(p.numel() for p in vla.parameters()), "trainable": sum(p.numel() for p in params),
            "step_s": seconds, "samples_per_s": args.batch / seconds, "peak_memory_gib": memory,
            "flops_per_step": flops, "matmul_peak_tflops": peak / 1e12, "mfu": flops / seconds / peak}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="kosmos,paligemma", help="comma-separated backbone names")
    parser.add_argument("--size", default="full", help="full (random weights), small or tiny")
    parser.add_argument("--precisions", default="bf16-mixed,bf16-true", help="comma-separated Fabric precisions")
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full (fine-tuning), lora")
    parser.add_argument("--batch", type=int, default=8, help="B")
    parser.add_argument("--window", type=int, default=8, help="T")
    parser.add_argument("--chunk", type=int, default=10, help="C")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    parser.add_argument("--quick", action="store_true", help="kosmos tiny, B=2, T=2, 32-true, CPU, 2 steps")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.backbones, args.size, args.precisions, args.batch, args.window, args.chunk, args.steps, args.device = \
            "kosmos", "tiny", "32-true", 2, 2, 3, 2, "cpu"
    cuda = args.device.startswith("cuda")
    peak = matmul_peak(args.device, torch.bfloat16 if cuda else torch.float32, n=8192 if cuda else 1024)
    rows = []
    for backbone in args.backbones.split(","):
        for precision in args.precisions.split(","):
            for mode in args.modes.split(","):
                rows.append(measure(backbone, args.size, precision, mode, args, peak))
                if cuda:
                    torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    print(f"device: {rows[0]['device']}; matmul peak {rows[0]['matmul_peak_tflops']:.1f} TFLOP/s "
          f"({'bf16' if cuda else 'fp32'}, measured)")
    print(f"{'backbone':<10} {'precision':<10} {'mode':<5} {'trainable':>14} {'step s':>8} {'samples/s':>10} "
          f"{'peak GiB':>9} {'TFLOP/step':>11} {'MFU':>6}")
    for r in rows:
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['backbone']:<10} {r['precision']:<10} {r['mode']:<5} {r['trainable']:>14,} {r['step_s']:>8.3f} "
              f"{r['samples_per_s']:>10.1f} {memory:>9} {r['flops_per_step'] / 1e12:>11.2f} {100 * r['mfu']:>5.1f}%")
    return rows


if __name__ == "__main__":
    main()
