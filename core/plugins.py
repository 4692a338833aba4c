"""Find and load plugins: every entry point of group ``robovla``, each kept apart.

A plugin that fails to import, or whose hooks do not match the hookspecs, is recorded with
its error and never stops the others from loading. ``ROBOVLA_PLUGINS`` (comma-separated
distribution or entry-point names, or ``dist:entry-point``; empty means none) is an allow
list and ``ROBOVLA_DISABLE_PLUGINS`` a block list.

Plugin code (its import, its hooks, a lazily imported class) runs inside :func:`contained`:
any exception it raises, BaseExceptions too (SystemExit, GeneratorExit, a KeyboardInterrupt
it raises itself, its own subclasses), marks that plugin broken. A real Ctrl-C still stops
robo-run: it arrives as SIGINT, whose handler notes it before Python raises the
KeyboardInterrupt, so an interrupt is passed on exactly when a SIGINT came. ``os._exit``,
which no ``except`` can catch, is replaced while plugin code runs, so that a plugin calling
it is reported as broken too (from another thread or a forked child, the call goes through,
after a line on stderr naming the plugin).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from typing import Iterator

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


class PluginExit(BaseException):
    """A plugin called ``os._exit`` while robovla ran its code (raised instead of exiting)."""

    def __init__(self, status: int):
        super().__init__(f"the plugin called os._exit({status}) while robovla ran its code")


@dataclass
class Guard:
    """What :func:`contained` saw: whether a real SIGINT (Ctrl-C) arrived meanwhile."""

    interrupted: bool = False


@contextmanager
def contained(label: str) -> Iterator[Guard]:
    """Run plugin code (``label`` names it for messages): note a real SIGINT, turn ``os._exit``
    into :class:`PluginExit`. The caller catches BaseException and asks ``guard.interrupted``."""
    guard = Guard()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):  # a real Ctrl-C: note it, then behave as before
            if previous is signal.default_int_handler or previous == signal.SIG_DFL:
                guard.interrupted = True
                raise KeyboardInterrupt
            if callable(previous):
                previous(signum, frame)

        if previous is not None:
            signal.signal(signal.SIGINT, on_sigint)
    real_exit, pid, thread = os._exit, os.getpid(), threading.get_ident()

    def exit_in_plugin(status: int) -> None:
        if os.getpid() == pid and threading.get_ident() == thread:
            raise PluginExit(status)
        print(f"robovla: {label} called os._exit({status}) while robovla loaded it", file=sys.stderr, flush=True)
        real_exit(status)

    os._exit = exit_in_plugin
    try:
        yield guard
    finally:
        os._exit = real_exit
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if guard.interrupted:  # the plugin swallowed the user's Ctrl-C: it still stops robo-run
        raise KeyboardInterrupt


def _load_entry_points() -> None:
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
                what = f"importing module {ep.module!r} failed"
                try:
                    module = ep.load()
                    what = "registering its hooks failed"
                    add(module, info)
                except BaseException as exc:  # any failure but a real Ctrl-C: keep it, load the others
                    if guard.interrupted:
                        raise
                    if _pm.has_plugin(key):
                        _pm.unregister(name=key)
                    info.error = describe(exc, what)
                    _infos[key] = info
    unmatched[:] = sorted((allow or set()) - matched)


def add(module: object, info: PluginInfo) -> PluginInfo:
    """Register ``module`` (a module or object with @hookimpl functions) as plugin ``info``.

    Hooks are checked against the specs; a mismatch marks the plugin broken instead of
    raising, so that the other plugins keep working.
    """
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
                raise pluggy.PluginValidationError(
                    module, f"hookimpl {caller.name!r} matches no robovla hook"
                    + (f"; did you mean {near!r}?" if near else "")
                    + f" Valid hooks: {', '.join(HOOKS)}",
                )
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
    note = " (raised by the plugin's own code: no Ctrl-C came)" if isinstance(exc, KeyboardInterrupt) else ""
    return f"{what}: {type(exc).__name__}: {exc}{note}\n{tb.rstrip()}"
