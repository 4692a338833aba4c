"""Closed-loop evaluation: a VLA drives an Env, one control step at a time.

Shape letters: K [LRN] tokens per frame, D hidden size, C chunk, A action dim, H/W image
size. Per episode e (of ``episodes``): ``env.reset(seed + e)``, a task drawn with
``numpy.random.default_rng([seed, e])`` among ``env.tasks``, ``env.start_task`` gives the
instruction, the head's history is reset; then per step the current camera images
(uint8 [1, 1, H, W, 3] each) and the instruction give the [LRN] feature [1, 1, K, D], the
head steps once, the first action of its chunk [A] is decoded by the action space with the
current robot_obs, and the command is sent to the env, until ``env.task_success()`` or
``max_steps``. Every episode is reproducible on its own from (seed, e), and a whole
evaluation is deterministic given ``seed`` (sampling heads draw from a generator seeded
per episode).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from robovla.action_space import ActionSpace
from robovla.env import Env, Observation


def episode_max_steps(env: Env, max_steps: int | None) -> int:
    """``max_steps``, or the env config's ``max_steps``; an error when neither is there."""
    if max_steps is None:
        max_steps = getattr(env.config, "max_steps", None)
        if max_steps is None:
            raise ValueError(f"{type(env).__name__} has no config.max_steps; pass max_steps= to evaluate() "
                             "(steps a policy gets per task before it counts as failed)")
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return int(max_steps)


def frames(observation: Observation, cameras: tuple[str, ...], env: Env) -> dict[str, torch.Tensor]:
    """The observation's images as the VLA reads them: camera -> uint8 [1, 1, H, W, 3]."""
    missing = [cam for cam in cameras if cam not in observation.images]
    if missing:
        raise KeyError(f"the backbone reads cameras {list(cameras)}, but {type(env).__name__} provides only "
                       f"{sorted(observation.images)} (no {missing}); choose cameras the env has with "
                       "--backbone.cameras")
    return {cam: torch.as_tensor(np.ascontiguousarray(observation.images[cam]), dtype=torch.uint8)[None, None]
            for cam in cameras}


def run_episode(vla: Any, action_space: ActionSpace, env: Env, seed: int, e: int, max_steps: int) -> dict[str, Any]:
    """One episode (see the module docstring); returns its task, success and steps taken."""
    observation = env.reset(seed + e)
    tasks = env.tasks
    task = tasks[int(np.random.default_rng([seed, e]).integers(len(tasks)))]
    instruction = env.start_task(task)
    generator = torch.Generator(device=vla.lrn.device).manual_seed(seed * 100_003 + e)
    vla.head.reset()
    success, steps = False, 0
    while steps < max_steps and not success:
        feature = vla.features(frames(observation, vla.backbone.cameras, env), [instruction])  # [1, 1, K, D]
        chunk = vla.head.actions(vla.head.step(feature), generator=generator)  # [1, 1, C, A], normalized
        action = chunk[0, 0, 0].float().cpu().numpy()
        observation = env.step(action_space.decode(action, observation.robot_obs))
        steps += 1
        success = bool(env.task_success())
    return {"seed": seed + e, "task": task, "instruction": instruction, "success": success, "steps": steps}


def evaluate(vla: Any, action_space: ActionSpace, env: Env, episodes: int, seed: int = 0,
             max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``episodes`` closed-loop episodes of ``vla`` (a :class:`robovla.vla.VLA`) in ``env``.

    Returns ``success_rate``, ``per_task`` (task -> {"success_rate", "episodes"}),
    ``mean_steps`` (over all episodes; a failure counts its ``max_steps``), ``episodes``,
    ``max_steps``, ``seed`` and ``results`` (one dict per episode: seed, task, instruction,
    success, steps). The model is evaluated in eval mode without gradients and left in the
    mode it came in.
    """
    from tqdm import tqdm

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    limit = episode_max_steps(env, max_steps)
    was_training = vla.training
    vla.eval()
    results: list[dict[str, Any]] = []
    try:
        with torch.no_grad(), tqdm(total=episodes, desc="closed loop", unit="episode", disable=not progress) as bar:
            for e in range(episodes):
                results.append(run_episode(vla, action_space, env, seed, e, limit))
                bar.update(1)
                bar.set_postfix(success=f"{np.mean([r['success'] for r in results]):.2f}")
    finally:
        vla.train(was_training)
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task"]].append(r["success"])
    return {
        "success_rate": float(np.mean([r["success"] for r in results])),
        "per_task": {task: {"success_rate": float(np.mean(s)), "episodes": len(s)} for task, s in sorted(per_task.items())},
        "mean_steps": float(np.mean([r["steps"] for r in results])),
        "episodes": episodes, "max_steps": limit, "seed": seed, "results": results,
    }
