"""Start-up time of `robo-run`, side by side with the interpreter and `import torch`.

    python bench/cli_startup.py [--repeats 5]

Each command runs in a fresh process; the rounds interleave the commands so that noise
from other processes hits them alike. Prints the median wall time of each and its ratio
to `import torch`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (median reported)")
    args = parser.parse_args()
    robo_run = shutil.which("robo-run", path=str(Path(sys.executable).parent)) or "robo-run"
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "robo-run --help": [robo_run, "--help"],
        "robo-run plugins": [robo_run, "plugins"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, cmd in commands.items():  # warm the page cache once
        subprocess.run(cmd, capture_output=True, check=True)
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            start = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
    torch_median = statistics.median(times["python -c 'import torch'"])
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'/ import torch':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<28} {median:9.3f} {min(values):7.3f} {median / torch_median:15.2f}")


if __name__ == "__main__":
    main()
