"""LeRobotDataset v3.0, as one plugin (entry point ``lerobot``). It registers:

- dataset ``lerobot``: a LeRobotDataset folder or hub id (:class:`~.dataset.LeRobotDataset`),
  read with pyarrow and PyAV (``pip install 'robovla[lerobot]'``);
- action space ``continuous``: any continuous action vector with a gripper dimension,
  normalized per dimension (:class:`~.actions.Continuous`).

Modules: ``files`` (what the format's files hold), ``video`` (MP4 frames), ``dataset`` (the
reader), ``checks`` (``robo-run data check``), ``actions`` (the action space), ``export``
(``robo-run data export --to lerobot``: any robovla dataset written as a LeRobotDataset).
Components are registered by reference, so that listing plugins imports neither pyarrow nor PyAV.
"""

import robovla


@robovla.hookimpl
def register_datasets(register):
    register("lerobot", "robovla_plugins.datasets.lerobot.dataset:LeRobotDataset")


@robovla.hookimpl
def register_action_spaces(register):
    register("continuous", "robovla_plugins.datasets.lerobot.actions:Continuous")
