"""Packaging as users meet it: an out-of-tree plugin installed with pip, and robovla's wheel."""

import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from helpers import EXAMPLE, ROBO_RUN, ROOT, clean_env, pip_installed, run

pytestmark = pytest.mark.slow


def test_out_of_tree_plugin_installed_with_pip(tmp_path):
    source = tmp_path / "plugin_example"
    shutil.copytree(EXAMPLE, source)  # setuptools writes build/ and egg-info next to the sources
    with pip_installed(source, "robovla-example") as listed:
        rows = {r["name"]: r for r in listed}
        assert set(rows) == {"example-linear", "example-clip"}
        assert all((r["version"], r["status"], r["entry_point"]) == ("0.1.0", "ok", "example = robovla_example")
                   for r in rows.values())
        api = run([sys.executable, "-c", (
            "import robovla, torch\n"
            "c = robovla.get_component('head', 'example-linear')\n"
            "print(robovla.list_components('head', 'example-*'), c.plugin.distribution, c.plugin.version)\n"
            "head = robovla.create('head', 'example-linear', {'gripper_weight': 0.5}, dims=robovla.Dims(D=16))\n"
            "print(tuple(head(torch.zeros(2, 8, 1, 16))['arm'].shape), head.config.gripper_weight)\n")])
        assert api.returncode == 0, api.stderr
        assert api.stdout.splitlines() == ["['example-linear'] robovla-example 0.1.0", "(2, 8, 10, 6) 0.5"]
        fields = run([str(ROBO_RUN), "config", "--head", "example-linear", "--help"])
        assert "--head.gripper_weight" in fields.stdout, fields.stderr


def test_wheel_carries_registry_and_runs_in_a_fresh_venv(tmp_path):
    source = tmp_path / "robovla"  # a copy: building writes build/ and egg-info beside the sources
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", ".pytest_cache", "__pycache__", "runs"))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(source)],
                cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("robovla-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "robovla/registry.toml" in names and "robovla_plugins/__init__.py" in names
    assert "robovla/testing/__init__.py" in names and not [n for n in names if n.startswith(("core/", "tests/"))]
    assert zipfile.ZipFile(wheel).read("robovla/registry.toml") == (ROOT / "registry.toml").read_bytes()
    bundled = ROOT / "plugins" / "backbones" / "kosmos" / "kosmos-2-tiny"  # the pre-trained tiny Kosmos-2
    for file in bundled.iterdir():
        assert zipfile.ZipFile(wheel).read(f"robovla_plugins/backbones/kosmos/kosmos-2-tiny/{file.name}") == \
            file.read_bytes(), file.name

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    # The commands checked here need no torch, so the wheel goes in without it (--no-deps)
    # beside the light dependencies, which keeps this test to seconds instead of gigabytes.
    for args in (["--no-deps", str(wheel)], ["pydantic", "pluggy", "tomli-w", "numpy"]):
        done = run([str(bin_dir / "pip"), "install", "-q", *args], env=clean_env())
        assert done.returncode == 0, done.stdout + done.stderr
    env = clean_env()
    listing = run([str(bin_dir / "robo-run"), "plugins", "--json"], env=env, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)  # the built-in plugins, through the wheel's entry points
    assert {(r["kind"], r["name"], r["distribution"], r["status"]) for r in rows} >= {
        ("dataset", "calvin", "robovla", "ok"), ("env", "synthetic", "robovla", "ok"),
        ("action_space", "rel-world", "robovla", "ok"), ("action_space", "rel-tcp", "robovla", "ok"),
        ("action_space", "abs-world", "robovla", "ok"), ("backbone", "kosmos", "robovla", "ok"),
        ("backbone", "paligemma", "robovla", "ok"), ("backbone", "composite", "robovla", "ok"),
        ("backbone", "cnn-pool", "robovla", "ok")} | {
        ("head", name, "robovla", "ok") for name in ("lstm", "mlp", "gpt", "discrete", "flow")}
    assert {r["status"] for r in rows} == {"ok"} and {r["distribution"] for r in rows} == {"robovla"}
    presets = run([str(bin_dir / "robo-run"), "presets", "--json"], env=env, cwd=tmp_path)
    assert json.loads(presets.stdout)["calvin-kosmos-lstm"]["train"]["window"] == 8, presets.stderr
    where = run([str(bin_dir / "python"), "-c", "import robovla.registry_file as r; print(r.path())"], env=env, cwd=tmp_path)
    assert where.stdout.strip() == str(next(venv.glob("lib/python*/site-packages/robovla/registry.toml")))
