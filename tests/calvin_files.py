"""Write small splits in CALVIN's exact on-disk format, for loader and check tests.

Frame ids are global (the debug split's first is 358482); vectors are float64, images
uint8 at CALVIN's sizes; ranges and annotation ends are inclusive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIRST = 358482


def rel_action(frame: int) -> np.ndarray:
    """A distinct, recognisable rel_actions vector per frame: arm values in [-1, 1], gripper +-1."""
    arm = np.sin(frame * np.arange(1, 7) * 0.37)
    return np.concatenate([arm, [1.0 if frame % 3 else -1.0]])


def write_split(root: Path, recordings: list[tuple[int, int]], annotations: list[tuple[int, int, str, str]],
                seed: int = 0, scenes: dict[str, tuple[int, int]] | None = None) -> Path:
    """Write frames for each inclusive (start, end) recording, the language annotations and,
    when given, scene_info.npy (scene name -> inclusive frame-id range)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ramp = np.add.outer(np.arange(200), np.arange(200))[:, :, None]  # texture, so that shifts show
    for start, end in recordings:
        for frame in range(start, end + 1):
            robot_obs = np.concatenate([rng.uniform(-0.3, 0.3, 3), [3.09, -0.03, 1.5], [0.08],
                                        rng.uniform(-1, 1, 7), [1.0]])
            np.savez_compressed(
                root / f"episode_{frame:07d}.npz",
                rgb_static=((frame + ramp + np.zeros(3, int)) % 256).astype(np.uint8),
                rgb_gripper=((frame * 7 + ramp[:84, :84] + np.zeros(3, int)) % 256).astype(np.uint8),
                robot_obs=robot_obs.astype(np.float64),
                actions=np.concatenate([robot_obs[:6], [1.0]]).astype(np.float64),
                rel_actions=rel_action(frame).astype(np.float64),
                scene_obs=np.zeros(24, np.float64),
            )
    np.save(root / "ep_start_end_ids.npy", np.asarray(recordings, dtype=np.int64))
    np.save(root / "ep_lens.npy", np.asarray([e - s + 1 for s, e in recordings], dtype=np.int64))
    (root / "lang_annotations").mkdir(exist_ok=True)
    ann = {"language": {"ann": [a[2] for a in annotations], "task": [a[3] for a in annotations],
                        "emb": np.zeros((len(annotations), 1, 384), np.float32)},
           "info": {"indx": [(a[0], a[1]) for a in annotations], "episodes": []}}
    np.save(root / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    if scenes is not None:
        np.save(root / "scene_info.npy", {k: list(v) for k, v in scenes.items()}, allow_pickle=True)
    return root
