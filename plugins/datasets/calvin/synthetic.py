"""A learnable synthetic task in CALVIN's exact layout, and the environment that runs it.

A table seen from above (static camera, 200x200) and from a TCP-centred wide gripper
camera (84x84, the whole table in view) holds three blocks of distinct colours at random
positions. The instruction names one block ("move to the red block", with paraphrases);
the expert moves the TCP to it under CALVIN rel_actions (world-frame deltas, 0.02 m per
unit) and closes the gripper there. Solving it needs the image (where) and the instruction
(which); a policy that ignores the instruction reaches the named block about a third of
the time.

Coordinates are metres in the world frame; the table spans [-TABLE, TABLE] in x and y, the
TCP moves in a plane at height Z with CALVIN's neutral orientation.
"""

from __future__ import annotations

import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

import robovla
from robovla.env import Chain, Observation
from robovla_plugins.datasets.calvin.actions import POS_STEP

TABLE = 0.25  # half-width of the table, metres
BLOCK = 0.05  # block side, metres
Z = 0.5  # TCP height
ORIENTATION = (3.09, -0.03, 1.5)  # CALVIN's neutral TCP Euler angles
JOINTS = (-1.2178, 1.0399, 2.1198, -2.3421, -0.8702, 1.6412, 0.5534)  # CALVIN's neutral joints
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
TEMPLATES = ("move to the {} block", "go to the {} block", "reach the {} block", "bring the gripper to the {} block",
             "grasp the {} block")
REACHED = 0.01  # the expert closes the gripper this close to the target
SUCCESS = 0.03  # success: gripper closed within this distance (x, y) of the named block
HOLD = 3  # frames recorded after the gripper closes
FIRST_FRAME = 358482  # like CALVIN's debug split, ids do not start at 0
NOISE = 3  # camera noise: each pixel channel moves by up to +-NOISE grey levels
CHAIN_SEEDS = 1_000_000  # long-horizon chains start from env seeds here, apart from the episode seeds
CHAIN_LENGTH = 5  # subtasks per chain, as in CALVIN


@dataclass
class Scene:
    """One episode's layout: block colours and positions, the target, the TCP start."""

    colours: list[str]
    blocks: np.ndarray  # [3, 2] x, y
    target: int
    tcp: np.ndarray  # [2]
    template: int

    @property
    def task(self) -> str:
        return f"reach_{self.colours[self.target]}_block"

    @property
    def instruction(self) -> str:
        return TEMPLATES[self.template].format(self.colours[self.target])


def make_scene(*key: int) -> Scene:
    """The scene for a seed key: blocks at least 0.11 m apart, the TCP at least 0.12 m from the target.

    Written episodes use keys (0, seed, episode) and the environment (1, seed), so that an
    evaluation never replays a training layout by accident.
    """
    rng = np.random.default_rng(list(key))
    colours = list(rng.choice(list(COLOURS), 3, replace=False))
    while True:
        blocks = rng.uniform(-TABLE + BLOCK, TABLE - BLOCK, (3, 2))
        gaps = [np.linalg.norm(blocks[i] - blocks[j]) for i in range(3) for j in range(i)]
        if min(gaps) >= 0.11:
            break
    target = int(rng.integers(3))
    while True:
        tcp = rng.uniform(-TABLE, TABLE, 2)
        if np.linalg.norm(tcp - blocks[target]) >= 0.12:
            break
    return Scene(colours, blocks, target, tcp, int(rng.integers(len(TEMPLATES))))


def expert(tcp: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """The expert's rel-world command: full-speed steps toward ``goal``, then close there."""
    delta = (goal - tcp) / POS_STEP
    if np.linalg.norm(goal - tcp) <= REACHED:
        return np.array([0, 0, 0, 0, 0, 0, -1.0])
    arm = np.clip(delta, -1, 1)
    return np.array([arm[0], arm[1], 0, 0, 0, 0, 1.0])


# ---------------------------------------------------------------------------- rendering

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def render(scene: Scene, tcp: np.ndarray, closed: bool, centre: np.ndarray, half_width: float, size: int) -> np.ndarray:
    """A top-down image uint8 [size, size, 3] of the square ``centre +- half_width``."""
    if size not in _GRIDS:
        u = (np.arange(size) + 0.5) / size * 2 - 1
        _GRIDS[size] = np.meshgrid(u, -u)  # x to the right, y up
    gx, gy = _GRIDS[size]
    x, y = centre[0] + gx * half_width, centre[1] + gy * half_width
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (30, 30, 35)
    img[(np.abs(x) <= TABLE) & (np.abs(y) <= TABLE)] = (150, 120, 90)
    for colour, (bx, by) in zip(scene.colours, scene.blocks):
        img[(np.abs(x - bx) <= BLOCK / 2) & (np.abs(y - by) <= BLOCK / 2)] = COLOURS[colour]
    arm, thick = 0.03, max(0.006, half_width / size * 1.5)
    cross = ((np.abs(x - tcp[0]) <= thick) & (np.abs(y - tcp[1]) <= arm)) | \
            ((np.abs(y - tcp[1]) <= thick) & (np.abs(x - tcp[0]) <= arm))
    img[cross] = (90, 90, 90) if closed else (255, 255, 255)
    return img


def observe(scene: Scene, tcp: np.ndarray, gripper: float, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Both camera images (with camera noise) and robot_obs (15) for a TCP position and the
    last gripper command. The noise also gives the files a realistic, not trivially
    compressible, size."""
    closed = gripper < 0
    images = {"static": render(scene, tcp, closed, np.zeros(2), TABLE * 1.1, 200),
              "gripper": render(scene, tcp, closed, tcp, 2 * TABLE, 84)}
    for name, img in images.items():
        noisy = img.astype(np.int16) + rng.integers(-NOISE, NOISE + 1, img.shape, dtype=np.int16)
        images[name] = np.clip(noisy, 0, 255).astype(np.uint8)
    robot_obs = np.array([tcp[0], tcp[1], Z, *ORIENTATION, 0.02 if closed else 0.08, *JOINTS, gripper])
    return images, robot_obs


# ------------------------------------------------------------------------------ writing


def savez(path: Path, **arrays: np.ndarray) -> None:
    """np.savez_compressed's format at zlib level 1: readable by np.load, ten times faster to write."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for key, value in arrays.items():
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def episode(scene: Scene, rng: np.random.Generator) -> list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """The expert's episode: per frame (images, robot_obs, rel_action)."""
    tcp, gripper, frames, held = scene.tcp.copy(), 1.0, [], 0
    while held < HOLD:
        images, robot_obs = observe(scene, tcp, gripper, rng)
        action = expert(tcp, scene.blocks[scene.target])
        frames.append((images, robot_obs, action))
        tcp = tcp + action[:2] * POS_STEP
        gripper = action[6]
        held += gripper < 0
    return frames


def write_split(out: Path, episodes: int, seed: int, first_frame: int = FIRST_FRAME) -> dict[str, int]:
    """Write ``episodes`` expert episodes into ``out`` in CALVIN's layout; returns counts."""
    out.mkdir(parents=True, exist_ok=True)
    frame, ranges, ann = first_frame, [], {"ann": [], "task": [], "indx": []}
    zeros = {"rgb_tactile": np.zeros((160, 120, 6), np.uint8), "depth_static": np.zeros((200, 200), np.float32),
             "depth_gripper": np.zeros((84, 84), np.float32), "depth_tactile": np.zeros((160, 120, 2), np.float32)}
    from tqdm import tqdm

    for e in tqdm(range(episodes), desc=f"writing {out.name}/", unit="episode", dynamic_ncols=True,
                  mininterval=0.5 if sys.stderr.isatty() else 30):
        scene = make_scene(0, seed, e)
        start = frame
        steps = episode(scene, np.random.default_rng([seed, e]))
        scene_obs = np.zeros(24)
        for i, (bx, by) in enumerate(scene.blocks):
            scene_obs[6 + 6 * i: 9 + 6 * i] = (bx, by, Z - 0.1)
        for i, (images, robot_obs, action) in enumerate(steps):
            following = steps[i + 1][1] if i + 1 < len(steps) else robot_obs  # CALVIN: action = next TCP pose
            absolute = np.concatenate([following[:3], ORIENTATION, action[6:]])
            savez(out / f"episode_{frame:07d}.npz", rgb_static=images["static"],
                                rgb_gripper=images["gripper"], actions=absolute.astype(np.float64),
                                rel_actions=action.astype(np.float64), robot_obs=robot_obs.astype(np.float64),
                                scene_obs=scene_obs, **zeros)
            frame += 1
        ranges.append((start, frame - 1))
        ann["ann"].append(scene.instruction)
        ann["task"].append(scene.task)
        ann["indx"].append((start, frame - 1))
    np.save(out / "ep_start_end_ids.npy", np.asarray(ranges, dtype=np.int64))
    np.save(out / "ep_lens.npy", np.asarray([b - a + 1 for a, b in ranges], dtype=np.int64))
    (out / "lang_annotations").mkdir(exist_ok=True)
    np.save(out / "lang_annotations" / "auto_lang_ann.npy", allow_pickle=True, arr={
        "language": {"ann": ann["ann"], "task": ann["task"], "emb": np.zeros((episodes, 1, 384), np.float32)},
        "info": {"indx": ann["indx"], "episodes": []}})
    np.save(out / "scene_info.npy", {"synthetic_reach": [first_frame, frame - 1]}, allow_pickle=True)
    return {"episodes": episodes, "frames": frame - first_frame, "last_frame": frame - 1}


def validation_episodes(episodes: int) -> int:
    """Episodes of the validation split written beside ``episodes`` training ones."""
    return max(episodes // 10, 10)


def write_task(out: Path, episodes: int, seed: int, val_episodes: int | None = None) -> dict[str, Any]:
    """A task folder as CALVIN ships one: ``training/`` and ``validation/`` (other seeds)."""
    val = validation_episodes(episodes) if val_episodes is None else val_episodes
    train = write_split(out / "training", episodes, seed)
    return {"training": train, "validation": write_split(out / "validation", val, seed + 7919,
                                                         first_frame=train["last_frame"] + 1)}


# ---------------------------------------------------------------------------- environment


class SyntheticReach(robovla.Env):
    """The synthetic reach task: reset to a seeded scene, step rel-world commands."""

    safe_in_process = True  # numpy only: instances share nothing

    class Config(robovla.ComponentConfig):
        max_steps: int = Field(60, ge=1, description="steps a policy gets per task before it counts as failed")

    def __init__(self, config: Any):
        super().__init__(config)
        self.scene: Scene | None = None

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks feasible in the current scene: one per block on the table."""
        return tuple(f"reach_{c}_block" for c in self._scene().colours)

    def _scene(self) -> Scene:
        if self.scene is None:
            raise RuntimeError("call reset() first")
        return self.scene

    def _observation(self) -> Observation:
        images, robot_obs = observe(self._scene(), self.tcp, self.gripper, self.rng)
        return Observation(images=images, robot_obs=robot_obs)

    def reset(self, state: Any = None) -> Observation:
        """``state`` is an int seed (a chain's state is one too); None means 0."""
        seed = 0 if state is None else state
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"SyntheticReach.reset takes a seed, an int >= 0; got {state!r}")
        self.scene = make_scene(1, int(seed))
        self.rng = np.random.default_rng([int(seed), 1])
        self.tcp, self.gripper, self.target = self.scene.tcp.copy(), 1.0, self.scene.target
        return self._observation()

    def start_task(self, task: str) -> str:
        colour = task.removeprefix("reach_").removesuffix("_block")
        if task not in self.tasks:
            raise ValueError(f"task {task!r} is not feasible in this scene; feasible: {', '.join(self.tasks)}")
        self.target = self._scene().colours.index(colour)
        return TEMPLATES[self._scene().template].format(colour)

    def step(self, command: np.ndarray) -> Observation:
        command = np.asarray(command, dtype=np.float64)
        if command.shape != (7,) or command[6] not in (-1.0, 1.0) or not np.isfinite(command).all():
            raise ValueError(f"a command is [7], finite, with the gripper exactly -1 or +1, got {command!r}")
        self.tcp = np.clip(self.tcp + np.clip(command[:2], -1, 1) * POS_STEP, -TABLE, TABLE)
        self.gripper = float(command[6])
        return self._observation()

    def task_success(self) -> bool:
        goal = self._scene().blocks[self.target]
        return self.gripper < 0 and float(np.linalg.norm(self.tcp - goal)) <= SUCCESS

    def chains(self, n: int) -> list[Chain]:
        """Chain i starts from seed CHAIN_SEEDS + i and reaches CHAIN_LENGTH blocks in turn, never
        the same block twice in a row (the next subtask starts where the last one ended, at a
        block, with the gripper closed)."""
        out = []
        for i in range(n):
            colours = make_scene(1, CHAIN_SEEDS + i).colours
            rng = np.random.default_rng([2, i])
            order = [int(rng.integers(3))]
            while len(order) < CHAIN_LENGTH:
                order.append(int((order[-1] + rng.integers(1, 3)) % 3))
            out.append(Chain(CHAIN_SEEDS + i, tuple(f"reach_{colours[k]}_block" for k in order)))
        return out
