"""Test setup: offline hub, robovla's plugin kit, and the example plugin registered from source.

The example plugin (tests/plugin_example) is registered in this process from its source
folder, so that the conformance checks run on real components; tests that install it with
pip run robo-run in subprocesses, where the installed entry point is what loads.
"""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub lookup would otherwise hang ~30 s before failing
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Only the source copy of the example counts in this process, even if it is also installed.
os.environ["ROBOVLA_DISABLE_PLUGINS"] = "robovla-example"

from helpers import EXAMPLE  # noqa: E402
sys.path.insert(0, str(EXAMPLE))

pytest_plugins = ["robovla.testing"]


def pytest_configure(config):
    import robovla_example

    from robovla import plugins

    plugins.add(robovla_example, plugins.PluginInfo(
        "robovla-example:example", "robovla-example", "0.1.0", "example = robovla_example", "robovla_example"))
