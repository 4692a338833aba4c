"""The reports of closed-loop evaluations: metrics from per-chain (per-episode) results,
merging shards, the terminal table and the PNG chart.

A chain or episode whose policy or env raised carries an ``error``; it counts as failed
from the subtask it was in (so a policy that emits NaN scores no better than one that
fails), and reports count such results apart under ``errors``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def summarize_chains(results: list[dict[str, Any]], steps_per_task: int) -> dict[str, Any]:
    """The long-horizon metrics from per-chain results (see :func:`robovla.rollout.long_horizon`);
    also how the reports of shards run apart are merged (:func:`merge_chains`)."""
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
            "mean_steps": float(np.mean([sum(r["steps"]) for r in results])), "errors": errors(results),
            "results": results}


def summarize_episodes(results: list[dict[str, Any]], max_steps: int, seed: int) -> dict[str, Any]:
    """The single-task metrics from per-episode results (see :func:`robovla.rollout.evaluate`)."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task"]].append(r["success"])
    return {
        "protocol": "episodes",
        "success_rate": float(np.mean([r["success"] for r in results])),
        "per_task": {task: {"success_rate": float(np.mean(s)), "episodes": len(s)}
                     for task, s in sorted(per_task.items())},
        "mean_steps": float(np.mean([r["steps"] for r in results])),
        "episodes": len(results), "max_steps": max_steps, "seed": seed, "errors": errors(results), "results": results,
    }


def errors(results: list[dict[str, Any]]) -> dict[str, Any]:
    """How many results ended in an error, and which (index -> error), in index order."""
    failed = {str(r["index"]): r["error"] for r in results if r.get("error")}
    return {"count": len(failed), "by_index": failed}


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
    extra = {k: v for k, v in reports[0].items() if k not in merged and k not in ("shard", "videos")}
    videos = sorted((v for r in reports for v in r.get("videos", [])), key=lambda v: v["index"])
    return {**extra, **merged, **({"videos": videos} if videos else {}), "merged": len(reports)}


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
    failed = report.get("errors", {}).get("count", 0)
    if failed:
        what = "chains" if report["protocol"] == "long-horizon" else "episodes"
        lines += ["", f"{failed} {what} ended in an error (counted as failed from there on):"]
        lines += [f"  {i}: {e.splitlines()[0][:160]}" for i, e in list(report["errors"]["by_index"].items())[:10]]
        if failed > 10:
            lines.append(f"  ... and {failed - 10} more (the report's errors.by_index lists them all)")
    if report.get("videos"):
        lines += ["", f"videos ({len(report['videos'])}):"]
        lines += [f"  {v['index']}: {v['file']}  ({v['frames']} frames, {v['outcome']})" for v in report["videos"]]
    return "\n".join(lines)
