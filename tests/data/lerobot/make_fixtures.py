"""Write the LeRobotDataset v3.0 fixtures in this folder with lerobot's own writer.

Run with a Python that has ``lerobot==0.4.4`` (it cannot share robovla's environment; see
README.md), not robovla's:

    HF_HUB_OFFLINE=1 /work/lerobot-env/bin/python tests/data/lerobot/make_fixtures.py \
        /tmp/lr-src/training tests/data/lerobot [--episodes 2]

``SRC`` is one split of a task in CALVIN's layout (``episode_%07d.npz`` per frame,
``lang_annotations/auto_lang_ann.npy``); it is read with numpy only. Each language annotation
becomes one LeRobot episode (frames start..end inclusive, the instruction as its task), in
annotation order; the first ``--episodes`` annotations are used.

Writes into ``OUT``:
  reach-video/  use_videos=True  (lerobot 0.4.4's default codec: libsvtav1, crf 30, g 2, yuv420p)
  reach-image/  use_videos=False (PNG per frame, embedded in the data parquet)
  source.npz    the source numbers, frames of all episodes concatenated in episode order
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

FPS = 30  # CALVIN records at 30 Hz; the synthetic task has no rate of its own
ROBOT_TYPE = "synthetic-reach"
STATE_NAMES = ["tcp_x", "tcp_y", "tcp_z", "tcp_roll", "tcp_pitch", "tcp_yaw", "gripper_width",
               *(f"joint_{i}" for i in range(1, 8)), "gripper_action"]
ACTION_NAMES = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"]
IMAGE_NAMES = ["height", "width", "channels"]


def read_source(src: Path, episodes: int | None) -> dict[str, np.ndarray]:
    """The frames of the first ``episodes`` annotations, concatenated, with per-episode lengths."""
    ann = np.load(src / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True).item()
    texts, tasks, indx = ann["language"]["ann"], ann["language"]["task"], ann["info"]["indx"]
    keep = range(len(texts) if episodes is None else min(episodes, len(texts)))
    out: dict[str, list] = {k: [] for k in ("rgb_static", "rgb_gripper", "robot_obs", "rel_actions", "frame_ids")}
    lengths = []
    for e in keep:
        start, end = (int(v) for v in indx[e])
        lengths.append(end - start + 1)
        for frame in range(start, end + 1):
            with np.load(src / f"episode_{frame:07d}.npz") as npz:
                for key in ("rgb_static", "rgb_gripper", "robot_obs", "rel_actions"):
                    out[key].append(npz[key])
            out["frame_ids"].append(frame)
    return {**{k: np.stack(v) for k, v in out.items()},
            "episode_lengths": np.asarray(lengths, np.int64),
            "instructions": np.asarray([str(texts[e]) for e in keep]),  # unicode array: loads without pickle
            "tasks": np.asarray([str(tasks[e]) for e in keep]),
            "fps": np.asarray(FPS)}


def features(source: dict[str, np.ndarray], image_dtype: str) -> dict:
    return {
        "observation.images.static": {"dtype": image_dtype, "shape": source["rgb_static"].shape[1:],
                                      "names": IMAGE_NAMES},
        "observation.images.gripper": {"dtype": image_dtype, "shape": source["rgb_gripper"].shape[1:],
                                       "names": IMAGE_NAMES},
        "observation.state": {"dtype": "float32", "shape": (len(STATE_NAMES),), "names": STATE_NAMES},
        "action": {"dtype": "float32", "shape": (len(ACTION_NAMES),), "names": ACTION_NAMES},
    }


def write(root: Path, repo_id: str, source: dict[str, np.ndarray], use_videos: bool) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if root.exists():
        shutil.rmtree(root)
    ds = LeRobotDataset.create(repo_id=repo_id, fps=FPS, root=root, robot_type=ROBOT_TYPE,
                               features=features(source, "video" if use_videos else "image"),
                               use_videos=use_videos)  # every other argument at lerobot's default
    i = 0
    for length, instruction in zip(source["episode_lengths"], source["instructions"]):
        for _ in range(length):
            ds.add_frame({"observation.images.static": source["rgb_static"][i],
                          "observation.images.gripper": source["rgb_gripper"][i],
                          "observation.state": source["robot_obs"][i].astype(np.float32),
                          "action": source["rel_actions"][i].astype(np.float32),
                          "task": str(instruction)})
            i += 1
        ds.save_episode()
    ds.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="a split folder in CALVIN's layout (e.g. .../training)")
    parser.add_argument("out", type=Path, help="the fixture folder (tests/data/lerobot)")
    parser.add_argument("--episodes", type=int, default=None, help="the first N annotations only (default: all)")
    args = parser.parse_args()
    source = read_source(args.src, args.episodes)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "source.npz", **source)
    write(args.out / "reach-video", "robovla/synthetic-reach-video", source, use_videos=True)
    write(args.out / "reach-image", "robovla/synthetic-reach-image", source, use_videos=False)
    print(f"{len(source['episode_lengths'])} episodes, lengths {source['episode_lengths'].tolist()}, "
          f"{len(source['frame_ids'])} frames -> {args.out}")


if __name__ == "__main__":
    main()
