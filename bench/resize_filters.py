"""How far each resize filter is from PIL's bicubic, the resize the VLMs' own image processors
and RoboVLMs' loaders apply, on CALVIN's camera sizes (static 200x200, gripper 84x84 -> 224).

    python bench/resize_filters.py [--repeats 20]

Images: the synthetic task's two cameras (flat colours with camera noise), a smooth colour
field (the case the filter kernel matters most for after upscaling), and uniform noise
(the worst case). For each filter of ``robovla.loader.resize``, the largest difference to
PIL's bicubic in grey levels and in the backbone's normalised units (CLIP's smallest std,
0.2686), and the time per frame, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from robovla.loader import RESIZE_FILTERS, resize
from robovla_plugins.datasets.calvin.synthetic import make_scene, observe

CLIP_STD = 0.26130258  # the smallest of CLIP's three stds: the largest step in normalised units


def smooth(n: int, phase: float = 0.0) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n] / n
    img = np.stack([127.5 + 127.5 * np.sin(2 * np.pi * (1.3 * x + 0.7 * y) + phase),
                    127.5 + 127.5 * np.cos(2 * np.pi * (2.1 * x - y)), 255 * x * y], axis=-1)
    return img.round().clip(0, 255).astype(np.uint8)


def images() -> dict[str, np.ndarray]:
    """name -> uint8 [8, n, n, 3] frames."""
    rng = np.random.default_rng(0)
    scene = make_scene(0, 1)
    frames = [observe(scene, rng.uniform(-0.2, 0.2, 2), 1.0, rng)[0] for _ in range(8)]
    out = {"synthetic static 200": np.stack([f["static"] for f in frames]),
           "synthetic gripper 84": np.stack([f["gripper"] for f in frames])}
    for n in (200, 84):
        out[f"smooth {n}"] = np.stack([smooth(n, phase=k / 8) for k in range(8)])
        out[f"noise {n}"] = rng.integers(0, 256, (8, n, n, 3), dtype=np.uint8)
    return out


def pil_bicubic(frames: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224, help="output side (default 224)")
    p.add_argument("--repeats", type=int, default=20, help="timing repeats (default 20)")
    args = p.parse_args()
    print(f"largest |filter - PIL bicubic| to {args.size}x{args.size}: grey levels (normalised units)")
    header = f"{'image':<22}" + "".join(f"{f:>20}" for f in RESIZE_FILTERS)
    print(header)
    timings = {f: [] for f in RESIZE_FILTERS}
    for name, frames in images().items():
        ref = pil_bicubic(frames, args.size).astype(int)
        row = f"{name:<22}"
        for f in RESIZE_FILTERS:
            gap = int(np.abs(resize(frames, args.size, f).astype(int) - ref).max())
            row += f"{gap:>9} ({gap / 255 / CLIP_STD:.4f})"
            start = time.perf_counter()
            for _ in range(args.repeats):
                resize(frames, args.size, f)
            timings[f].append((time.perf_counter() - start) / args.repeats / len(frames))
        print(row)
    print("time per frame: " + ", ".join(f"{f} {1e3 * np.mean(t):.2f} ms" for f, t in timings.items())
          + f" (ratio bicubic / bilinear {np.mean(timings['bicubic']) / np.mean(timings['bilinear']):.1f}x)")


if __name__ == "__main__":
    main()
