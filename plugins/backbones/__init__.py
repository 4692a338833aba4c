"""robovla's built-in backbones: Kosmos-2 and PaLI-Gemma through the stock transformers classes.

This module holds only the hooks and stays free of torch and transformers, so that
``robo-run plugins`` and ``--help`` stay fast; each class is imported on first use.
"""

import robovla


@robovla.hookimpl
def register_backbones(register):
    register("kosmos", "robovla_plugins.backbones.kosmos:Kosmos")
    register("paligemma", "robovla_plugins.backbones.paligemma:PaliGemma")
