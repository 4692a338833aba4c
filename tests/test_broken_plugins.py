"""Broken plugins, installed as pip would leave them: reported, never hiding the others."""

import json
from pathlib import Path

import pytest

from helpers import ROBO_RUN, clean_env, fake_distribution, run

GOOD = '''
import robovla
from robovla_good_spaces import Identity

@robovla.hookimpl
def register_action_spaces(register):
    register("good-identity", Identity)
'''
GOOD_SPACES = '''
import robovla

class Identity(robovla.ActionSpace):
    """Targets are the raw actions."""
    def encode(self, actions, robot_obs):
        return actions
    def decode(self, targets, robot_obs):
        return targets
'''
BROKEN_IMPORT = "import robovla_missing_dependency_xyz\n"
BROKEN_HOOK = '''
import robovla

@robovla.hookimpl
def register_heads(register):
    register("broken-head", "robovla_broken_hook:Nothing")
    raise ValueError("weights file not found")
'''

BAD_ARGUMENT = '''
import robovla

@robovla.hookimpl
def register_heads(reg):
    reg("x", "robovla_bad_argument:X")
'''
EXITS = "raise SystemExit(3)\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    fake_distribution(site, "good-plugin", "1.0", {"robovla_good": GOOD, "robovla_good_spaces": GOOD_SPACES},
                      {"good": "robovla_good"})
    fake_distribution(site, "broken-import", "0.1", {"robovla_broken_import": BROKEN_IMPORT},
                      {"broken-import": "robovla_broken_import"})
    fake_distribution(site, "broken-hook", "0.2", {"robovla_broken_hook": BROKEN_HOOK},
                      {"hooky": "robovla_broken_hook"})
    fake_distribution(site, "bad-argument", "0.3", {"robovla_bad_argument": BAD_ARGUMENT},
                      {"bad-argument": "robovla_bad_argument"})
    fake_distribution(site, "exits", "0.4", {"robovla_exits": EXITS}, {"exits": "robovla_exits"})
    return site


def plugins_json(site: Path, **env: str) -> dict[str, dict]:
    result = run([str(ROBO_RUN), "plugins", "--json"], env=clean_env(PYTHONPATH=str(site), **env))
    assert result.returncode == 0, result.stderr
    return {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}


def test_broken_plugins_are_reported_and_the_others_work(site):
    rows = plugins_json(site)
    assert rows[("action_space", "good-identity")]["status"] == "ok"
    imp = rows[("plugin", "broken-import")]
    assert (imp["distribution"], imp["version"], imp["entry_point"], imp["status"]) == \
        ("broken-import", "0.1", "broken-import = robovla_broken_import", "error")
    assert "ModuleNotFoundError: No module named 'robovla_missing_dependency_xyz'" in imp["error"]
    assert "Traceback (most recent call last)" in imp["error"]
    hook = rows[("plugin", "hooky")]
    assert hook["distribution"] == "broken-hook" and hook["entry_point"] == "hooky = robovla_broken_hook"
    assert "its hook register_heads raised: ValueError: weights file not found" in hook["error"]
    assert rows[("head", "broken-head")]["status"] == "error"
    assert "importing module 'robovla_exits' failed: SystemExit: 3" in rows[("plugin", "exits")]["error"]

    table = run([str(ROBO_RUN), "plugins"], env=clean_env(PYTHONPATH=str(site)))
    assert table.returncode == 0
    assert "plugin broken-import [broken-import]: plugin broken-import 0.1 (entry point " \
           "'broken-import = robovla_broken_import') is broken: importing module 'robovla_broken_import' " \
           "failed: ModuleNotFoundError: No module named 'robovla_missing_dependency_xyz'" in table.stdout
    assert "Fix: pip install robovla_missing_dependency_xyz  (the plugin needs it; the package name may " \
           "differ), or upgrade or reinstall broken-import, or disable it with " \
           "ROBOVLA_DISABLE_PLUGINS=broken-import" in table.stdout
    # the table shows the whole message, not just its first line (the traceback is in --json)
    assert "Argument(s) {'reg'} are declared in the hookimpl but can not be found in the hookspec" in table.stdout
    assert "Traceback" not in table.stdout


def test_using_a_component_of_a_broken_plugin_fails_with_the_report(site):
    result = run([str(ROBO_RUN), "config", "--head", "broken-head", "--action-space", "good-identity"],
                 env=clean_env(PYTHONPATH=str(site)))
    assert result.returncode == 2
    err = result.stderr
    assert "--head broken-head: head 'broken-head' cannot be used: plugin broken-hook 0.2 (entry point " \
           "'hooky = robovla_broken_hook') is broken: its hook register_heads raised: ValueError: " \
           "weights file not found" in err
    assert "ROBOVLA_DISABLE_PLUGINS=broken-hook" in err
    assert "--action-space" not in err  # the good plugin's component resolved


def test_allow_and_block_lists(site):
    assert set(plugins_json(site, ROBOVLA_PLUGINS="good-plugin")) == {("action_space", "good-identity")}
    assert set(plugins_json(site, ROBOVLA_PLUGINS="hooky")) == {("head", "broken-head"), ("plugin", "hooky")}
    assert plugins_json(site, ROBOVLA_PLUGINS="") == {}
    assert set(plugins_json(site, ROBOVLA_DISABLE_PLUGINS="broken-import, broken_hook,bad-argument,exits,robovla")) == \
        {("action_space", "good-identity")}
    assert set(plugins_json(site, ROBOVLA_PLUGINS="broken-hook:hooky")) == {("head", "broken-head"), ("plugin", "hooky")}
    missing = plugins_json(site, ROBOVLA_PLUGINS="good-plugin,no-such-plugin,broken-import",
                           ROBOVLA_DISABLE_PLUGINS="broken-import")
    assert set(missing) == {("action_space", "good-identity"), ("plugin", "no-such-plugin")}
    assert missing[("plugin", "no-such-plugin")]["status"] == "missing"
    assert "ROBOVLA_PLUGINS names 'no-such-plugin', but no installed distribution" in \
        missing[("plugin", "no-such-plugin")]["error"]
