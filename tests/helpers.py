"""Helpers shared by tests: a clean environment for subprocesses and fake installed plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
ROBO_RUN = Path(sys.executable).with_name("robo-run")
EXAMPLE = ROOT / "tests" / "plugin_example"


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without robovla's plugin switches (conftest sets one), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBOVLA_")}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command, capturing text output, never raising on a non-zero exit."""
    return subprocess.run(args, capture_output=True, text=True, env=env or clean_env(), cwd=cwd, timeout=600)


@contextmanager
def pip_installed(source: Path, distribution: str) -> Iterator[list[dict]]:
    """``source`` installed into this environment with pip (no dependencies, no build isolation,
    as a user's checkout installs) for the block; yields its rows of ``robo-run plugins --json``.
    Uninstalled afterwards, and checked gone from the listing."""
    pip = [sys.executable, "-m", "pip"]
    installed = run(pip + ["install", "--no-deps", "--no-build-isolation", "--no-cache-dir", str(source)])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    try:
        listing = run([str(ROBO_RUN), "plugins", "--json"])
        assert listing.returncode == 0, listing.stderr
        yield [r for r in json.loads(listing.stdout) if r["distribution"] == distribution]
    finally:
        removed = run(pip + ["uninstall", "-y", distribution])
    assert removed.returncode == 0, removed.stderr
    after = json.loads(run([str(ROBO_RUN), "plugins", "--json"]).stdout)
    assert not [r for r in after if r["distribution"] == distribution]


def fake_distribution(site: Path, dist: str, version: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write an installed distribution into ``site`` the way pip leaves one: modules plus a
    ``.dist-info`` folder with METADATA and entry_points.txt (group robovla)."""
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[robovla]\n{lines}")


TINY_TRAINING = ["--train.window", "4", "--train.chunk", "3", "--train.batch_size", "2", "--train.num_workers", "0",
                 "--fabric.accelerator", "cpu", "--fabric.precision", "32-true", "--train.max_steps", "2",
                 "--train.val_path", "none", "--train.lr", "1e-2"]
TINY_CNN_LSTM = ["--backbone", "cnn-pool", "--backbone.cameras", "gripper,static", "--backbone.image_size", "32",
                 "--backbone.channels", "8,16", "--head", "lstm", "--head.hidden_size", "32", "--head.num_layers", "2",
                 "--head.mlp_widths", "32"]


def synth_split(out: Path, episodes: int = 4, seed: int = 5) -> Path:
    """Write the synthetic task into ``out`` (training/ and validation/); returns training/."""
    from robovla.cli import main

    assert main(["data", "synth", "--out", str(out), "--episodes", str(episodes), "--seed", str(seed)]) == 0
    return out / "training"


def train_tiny(out: Path, name: str, training: Path, *flags: str, steps: int = 2) -> Path:
    """A two-step training run (T=4, C=3) of the components in ``flags`` on ``training``; its folder."""
    from robovla.cli import main

    argv = [*flags, "--dataset.path", str(training), "--train.output_dir", str(out), "--train.run_name", name,
            *TINY_TRAINING, "--train.max_steps", str(steps)]
    assert main(argv) == 0
    return out / name
