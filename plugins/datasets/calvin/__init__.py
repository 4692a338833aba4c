"""CALVIN, as one plugin (entry point ``calvin``). It registers:

- dataset ``calvin``: a CALVIN split folder (:class:`~.dataset.CalvinDataset`);
- envs ``synthetic``, the synthetic reach task written in CALVIN's layout
  (:class:`~.synthetic.SyntheticReach`), and ``calvin``, CALVIN's simulator under the
  long-horizon protocol (:class:`~.sim.CalvinSim`, needs calvin_env);
- action spaces ``rel-world``, ``rel-tcp`` and ``abs-world`` (:mod:`.actions`).

Modules: ``dataset`` (the reader), ``files`` (what CALVIN's files hold, read as data only),
``actions`` (action spaces and rotation math), ``protocol`` (the 34 tasks, the 1000 chains,
the task oracle), ``sim`` (the simulator env), ``synthetic`` (the synthetic task: its writer
and its env).
"""

import robovla
from robovla_plugins.datasets.calvin.actions import AbsWorld, RelTcp, RelWorld
from robovla_plugins.datasets.calvin.dataset import CalvinDataset
from robovla_plugins.datasets.calvin.sim import CalvinSim
from robovla_plugins.datasets.calvin.synthetic import SyntheticReach


@robovla.hookimpl
def register_datasets(register):
    register("calvin", CalvinDataset)


@robovla.hookimpl
def register_envs(register):
    register("synthetic", SyntheticReach)
    register("calvin", CalvinSim)


@robovla.hookimpl
def register_action_spaces(register):
    register("rel-world", RelWorld)
    register("rel-tcp", RelTcp)
    register("abs-world", AbsWorld)
