"""The ``calvin`` env: CALVIN's simulator (calvin_env, scene D) under the long-horizon protocol.

calvin_env is optional and not on PyPI (docs/calvin-eval.md installs it). The simulator is
built from the dataset's ``validation/.hydra/merged_config.yaml`` by a factory named as
``module:function`` (``--env.simulator``), called as ``f(path, obs_space=..., show_gui=False,
use_egl=...)`` like calvin_env's ``get_env``; tests pass a fake one.

A chain (:meth:`CalvinSim.chains`) is one of CALVIN's 1000 official sequences: reset once to
its start state (robot neutral, scene from :func:`initial_scene_obs`), then five subtasks
without a reset, each given its validation sentence and judged by CALVIN's task oracle
between the info at its start and the current info.
"""

from __future__ import annotations

import importlib
import os
import re
import types
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import Field

import robovla
from robovla.env import Chain, Observation
from robovla.errors import unknown
from robovla.safe_read import UnsafeFileError, open_regular
from robovla_plugins.datasets.calvin.protocol import (NEUTRAL_ROBOT_OBS, NUM_SEQUENCES, TASKS, VALIDATION_INSTRUCTIONS,
                                                      apply, check_state, initial_scene_obs, initial_states, sequences,
                                                      task_achieved)

INSTALL = ("calvin_env is not on PyPI; install it from git with its tacto submodule:\n"
           "    git clone --recurse-submodules https://github.com/mees/calvin_env.git\n"
           "    pip install -e calvin_env/tacto && pip install -e calvin_env\n"
           "(docs/calvin-eval.md has the details)")


class CalvinSimError(robovla.RobovlaError, RuntimeError):
    """The CALVIN simulator cannot be built or was used wrongly; the message says how to fix it."""


PIP_NAMES = {"yaml": "pyyaml", "hydra": "hydra-core", "cv2": "opencv-python", "quaternion": "numpy-quaternion",
             "git": "gitpython"}
"""Import name -> PyPI name, for calvin_env's dependencies whose names differ."""


def _import(module: str, flag: str) -> Any:
    """Import ``module``; a missing calvin_env (or one of its dependencies) gets the install advice."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == "calvin_env":
            raise CalvinSimError(f"{flag}: the calvin env needs the package calvin_env, which is not "
                                 f"installed. {INSTALL}") from None
        raise CalvinSimError(f"{flag}: importing {module} needs the module {missing!r}, which is not installed: "
                             f"pip install {PIP_NAMES.get(missing, missing)} (calvin_env's requirements.txt lists "
                             "its dependencies)") from None


def load_factory(spec: str) -> Callable[..., Any]:
    """The function a ``module:function`` string names."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise CalvinSimError(f"--env.simulator {spec!r}: expected 'module:function', e.g. {DEFAULT_SIMULATOR!r}")
    factory = getattr(_import(module, f"--env.simulator {spec!r}"), name, None)
    if not callable(factory):
        raise CalvinSimError(f"--env.simulator {spec!r}: module {module} has no function {name!r}")
    return factory


CONFIG_LIMIT = 1 << 20  # bytes; CALVIN's merged_config.yaml has about 10 KB
TARGET = re.compile(r"calvin_env(\.[A-Za-z][A-Za-z0-9_]*)+")  # written out; no dunders, no interpolation
NODE_RESOLVERS = ("oc.create", "oc.decode")  # resolvers that turn a string into config nodes (a _target_ could hide)


def read_config(file: Path) -> tuple[str, list[tuple[str, str]]]:
    """The text of a split's ``merged_config.yaml`` and its hydra targets as (key path, name).

    hydra's instantiate imports and calls whatever a ``_target_`` names, and the file comes
    with a download, so it is refused unless every ``_target_`` is a calvin_env name written
    out (``calvin_env.``..., not interpolated). :func:`check_targets` then checks, once
    calvin_env is imported, that each name is a class or function calvin_env defines."""
    try:
        with open_regular(file) as f:
            raw = f.read(CONFIG_LIMIT + 1)
    except UnsafeFileError as exc:
        raise CalvinSimError(str(exc)) from None
    if len(raw) > CONFIG_LIMIT:
        raise CalvinSimError(f"{file}: over {CONFIG_LIMIT} bytes; CALVIN's is about 10 KB: use the file from "
                             "CALVIN's download")
    yaml = _import("yaml", f"reading {file}")
    try:
        text = raw.decode("utf-8")
        tree = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise CalvinSimError(f"{file}: not readable YAML ({type(exc).__name__}: {exc})") from None
    targets, problems = walk_targets(tree)
    _refuse(file, problems)
    return text, targets


def _refuse(file: Path, problems: list[tuple[str, str]]) -> None:
    if problems:
        raise CalvinSimError(f"{file}: refused, it would make hydra call what is not calvin_env's (only calvin_env's "
                             f"own classes and functions are built):\n  " +
                             "\n  ".join(f"{where}: {what}" for where, what in problems[:20]) +
                             "\nUse the .hydra/merged_config.yaml of CALVIN's own download.")


def walk_targets(tree: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(key path, name) of every ``_target_``, and (key path, what is wrong) for each that is
    not a calvin_env name written out and each string that builds config nodes."""
    targets: list[tuple[str, str]] = []
    problems: list[tuple[str, str]] = []
    stack: list[tuple[str, Any]] = [("", tree)]
    seen: set[int] = set()  # YAML anchors share nodes: visit each once
    while stack:
        path, node = stack.pop()
        if isinstance(node, (dict, list)):
            if id(node) in seen:
                continue
            seen.add(id(node))
        if isinstance(node, dict):
            for key, value in node.items():
                where = f"{path}.{key}" if path else str(key)
                if key == "_target_":
                    ok = isinstance(value, str) and TARGET.fullmatch(value)
                    (targets if ok else problems).append((where, value if ok else f"target {value!r} is not a "
                                                          "calvin_env name (calvin_env.module.Class, written out)"))
                stack.append((where, value))
        elif isinstance(node, list):
            stack.extend((f"{path}[{i}]", value) for i, value in enumerate(node))
        elif isinstance(node, str) and any(r in node for r in NODE_RESOLVERS):
            problems.append((path, f"{node[:80]!r} builds config nodes from a string ({', '.join(NODE_RESOLVERS)})"))
    return sorted(targets), sorted(problems)


def _calvin_env_own(obj: Any) -> bool:
    name = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    return isinstance(name, str) and (name == "calvin_env" or name.startswith("calvin_env."))


def _describe(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return f"the module {obj.__name__}"
    return f"{type(obj).__name__} {getattr(obj, '__qualname__', '?')} of {getattr(obj, '__module__', None)}"


def check_targets(file: Path, targets: list[tuple[str, str]]) -> None:
    """Refuse targets that reach outside calvin_env through its attributes (e.g.
    ``calvin_env.envs.play_table_env.os.system``: a module calvin_env imports). Each step is
    looked up as hydra does (attribute, else submodule) and must be calvin_env's own module,
    class or function; nothing is called."""
    problems = []
    for where, name in targets:
        parts = name.split(".")
        obj: Any = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], start=2):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                try:
                    obj = importlib.import_module(".".join(parts[:i])) if isinstance(obj, types.ModuleType) else None
                except ImportError:
                    obj = None
            if obj is None or not _calvin_env_own(obj):
                problems.append((where, f"target {name!r}: {'.'.join(parts[:i])} " + (
                    "does not exist" if obj is None else f"is {_describe(obj)}, not calvin_env's own")))
                break
    _refuse(file, problems)


def make_calvin_env(dataset_path: Path, obs_space: dict[str, list[str]] | None = None, show_gui: bool = False,
                    use_egl: bool = False) -> Any:
    """calvin_env's ``get_env`` with the renderer chosen: the env section of the dataset's
    ``.hydra/merged_config.yaml`` (it says use_egl: true), only the cameras of ``obs_space``.
    The file is checked first (:func:`read_config`, :func:`check_targets`): only calvin_env's
    own classes and functions are built.

    get_env itself keeps the file's use_egl, so a machine without a working EGL driver could not
    run it headless; use_egl=False renders with pybullet's TinyRenderer on the CPU.
    """
    file = Path(dataset_path) / ".hydra" / "merged_config.yaml"
    checked = read_config(file) if os.path.lexists(file) else None  # refused before anything is imported
    _import("calvin_env.envs.play_table_env", "--env.simulator")  # the install advice, before hydra's errors
    if checked is None:
        raise CalvinSimError(f"--env.path {dataset_path}: no .hydra/merged_config.yaml there; point it at the "
                             "validation/ folder of a CALVIN split, e.g. /data/task_D_D/validation")
    text, targets = checked
    check_targets(file, targets)
    config = _import("omegaconf", "--env.simulator").OmegaConf.create(text)  # the text that was checked
    instantiate = _import("hydra.utils", "--env.simulator").instantiate
    if obs_space is not None:
        wanted = {key.split("_", 1)[1] for key in obs_space["rgb_obs"] + obs_space["depth_obs"]}
        for name in set(config.cameras) - wanted:
            del config.cameras[name]
    config.env.use_egl = use_egl
    return instantiate(config.env, show_gui=show_gui, use_vr=False, use_scene_info=True)


DEFAULT_SIMULATOR = f"{__name__}:make_calvin_env"


class CalvinSim(robovla.Env):
    """CALVIN's simulator, scene D, driven by relative world-frame commands (rel_actions)."""

    class Config(robovla.ComponentConfig):
        path: Path = Field(description="the validation/ folder of a CALVIN split (its .hydra/merged_config.yaml "
                                       "builds the simulator), e.g. /data/task_D_D/validation")
        max_steps: int = Field(360, ge=1, description="env steps a subtask gets before the chain fails (CALVIN: 360)")
        use_egl: bool = Field(False, description="render with EGL on a GPU; false: pybullet's TinyRenderer on the "
                                                 "CPU (headless, no display or GL driver needed, slower)")
        cameras: list[Literal["static", "gripper"]] = Field(
            ["static", "gripper"], min_length=1, description="cameras to render (static 200x200, gripper 84x84)")
        simulator: str = Field(DEFAULT_SIMULATOR, description="'module:function' that builds the simulator, called as "
                               "f(path, obs_space=..., show_gui=False, use_egl=...) and returning a calvin_env-like "
                               "env")

    def __init__(self, config: Any):
        super().__init__(config)
        factory = load_factory(config.simulator)
        obs_space = {"rgb_obs": [f"rgb_{c}" for c in config.cameras], "depth_obs": []}
        self.sim = factory(Path(config.path).expanduser(), obs_space=obs_space, show_gui=False, use_egl=config.use_egl)
        self.task: str | None = None
        self.start_info: dict[str, Any] | None = None
        self.start_state: dict[str, Any] | None = None  # the symbolic state of the last reset

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks feasible from the start state of the last reset (exactly one of the task's
        symbolic rules applies, as in the sequence generator); all 34 before a reset."""
        if self.start_state is None:
            return tuple(TASKS)
        return tuple(t for t in TASKS if len(apply(self.start_state, t)) == 1)

    def reset(self, state: Any = None) -> Observation:
        """``state``: a chain's start state (a dict, see :func:`check_state`), or an int seed
        that picks start state ``seed % 192``; None means seed 0."""
        if state is None or (isinstance(state, (int, np.integer)) and not isinstance(state, bool)):
            states = initial_states()
            state = states[int(state or 0) % len(states)]
        elif not isinstance(state, dict):
            raise CalvinSimError(f"CalvinSim.reset takes a start state (a dict from chains()) or an int seed, "
                                 f"got {state!r}")
        self.start_state = check_state(state)
        scene_obs = initial_scene_obs(self.start_state)
        self.task, self.start_info = None, None
        return self._observation(self.sim.reset(robot_obs=NEUTRAL_ROBOT_OBS.copy(), scene_obs=scene_obs))

    def start_task(self, task: str) -> str:
        if task not in TASKS:
            raise unknown("CALVIN task", task, TASKS)
        self.task, self.start_info = task, self.sim.get_info()
        return VALIDATION_INSTRUCTIONS[task]

    def step(self, command: np.ndarray) -> Observation:
        # a copy: the calvin_env that mees/calvin pins scales the array it is given in place
        command = np.array(command, dtype=np.float64)
        if command.shape != (7,) or not np.isfinite(command).all() or command[6] not in (-1.0, 1.0):
            raise ValueError(f"a CALVIN command is [7] (dx, dy, dz, droll, dpitch, dyaw in rel_actions units, "
                             f"gripper), finite, with the gripper exactly -1 or +1; got {command!r}")
        obs, _, _, _ = self.sim.step(command)
        return self._observation(obs)

    def task_success(self) -> bool:
        if self.task is None or self.start_info is None:
            raise CalvinSimError("CalvinSim.task_success: no task started; call start_task(task) after reset()")
        return task_achieved(self.task, self.start_info, self.sim.get_info())

    def chains(self, n: int) -> list[Chain]:
        """The first ``n`` of CALVIN's 1000 official sequences, in their order."""
        if not 1 <= n <= NUM_SEQUENCES:
            raise ValueError(f"CALVIN has {NUM_SEQUENCES} evaluation sequences; ask for 1 to {NUM_SEQUENCES}, got {n}")
        return [Chain(state, tasks) for state, tasks in sequences()[:n]]

    def close(self) -> None:
        self.sim.close()
        if getattr(self.sim, "cid", None) is not None:
            self.sim.cid = -1  # calvin_env's __del__ closes again, and pybullet raises "Not connected"

    def _observation(self, obs: dict[str, Any]) -> Observation:
        rgb = obs["rgb_obs"]
        missing = [c for c in self.config.cameras if f"rgb_{c}" not in rgb]
        if missing:
            raise CalvinSimError(f"the simulator renders {sorted(rgb)}, not {[f'rgb_{c}' for c in missing]}; "
                                 f"choose --env.cameras among those, or add the camera to the dataset's "
                                 f".hydra/merged_config.yaml")
        return Observation(images={c: np.asarray(rgb[f"rgb_{c}"]) for c in self.config.cameras},
                           robot_obs=np.asarray(obs["robot_obs"], dtype=np.float64))
