"""Helpers shared by tests: a clean environment for subprocesses and fake installed plugins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
