"""The plugin kit's conformance checks: run on every registered component, and shown to fail."""

import pytest
from pydantic import Field

import robovla
from robovla import testing
from robovla.testing import test_conformance  # noqa: F401  (parametrized over the registry)


def test_checks_cover_the_registered_components():
    ids = {(c.kind, c.name, fn.__name__) for c, fn in testing.cases()}
    assert ("head", "example-linear", "usable") in ids
    assert ("action_space", "example-clip", "config_round_trips_through_toml") in ids
    expected = len(testing.CHECKS["head"]) + len(testing.CHECKS["action_space"])
    assert len(testing.cases("robovla-example")) == expected == 12  # 3 for every kind, 6 head checks


class Incomplete(robovla.ActionSpace):
    """Implements encode but not decode."""

    def encode(self, actions, robot_obs):
        return actions


class Undocumented(robovla.ActionSpace):
    def encode(self, actions, robot_obs):
        return actions

    def decode(self, targets, robot_obs):
        return targets


class LaxConfig(robovla.ActionSpace):
    """Its Config allows unknown fields."""

    class Config(robovla.ComponentConfig):
        model_config = {"extra": "allow"}
        bound: float = Field(1.0, description="a bound")

    encode = decode = lambda self, a, o: a


class Hooks:
    @robovla.hookimpl
    def register_action_spaces(self, register):
        register("incomplete", Incomplete)
        register("undocumented", Undocumented)
        register("lax", LaxConfig)


@pytest.mark.parametrize("name, check, message", [
    ("incomplete", testing.usable, "leaves abstract methods \\['decode'\\] unimplemented"),
    ("undocumented", testing.usable, "give Undocumented a docstring"),
    ("lax", testing.config_strict_and_documented, "must keep extra='forbid'"),
])
def test_checks_fail_on_bad_components(robovla_plugin, name, check, message):
    robovla_plugin(Hooks(), name="bad", distribution="bad-dist")
    with pytest.raises(AssertionError, match=message):
        check(robovla.get_component("action_space", name))


def test_distribution_filter_is_forgiving_about_spelling_but_not_about_names():
    assert testing.cases("ROBOVLA_example") == testing.cases("robovla-example")
    with pytest.raises(pytest.UsageError, match="no installed distribution of that name.*robovla-example"):
        testing.cases("robovla-exampel")


def test_fixture_never_removes_a_plugin_it_did_not_add(robovla_plugin):
    robovla_plugin(Hooks(), name="first")
    with pytest.raises(ValueError, match="registered already"):
        robovla_plugin(Hooks(), name="first")
    assert robovla.get_component("action_space", "lax")  # the first registration is intact
