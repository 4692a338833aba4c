"""Exceptions robovla raises for user-facing problems, and the closest-match helper.

Every message names the thing, the place (flag, file, key, plugin, entry point) and the
fix. The command line prints these messages as they are, without a traceback.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path


class RobovlaError(Exception):
    """Base class of the errors robovla raises for problems a user can fix."""


class ConfigError(RobovlaError, ValueError):
    """A run configuration is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], header: str = "invalid configuration"):
        self.problems = list(problems)
        lines = "\n".join("  " + p.replace("\n", "\n    ") for p in self.problems)
        n = len(self.problems)
        super().__init__(f"{header} ({n} problem{'s' * (n != 1)}):\n{lines}")


class UnknownNameError(RobovlaError, KeyError):
    """A name (component, preset, field, section) is not one of the valid ones."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.message


class PluginError(RobovlaError, RuntimeError):
    """A plugin failed to load, raised inside its hook, or registered something unusable."""


def natural_key(name: str) -> list:
    """Sort key that puts "rel-2" before "rel-10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``name`` (difflib ratio >= 0.6), or None."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def unknown(what: str, name: str, choices: Iterable[str], hint: str = "") -> UnknownNameError:
    """Build the standard "unknown X" error: the valid names and the closest match.

    >>> str(unknown("head", "lstn", ["lstm", "mlp"]))
    "unknown head 'lstn'; did you mean 'lstm'? Valid: lstm, mlp"
    """
    choices = sorted(choices, key=natural_key)
    near = closest(name, choices)
    msg = f"unknown {what} {name!r}" + (f"; did you mean {near!r}?" if near else ".")
    msg += f" Valid: {', '.join(choices)}" if choices else f" No {what} is available."
    if hint:
        msg += f"\n{hint}"
    return UnknownNameError(msg)


def missing_folder(path: str | Path) -> str:
    """Why ``path`` is not a folder, for messages: "no such folder" with the nearest existing
    folder above it, the name in it closest to the missing one, and what else it holds.

    A mistyped path then names the way to the right one:
    ``no such folder; /data/task_D_D exists and holds training/, validation/ (did you mean .../training?)``
    """
    path = Path(path).expanduser().absolute()
    if path.exists():
        return "is a file, not a folder"
    existing, missing = path, None
    while not existing.exists() and existing != existing.parent:
        existing, missing = existing.parent, existing.name
    if not existing.is_dir():
        return f"no such folder ({existing} is a file)"
    if missing and (existing / missing).is_symlink():
        return f"no such folder: {existing / missing} is a broken symbolic link (to {os.readlink(existing / missing)})"
    try:
        names = sorted((p.name + "/" * p.is_dir() for p in existing.iterdir() if not p.name.startswith(".")),
                       key=natural_key)
    except OSError as exc:
        return f"no such folder; {existing} exists but cannot be listed ({exc.strerror or exc})"
    near = closest(missing or "", [n.rstrip("/") for n in names])
    held = ", ".join(names[:12]) + (f", ... ({len(names)} entries)" if len(names) > 12 else "") if names else "nothing"
    hint = f" (did you mean {existing / near}?)" if near else ""
    return f"no such folder; the nearest existing folder is {existing}, which holds {held}{hint}"
