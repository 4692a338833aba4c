"""Config-only components for configuration and CLI tests (one of each run kind)."""

from pathlib import Path

from pydantic import Field

import robovla


class ToyBackbone(robovla.Backbone):
    """Stands in for a backbone where only its Config is used."""

    class Config(robovla.ComponentConfig):
        path: str = Field("tiny", description="checkpoint or size")
        layers: int = Field(2, ge=1, description="decoder layers")


class OtherBackbone(robovla.Backbone):
    """A second backbone with different fields."""

    class Config(robovla.ComponentConfig):
        width: int = Field(64, description="hidden width")


class ToyDataset(robovla.Dataset):
    """Stands in for a dataset; its path is required."""

    class Config(robovla.ComponentConfig):
        path: Path = Field(description="split folder")


class Toy:
    @robovla.hookimpl
    def register_backbones(self, register):
        register("toy", ToyBackbone)
        register("other", OtherBackbone)

    @robovla.hookimpl
    def register_datasets(self, register):
        register("toy-data", ToyDataset)


PRESETS = {
    "defaults": {"preset": "toy-recipe"},
    "presets": {
        "toy-recipe": {
            "description": "toy components with a few recipe values",
            "backbone": {"name": "toy", "layers": 6},
            "head": {"name": "example-linear"},
            "dataset": {"name": "toy-data", "path": "/data/from-preset"},
            "action_space": {"name": "example-clip", "bound": 0.65},
            "train": {"lr": 2e-5, "window": 8},
        },
        "broken-recipe": {"description": "a typo inside", "train": {"lrr": 1.0}},
    },
}
