"""registry.toml: values, never code. Presets (named recipes), the default preset, and each
first-party backbone's known checkpoints (hub id, image size, image tokens, mean/std), in
the way timm keeps its pretrained-config tables.

The file lives at the repository root; wheels carry it inside the ``robovla`` package.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

from robovla.errors import ConfigError, unknown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def path() -> Path:
    """Where registry.toml is: inside the installed package (wheel) or the source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "registry.toml", here.parent / "registry.toml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"registry.toml is missing from {here} and {here.parent}; reinstall robovla")


def read_toml(file: Path) -> dict[str, Any]:
    """Parse a TOML file, with errors that name the file and the line."""
    try:
        with open(file, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such file"], header="cannot read configuration") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"], header="cannot read configuration") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot be read: {type(exc).__name__}: {exc}; TOML files are UTF-8 text"],
                          header="cannot read configuration") from None


def toml_value(text: str) -> Any:
    """Parse one TOML value, e.g. ``["q_proj", "v_proj"]``; errors say what was given."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{text!r} is not a TOML value ({exc}); write lists as "
                           "[\"a\", \"b\"] or a,b"], header="cannot parse a flag value") from None


@functools.cache
def load() -> dict[str, Any]:
    """The parsed registry.toml (read once per process)."""
    return read_toml(path())


def presets() -> dict[str, dict[str, Any]]:
    """Every preset: name -> its table (``description`` plus config sections)."""
    return load().get("presets", {})


def preset(name: str) -> dict[str, dict[str, Any]]:
    """The config sections of preset ``name`` (its description removed)."""
    table = presets().get(name)
    if table is None:
        where = f" (named by [defaults] in {path()})" if name == default_preset() else ""
        raise unknown("preset", name, presets(), f"List them with: robo-run presets{where}")
    return {k: v for k, v in table.items() if k != "description"}


def default_preset() -> str | None:
    """The preset a run starts from when no ``--preset`` is given."""
    return load().get("defaults", {}).get("preset")


def checkpoints(backbone: str) -> dict[str, dict[str, Any]]:
    """Known checkpoints of a first-party backbone: hub id -> image_size, image_tokens, mean, std."""
    return load().get("checkpoints", {}).get(backbone, {})
