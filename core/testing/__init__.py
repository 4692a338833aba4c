"""A kit for plugin authors: conformance checks over every registered component, and a
fixture that registers a plugin inside one test.

In a plugin package's tests::

    # conftest.py
    pytest_plugins = ["robovla.testing"]

    # test_conformance.py: every check, on every component registered in this environment
    from robovla.testing import test_conformance  # noqa: F401

``pytest --robovla-distribution my-robovla-plugin`` limits the checks to one
distribution's components. Checks are plain functions ``check(component)`` that raise
AssertionError with a message saying what to fix; :func:`check` adds one for some kinds.
Besides the checks every kind gets, backbones, heads, action spaces, envs and datasets each
have their own (``robovla.testing.backbones``, ``.heads``, ``.action_spaces``, ``.envs``,
``.datasets``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from robovla import plugins
from robovla.config import ComponentConfig
from robovla.registry import KINDS, Component, registry

Check = Callable[[Component], None]
CHECKS: dict[str, list[Check]] = {kind: [] for kind in KINDS}


def check(*kinds: str) -> Callable[[Check], Check]:
    """Decorator: run this check on every registered component of ``kinds`` (all if none)."""

    def add(fn: Check) -> Check:
        for kind in kinds or KINDS:
            CHECKS[kind].append(fn)
        return fn

    return add


def name(component: Component) -> str:
    """How a check's message names a component: its kind and name (``head 'lstm'``)."""
    return f"{component.kind.replace('_', ' ')} {component.name!r}"


def cases(distribution: str | None = None) -> list[tuple[Component, Check]]:
    """Every (component, check) pair for the components registered now.

    ``distribution`` (spelled with - or _, any case) limits them to one distribution's;
    naming one that registered nothing is an error, not an empty run.
    """
    components = registry().components
    if distribution is not None:
        known = {plugins.norm(c.plugin.distribution) for c in components}
        if plugins.norm(distribution) not in known:
            raise pytest.UsageError(f"--robovla-distribution {distribution}: no installed distribution of that "
                                    f"name registers robovla components; these do: {', '.join(sorted(known))}")
        components = [c for c in components if plugins.norm(c.plugin.distribution) == plugins.norm(distribution)]
    return [(c, fn) for c in components for fn in CHECKS[c.kind]]


# ------------------------------------------------------------------ checks for all kinds


@check()
def usable(component: Component) -> None:
    """The component imports, is a concrete subclass of its interface, and is documented."""
    assert component.error is None, component.error
    cls = component.load()
    assert not inspect.isabstract(cls), (
        f"{component.kind} {component.name!r}: {cls.__qualname__} leaves abstract methods "
        f"{sorted(cls.__abstractmethods__)} unimplemented")
    assert (cls.__doc__ or "").strip(), f"{component.kind} {component.name!r}: give {cls.__qualname__} a docstring"


@check()
def config_strict_and_documented(component: Component) -> None:
    """``Config`` derives from ComponentConfig: unknown fields fail and every field is described."""
    config = component.load().Config
    assert isinstance(config, type) and issubclass(config, ComponentConfig), (
        f"{component.kind} {component.name!r}: Config must subclass robovla.ComponentConfig, got {config!r}")
    assert config.model_config.get("extra") == "forbid", (
        f"{component.kind} {component.name!r}: Config must keep extra='forbid' (unknown fields are errors)")
    with pytest.raises(Exception, match="(?i)extra"):
        config.model_validate({"_no_such_field_": 1})


@check()
def config_round_trips_through_toml(component: Component) -> None:
    """A config with its defaults, written as TOML and read back as a saved run config is,
    is the same config."""
    import tomli_w

    from robovla.config import spell_none, validate_section
    from robovla.registry_file import tomllib

    config = component.load().Config
    required = [n for n, f in config.model_fields.items() if f.is_required()]
    if required:
        pytest.skip(f"fields {required} have no default")
    first = config()
    text = tomli_w.dumps(spell_none(first.model_dump(mode="json")))
    again, problems = validate_section(component.kind, config, tomllib.loads(text))
    assert not problems and again == first, f"TOML round trip changed:\n{text}\n{problems}"


# -------------------------------------------------------------------- pytest plugin part


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--robovla-distribution", default=None,
                     help="run robovla conformance checks only on this distribution's components")


def pytest_generate_tests(metafunc: Any) -> None:
    if "robovla_case" in metafunc.fixturenames:
        found = cases(metafunc.config.getoption("robovla_distribution"))
        ids = [f"{c.kind}-{c.name}-{fn.__name__}" for c, fn in found]
        metafunc.parametrize("robovla_case", found, ids=ids)


def test_conformance(robovla_case: tuple[Component, Check]) -> None:
    """One conformance check on one registered component."""
    component, fn = robovla_case
    fn(component)


@pytest.fixture
def robovla_plugin() -> Iterator[Callable[..., plugins.PluginInfo]]:
    """Register plugins for one test: ``robovla_plugin(obj, name="x")``; removed afterwards.

    ``obj`` is a module, class or instance holding ``@robovla.hookimpl`` functions.
    """
    added: list[str] = []

    def register(obj: Any, name: str = "test-plugin", distribution: str = "test", version: str = "0") -> plugins.PluginInfo:
        module = getattr(obj, "__name__", type(obj).__name__)
        info = plugins.PluginInfo(f"{distribution}:{name}", distribution, version,
                                  f"{name} = {module}", module)
        plugins.add(obj, info)  # raises if the name is taken: then there is nothing of ours to remove
        added.append(info.name)
        return info

    yield register
    for name in added:
        plugins.remove(name)
from robovla.testing import heads as _heads  # noqa: E402,F401
from robovla.testing import backbones as _backbones  # noqa: E402,F401
from robovla.testing import action_spaces as _action_spaces  # noqa: E402,F401
from robovla.testing import envs as _envs  # noqa: E402,F401
from robovla.testing import datasets as _datasets  # noqa: E402,F401
