"""robovla's built-in backbones: Kosmos-2 and PaLI-Gemma through the stock transformers classes,
a composite of any timm vision encoder with any Hugging Face causal language model, and
``cnn-pool``, a small backbone built to train from scratch on a CPU (the demo's); and the
``robovlms`` converter, which maps RoboVLMs' checkpoints onto the first two.

This module holds only the hooks and stays free of torch and transformers, so that
``robo-run plugins`` and ``--help`` stay fast; each class is imported on first use.
"""

import robovla


@robovla.hookimpl
def register_backbones(register):
    register("kosmos", "robovla_plugins.backbones.kosmos:Kosmos")
    register("paligemma", "robovla_plugins.backbones.paligemma:PaliGemma")
    register("composite", "robovla_plugins.backbones.composite:Composite")
    register("cnn-pool", "robovla_plugins.backbones.cnn_pool:CNNPool")


@robovla.hookimpl
def register_converters(register):
    register("robovlms", "robovla_plugins.backbones.robovlms:RoboVLMs")
