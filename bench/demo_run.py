"""Shared by the benches: running robo-run from a Python of one's choosing, and a demo run to
measure with (``robo-run --preset demo``, shortened, no evaluation)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI = "import sys\nfrom robovla.cli import main\nsys.exit(main(sys.argv[1:]))\n"
"""``python -c CLI ARGS`` runs robo-run ARGS with the robovla that python imports (PYTHONPATH)."""


def train_demo(out: Path, steps: int, env: dict[str, str]) -> Path:
    """The demo preset trained for ``steps`` steps into ``out/demo``, in a subprocess with ``env``."""
    argv = ["--preset", "demo", "--train.max_steps", str(steps), "--train.val_path", "none", "--train.eval_env",
            "none", "--train.checkpoint_every", str(10 * steps), "--train.output_dir", str(out),
            "--train.run_name", "demo"]
    done = subprocess.run([sys.executable, "-c", CLI, *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"training the demo run failed:\n{done.stderr[-3000:]}")
    return out / "demo"
