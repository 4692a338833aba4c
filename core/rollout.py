"""Closed-loop evaluation: a :class:`robovla.Policy` drives Envs, one control step at a time.

Two protocols:

- :func:`long_horizon`, CALVIN's (reference: calvin_agent/evaluation/evaluate_policy.py):
  per chain, the env is reset once to the chain's start state; then per subtask the
  policy is reset, the env gives the instruction, and the policy has ``steps_per_task``
  env steps (360 in CALVIN), the oracle asked after every step. Success moves on to the
  next subtask from wherever the robot stopped (no reset); a failure ends the chain.
  Reported: the success rate after 1..L subtasks in a row, the average length (their sum)
  and per task the successes and attempts.
- :func:`evaluate`, single-task episodes: episode e resets the env with seed ``seed + e``,
  draws its task with ``numpy.random.default_rng([seed, e])`` among ``env.tasks`` and runs
  until success or ``max_steps``.

Several envs (an :class:`robovla.env_workers.EnvPool`, in worker processes or in this one)
run different chains side by side, stepped in lockstep with one batched policy call per
control step; sampling heads draw from a generator seeded per chain and subtask (per
episode), so each result depends on the seed alone, not on how many envs ran or in what
order. Before the first chain, the env's first start is checked against the cameras the
policy reads (a misfit ends the evaluation at once). A chain whose policy gives a malformed
command (NaN, a wrong shape), whose observation the policy cannot read (a NaN state) or
whose env raises is recorded as failed with the error and the evaluation goes on (the
policy raising anything else, a bug, ends the evaluation; what finished before is kept);
a chain whose
worker process dies is re-run from its start in a fresh worker (at most
:data:`MAX_RERUNS` times). ``on_result`` sees each result as it ends (robovla.eval_log
writes them down, so that an interrupted evaluation resumes), and a recorder
(robovla.videos) films the chains it wants.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from robovla.batch import ROBOT_OBS_DIM
from robovla.env import Chain, Env, Observation
from robovla.env_workers import EnvPool, EnvWorkerError, Fault, describe
from robovla.eval_report import chart, merge_chains, summarize_chains, summarize_episodes, table

__all__ = ["long_horizon", "evaluate", "episode_max_steps", "Job", "MAX_RERUNS",
           "chart", "table", "merge_chains", "summarize_chains"]

MAX_RERUNS = 2
"""A chain whose worker process dies is re-run from its start this many times; then it is
recorded as failed with the error."""


def episode_max_steps(config: Any, max_steps: int | None, name: str) -> int:
    """``max_steps``, or the env config's ``max_steps`` (``name``: the env's, for the error);
    an error when neither is there."""
    if max_steps is None:
        max_steps = getattr(config, "max_steps", None)
        if max_steps is None:
            raise ValueError(f"{name} has no config.max_steps; pass max_steps= (robo-run eval --steps N): the steps a "
                             "policy gets per task before it counts as failed")
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return int(max_steps)


def command_problem(command: Any) -> str | None:
    """What is wrong with a policy's command for an env (a finite vector), or None."""
    array = np.asarray(command)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return f"the policy's command is {array.dtype} {list(array.shape)}, not a vector [A] of numbers"
    if not np.isfinite(array).all():
        return f"the policy's command is not finite: {np.array2string(array, precision=4)}"
    return None


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One chain (or episode) to run: its place in the list given, its number, its start."""

    position: int
    index: int
    state: Any
    tasks: tuple[str, ...] | None  # None: an episode, whose task is drawn after the reset


@dataclass
class _Run:
    """A job under way in one slot."""

    job: Job
    tasks: tuple[str, ...] = ()
    observation: Any = None
    instruction: str = ""
    subtask: int = 0
    steps: int = 0
    steps_per_subtask: list[int] = field(default_factory=list)
    reruns: int = 0


class _Runner:
    """Runs jobs on a pool's slots in lockstep (module docstring)."""

    def __init__(self, policy: Any, pool: EnvPool, limit: int, seed: int, episodes: bool,
                 on_result: Callable[[dict[str, Any]], None] | None, recorder: Any):
        self.policy, self.pool, self.limit, self.seed, self.episodes = policy, pool, limit, seed, episodes
        self.on_result, self.recorder = on_result, recorder
        self.running: dict[int, _Run] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.failed, self.score = 0, 0.0  # chains that ended in an error; sum of successes (of lengths)

    def run(self, jobs: list[Job], progress: bool, desc: str, probe: Any) -> dict[int, dict[str, Any]]:
        """Run ``jobs``; first, ``probe`` (the protocol's first start state, whether or not it is
        among ``jobs``) checks that the env renders the cameras the policy reads."""
        from tqdm import tqdm

        if jobs:
            self.check_fit(probe)
        pending = deque(jobs)
        with tqdm(total=len(jobs), desc=desc, unit="episode" if self.episodes else "chain",
                  disable=not progress) as self.bar:
            while pending or self.running:
                for slot in range(len(self.pool)):
                    while slot not in self.running and pending:
                        self.start(slot, _Run(pending.popleft()))
                if self.running:
                    self.step()
        return self.results

    # ------------------------------------------------------------------- a job's life

    def start(self, slot: int, run: _Run) -> None:
        """Reset the slot's env to the job's start and begin its first subtask."""
        self.running[slot] = run
        if self.recorder is not None:
            self.recorder.begin(run.job)
        reply = self.pool.call("begin", {slot: (run.job.state,)})[slot]
        if isinstance(reply, Fault):
            return self.fault(slot, reply)
        run.observation, feasible = reply
        if self.episodes:
            if not feasible:
                return self.finish(slot, "the env offers no task after reset (its tasks are empty)")
            run.tasks = (feasible[int(np.random.default_rng([self.seed, run.job.index]).integers(len(feasible)))],)
        else:
            run.tasks = tuple(run.job.tasks)
        self.begin_subtask(slot)

    def begin_subtask(self, slot: int) -> None:
        run = self.running[slot]
        run.steps = 0
        reply = self.pool.call("start", {slot: (run.tasks[run.subtask],)})[slot]
        if isinstance(reply, Fault):
            return self.fault(slot, reply)
        run.instruction = reply
        index = run.job.index
        self.policy.reset(index, seed=self.seed * 100_003 + index if self.episodes else
                          self.seed * 1_000_003 + index * 101 + run.subtask)

    def step(self) -> None:
        """One control step of every running job: one policy call, then every env at once."""
        from robovla.policy import ObservationError

        slots = sorted(self.running)
        try:
            commands = self.act(slots)
        except ObservationError:  # raised before the policy changed anything: each slot asked alone
            commands, kept = [], []
            for slot in slots:
                try:
                    commands.append(self.act([slot])[0])
                    kept.append(slot)
                except ObservationError as exc:
                    self.finish(slot, f"the env's observation is unusable: {exc}")
            slots = kept
        requests = {}
        for slot, command in zip(slots, commands):
            problem = command_problem(command)
            if problem:
                self.finish(slot, problem)
            else:
                requests[slot] = (np.asarray(command),)
        for slot, reply in self.pool.call("step", requests).items():
            if isinstance(reply, Fault):
                self.fault(slot, reply)
                continue
            run = self.running[slot]
            run.observation, success = reply
            run.steps += 1
            over = not success and run.steps >= self.limit
            if success or over:
                run.steps_per_subtask.append(run.steps)
                run.subtask += int(success)
            self.film(run, over)
            if over or run.subtask == len(run.tasks):
                self.finish(slot)
            elif success:
                self.begin_subtask(slot)

    def act(self, slots: list[int]) -> Any:
        """The policy's commands for ``slots``. The policy raising otherwise (a bug, an image it
        cannot read) ends the evaluation; the results finished before are kept."""
        runs = [self.running[s] for s in slots]  # the policy keeps each chain under its number
        return self.policy.act_batch([r.observation for r in runs], [r.instruction for r in runs],
                                     keys=[r.job.index for r in runs])

    def check_fit(self, state: Any) -> None:
        """Reset slot 0 to ``state`` and check that its images are what the policy reads (cameras,
        uint8 [H, W, 3]); an ObservationError (the env and the policy do not fit) ends the
        evaluation before it starts. Any other fault is left to the chain that starts there."""
        from robovla.policy import check_observation

        cameras = getattr(self.policy, "cameras", None)
        reply = self.pool.call("begin", {0: (state,)})[0]
        if cameras is not None and not isinstance(reply, Fault) and isinstance(reply[0], Observation):
            shown = Observation(images=reply[0].images, robot_obs=np.zeros(ROBOT_OBS_DIM))
            check_observation(shown, "", cameras, where="the env's first observation")

    def fault(self, slot: int, fault: Fault) -> None:
        """A slot's call failed: re-run the job in a fresh worker when the worker died, else fail it."""
        run = self.running[slot]
        if not fault.died:
            return self.finish(slot, fault.message)
        try:
            self.pool.restart(slot)
        except Exception as exc:  # noqa: BLE001 - no worker: the evaluation cannot go on
            raise EnvWorkerError(f"{fault.message}; starting a fresh worker failed: {describe(exc)}. The chains "
                                 "finished so far are kept: fix the env, then continue with --resume") from None
        if run.reruns >= MAX_RERUNS:
            return self.finish(slot, f"{fault.message}; the chain was run {run.reruns + 1} times, each time "
                                     "killing its worker")
        self.bar.write(f"{fault.message}; re-running {'episode' if self.episodes else 'chain'} {run.job.index} "
                       "from its start in a fresh worker")
        self.policy.drop(run.job.index)
        self.start(slot, _Run(run.job, reruns=run.reruns + 1))  # the recorder films it again from its start

    def finish(self, slot: int, error: str | None = None) -> None:
        run = self.running.pop(slot)
        if error is not None and len(run.steps_per_subtask) <= run.subtask < len(run.tasks or (None,)):
            run.steps_per_subtask.append(run.steps)  # the steps the failing subtask got
        result = self.result(run)
        if error is not None:
            result["error"] = error
            self.failed += 1
            self.bar.write(f"{'episode' if self.episodes else 'chain'} {run.job.index} failed: {error.splitlines()[0]}")
        self.policy.drop(run.job.index)
        if self.recorder is not None:
            self.recorder.end(run.job, result)
        if self.on_result is not None:
            self.on_result(result)
        self.results[run.job.position] = result
        self.score += result["success"] if self.episodes else result["completed"]
        self.bar.update(1)
        self.bar.set_postfix({"success" if self.episodes else "avg_len": f"{self.score / len(self.results):.2f}",
                              **({"errors": self.failed} if self.failed else {})}, refresh=False)

    def result(self, run: _Run) -> dict[str, Any]:
        job = run.job
        if self.episodes:
            return {"index": job.index, "seed": job.state, "task": run.tasks[0] if run.tasks else "(no task)",
                    "instruction": run.instruction, "success": run.subtask == 1,
                    "steps": run.steps_per_subtask[0] if run.steps_per_subtask else 0}
        return {"index": job.index, "state": job.state, "tasks": list(job.tasks), "seed": self.seed,
                "completed": run.subtask, "steps": run.steps_per_subtask,
                "success": [i < run.subtask for i in range(len(run.steps_per_subtask))]}

    def film(self, run: _Run, over: bool) -> None:
        if self.recorder is None or not self.recorder.wants(run.job):
            return
        marks = [(task, "done" if i < run.subtask else "failed" if i == run.subtask and over else
                  "running" if i == run.subtask else "pending") for i, task in enumerate(run.tasks)]
        self.recorder.frame(run.job, run.observation, run.instruction, marks)


def _pool(envs: Env | list[Env] | EnvPool) -> EnvPool:
    """A pool over the envs given (the caller keeps them and closes them)."""
    if isinstance(envs, EnvPool):
        return envs
    if isinstance(envs, Env) or envs:
        return EnvPool.of(envs)
    raise ValueError("an evaluation needs at least one env")


# ------------------------------------------------------------------------ protocols


def long_horizon(policy: Any, envs: Env | list[Env] | EnvPool, chains: list[Chain], steps_per_task: int | None = None,
                 seed: int = 0, progress: bool = True, indices: list[int] | None = None,
                 done: dict[int, dict[str, Any]] | None = None, on_result: Callable | None = None,
                 recorder: Any = None) -> dict[str, Any]:
    """Run ``chains`` under the long-horizon protocol (module docstring) on ``envs`` side by side.

    Returns ``avg_len``, ``chain_sr`` {"1".."L": fraction}, ``task_info`` {task: {"success",
    "total"}}, ``sequences``, ``steps_per_task``, ``mean_steps`` (env steps per chain),
    ``errors`` and ``results`` (per chain: its index, state, tasks, seed, ``completed``, the
    steps and the success of each attempted subtask, and ``error`` when it ended in one).
    ``indices`` numbers the chains (default 0, 1, ...): a shard of a longer list keeps the
    numbers, and so the seeds, its chains have in the whole list. ``done`` maps indices to
    results already finished (a resumed evaluation): those chains are not run again.
    """
    pool = _pool(envs)
    if not chains:
        raise ValueError("long_horizon needs at least one chain")
    limit = episode_max_steps(pool.config, steps_per_task, pool.name)
    indices = list(range(len(chains))) if indices is None else list(indices)
    if len(indices) != len(chains):
        raise ValueError(f"{len(indices)} indices for {len(chains)} chains")
    done = done or {}
    jobs = [Job(p, i, c.state, tuple(c.tasks)) for p, (i, c) in enumerate(zip(indices, chains)) if i not in done]
    runner = _Runner(policy, pool, limit, seed, False, on_result, recorder)
    fresh = runner.run(jobs, progress, "long-horizon chains", probe=chains[0].state)
    results = [fresh[p] if i not in done else done[i] for p, i in enumerate(indices)]
    return summarize_chains(results, limit)


def evaluate(policy: Any, env: Env | list[Env] | EnvPool, episodes: int, seed: int = 0, max_steps: int | None = None,
             progress: bool = True, done: dict[int, dict[str, Any]] | None = None, on_result: Callable | None = None,
             recorder: Any = None) -> dict[str, Any]:
    """Run ``episodes`` single-task episodes of ``policy`` in ``env`` (module docstring; one
    env, several side by side, or a pool).

    Returns ``success_rate``, ``per_task`` (task -> {"success_rate", "episodes"}),
    ``mean_steps`` (over all episodes; a failure counts its ``max_steps``), ``episodes``,
    ``max_steps``, ``seed``, ``errors`` and ``results`` (one dict per episode: index, seed,
    task, instruction, success, steps, and ``error`` when it ended in one).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    pool = _pool(env)
    limit = episode_max_steps(pool.config, max_steps, pool.name)
    done = done or {}
    jobs = [Job(e, e, seed + e, None) for e in range(episodes) if e not in done]
    fresh = _Runner(policy, pool, limit, seed, True, on_result, recorder).run(jobs, progress, "closed loop",
                                                                              probe=seed)
    results = [fresh[e] if e not in done else done[e] for e in range(episodes)]
    return summarize_episodes(results, limit, seed)
