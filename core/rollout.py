"""Closed-loop evaluation: a :class:`robovla.Policy` drives Envs, one control step at a time.

Two protocols:

- :func:`long_horizon`, CALVIN's (reference: calvin_agent/evaluation/evaluate_policy.py):
  per chain, the env is reset once to the chain's start state; then per subtask the
  policy is reset, the env gives the instruction, and the policy has ``steps_per_task``
  env steps (360 in CALVIN), the oracle asked after every step. Success moves on to the
  next subtask from wherever the robot stopped (no reset); a failure ends the chain.
  Reported: the success rate after 1..L subtasks in a row, the average length (their sum)
  and per task the successes and attempts. Several envs run different chains side by side,
  stepped as one batch; each chain's result does not depend on how many run beside it.
- :func:`evaluate`, single-task episodes: episode e resets the env with seed ``seed + e``,
  draws its task with ``numpy.random.default_rng([seed, e])`` among ``env.tasks`` and runs
  until success or ``max_steps``.

Sampling heads draw from a generator seeded per episode (or per chain and subtask), so an
evaluation is deterministic given its seed.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robovla.env import Chain, Env, Observation


def episode_max_steps(env: Env, max_steps: int | None) -> int:
    """``max_steps``, or the env config's ``max_steps``; an error when neither is there."""
    if max_steps is None:
        max_steps = getattr(env.config, "max_steps", None)
        if max_steps is None:
            raise ValueError(f"{type(env).__name__} has no config.max_steps; pass max_steps= "
                             "(steps a policy gets per task before it counts as failed)")
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return int(max_steps)


# ------------------------------------------------------------------------ long horizon


@dataclass
class _Running:
    """One env's current chain."""

    position: int  # in the chains given
    index: int  # the chain's number
    chain: Chain
    observation: Observation
    instruction: str = ""
    subtask: int = 0
    steps: int = 0
    steps_per_subtask: list[int] = field(default_factory=list)


def long_horizon(policy: Any, envs: Env | list[Env], chains: list[Chain], steps_per_task: int | None = None,
                 seed: int = 0, progress: bool = True, indices: list[int] | None = None) -> dict[str, Any]:
    """Run ``chains`` under the long-horizon protocol (module docstring) on ``envs`` side by side.

    Returns ``avg_len``, ``chain_sr`` {"1".."L": fraction}, ``task_info`` {task: {"success",
    "total"}}, ``sequences``, ``steps_per_task``, ``mean_steps`` (env steps per chain) and
    ``results`` (per chain: its index, state, tasks, ``completed`` and the steps each attempted
    subtask took). ``indices`` numbers the chains (default 0, 1, ...): a shard of a longer
    list keeps the numbers, and so the seeds, its chains have in the whole list.
    """
    from tqdm import tqdm

    envs = [envs] if isinstance(envs, Env) else list(envs)
    if not envs:
        raise ValueError("long_horizon needs at least one env")
    if not chains:
        raise ValueError("long_horizon needs at least one chain")
    limit = episode_max_steps(envs[0], steps_per_task)
    indices = list(range(len(chains))) if indices is None else list(indices)
    if len(indices) != len(chains):
        raise ValueError(f"{len(indices)} indices for {len(chains)} chains")
    pending = deque(zip(range(len(chains)), indices, chains))
    results: list[dict[str, Any] | None] = [None] * len(chains)
    running: dict[int, _Running] = {}

    def begin_subtask(slot: int) -> None:
        r = running[slot]
        r.instruction = envs[slot].start_task(r.chain.tasks[r.subtask])
        r.steps = 0
        policy.reset(slot, seed=seed * 1_000_003 + r.index * 101 + r.subtask)

    def start_chain(slot: int) -> None:
        position, index, chain = pending.popleft()
        running[slot] = _Running(position, index, chain, envs[slot].reset(chain.state))
        begin_subtask(slot)

    def finish(slot: int, completed: int) -> None:
        r = running.pop(slot)
        results[r.position] = {"index": r.index, "state": r.chain.state, "tasks": list(r.chain.tasks),
                            "completed": completed, "steps": r.steps_per_subtask}
        policy.drop(slot)
        bar.update(1)
        done = [x["completed"] for x in results if x is not None]
        bar.set_postfix(avg_len=f"{np.mean(done):.2f}", refresh=False)
        if pending:
            start_chain(slot)

    with tqdm(total=len(chains), desc="long-horizon chains", unit="chain", disable=not progress) as bar:
        for slot in range(min(len(envs), len(chains))):
            start_chain(slot)
        while running:
            slots = sorted(running)
            commands = policy.act_batch([running[s].observation for s in slots],
                                        [running[s].instruction for s in slots], keys=slots)
            for slot, command in zip(slots, commands):
                r = running[slot]
                r.observation = envs[slot].step(command)
                r.steps += 1
                if envs[slot].task_success():
                    r.steps_per_subtask.append(r.steps)
                    r.subtask += 1
                    if r.subtask == len(r.chain.tasks):
                        finish(slot, r.subtask)
                    else:
                        begin_subtask(slot)
                elif r.steps >= limit:
                    r.steps_per_subtask.append(r.steps)
                    finish(slot, r.subtask)
    return summarize_chains([r for r in results if r is not None], limit)


def summarize_chains(results: list[dict[str, Any]], steps_per_task: int) -> dict[str, Any]:
    """The protocol's metrics from per-chain results (see :func:`long_horizon`); also how the
    reports of shards run apart are merged (:func:`merge_chains`)."""
    length = max(len(r["tasks"]) for r in results)
    completed = np.array([r["completed"] for r in results])
    task_info: dict[str, dict[str, int]] = defaultdict(lambda: {"success": 0, "total": 0})
    for r in results:
        for i, task in enumerate(r["tasks"][:r["completed"] + 1]):  # attempted: the successes and the failure
            task_info[task]["total"] += 1
            task_info[task]["success"] += int(i < r["completed"])
    chain_sr = {str(k): float(np.mean(completed >= k)) for k in range(1, length + 1)}
    return {"protocol": "long-horizon", "avg_len": float(completed.mean()), "chain_sr": chain_sr,
            "task_info": dict(sorted(task_info.items())), "sequences": len(results), "steps_per_task": steps_per_task,
            "mean_steps": float(np.mean([sum(r["steps"]) for r in results])), "results": results}


def merge_chains(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One long-horizon report from the reports of shards of the same chains (e.g. run in
    several processes with ``robo-run eval --shard I/N``), the chains in index order."""
    if not reports or any(r.get("protocol") != "long-horizon" for r in reports):
        raise ValueError("merge long-horizon reports (long_horizon*.json), at least one")
    steps = {r["steps_per_task"] for r in reports}
    if len(steps) != 1:
        raise ValueError(f"the reports ran different steps per subtask {sorted(steps)}; merge like with like")
    results = sorted((x for r in reports for x in r["results"]), key=lambda x: x["index"])
    seen = [x["index"] for x in results]
    if len(set(seen)) != len(seen):
        twice = sorted({i for i in seen if seen.count(i) > 1})
        raise ValueError(f"chains {twice[:10]} appear in more than one report; merge each shard once")
    merged = summarize_chains(results, steps.pop())
    extra = {k: v for k, v in reports[0].items() if k not in merged and k not in ("shard",)}
    return {**extra, **merged, "merged": len(reports)}


# ---------------------------------------------------------------------------- episodes


def evaluate(policy: Any, env: Env, episodes: int, seed: int = 0, max_steps: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run ``episodes`` single-task episodes of ``policy`` in ``env`` (module docstring).

    Returns ``success_rate``, ``per_task`` (task -> {"success_rate", "episodes"}),
    ``mean_steps`` (over all episodes; a failure counts its ``max_steps``), ``episodes``,
    ``max_steps``, ``seed`` and ``results`` (one dict per episode: seed, task, instruction,
    success, steps).
    """
    from tqdm import tqdm

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    limit = episode_max_steps(env, max_steps)
    results: list[dict[str, Any]] = []
    with tqdm(total=episodes, desc="closed loop", unit="episode", disable=not progress) as bar:
        for e in range(episodes):
            observation = env.reset(seed + e)
            tasks = env.tasks
            task = tasks[int(np.random.default_rng([seed, e]).integers(len(tasks)))]
            instruction = env.start_task(task)
            policy.reset(seed=seed * 100_003 + e)
            success, steps = False, 0
            while steps < limit and not success:
                observation = env.step(policy.act(observation, instruction))
                steps += 1
                success = bool(env.task_success())
            results.append({"seed": seed + e, "task": task, "instruction": instruction, "success": success,
                            "steps": steps})
            bar.update(1)
            bar.set_postfix(success=f"{np.mean([r['success'] for r in results]):.2f}", refresh=False)
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task"]].append(r["success"])
    return {
        "protocol": "episodes",
        "success_rate": float(np.mean([r["success"] for r in results])),
        "per_task": {task: {"success_rate": float(np.mean(s)), "episodes": len(s)} for task, s in sorted(per_task.items())},
        "mean_steps": float(np.mean([r["steps"] for r in results])),
        "episodes": episodes, "max_steps": limit, "seed": seed, "results": results,
    }


# ----------------------------------------------------------------------------- reports


def report_figure(tasks: int) -> tuple[Any, Any, Any]:
    """The layout of a report chart: (figure, headline axes on the left, per-task axes on the
    right), tall enough for one bar per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.28 * tasks + 1)), gridspec_kw={"width_ratios": [1, 1.4]})
    bx.tick_params(axis="y", labelsize=8)
    return fig, ax, bx


def save_figure(fig: Any, path: Path, title: str = "") -> Path:
    """Title, lay out, write ``path`` as a PNG and free the figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def chart(report: dict[str, Any], path: Path, title: str = "") -> Path:
    """A PNG of a closed-loop report: success after 1..L subtasks in a row (long horizon)
    or the success rate (episodes), and the success rate per task."""
    if report["protocol"] == "long-horizon":
        left = {f"{k}/{len(report['chain_sr'])}": v for k, v in report["chain_sr"].items()}
        left_title = f"tasks completed in a row (avg. len {report['avg_len']:.2f}, {report['sequences']} chains)"
        per_task = {t: v["success"] / v["total"] for t, v in report["task_info"].items()}
        counts = {t: v["total"] for t, v in report["task_info"].items()}
    else:
        left = {"success": report["success_rate"]}
        left_title = f"success rate ({report['episodes']} episodes)"
        per_task = {t: v["success_rate"] for t, v in report["per_task"].items()}
        counts = {t: v["episodes"] for t, v in report["per_task"].items()}
    fig, ax, bx = report_figure(len(per_task))
    bars = ax.bar(list(left), [100 * v for v in left.values()], color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set_ylim(0, 105)
    ax.set_ylabel("success (%)")
    ax.set_title(left_title, fontsize=10)
    names = sorted(per_task, key=lambda t: per_task[t])
    hb = bx.barh(names, [100 * per_task[t] for t in names], color="#55a868")
    bx.bar_label(hb, labels=[f"{100 * per_task[t]:.0f}% of {counts[t]}" for t in names], fontsize=8, padding=2)
    bx.set_xlim(0, 118)
    bx.set_xlabel("success per task (%)")
    return save_figure(fig, path, title)


def table(report: dict[str, Any]) -> str:
    """The report as text: the headline numbers, then one line per task."""
    lines = []
    if report["protocol"] == "long-horizon":
        sr = "  ".join(f"{k}/{len(report['chain_sr'])}: {100 * v:.1f}%" for k, v in report["chain_sr"].items())
        lines += [f"{report['sequences']} chains, {report['steps_per_task']} steps per subtask", sr,
                  f"average length: {report['avg_len']:.3f}", "", f"{'task':<32} {'success':>8} {'of':>6}"]
        lines += [f"{t:<32} {v['success']:>8} {v['total']:>6}" for t, v in report["task_info"].items()]
    else:
        lines += [f"{report['episodes']} episodes, at most {report['max_steps']} steps each: "
                  f"{100 * report['success_rate']:.1f}% success", "", f"{'task':<32} {'success':>8} {'episodes':>9}"]
        lines += [f"{t:<32} {100 * v['success_rate']:>7.1f}% {v['episodes']:>9}" for t, v in report["per_task"].items()]
    return "\n".join(lines)
