"""The component registry: what the installed plugins registered, in timm's spirit.

    >>> import robovla
    >>> robovla.list_components("head", "l*")          # fnmatch wildcards, natural sort
    >>> robovla.get_component("head", "lstm").load()   # the class, imported on first use
    >>> robovla.create("head", "lstm", {"hidden_size": 64}, dims=dims)

Each plugin's hooks are called one plugin at a time, so that every registration carries
its provider and one plugin's failure stays its own. A component of a broken plugin, and a
name that two third-party providers registered, are listed but raise a full report when
used. A built-in name (distribution ``robovla``) registered again by another plugin stays
robovla's: the other registration is listed as ``shadowed`` and the clash is reported in
:attr:`Registry.clashes`; a user who wants the other one disables the built-in entry point
with ``ROBOVLA_DISABLE_PLUGINS``.

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

import fnmatch
import importlib
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from robovla import plugins
from robovla.errors import PluginError, RobovlaError, natural_key, unknown
from robovla.plugins import PluginInfo

#: kind -> (hook, interface class as "module:attr", command-line flag)
KINDS: dict[str, tuple[str, str, str]] = {
    "backbone": ("register_backbones", "robovla.backbone:Backbone", "--backbone"),
    "head": ("register_heads", "robovla.head:PolicyHead", "--head"),
    "action_space": ("register_action_spaces", "robovla.action_space:ActionSpace", "--action-space"),
    "dataset": ("register_datasets", "robovla.dataset:Dataset", "--dataset"),
    "env": ("register_envs", "robovla.env:Env", "--env"),
    "converter": ("register_converters", "robovla.convert:Converter", "robo-run convert"),
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
BUILTIN = "robovla"
"""The distribution whose components win a name clash (in :func:`robovla.plugins.norm` spelling)."""


def _import(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def broken_report(info: PluginInfo, error: str, target: str = "") -> str:
    """The standard text for a broken plugin: who, where, the cause and the fix.

    A missing module other than the plugin's own suggests installing it (by its import
    name, which is usually, not always, the name to pip install).
    """
    missing = re.search(r"No module named '([^'.]+)", error)
    own = {info.module.split(".")[0], target.split(".")[0]}
    fix = ""
    if missing and missing.group(1) not in own:
        fix = f"pip install {missing.group(1)}  (the plugin needs it; the package name may differ), or "
    elif missing:
        fix = f"check the module path {target or info.module!r} in the plugin, or "
    return (
        f"plugin {info.distribution} {info.version} (entry point '{info.entry_point}') is broken: "
        f"{error}\nFix: {fix}upgrade or reinstall {info.distribution}, or disable it with "
        f"ROBOVLA_DISABLE_PLUGINS={info.distribution}"
    )


class PluginExit(BaseException):
    """A plugin called ``os._exit`` while robovla ran its code (raised instead of exiting)."""

    def __init__(self, status: int):
        super().__init__(f"the plugin called os._exit({status}) while robovla ran its code")


class Guard:
    """What :func:`contained` saw: ``interrupted`` tells whether a real SIGINT (Ctrl-C) arrived."""

    def __init__(self) -> None:
        self.start = _state["sigints"]

    @property
    def interrupted(self) -> bool:
        return _state["sigints"] > self.start


# Shared by every contained() in flight, in any thread (they may nest or overlap): the SIGINT
# count, the handler and os._exit found before the first one, and who runs plugin code now.
_lock = threading.Lock()
_state: dict[str, Any] = {"sigints": 0, "handler": None, "exit": os._exit}
_running: dict[int, list[tuple[int, str]]] = {}  # thread id -> [(process id, label)] of plugin code it runs


def _on_sigint(signum: int, frame: Any) -> None:
    """A real Ctrl-C while plugin code runs: count it, then do what the handler before did."""
    previous = _state["handler"]
    if previous is signal.default_int_handler or previous == signal.SIG_DFL:
        _state["sigints"] += 1
        raise KeyboardInterrupt
    if callable(previous):
        previous(signum, frame)


def _exit_in_plugin(status: int) -> None:
    """os._exit while plugin code runs: raised as PluginExit in the thread and process running it."""
    own = _running.get(threading.get_ident())
    if own and own[-1][0] == os.getpid():
        raise PluginExit(status)
    labels = ", ".join(label for runs in list(_running.values()) for _, label in runs)
    print(f"robovla: {labels or 'a plugin'} called os._exit({status}) while robovla loaded it", file=sys.stderr,
          flush=True)
    _state["exit"](status)


@contextmanager
def contained(label: str) -> Iterator[Guard]:
    """Run plugin code (``label`` names it for messages): note a real SIGINT, turn ``os._exit``
    into :class:`PluginExit`. The caller catches BaseException and asks ``guard.interrupted``;
    a Ctrl-C the plugin code swallowed is raised again at the end."""
    main = threading.current_thread() is threading.main_thread()
    with _lock:
        if not _running:
            _state["exit"], os._exit = os._exit, _exit_in_plugin
        _running.setdefault(threading.get_ident(), []).append((os.getpid(), label))
        handler = signal.getsignal(signal.SIGINT) if main else None
        ours = handler is not None and handler is not _on_sigint
        if ours:
            _state["handler"] = handler
            signal.signal(signal.SIGINT, _on_sigint)
    guard = Guard()
    try:
        yield guard
    finally:
        with _lock:
            runs = _running[threading.get_ident()]
            runs.pop()
            if not runs:
                del _running[threading.get_ident()]
            if not _running:
                os._exit = _state["exit"]
            if ours:
                signal.signal(signal.SIGINT, handler)
    if guard.interrupted:  # the plugin swallowed the user's Ctrl-C: it still stops robo-run
        raise KeyboardInterrupt


def summary(report: str) -> str:
    """A broken-plugin report for a terminal: the message and the fix, its traceback left to
    ``robo-run plugins --json`` (said so when one was cut)."""
    lines = report.splitlines()
    cut = next((i for i, x in enumerate(lines) if x.lstrip().startswith("Traceback (most recent call last)")),
               len(lines))
    if cut == len(lines):
        return report
    fixes = [x for x in lines[cut:] if x.lstrip().startswith("Fix:")]
    return "\n".join([*lines[:cut], *fixes, "(robo-run plugins --json shows the traceback)"])


@dataclass
class Component:
    """One registration: a kind, a name, its class (or a lazy reference) and its provider."""

    kind: str
    name: str
    target: Any  # the class, or "module:Class" to import on first use
    plugin: PluginInfo
    error: str | None = None  # set when the component cannot be used, with the reason
    shadowed: bool = False  # another plugin's registration of a built-in name: the built-in is used
    _cls: type | None = field(default=None, repr=False)

    @property
    def module(self) -> str:
        return self.target.split(":")[0] if isinstance(self.target, str) else self.target.__module__

    @property
    def status(self) -> str:
        return "shadowed" if self.shadowed else "ok" if self.error is None else "error"

    def load(self) -> type:
        """The component class: imported if it was registered lazily, and checked."""
        label = f"{self.kind} {self.name!r}"
        if self.error is not None:
            raise PluginError(f"{label} cannot be used: {self.error}")
        if self._cls is None:
            with contained(f"plugin {self.plugin.distribution} ({label})") as guard:
                try:
                    cls = _import(self.target) if isinstance(self.target, str) else self.target
                except BaseException as exc:  # anything but a real Ctrl-C: the plugin is broken
                    if guard.interrupted:
                        raise
                    cause = plugins.describe(exc, f"importing {self.target!r} failed")
                    self.error = broken_report(self.plugin, cause, self.module)
                    raise PluginError(f"{label} cannot be used: {self.error}") from exc
            interface = _import(KINDS[self.kind][1])
            if not (isinstance(cls, type) and issubclass(cls, interface)):
                raise PluginError(
                    f"{label} from {self.plugin.distribution} is {cls!r}, which is not a subclass of "
                    f"robovla.{interface.__name__}. Fix: derive it from robovla.{interface.__name__}"
                )
            from robovla.config import ComponentConfig

            if not (isinstance(cls.Config, type) and issubclass(cls.Config, ComponentConfig)):
                raise PluginError(f"{label} from {self.plugin.distribution}: {cls.__qualname__}.Config is "
                                  f"{cls.Config!r}. Fix: declare class Config(robovla.ComponentConfig)")
            self._cls = cls
        return self._cls


class Registry:
    """Every component the loaded plugins registered, built by calling their hooks."""

    def __init__(self) -> None:
        pm = plugins.manager()
        self.generation = plugins.generation
        self.components: list[Component] = []
        self.errors = {name: i.error for name, i in plugins.infos().items() if i.error}
        for kind, (hook, _, _) in KINDS.items():
            for impl in getattr(pm.hook, hook).get_hookimpls():
                info = plugins.info(impl.plugin_name, getattr(impl.plugin, "__name__", "?"))
                added: list[Component] = []

                def register(name: str, component: Any, _kind=kind, _info=info, _added=added) -> None:
                    if not isinstance(name, str) or not _NAME.match(name):
                        raise RobovlaError(f"{_kind} name {name!r} is invalid: use lowercase letters, "
                                           "digits, '-', '_' or '.', starting with a letter or digit")
                    if not (isinstance(component, type) or (isinstance(component, str) and ":" in component)):
                        raise RobovlaError(f"{_kind} {name!r}: register a class or a 'module:Class' "
                                           f"string, not {component!r}")
                    if isinstance(component, type) and not _derives(component, KINDS[_kind][1]):
                        raise RobovlaError(f"{_kind} {name!r}: {component.__qualname__} does not derive from "
                                           f"robovla.{KINDS[_kind][1].split(':')[1]}")
                    _added.append(Component(_kind, name, component, _info))

                with contained(f"plugin {info.distribution} (entry point '{info.entry_point}')") as guard:
                    try:
                        impl.function(register=register)
                    except BaseException as exc:  # anything but a real Ctrl-C: the plugin is broken
                        if guard.interrupted:
                            raise
                        found = plugins.describe(exc, f"its hook {hook} raised")
                        self.errors[info.name] = "\n".join(filter(None, [self.errors.get(info.name), found]))
                self.components += added
        for c in self.components:
            if c.plugin.name in self.errors:
                c.error = broken_report(c.plugin, self.errors[c.plugin.name])
        self._mark_collisions()

    def _mark_collisions(self) -> None:
        """Two registrations of one name: a built-in keeps it (the others are shadowed, the
        clash noted in ``clashes``); between third-party plugins, neither may be used."""
        self.clashes: list[str] = []
        by_key: dict[tuple[str, str], list[Component]] = {}
        for c in self.components:
            by_key.setdefault((c.kind, c.name), []).append(c)
        for (kind, name), same in by_key.items():
            if len(same) < 2:
                continue
            builtin = [c for c in same if plugins.norm(c.plugin.distribution) == BUILTIN]
            if len(builtin) == 1:
                self._shadow(builtin[0], [c for c in same if c is not builtin[0]])
                continue
            who = " and ".join(f"{c.plugin.distribution} {c.plugin.version} ({c.module})" for c in same)
            for c in same:
                c.error = (f"{kind} name {name!r} is registered by {who}. Fix: uninstall one, or "
                           "disable one with ROBOVLA_DISABLE_PLUGINS=<distribution>")

    def _shadow(self, builtin: Component, others: list[Component]) -> None:
        kind, name = builtin.kind.replace("_", " "), builtin.name
        for c in others:
            c.shadowed = True
            c.error = (f"{kind} name {name!r} is robovla's built-in {kind} ({builtin.module}); "
                       f"{c.plugin.distribution} {c.plugin.version} registers it too ({c.module}), and the built-in "
                       f"is used. Fix: rename it in {c.plugin.distribution}; to use {c.plugin.distribution}'s "
                       f"instead, disable the built-in entry point with "
                       f"ROBOVLA_DISABLE_PLUGINS={builtin.plugin.name} (it hides every built-in that entry point "
                       "registers)")
        providers = ", ".join(f"{c.plugin.distribution} {c.plugin.version}" for c in others)
        self.clashes.append(f"{kind} {name!r} is registered by robovla {builtin.plugin.version} and by {providers}; "
                            f"robovla's built-in is used (robo-run plugins shows the clash and how to choose)")

    def get(self, kind: str, name: str) -> Component:
        _check_kind(kind)
        same = [c for c in self.components if c.kind == kind and c.name == name]
        if same:
            return next((c for c in same if not c.shadowed), same[0])
        hint = "".join(f"\nNote: {broken_report(plugins.info(p), e).splitlines()[0]}" for p, e in self.errors.items())
        names = {c.name for c in self.components if c.kind == kind}
        raise unknown(kind.replace("_", " "), name, names, hint.lstrip("\n"))


_registry: Registry | None = None


def registry() -> Registry:
    """The registry for the plugins loaded now (rebuilt when a plugin is added or removed)."""
    global _registry
    if _registry is None or _registry.generation != plugins.generation:
        _registry = Registry()
    return _registry


def _derives(cls: type, interface: str) -> bool:
    """Whether ``cls`` has the interface ("module:Class") among its bases, without importing it."""
    module, _, name = interface.partition(":")
    return any(b.__module__ == module and b.__qualname__ == name for b in cls.__mro__)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise unknown("component kind", kind, KINDS)


def active_plugins() -> str:
    """The loaded plugins in one line, as pytest prints its own: each distribution with its
    version and entry points, then any broken ones (``robo-run plugins`` says why)."""
    loaded: dict[tuple[str, str], list[str]] = {}
    broken = []
    for info in plugins.infos().values():
        entry = info.entry_point.split(" = ")[0]
        if info.error is None:
            loaded.setdefault((info.distribution, info.version), []).append(entry)
        else:
            broken.append(f"{info.distribution}:{entry}")
    line = "plugins: " + (", ".join(f"{d}-{v} ({', '.join(sorted(e))})" for (d, v), e in sorted(loaded.items()))
                          or "none")
    return line + (f"; broken: {', '.join(sorted(broken))} (see robo-run plugins)" if broken else "")


def list_components(kind: str, filter: str | list[str] = "*", exclude: str | list[str] = (),
                    distribution: str | None = None) -> list[str]:
    """Names of the usable components of ``kind`` matching ``filter`` (fnmatch), naturally sorted."""
    _check_kind(kind)
    inc = [filter] if isinstance(filter, str) else list(filter)
    exc = [exclude] if isinstance(exclude, str) else list(exclude)
    names = {
        c.name for c in registry().components
        if c.kind == kind and c.error is None
        and (distribution is None or c.plugin.distribution == distribution)
        and any(fnmatch.fnmatchcase(c.name, p) for p in inc)
        and not any(fnmatch.fnmatchcase(c.name, p) for p in exc)
    }
    return sorted(names, key=natural_key)


def get_component(kind: str, name: str) -> Component:
    """The registration of ``name``; raises with the valid names and the closest match."""
    return registry().get(kind, name)


def create(kind: str, name: str, config: Any = None, /, **kwargs: Any) -> Any:
    """Build component ``name``: ``cls(config, **kwargs)``.

    ``config`` is the component's ``Config`` instance, a dict of field overrides (checked,
    errors spelled as ``--<kind>.<field>``), or None for the defaults.
    """
    from robovla.config import validate_component

    cls = get_component(kind, name).load()
    if not isinstance(config, cls.Config):
        config = validate_component(kind, name, cls.Config, dict(config or {}))
    return cls(config, **kwargs)
