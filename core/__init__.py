"""robovla: turn vision-language models into robot Vision-Language-Action policies.

The top level is cheap to import: the torch-based interfaces (:class:`Backbone`,
:class:`PolicyHead`) load on first access, so ``robo-run --help`` and plugin listing
import no torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from robovla.config import ComponentConfig, RunConfig
from robovla.errors import ConfigError, PluginError, RobovlaError, UnknownNameError
from robovla.hookspecs import hookimpl
from robovla.registry import create, get_component, list_components

try:
    __version__ = version("robovla")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "Backbone": "robovla.backbone", "TextTokens": "robovla.backbone",
    "PromptedBackbone": "robovla.prompt", "PromptConfig": "robovla.prompt",
    "PolicyHead": "robovla.head", "Dims": "robovla.head", "Prediction": "robovla.head",
    "ActionSpace": "robovla.action_space",
    "Dataset": "robovla.dataset", "Segment": "robovla.dataset", "Frames": "robovla.dataset",
    "Problem": "robovla.dataset",
    "Env": "robovla.env", "Observation": "robovla.env", "Chain": "robovla.env",
    "Batch": "robovla.batch",
    "Policy": "robovla.policy", "Execution": "robovla.policy", "PolicyClient": "robovla.client",
    "Converter": "robovla.convert", "Conversion": "robovla.convert",
}

__all__ = [
    "hookimpl", "ComponentConfig", "RunConfig", "create", "get_component", "list_components",
    "ConfigError", "PluginError", "RobovlaError", "UnknownNameError", "__version__", *_LAZY,
]

if TYPE_CHECKING:
    from robovla.action_space import ActionSpace
    from robovla.backbone import Backbone, TextTokens
    from robovla.batch import Batch
    from robovla.dataset import Dataset, Frames, Problem, Segment
    from robovla.env import Chain, Env, Observation
    from robovla.head import Dims, PolicyHead, Prediction
    from robovla.client import PolicyClient
    from robovla.convert import Conversion, Converter
    from robovla.policy import Execution, Policy
    from robovla.prompt import PromptConfig, PromptedBackbone


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robovla' has no attribute {name!r}")
