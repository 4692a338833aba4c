"""Find and load plugins: every entry point of group ``robovla``, each kept apart.

A plugin that fails to import, or whose hooks do not match the hookspecs, is recorded with
its error and never stops the others from loading. ``ROBOVLA_PLUGINS`` (comma-separated
distribution or entry-point names, or ``dist:entry-point``; empty means none) is an allow
list and ``ROBOVLA_DISABLE_PLUGINS`` a block list. Imports run in :func:`robovla.registry.contained`.
"""

from __future__ import annotations

import os
import re
import traceback
from dataclasses import dataclass
from importlib import metadata

import pluggy

from robovla import hookspecs
from robovla.errors import closest

GROUP = "robovla"
HOOKS = [n for n in vars(hookspecs) if n.startswith("register_")]


@dataclass
class PluginInfo:
    """Where a plugin comes from, and why it is broken (``error``) if it is."""

    name: str  # "<distribution>:<entry point name>", the key in the plugin manager
    distribution: str
    version: str
    entry_point: str  # "heads = robovla_plugins.heads", as written in pyproject.toml
    module: str
    error: str | None = None


_pm: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}
unmatched: list[str] = []  # names in ROBOVLA_PLUGINS that no installed entry point has
generation = 0  # bumped on every change, so the registry knows to rebuild


def norm(name: str) -> str:
    """Distribution and entry-point names compare case-blind, with -, _ and . alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    return None if value is None else {norm(v.strip()) for v in value.split(",") if v.strip()}


def manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with the installed entry points loaded once."""
    global _pm
    if _pm is None:
        _pm = pluggy.PluginManager("robovla")
        _pm.add_hookspecs(hookspecs)
        _load_entry_points()
    return _pm


def infos() -> dict[str, PluginInfo]:
    """Every plugin seen, loaded or broken, keyed by plugin name."""
    manager()
    return _infos


def info(name: str, module: str = "?") -> PluginInfo:
    """The record of plugin ``name``; a bare one for a plugin registered straight with pluggy."""
    return infos().get(name) or PluginInfo(name, name, "?", "(registered directly)", module)


def _load_entry_points() -> None:
    from robovla.registry import contained

    allow, deny = _env_names("ROBOVLA_PLUGINS"), _env_names("ROBOVLA_DISABLE_PLUGINS") or set()
    seen, matched = set(), set()
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"] or "?"
        for ep in dist.entry_points.select(group=GROUP):
            key = f"{dist_name}:{ep.name}"
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            ids = {norm(dist_name), norm(ep.name), f"{norm(dist_name)}:{norm(ep.name)}"}
            matched |= ids & (allow or set())
            if (allow is not None and not ids & allow) or ids & deny:
                continue
            info = PluginInfo(key, dist_name, dist.version, f"{ep.name} = {ep.value}", ep.module)
            with contained(f"plugin {dist_name} (entry point '{info.entry_point}')") as guard:
                try:
                    add(ep.load(), info)
                except BaseException as exc:  # any failure but a real Ctrl-C: keep it, load the others
                    if guard.interrupted:
                        raise
                    remove(key)
                    info.error = describe(exc, f"importing module {ep.module!r} failed")
                    _infos[key] = info
    unmatched[:] = sorted((allow or set()) - matched)


def add(module: object, info: PluginInfo) -> PluginInfo:
    """Register ``module`` (a module or object with @hookimpl functions) as plugin ``info``.

    Hooks are checked against the specs; a mismatch marks the plugin broken instead of
    raising, so that the other plugins keep working."""
    global generation
    pm = manager()
    if info.name in _infos:
        raise ValueError(f"a plugin named {info.name!r} is registered already; remove() it first")
    try:
        pm.register(module, name=info.name)
        if not pm.get_hookcallers(module):
            pm.unregister(module)
            raise pluggy.PluginValidationError(module, "it has no @robovla.hookimpl functions; decorate "
                                               f"its hooks ({', '.join(HOOKS)}) with @robovla.hookimpl")
        for caller in pm.get_hookcallers(module):
            if not caller.has_spec():
                near = closest(caller.name, HOOKS)
                pm.unregister(module)
                raise pluggy.PluginValidationError(module, f"hookimpl {caller.name!r} matches no robovla hook"
                                                   + (f"; did you mean {near!r}?" if near else "")
                                                   + f" Valid hooks: {', '.join(HOOKS)}")
    except pluggy.PluginValidationError as exc:
        info.error = describe(exc, "its hooks do not match robovla's hookspecs")
    except ValueError as exc:  # pluggy: this object is registered already, under another name
        info.error = describe(exc, "it could not be registered")
    _infos[info.name] = info
    generation += 1
    return info


def remove(name: str) -> None:
    """Unregister plugin ``name`` (as given to :func:`add`); used by tests."""
    global generation
    pm = manager()
    if pm.has_plugin(name):
        pm.unregister(name=name)
    _infos.pop(name, None)
    generation += 1


def describe(exc: BaseException, what: str) -> str:
    """``what``, the exception and its traceback, as one text for reports."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    own = " (raised by the plugin's own code: no Ctrl-C came)" * isinstance(exc, KeyboardInterrupt)
    return f"{what}: {type(exc).__name__}: {exc}{own}\n{tb.rstrip()}"
