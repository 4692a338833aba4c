"""A trained VLA as a controller: one VLM pass per control step, a command out.

    policy = robovla.Policy.from_run("runs/demo")
    policy.reset()
    command = policy.act(observation, "open the drawer")  # [A], the gripper exactly -1 or +1

Shape letters: B episodes stepped together, K [LRN] tokens, D hidden size, C chunk,
A action dim, S the image size the backbone reads.

Every episode has a key (0 unless given: an env index, a client session) and its own
history. A control step encodes only the new frame (the camera images resized to S as in
training, or as they come for a backbone that takes any size; and the instruction) into
its [LRN] feature [1, 1, K, D]; the head steps once on it, its own history (LSTM state,
last T features) carrying the past, and predicts a chunk of C normalized actions.
:meth:`Policy.act_batch` steps several episodes with one batched
VLM pass, swapping each episode's head history in and out. Which action of the chunks is
executed (:class:`Execution`):

- ``first``: the first action of the newest chunk, re-planning every step (the recipe);
- ``chunk:k``: the actions of one chunk k steps in a row, then a new chunk. A head with a
  history still reads every frame (its window is consecutive frames, as in training); a
  head without one is not queried between re-plans;
- ``ensemble[:m]``: temporal ensembling (ACT): the mean of every chunk's prediction for
  the current step, chunk i of n (oldest first) weighted exp(-m i); m = 0.01 by default.

The action space decodes the chosen action with the current robot_obs; the gripper
probability becomes exactly -1 or +1.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Literal

import numpy as np
import torch

from robovla.env import Observation
from robovla.errors import RobovlaError

if TYPE_CHECKING:
    from robovla.vla import VLA

MAX_IMAGE_SIDE = 4096  # pixels; larger camera images are refused
MAX_INSTRUCTION = 2000  # characters


class ObservationError(RobovlaError, ValueError):
    """An observation or instruction the policy cannot read; the message says which part and why."""


class ExecutionError(RobovlaError, ValueError):
    """An execution (``first``, ``chunk:K``, ``ensemble:M``) that is malformed or does not fit the model."""


@dataclass(frozen=True)
class Execution:
    """How a policy turns its action chunks into one command per step (see the module docstring)."""

    mode: Literal["first", "chunk", "ensemble"] = "first"
    steps: int = 1  # chunk: actions executed from one chunk before re-planning
    decay: float = 0.01  # ensemble: chunk i of n (oldest first) weighs exp(-decay * i)

    @classmethod
    def parse(cls, text: str | Execution) -> Execution:
        """``first``, ``chunk:K`` or ``ensemble`` / ``ensemble:M``."""
        if isinstance(text, Execution):
            return text
        mode, _, arg = str(text).strip().partition(":")
        try:
            if mode == "first" and not arg:
                return cls()
            if mode == "chunk" and arg:
                return cls("chunk", steps=int(arg))
            if mode == "ensemble":
                return cls("ensemble", decay=float(arg) if arg else 0.01)
        except ExecutionError:
            raise
        except ValueError:
            pass
        raise ExecutionError(f"execution {text!r}: use first, chunk:K (K actions of a chunk, then re-plan), "
                             "or ensemble / ensemble:M (temporal ensembling with decay M)")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ExecutionError(f"chunk:{self.steps}: execute at least 1 action of a chunk")
        if not (math.isfinite(self.decay) and self.decay >= 0):
            raise ExecutionError(f"ensemble:{self.decay}: the decay must be a finite number >= 0")

    def __str__(self) -> str:
        return {"first": "first", "chunk": f"chunk:{self.steps}", "ensemble": f"ensemble:{self.decay:g}"}[self.mode]


@dataclass
class _Episode:
    """What a policy keeps for one episode."""

    generator: torch.Generator  # noise of sampling heads
    history: dict[str, Any] | None = None  # the head's (None: not stepped yet)
    steps: int = 0
    plan: np.ndarray | None = None  # chunk: the chunk being executed [C, A], normalized
    planned_at: int = 0
    past: list[tuple[int, np.ndarray]] = field(default_factory=list)  # ensemble: (step, chunk [C, A])


def checkpoint_folder(run_dir: str | Path, checkpoint: str | Path, flag: str = "checkpoint") -> Path:
    """The checkpoint folder ``checkpoint`` names: a name under ``RUN_DIR/checkpoints`` (``last``,
    ``step-000500``) or a path to a folder directly inside it, symlinks followed. Anything else
    (another run's checkpoint, a ``..`` escaping the run, the run folder itself) is a
    CheckpointError naming ``flag`` and the run's checkpoints: its weights would be filed and
    served as this run's."""
    from robovla import checkpoint as ckpt

    root = Path(run_dir).expanduser() / ckpt.CHECKPOINTS
    given = Path(checkpoint).expanduser()
    folder = root / given if not given.is_absolute() and os.path.lexists(root / given) else given
    inside, resolved = resolved_or_none(root), resolved_or_none(folder)
    if resolved is not None and resolved.parent == inside and resolved.is_dir():
        return resolved
    own = [p for p in root.glob("*") if not p.name.startswith(".")] if inside is not None else []
    names = sorted(p.name for p in own if (r := resolved_or_none(p)) is not None and r.parent == inside and r.is_dir())
    where = ("neither a folder nor one of the run's checkpoints" if resolved is None
             else f"{resolved} is not a checkpoint folder of this run")
    raise ckpt.CheckpointError(
        f"{flag} {str(checkpoint)!r}: {where}; give a checkpoint name under {root} "
        f"({', '.join(names) if names else 'it has none'}), or a folder inside it; a checkpoint of another "
        "run is served and evaluated with --run of the run it belongs to")


def resolved_or_none(path: Path) -> Path | None:
    """``path`` with every symlink followed; None if it is missing, dangling or a loop."""
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None


def check_observation(observation: Any, instruction: Any, cameras: tuple[str, ...], where: str = "") -> None:
    """Raise :class:`ObservationError` unless ``observation`` has uint8 [H, W, 3] images for
    ``cameras`` and a finite robot_obs [15], and ``instruction`` is a string."""
    at = f"{where}: " if where else ""
    if not isinstance(observation, Observation):
        raise ObservationError(f"{at}expected a robovla.Observation (images, robot_obs), got {type(observation).__name__}")
    if not isinstance(instruction, str):
        raise ObservationError(f"{at}the instruction must be a string, got {type(instruction).__name__}")
    if len(instruction) > MAX_INSTRUCTION:
        raise ObservationError(f"{at}the instruction has {len(instruction)} characters; at most {MAX_INSTRUCTION}")
    images = observation.images
    if not isinstance(images, dict):
        raise ObservationError(f"{at}images must map camera name -> uint8 [H, W, 3] array, got {type(images).__name__}")
    missing = [cam for cam in cameras if cam not in images]
    if missing:
        raise ObservationError(f"{at}no image for camera(s) {missing}; the policy reads {list(cameras)} "
                               f"and got {sorted(images)}")
    for cam in cameras:
        img = images[cam]
        if not isinstance(img, np.ndarray):
            raise ObservationError(f"{at}camera {cam!r}: expected a numpy array, got {type(img).__name__}")
        if img.dtype != np.uint8:
            raise ObservationError(f"{at}camera {cam!r}: images are uint8 (0..255), got {img.dtype}; "
                                   "convert with (x * 255).round().astype(np.uint8) if yours are floats in [0, 1]")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ObservationError(f"{at}camera {cam!r}: expected an RGB image [H, W, 3], got shape {list(img.shape)}")
        if not (1 <= img.shape[0] <= MAX_IMAGE_SIDE and 1 <= img.shape[1] <= MAX_IMAGE_SIDE):
            raise ObservationError(f"{at}camera {cam!r}: {img.shape[0]}x{img.shape[1]} pixels; each side must be "
                                   f"1..{MAX_IMAGE_SIDE}")
    robot_obs = observation.robot_obs
    if not isinstance(robot_obs, np.ndarray) or robot_obs.shape != (15,):
        shape = list(robot_obs.shape) if isinstance(robot_obs, np.ndarray) else type(robot_obs).__name__
        raise ObservationError(f"{at}robot_obs must be a float array [15] (CALVIN's robot state), got {shape}")
    if robot_obs.dtype.kind != "f":
        raise ObservationError(f"{at}robot_obs must be floating point, got {robot_obs.dtype}")
    if not np.isfinite(robot_obs).all():
        bad = np.flatnonzero(~np.isfinite(robot_obs)).tolist()
        raise ObservationError(f"{at}robot_obs has non-finite values at indices {bad}")


class Policy:
    """A VLA, its fitted action space and an execution policy, stepped one frame at a time."""

    def __init__(self, vla: VLA, action_space: Any, execution: str | Execution = "first",
                 precision: Literal["32-true", "bf16-mixed"] = "32-true", info: dict[str, Any] | None = None):
        self.vla, self.action_space = vla, action_space
        self.execution = Execution.parse(execution)
        if self.execution.mode == "chunk" and self.execution.steps > vla.head.dims.C:
            raise ExecutionError(f"chunk:{self.execution.steps}: a chunk holds only C={vla.head.dims.C} actions")
        if precision not in ("32-true", "bf16-mixed"):
            raise ValueError(f"precision {precision!r}: use 32-true or bf16-mixed")
        self.precision = precision
        self.info = dict(info or {})
        # what the components declare (robovla.Backbone, robovla.PolicyHead)
        self.cameras: tuple[str, ...] = tuple(vla.backbone.cameras)
        self.image_size: int | None = vla.backbone.image_size
        self.resize_filter: str = vla.backbone.resize_filter
        self.has_history = bool(vla.head.history_attributes)
        self.episodes: dict[Hashable, _Episode] = {}
        vla.eval()

    # ------------------------------------------------------------------------ loading

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str | Path | None = None, *, device: str = "cpu",
                 precision: Literal["32-true", "bf16-mixed"] = "32-true",
                 execution: str | Execution = "first") -> Policy:
        """Rebuild a run's model from its config.toml and a checkpoint (default: ``last``),
        with its fitted action space; no training code runs. ``checkpoint`` is a name under
        ``RUN_DIR/checkpoints`` (e.g. ``step-000500``) or a folder inside it (:func:`checkpoint_folder`)."""
        from robovla import checkpoint as ckpt
        from robovla import config as cfg
        from robovla.data import saved_action_space
        from robovla.runs import model_changes
        from robovla.vla import build

        run_dir = Path(run_dir).expanduser()
        config_file = ckpt.run_config(run_dir, str(run_dir), stats=True)
        folder = ckpt.last(run_dir) if checkpoint is None else checkpoint_folder(run_dir, checkpoint)
        run = cfg.resolve(cfg.NONE, config_file, [])
        from robovla.finetune import TRAINABLE

        # a LoRA checkpoint holds the trained weights only: the frozen base is --train.init's, when given
        trainable_only = ckpt.weight_files(folder, ckpt.read_state(folder)) == TRAINABLE
        with torch.random.fork_rng(devices=[]):  # building seeds torch; the caller's RNG is left as it was
            vla = build(run, init=trainable_only)
        state = ckpt.load(folder, vla)  # state.json checked, the weights' checksums verified
        model_changes(run, run_dir, folder, state)
        space = saved_action_space(run, run_dir)
        info = {"run": str(run_dir), "checkpoint": folder.name, "step": state.get("step"),
                "backbone": run.backbone.name, "head": run.head.name,
                "action_space": {"name": run.action_space.name, "config": dict(run.action_space.config)},
                "dataset": run.dataset.name}
        return cls(vla.to(device), space, execution=execution, precision=precision, info=info)

    @classmethod
    def from_pretrained(cls, source: str | Path, checkpoint: str | Path | None = None, *, device: str = "cpu",
                        precision: Literal["32-true", "bf16-mixed"] = "32-true",
                        execution: str | Execution = "first") -> Policy:
        """:meth:`from_run` of a local folder (``robo-run export``'s, or any run folder) or of a Hugging
        Face hub repo id (``owner/name``), downloaded into the hub's cache; the hub is reached only when
        ``source`` is not a local folder, and offline the error says what to download."""
        from robovla.sharing import local_folder

        policy = cls.from_run(local_folder(source, "Policy.from_pretrained"), checkpoint, device=device,
                              precision=precision, execution=execution)
        policy.info["source"] = str(source)
        return policy

    def metadata(self) -> dict[str, Any]:
        """What a client needs to know: cameras and image size, window, chunk, action space, execution."""
        from robovla import __version__

        dims = self.vla.head.dims
        return {**self.info, "robovla": __version__, "cameras": list(self.cameras), "image_size": self.image_size,
                "window": dims.T, "chunk": dims.C, "action_dim": dims.A, "robot_obs_dim": 15,
                "execution": str(self.execution), "max_image_side": MAX_IMAGE_SIDE}

    def __repr__(self) -> str:
        where = f"{self.info['run']} ({self.info['checkpoint']}), " if "run" in self.info else ""
        parts = [f"{k} {self.info[k]}" for k in ("backbone", "head") if k in self.info]
        return (f"Policy({where}{', '.join(parts + [''])}cameras {list(self.cameras)}, image size {self.image_size}, "
                f"window {self.vla.head.dims.T}, chunk {self.vla.head.dims.C}, execution {self.execution})")

    # ----------------------------------------------------------------------- stepping

    def reset(self, key: Hashable = 0, seed: int = 0) -> None:
        """Start a new episode under ``key``: the head's history, the chunk being executed and
        the ensemble are forgotten; sampling heads draw from a generator seeded with ``seed``."""
        device = self.vla.lrn.device
        self.episodes[key] = _Episode(generator=torch.Generator(device=device).manual_seed(seed))

    def drop(self, key: Hashable) -> None:
        """Forget episode ``key`` entirely (e.g. a client that left)."""
        self.episodes.pop(key, None)

    def act(self, observation: Observation, instruction: str, key: Hashable = 0) -> np.ndarray:
        """One control step of episode ``key``: the command [A] for ``observation``."""
        return self.act_batch([observation], [instruction], [key])[0]

    def act_batch(self, observations: list[Observation], instructions: list[str],
                  keys: list[Hashable] | None = None) -> np.ndarray:
        """One control step of several episodes (distinct ``keys``, default 0..B-1) with one
        batched VLM pass: commands [B, A]. An episode not :meth:`reset` yet starts fresh."""
        keys = self._checked(observations, instructions, keys)
        episodes = [self.episodes[k] for k in keys]
        query = [i for i, ep in enumerate(episodes) if self._needs_query(ep)]
        chunks = dict(zip(query, self._query([observations[i] for i in query], [instructions[i] for i in query],
                                             [episodes[i] for i in query]))) if query else {}
        commands = []
        for i, ep in enumerate(episodes):
            action = self._choose(ep, chunks.get(i))
            commands.append(self.action_space.decode(action.astype(np.float64), observations[i].robot_obs))
            ep.steps += 1
        return np.stack(commands)

    def predict(self, observations: list[Observation], instructions: list[str],
                keys: list[Hashable] | None = None) -> np.ndarray:
        """One step of several episodes like :meth:`act_batch`, but returns the predicted
        chunks [B, C, A] as they are, normalized (the gripper channel P(open)), for callers
        that execute chunks themselves; the execution policy is not applied."""
        keys = self._checked(observations, instructions, keys)
        episodes = [self.episodes[k] for k in keys]
        chunks = self._query(observations, instructions, episodes)
        for ep in episodes:
            ep.steps += 1
        return np.stack(chunks)

    # ------------------------------------------------------------------------ helpers

    def _checked(self, observations: list[Observation], instructions: list[str],
                 keys: list[Hashable] | None) -> list[Hashable]:
        """Validate one step's inputs; start the episodes of new keys; returns the keys."""
        keys = list(range(len(observations))) if keys is None else list(keys)
        if not (len(observations) == len(instructions) == len(keys)) or not keys:
            raise ObservationError(f"a step needs as many instructions and keys as observations (at least one), "
                                   f"got {len(observations)}, {len(instructions)} and {len(keys)}")
        if len(set(keys)) != len(keys):
            raise ObservationError(f"keys must be distinct (one step per episode), got {keys}")
        for i, (obs, instruction) in enumerate(zip(observations, instructions)):
            check_observation(obs, instruction, self.cameras, where=f"episode {keys[i]!r}")
        for key in keys:
            if key not in self.episodes:
                self.reset(key)
        return keys

    def _query(self, observations: list[Observation], instructions: list[str],
               episodes: list[_Episode]) -> list[np.ndarray]:
        """One batched VLM pass and one head step per episode: each episode's chunk [C, A]."""
        head, chunks = self.vla.head, []
        with torch.inference_mode(), self._autocast():
            features = self.vla.features(self._images(observations), instructions)  # [b, 1, K, D]
            for row, ep in enumerate(episodes):
                if ep.history is None:
                    head.reset()
                elif self.has_history:
                    head.load_history(ep.history)
                prediction = head.step(features[row:row + 1])
                ep.history = head.save_history() if self.has_history else {}
                chunks.append(head.actions(prediction, generator=ep.generator)[0, 0].float().cpu().numpy())
        return chunks

    def _needs_query(self, ep: _Episode) -> bool:
        e = self.execution
        if e.mode != "chunk" or self.has_history:
            return True
        return ep.plan is None or ep.steps - ep.planned_at >= e.steps

    def _choose(self, ep: _Episode, chunk: np.ndarray | None) -> np.ndarray:
        """The normalized action [A] to execute at this step, from the new chunk [C, A] and the past."""
        e, n = self.execution, ep.steps
        if e.mode == "first":
            return chunk[0]
        if e.mode == "chunk":
            if ep.plan is None or n - ep.planned_at >= e.steps:
                ep.plan, ep.planned_at = chunk, n
            return ep.plan[n - ep.planned_at]
        c = len(chunk)
        ep.past = [(t, p) for t, p in ep.past if n - t < c] + [(n, chunk)]  # oldest first
        weights = np.exp(-e.decay * np.arange(len(ep.past)))
        stacked = np.stack([p[n - t] for t, p in ep.past])  # [n_chunks, A]
        return (weights[:, None] * stacked).sum(0) / weights.sum()

    def _images(self, observations: list[Observation]) -> dict[str, torch.Tensor]:
        """camera -> uint8 [B, 1, S, S, 3], resized as the training loader resizes."""
        from robovla.loader import resize

        device = self.vla.lrn.device
        out = {}
        for cam in self.cameras:
            frames = [np.ascontiguousarray(o.images[cam]) for o in observations]
            if self.image_size:
                frames = [resize(f[None], self.image_size, self.resize_filter)[0] for f in frames]
            elif len({f.shape for f in frames}) > 1:
                raise ObservationError(f"camera {cam!r}: episodes stepped together need images of one size, got "
                                       f"{sorted({f.shape for f in frames})}")
            out[cam] = torch.from_numpy(np.stack(frames))[:, None].to(device)
        return out

    def _autocast(self) -> Any:
        if self.precision == "bf16-mixed":
            return torch.autocast(self.vla.lrn.device.type, dtype=torch.bfloat16)
        return nullcontext()
