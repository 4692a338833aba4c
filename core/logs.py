"""A run's logs: metrics.csv always, TensorBoard and Weights & Biases when they are there,
and loss.png drawn from metrics.csv.

    metrics.csv   step,split,key,value   one row per logged value (split: train or val)

Every destination is a sink with ``log`` and ``close``; one that is not installed or not
asked for is simply absent, and processes other than the first log nothing, so the
training loop calls :meth:`Logs.log` without asking who listens.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

from robovla.errors import RobovlaError

HEADER, METRICS = "step,split,key,value", "metrics.csv"


class Sink(Protocol):
    def log(self, step: int, split: str, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class CsvSink:
    """Appends to metrics.csv. Resuming at ``resume_step`` drops the rows logged after it:
    the resumed run logs those steps again."""

    def __init__(self, file: Path, resume_step: int | None):
        self.file = file
        kept = [row for row in rows(file) if resume_step is None or row[0] <= resume_step]
        file.write_text("\n".join([HEADER] + [f"{s},{split},{k},{v:.8g}" for s, split, k, v in kept]) + "\n")

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        with open(self.file, "a") as f:
            f.writelines(f"{step},{split},{k},{v:.8g}\n" for k, v in values.items())

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, run_dir: Path):
        import wandb

        self.run = wandb.init(project=project, dir=str(run_dir), name=run_dir.name, resume="allow")

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        self.run.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Logs:
    """Fans every logged row out to the sinks of this process (none on ranks other than 0)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    @classmethod
    def open(cls, run_dir: Path, writer: bool, resume_step: int | None = None,
             wandb_project: str | None = None) -> Logs:
        """The sinks of a run folder: metrics.csv, TensorBoard if installed, W&B if a project
        is named. ``writer`` False (ranks other than 0): none."""
        if not writer:
            return cls([])
        sinks: list[Sink] = [CsvSink(run_dir / METRICS, resume_step)]
        try:
            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            print(f"note: tensorboard is not installed, so this run logs to {run_dir / METRICS} and loss.png only "
                  "(pip install tensorboard to log for TensorBoard too)", file=sys.stderr)
        if wandb_project:
            sinks.append(WandbSink(wandb_project, run_dir))
        return cls(sinks)

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, split, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def rows(file: Path) -> list[tuple[int, str, str, float]]:
    """A metrics.csv's rows as (step, split, key, value), each checked (none when there is no
    file), or a :class:`robovla.RobovlaError` naming the line that is not one."""
    try:
        lines = Path(file).read_text().splitlines() if Path(file).exists() else [HEADER]
    except (OSError, UnicodeDecodeError) as exc:
        raise RobovlaError(f"{file}: cannot be read ({exc}); move it aside to start a new one") from None
    out = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split(",")
        try:
            row = (int(parts[0]), parts[1], parts[2], float(parts[3]))
        except (ValueError, IndexError):
            row = None
        if lines[0] != HEADER or row is None or len(parts) != 4 or row[0] < 0:
            raise RobovlaError(f"{file}, line {1 if lines[0] != HEADER else n}: not a row of a robovla metrics.csv "
                               f"({HEADER}); the file is damaged: remove that line, or move the file aside")
        out.append(row)
    return out


def read(run_dir: Path) -> list[tuple[int, str, str, float]]:
    """metrics.csv's rows as (step, split, key, value)."""
    return rows(Path(run_dir) / METRICS)


def plot(run_dir: Path) -> Path | None:
    """loss.png in the run folder (drawn at every checkpoint): training and validation loss, its
    arm and gripper terms beside it, and the learning rate below."""
    rows = read(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(split: str, key: str) -> tuple[list[int], list[float]]:
        points = [(s, v) for s, sp, k, v in rows if sp == split and k == key]
        return [p[0] for p in points], [p[1] for p in points]

    fig = plt.figure(figsize=(12, 6))
    grid = fig.add_gridspec(2, 3, height_ratios=[3, 1])
    panels = [fig.add_subplot(grid[0, i]) for i in range(3)]
    for ax, key, label in zip(panels, ("loss", "arm_loss", "gripper_loss"), ("loss", "arm loss", "gripper loss")):
        for split, style in (("train", "-"), ("val", "o-")):
            x, y = series(split, key)
            if x:
                ax.plot(x, y, style, label=f"{split}")
        if ax.has_data():
            ax.set_yscale("log")
            ax.legend()
        ax.set_title(label if key != "loss" else f"{Path(run_dir).name}: loss")
    lr = fig.add_subplot(grid[1, :], sharex=panels[0])
    lr.plot(*series("train", "lr"))
    lr.set_ylabel("learning rate")
    lr.set_xlabel("optimizer step")
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    tmp = out.with_name(".loss.png.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(out)  # a viewer never sees half a picture
    return out
