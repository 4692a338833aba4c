"""robovla-example: the hooks. Kept free of torch, so `robo-run plugins` stays fast."""

import robovla

from robovla_example.action_space import ClipActions


@robovla.hookimpl
def register_heads(register):
    # A "module:Class" string is imported on first use; the head module needs torch.
    register("example-linear", "robovla_example.head:LinearHead")


@robovla.hookimpl
def register_action_spaces(register):
    register("example-clip", ClipActions)  # numpy only, so the class itself is fine
