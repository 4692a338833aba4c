"""registry.toml: values, never code. Presets (named recipes), the default preset, and each
first-party backbone's known checkpoints (hub id, image size, image tokens, mean/std), in
the way timm keeps its pretrained-config tables.

The file lives at the repository root; wheels carry it inside the ``robovla`` package.
"""

from __future__ import annotations

import functools
import os
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


MAX_TOML_BYTES = 1 << 20
"""The largest TOML file read (1 MiB): configs and presets are a few kilobytes."""


def read_toml(file: Path, what: str = "") -> dict[str, Any]:
    """Parse a TOML file, with errors that name the file (and ``what`` gave it, e.g. ``--config``)
    and the line. Only a regular file of at most :data:`MAX_TOML_BYTES` is read: a device
    (/dev/zero), a named pipe or a huge file is refused before reading it."""
    from robovla.safe_read import UnsafeFileError, open_regular

    where = f"{what} {file}" if what else str(file)

    def fail(problem: str) -> ConfigError:
        return ConfigError([f"{where}: {problem}"], header="cannot read configuration")

    try:
        with open_regular(file) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_TOML_BYTES:
                raise fail(f"is {size} bytes; a config file is at most {MAX_TOML_BYTES} bytes (1 MiB)")
            data = f.read(MAX_TOML_BYTES + 1)
    except UnsafeFileError as exc:
        problem = "no such file" if exc.missing else f"cannot be opened: {exc.detail}"
        raise fail(f"is {exc.kind}; give a TOML file (e.g. a run's config.toml)" if exc.kind else problem) from None
    except OSError as exc:
        raise fail(f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_TOML_BYTES:
        raise fail(f"grew past {MAX_TOML_BYTES} bytes while being read; a config file is at most 1 MiB")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise fail(f"is not UTF-8 text ({exc}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise fail(f"not valid TOML: {exc}") from None
    except RecursionError:
        raise fail("nests tables or arrays too deeply to read") from None


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
