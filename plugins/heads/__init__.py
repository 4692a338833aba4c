"""The built-in policy heads, registered as one plugin (entry point ``heads``).

This module imports no torch: the heads are registered as "module:Class" strings and
imported on first use, so that ``robo-run plugins`` stays fast.
"""

import robovla


@robovla.hookimpl
def register_heads(register):
    register("lstm", "robovla_plugins.heads.lstm:LSTMHead")
    register("mlp", "robovla_plugins.heads.mlp:MLPHead")
    register("gpt", "robovla_plugins.heads.gpt:GPTHead")
    register("discrete", "robovla_plugins.heads.discrete:DiscreteHead")
    register("flow", "robovla_plugins.heads.flow:FlowHead")
