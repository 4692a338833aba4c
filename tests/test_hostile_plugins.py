"""Hostile and careless plugins, installed as pip would leave them.

A plugin that raises any BaseException (a KeyboardInterrupt of its own, GeneratorExit, its
own subclass, SystemExit) or calls os._exit, at import, in a hook or when its class is
imported, is listed as broken with its distribution and entry point; ``robo-run --help``,
``plugins`` and ``config`` keep working. A real Ctrl-C (a SIGINT) still stops robo-run. A
plugin that registers a built-in's name does not replace the built-in: the clash is listed
and warned about once, and the user can choose the other provider by disabling the
built-in entry point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

import robovla
from robovla.cli import main
from robovla.errors import PluginError
from robovla.registry import PluginExit, contained, registry

from helpers import ROBO_RUN, clean_env, fake_distribution, run

HOOK = '''
import robovla

class Custom(BaseException):
    """Not an Exception: a bare ``except Exception`` lets it through."""

@robovla.hookimpl
def register_heads(register):
    raise {error}
'''
LAZY = '''
import robovla

@robovla.hookimpl
def register_heads(register):
    register("lazy-head", "robovla_lazy_head_impl:Head")
'''
IMPORTS = {  # distribution -> what its module does at import
    "ki-import": "raise KeyboardInterrupt('raised by the plugin')\n",
    "genexit-import": "raise GeneratorExit('closing')\n",
    "custom-import": "class Custom(BaseException):\n    pass\nraise Custom('a BaseException of its own')\n",
    "exit-import": "import os\nos._exit(7)\n",
    "sysexit-import": "import sys\nsys.exit(4)\n",
}
HOOKS = {  # distribution -> what its register_heads hook raises
    "ki-hook": "KeyboardInterrupt('from the hook')",
    "genexit-hook": "GeneratorExit()",
    "custom-hook": "Custom('hook failed')",
}


def module(dist: str) -> str:
    return "robovla_" + dist.replace("-", "_")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    for dist, source in IMPORTS.items():
        fake_distribution(site, dist, "0.1", {module(dist): source}, {dist: module(dist)})
    for dist, error in HOOKS.items():
        fake_distribution(site, dist, "0.2", {module(dist): HOOK.format(error=error)}, {dist: module(dist)})
    fake_distribution(site, "lazy-ki", "0.3", {"robovla_lazy_head": LAZY,
                                               "robovla_lazy_head_impl": "raise KeyboardInterrupt\n"},
                      {"lazy": "robovla_lazy_head"})
    return site


def robo_run(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return run([str(ROBO_RUN), *args], env=clean_env(PYTHONPATH=str(site), **env))


def test_base_exceptions_at_import_and_in_hooks_break_only_their_plugin(site):
    listed = robo_run(site, "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(listed.stdout)}
    for dist in IMPORTS:
        row = rows[("plugin", dist)]
        assert (row["distribution"], row["entry_point"], row["status"]) == (dist, f"{dist} = {module(dist)}", "error")
        assert f"plugin {dist} 0.1 (entry point '{dist} = {module(dist)}') is broken: importing module " \
               f"'{module(dist)}' failed" in row["error"]
    assert "KeyboardInterrupt: raised by the plugin (raised by the plugin's own code: no Ctrl-C came)" in \
        rows[("plugin", "ki-import")]["error"]
    assert "GeneratorExit: closing" in rows[("plugin", "genexit-import")]["error"]
    assert "Custom: a BaseException of its own" in rows[("plugin", "custom-import")]["error"]
    assert "PluginExit: the plugin called os._exit(7) while robovla ran its code" in \
        rows[("plugin", "exit-import")]["error"]
    assert "SystemExit: 4" in rows[("plugin", "sysexit-import")]["error"]
    for dist, error in HOOKS.items():
        row = rows[("plugin", dist)]
        assert f"plugin {dist} 0.2 (entry point '{dist} = {module(dist)}') is broken: its hook register_heads " \
               f"raised: {error.split('(')[0]}" in row["error"]
    assert rows[("head", "lstm")]["status"] == rows[("head", "lazy-head")]["status"] == "ok"

    table = robo_run(site, "plugins")
    assert table.returncode == 0 and "Traceback" not in table.stdout
    assert "plugin exit-import [exit-import]: plugin exit-import 0.1" in table.stdout
    helped = robo_run(site, "--help")
    assert helped.returncode == 0 and "usage: robo-run [COMMAND] [FLAGS]" in helped.stdout, helped.stderr
    config = robo_run(site, "config", "--preset", "demo")
    assert config.returncode == 0 and '[head]\nname = "lstm"' in config.stdout, config.stderr

    lazy = robo_run(site, "config", "--preset", "demo", "--head", "lazy-head")
    assert lazy.returncode == 2
    assert "--head lazy-head: head 'lazy-head' cannot be used: plugin lazy-ki 0.3 (entry point 'lazy = " \
           "robovla_lazy_head') is broken: importing 'robovla_lazy_head_impl:Head' failed: KeyboardInterrupt" \
           in lazy.stderr
    assert "Traceback" not in lazy.stderr and "(robo-run plugins --json shows the traceback)" in lazy.stderr


def test_os_exit_from_another_thread_names_the_plugin(tmp_path):
    source = "import os, threading\nt = threading.Thread(target=os._exit, args=(5,))\nt.start()\nt.join()\n"
    fake_distribution(tmp_path, "thread-exit", "0.4", {"robovla_thread_exit": source}, {"te": "robovla_thread_exit"})
    result = robo_run(tmp_path, "plugins")
    assert result.returncode == 5  # it cannot be stopped, but it no longer exits silently
    assert "robovla: plugin thread-exit (entry point 'te = robovla_thread_exit') called os._exit(5) while robovla " \
           "loaded it" in result.stderr


@pytest.mark.parametrize("swallow", [False, True], ids=["plain", "plugin-swallows-it"])
def test_a_real_ctrl_c_while_a_plugin_loads_stops_robo_run(tmp_path, swallow):
    marker = tmp_path / "importing"
    wait = "time.sleep(3600)"
    body = f"try:\n    {wait}\nexcept KeyboardInterrupt:\n    pass\n" if swallow else f"{wait}\n"
    source = f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\n{body}"
    fake_distribution(tmp_path, "slow-import", "0.5", {"robovla_slow": source}, {"slow": "robovla_slow"})
    proc = subprocess.Popen([str(ROBO_RUN), "plugins"], env=clean_env(PYTHONPATH=str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not marker.exists() and proc.poll() is None:  # the plugin's import has begun
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().endswith("robo-run plugins: interrupted"), err
    assert "slow-import" not in out  # not listed as a broken plugin: the user stopped it


class Interrupts:
    @robovla.hookimpl
    def register_heads(self, register):
        signal.raise_signal(signal.SIGINT)  # a real SIGINT, as Ctrl-C sends it


class SwallowsInterrupt:
    @robovla.hookimpl
    def register_heads(self, register):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass


class RaisesKeyboardInterrupt:
    @robovla.hookimpl
    def register_heads(self, register):
        raise KeyboardInterrupt("not from the keyboard")


@pytest.mark.parametrize("plugin", [Interrupts(), SwallowsInterrupt()], ids=["plain", "swallowed"])
def test_a_sigint_during_a_hook_is_passed_on(robovla_plugin, plugin):
    robovla_plugin(plugin, name="sigint")
    with pytest.raises(KeyboardInterrupt):
        registry()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_a_hooks_own_keyboard_interrupt_breaks_only_its_plugin(robovla_plugin):
    robovla_plugin(RaisesKeyboardInterrupt(), name="raiser", distribution="raiser-dist", version="1.2")
    assert registry().errors["raiser-dist:raiser"].startswith(
        "its hook register_heads raised: KeyboardInterrupt: not from the keyboard (raised by the plugin's own code")
    assert robovla.get_component("head", "lstm").load().__name__ == "LSTMHead"


class ClashingHeads:
    @robovla.hookimpl
    def register_heads(self, register):
        register("lstm", "robovla_plugins.heads.mlp:MLPHead")
        register("twice", "robovla_plugins.heads.mlp:MLPHead")


def test_a_builtin_name_stays_builtin_and_the_clash_is_reported_once(robovla_plugin, capsys):
    robovla_plugin(ClashingHeads(), name="clash", distribution="clash-dist", version="2.0")
    robovla_plugin(ClashingHeads(), name="clash2", distribution="clash-two", version="3.0")
    used = robovla.get_component("head", "lstm")
    assert (used.plugin.distribution, used.module, used.load().__name__) == \
        ("robovla", "robovla_plugins.heads.lstm", "LSTMHead")
    shadowed = [c for c in registry().components if c.name == "lstm" and c.shadowed]
    assert sorted(c.plugin.distribution for c in shadowed) == ["clash-dist", "clash-two"]
    assert all(c.status == "shadowed" for c in shadowed)
    assert "ROBOVLA_DISABLE_PLUGINS=robovla:heads" in shadowed[0].error
    assert robovla.list_components("head", "lstm") == ["lstm"]
    # between two third-party plugins a clash still makes the name unusable, naming both
    with pytest.raises(PluginError, match="head name 'twice' is registered by clash-dist 2.0 .* and clash-two 3.0"):
        robovla.get_component("head", "twice").load()

    assert main(["config", "--preset", "demo"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == ["robo-run: warning: head 'lstm' is registered by robovla "
                                f"{used.plugin.version} and by clash-dist 2.0, clash-two 3.0; robovla's built-in is "
                                "used (robo-run plugins shows the clash and how to choose)"]
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err  # the table says it
    assert "head lstm [clash-dist]: head name 'lstm' is robovla's built-in head (robovla_plugins.heads.lstm); " \
           "clash-dist 2.0 registers it too (robovla_plugins.heads.mlp), and the built-in is used." in captured.out


def test_the_user_chooses_the_other_provider_by_disabling_the_builtin(tmp_path):
    clash = "import robovla\n\n@robovla.hookimpl\ndef register_heads(register):\n" \
            "    register('lstm', 'robovla_plugins.heads.mlp:MLPHead')\n"
    fake_distribution(tmp_path, "clash-dist", "2.0", {"robovla_clash": clash}, {"clash": "robovla_clash"})
    shown = robo_run(tmp_path, "plugins", "--json")
    rows = [r for r in json.loads(shown.stdout) if (r["kind"], r["name"]) == ("head", "lstm")]
    assert sorted((r["distribution"], r["status"]) for r in rows) == [("clash-dist", "shadowed"), ("robovla", "ok")]
    chosen = robo_run(tmp_path, "plugins", "--json", ROBOVLA_DISABLE_PLUGINS="robovla:heads")
    rows = [r for r in json.loads(chosen.stdout) if (r["kind"], r["name"]) == ("head", "lstm")]
    assert [(r["distribution"], r["module"], r["status"]) for r in rows] == \
        [("clash-dist", "robovla_plugins.heads.mlp", "ok")]
    assert "warning" not in chosen.stderr


def test_plugin_code_leaves_os_exit_and_sigint_as_they_were():
    exit_before, handler_before = os._exit, signal.getsignal(signal.SIGINT)
    with pytest.raises(PluginExit, match=r"os._exit\(3\)"):
        with contained("plugin test"):
            os._exit(3)
    assert os._exit is exit_before and signal.getsignal(signal.SIGINT) is handler_before


def test_nested_and_overlapping_plugin_code_keeps_its_guard():
    exit_before, handler_before = os._exit, signal.getsignal(signal.SIGINT)
    inside, leave = threading.Event(), threading.Event()
    caught = []

    def other_thread():
        with contained("plugin in a thread"):
            inside.set()
            leave.wait()
            try:
                os._exit(9)
            except PluginExit as exc:
                caught.append(str(exc))

    with contained("plugin outer"):
        with pytest.raises(PluginExit, match=r"os._exit\(4\)"):
            with contained("plugin inner"):
                os._exit(4)
        thread = threading.Thread(target=other_thread)
        thread.start()
        inside.wait()
        leave.set()
        thread.join()
        assert caught == ["the plugin called os._exit(9) while robovla ran its code"]
        with pytest.raises(PluginExit, match=r"os._exit\(5\)"):  # the thread left; the outer guard holds
            os._exit(5)
    assert os._exit is exit_before and signal.getsignal(signal.SIGINT) is handler_before
    with pytest.raises(KeyboardInterrupt):  # a real SIGINT that nested plugin code swallows still stops robovla
        with contained("plugin outer") as outer:
            with contained("plugin inner"):
                try:
                    signal.raise_signal(signal.SIGINT)
                except KeyboardInterrupt:
                    pass
    assert outer.interrupted
    assert os._exit is exit_before and signal.getsignal(signal.SIGINT) is handler_before
