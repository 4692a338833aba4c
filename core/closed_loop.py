"""``robo-run eval``'s closed-loop part: the env from ``--env NAME --env.FIELD VALUE``, its
workers, the results file that makes an evaluation resumable, videos, and ``--merge``.

Files, in the report folder, per evaluation (``NAME`` is ``long_horizon`` or ``episodes``,
a shard's ``long_horizon-shard-I-of-N``): ``NAME.jsonl`` (one line per finished chain, see
robovla.eval_log), ``NAME.json`` (the report), ``NAME.png`` (its chart) and with
``--record N`` ``videos/<long_horizon|episodes>-<index>.mp4``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from robovla import config as cfg
from robovla.env_workers import EnvPool, EnvSpec
from robovla.errors import ConfigError, RobovlaError


def env_spec(name: str, flags: list[tuple[str, str | None]], header: str = "cannot evaluate") -> EnvSpec:
    """The env ``name`` with ``--env.FIELD`` flags, checked like every other section's flags
    (lists as ``a,b``, bare yes/no flags, the field's type and bounds): an :class:`EnvSpec`
    holding the whole validated config; a ConfigError naming each bad flag."""
    from robovla.registry import get_component

    model = get_component("env", name).load().Config
    layer, problems = cfg.cli_layer(flags, {"env": model})
    values = layer.get("env", {})
    config, found = cfg.validate_section("env", model, values, {("env", k): "command line" for k in values})
    if problems or found:
        raise ConfigError(problems + found, header=header)
    return EnvSpec(name, config.model_dump(mode="json"))


def use_processes(spec: EnvSpec, workers: str, envs: int) -> bool:
    """Whether the envs run in worker processes (``--workers auto|process|inline``)."""
    safe = spec.env_class().safe_in_process
    if workers == "inline" and not safe and envs > 1:
        raise ConfigError([f"--workers inline: env {spec.name} is not safe to run several times in one process (it "
                           f"does not declare safe_in_process; a simulator's process-wide state would change what "
                           f"the envs see), so --envs {envs} needs worker processes: drop --workers inline"],
                          header="invalid arguments")
    return workers == "process" or (workers == "auto" and not safe)


def write_json(path: Path, data: Any) -> None:
    """Write ``path`` atomically (a temporary name, then a rename)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2))
    os.replace(partial, path)


def closed_loop(policy: Any, spec: EnvSpec, args: argparse.Namespace, run: Any, out: Path,
                shard: tuple[int, int] | None = None) -> tuple[dict[str, Any], str]:
    """Run the closed-loop evaluation ``args`` ask for; returns (report, file stem)."""
    from robovla import rollout, videos
    from robovla.eval_log import EvalLog

    long = args.protocol == "long-horizon"
    prefix = "long_horizon" if long else "episodes"
    stem = prefix + (f"-shard-{shard[0]}-of-{shard[1]}" if shard else "")
    if shard is not None and not long:
        raise ConfigError(["--shard: shards split long-horizon chains; single-task episodes run with --envs N"],
                          header="invalid arguments")
    processes = use_processes(spec, args.workers, args.envs)
    seed = run.train.eval_seed if args.seed is None else args.seed
    try:
        limit = rollout.episode_max_steps(spec.validated(), args.steps, spec.name)
    except ValueError as exc:
        raise ConfigError([f"--steps: {exc}"], header="invalid arguments") from None
    identity = {"protocol": args.protocol, "env": spec.name, "env_config": spec.config,
                "checkpoint": policy.info.get("checkpoint"), "step": policy.info.get("step"),
                "execution": str(policy.execution), "seed": seed, "steps": limit,
                "shard": f"{shard[0]}/{shard[1]}" if shard else None}
    recorder = videos.Recorder(out / "videos", args.record, prefix) if args.record else None
    try:
        with EvalLog(out / f"{stem}.jsonl", identity, resume=args.resume, overwrite=args.overwrite) as log:
            indices = _indices(args, shard)
            todo = [i for i in indices if i not in log.done]
            if recorder is not None and not log.done:
                recorder.clear(indices[:args.record])  # an earlier evaluation's videos of these chains
            with EnvPool(spec, max(1, min(args.envs, len(todo))), processes, timeout=args.env_timeout) as pool:
                report = _run(policy, pool, log, args, indices, limit, seed, recorder)
            report = {**report, **{k: identity[k] for k in ("env", "env_config", "execution", "checkpoint", "step")},
                      **({"shard": identity["shard"]} if shard else {}),
                      "workers": "processes" if processes else "inline"}
            if args.record:
                report["videos"] = videos.index(report["results"], out / "videos", args.record, prefix, out)
            write_json(out / f"{stem}.json", report)
            log.finish(len(report["results"]))
    finally:
        if recorder is not None:
            recorder.close()
    return report, stem


def _run(policy: Any, pool: EnvPool, log: Any, args: argparse.Namespace, indices: list[int], limit: int, seed: int,
         recorder: Any) -> dict[str, Any]:
    """The protocol on ``pool``, each result written to ``log`` as it ends; prints the loop's speed."""
    from robovla import rollout

    long = args.protocol == "long-horizon"
    fresh: list[dict[str, Any]] = []

    def finished(result: dict[str, Any]) -> None:
        log.add(result)
        fresh.append(result)

    start = time.perf_counter()
    common = dict(seed=seed, progress=not args.no_progress, done=log.done, on_result=finished, recorder=recorder)
    if long:
        chains = _chains(pool, args.sequences, indices)
        report = rollout.long_horizon(policy, pool, chains, steps_per_task=limit, indices=indices, **common)
    else:
        report = rollout.evaluate(policy, pool, episodes=args.episodes, max_steps=limit, **common)
    took = time.perf_counter() - start
    steps = sum(sum(r["steps"]) if long else r["steps"] for r in fresh)
    print(f"closed loop: {len(fresh)} {'chains' if long else 'episodes'} run, {steps} env steps in {took:.1f} s "
          f"({steps / max(took, 1e-9):.1f} steps/s; {len(pool)} env{'s' * (len(pool) > 1)} "
          f"{'in worker processes' if pool.processes else 'in this process'})", file=sys.stderr)
    return report


def _indices(args: argparse.Namespace, shard: tuple[int, int] | None) -> list[int]:
    """The numbers of the chains (episodes) this evaluation runs."""
    if args.protocol != "long-horizon":
        return list(range(args.episodes))
    indices = list(range(args.sequences))
    if shard is not None:
        indices = indices[shard[0]::shard[1]]
        if not indices:
            raise ConfigError([f"--shard {shard[0]}/{shard[1]}: no chains among {args.sequences}"],
                              header="invalid arguments")
    return indices


def _chains(pool: EnvPool, sequences: int, indices: list[int]) -> list[Any]:
    try:
        chains = pool.ask(0, "chains", sequences)
    except NotImplementedError as exc:
        raise RobovlaError(str(exc)) from None
    return [chains[i] for i in indices]


def merge(files: list[Path], out: Path | None) -> int:
    """``robo-run eval --merge``: the shards' long-horizon reports -> one report, table and chart."""
    from robovla import rollout

    reports = []
    for file in files:
        try:
            reports.append(json.loads(Path(file).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise RobovlaError(f"--merge {file}: cannot read a JSON report ({exc})") from None
    try:
        report = rollout.merge_chains(reports)
    except ValueError as exc:
        raise RobovlaError(f"--merge: {exc}") from None
    out = out or Path(files[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    print(rollout.table(report))
    write_json(out / "long_horizon.json", report)
    chart = rollout.chart(report, out / "long_horizon.png", title=f"{len(files)} shards merged")
    print(f"\nwrote {out / 'long_horizon.json'}, {chart}", file=sys.stdout)
    return 0
