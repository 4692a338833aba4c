"""The registry API and the plugin loader, in process: provenance, lookups, failures."""

import pytest
from pydantic import Field

import robovla
from robovla import plugins
from robovla.errors import ConfigError, PluginError, UnknownNameError
from robovla.registry import registry


class Clip(robovla.ActionSpace):
    """A tiny complete action space for registry tests."""

    class Config(robovla.ComponentConfig):
        bound: float = Field(1.0, gt=0, description="clip bound")

    def encode(self, actions, robot_obs):
        return actions

    def decode(self, targets, robot_obs):
        return targets


class Many:
    @robovla.hookimpl
    def register_action_spaces(self, register):
        for name in ["toy-2", "toy-10", "toy-1", "abs"]:
            register(name, Clip)


def test_list_uses_wildcards_natural_sort_and_provenance(robovla_plugin):
    robovla_plugin(Many(), name="many", distribution="many-dist", version="1.2.3")
    assert robovla.list_components("action_space", "toy-*") == ["toy-1", "toy-2", "toy-10"]
    assert robovla.list_components("action_space", ["abs", "toy-1*"]) == ["abs", "toy-1", "toy-10"]
    assert robovla.list_components("action_space", exclude="toy-*", distribution="many-dist") == ["abs"]
    c = robovla.get_component("action_space", "toy-10")
    assert (c.plugin.distribution, c.plugin.version, c.module, c.status) == ("many-dist", "1.2.3", __name__, "ok")
    assert robovla.list_components("head", distribution="robovla-example") == ["example-linear"]


def test_create_applies_and_checks_overrides(robovla_plugin):
    robovla_plugin(Many(), name="many")
    assert robovla.create("action_space", "abs").config.bound == 1.0
    assert robovla.create("action_space", "abs", {"bound": 0.5}).config.bound == 0.5
    with pytest.raises(ConfigError) as err:
        robovla.create("action_space", "abs", {"bound": -1, "bond": 2})
    assert err.value.problems == [
        "--action-space.bound: Input should be greater than 0, got -1",
        "--action-space.bond: unknown field 'bond'; did you mean 'bound'? Valid: bound",
    ]


def test_unknown_names_list_the_valid_ones_and_the_closest(robovla_plugin):
    robovla_plugin(Many(), name="many")
    with pytest.raises(UnknownNameError) as err:
        robovla.get_component("action_space", "toy-11")
    valid = robovla.list_components("action_space")
    assert {"abs", "example-clip", "toy-1", "toy-2", "toy-10"} <= set(valid)
    assert str(err.value).startswith(f"unknown action space 'toy-11'; did you mean 'toy-1'? Valid: {', '.join(valid)}")
    with pytest.raises(UnknownNameError, match="unknown component kind 'heads'; did you mean 'head'"):
        robovla.list_components("heads")


class Other:
    @robovla.hookimpl
    def register_action_spaces(self, register):
        register("abs", "some_other_package.spaces:Abs")


def test_a_name_registered_twice_names_both_providers(robovla_plugin):
    robovla_plugin(Many(), name="many", distribution="many-dist", version="1.0")
    robovla_plugin(Other(), name="other", distribution="other-dist", version="2.0")
    assert "abs" not in robovla.list_components("action_space")
    with pytest.raises(PluginError) as err:
        robovla.get_component("action_space", "abs").load()
    msg = str(err.value)
    assert "registered by many-dist 1.0 (test_registry) and other-dist 2.0 (some_other_package.spaces)" in msg
    assert "ROBOVLA_DISABLE_PLUGINS" in msg
    assert robovla.get_component("action_space", "toy-1").load() is Clip  # the rest still work


class RaisesMidway:
    @robovla.hookimpl
    def register_action_spaces(self, register):
        register("early", Clip)
        raise RuntimeError("config file of the plugin is missing")


def test_a_hook_that_raises_breaks_only_its_plugin(robovla_plugin):
    robovla_plugin(RaisesMidway(), name="midway", distribution="midway-dist", version="0.3")
    robovla_plugin(Many(), name="many")
    with pytest.raises(PluginError) as err:
        robovla.get_component("action_space", "early").load()
    msg = str(err.value)
    assert "plugin midway-dist 0.3 (entry point 'midway = RaisesMidway') is broken" in msg
    assert "its hook register_action_spaces raised: RuntimeError: config file of the plugin is missing" in msg
    assert "Traceback" in msg and "Fix:" in msg
    assert robovla.list_components("action_space", "toy-*") == ["toy-1", "toy-2", "toy-10"]
    # an unknown name mentions the broken plugin, which may be the one that provides it
    with pytest.raises(UnknownNameError, match="Note: plugin midway-dist 0.3"):
        robovla.get_component("action_space", "late")


class Misspelled:
    @robovla.hookimpl
    def register_head(self, register):
        register("x", Clip)


class WrongArgument:
    @robovla.hookimpl
    def register_heads(self, registrar):
        registrar("x", Clip)


def test_hookimpls_without_a_matching_spec_fail(robovla_plugin):
    info = robovla_plugin(Misspelled(), name="misspelled")
    assert "hookimpl 'register_head' matches no robovla hook; did you mean 'register_heads'?" in info.error
    assert not plugins.manager().has_plugin(info.name)  # unregistered: nothing half-loaded
    info = robovla_plugin(WrongArgument(), name="wrongarg")
    assert "registrar" in info.error and "hookspecs" in info.error
    assert "x" not in robovla.list_components("head")  # nothing of the broken plugin registered


class BadRegistrations:
    @robovla.hookimpl
    def register_heads(self, register):
        register("Bad Name", "x:Y")


class NotASpace:
    """Derives from nothing robovla knows."""


class Direct:
    @robovla.hookimpl
    def register_action_spaces(self, register):
        register("direct", NotASpace)


class NoHooks:
    def register_heads(self, register):  # forgot @robovla.hookimpl
        register("x", Clip)


def test_classes_are_checked_at_registration_and_plugins_need_hooks(robovla_plugin):
    robovla_plugin(Direct(), name="direct", distribution="direct-dist")
    assert "action_space 'direct': NotASpace does not derive from robovla.ActionSpace" in \
        registry().errors["direct-dist:direct"]
    info = robovla_plugin(NoHooks(), name="nohooks")
    assert "it has no @robovla.hookimpl functions" in info.error


class LazyTargets:
    @robovla.hookimpl
    def register_action_spaces(self, register):
        register("typo", "robovla_test_no_such_module.spaces:Space")
        register("missing-dep", "needs_missing_dep:Space")
        register("not-a-space", "collections:OrderedDict")


def test_registrations_are_checked(robovla_plugin):
    robovla_plugin(BadRegistrations(), name="badnames", distribution="badnames-dist")
    assert "head name 'Bad Name' is invalid" in registry().errors["badnames-dist:badnames"]
    robovla_plugin(LazyTargets(), name="lazy", distribution="lazy-dist")
    with pytest.raises(PluginError) as err:
        robovla.get_component("action_space", "typo").load()
    assert "No module named 'robovla_test_no_such_module'" in str(err.value)
    assert "Fix: check the module path 'robovla_test_no_such_module.spaces' in the plugin" in str(err.value)
    with pytest.raises(PluginError) as err:
        robovla.get_component("action_space", "missing-dep").load()
    assert "Fix: pip install robovla_missing_dependency_xyz  (the plugin needs it" in str(err.value)
    with pytest.raises(PluginError, match="not a subclass of robovla.ActionSpace. Fix: derive it"):
        robovla.get_component("action_space", "not-a-space").load()


def test_registry_rebuilds_when_plugins_change(robovla_plugin):
    before = registry()
    assert "abs" not in robovla.list_components("action_space")
    robovla_plugin(Many(), name="many")
    assert registry() is not before and "abs" in robovla.list_components("action_space")


def test_a_plugin_object_or_name_cannot_be_registered_twice(robovla_plugin):
    hooks = Many()
    robovla_plugin(hooks, name="many")
    with pytest.raises(ValueError, match="a plugin named 'test:many' is registered already"):
        robovla_plugin(Many(), name="many")
    info = robovla_plugin(hooks, name="again")
    assert "it could not be registered: ValueError: Plugin already registered" in info.error
    assert robovla.get_component("action_space", "abs").load() is Clip  # the first one still works
