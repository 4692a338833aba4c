"""Sharing trained policies: ``robo-run export``, ``robo-run push`` and ``Policy.from_pretrained``.

    robo-run export RUN_DIR OUT [--checkpoint NAME] [--merge-lora] [--repo-id ID] [--datasets ID,...]
    robo-run push RUN_DIR REPO_ID [--private] [--checkpoint NAME] [--merge-lora] [--datasets ID,...]

An exported folder is a run folder that holds only what a policy needs, so the reader of run
folders reads it: ``Policy.from_run``, ``robo-run eval/serve --run`` and ``--train.init``.

    OUT/README.md              the model card: YAML metadata (library, tags, base model, datasets,
                               the evaluation results) and how to load, serve and fine-tune it
    OUT/config.toml            the run's resolved configuration
    OUT/action_stats.json      its fitted action space
    OUT/export.json            what was exported, from where (it marks an exported folder)
    OUT/checkpoints/step-N/    model.safetensors (full weights; a LoRA run's merged with
                               --merge-lora), or trainable.safetensors + adapter_config.json (LoRA:
                               the adapter and the fully trained weights); state.json with their sha256
    OUT/checkpoints/last       a link to it. The hub stores no links: a folder with export.json and
                               one checkpoint needs none (robovla.checkpoint.last)
    OUT/eval.json, metrics.csv, loss.png, eval/step-N/*.json and *.png: the run's reports and
                               charts of that checkpoint (eval.json only when it is the run's last)

No optimizer or RNG state travels. A source that is not a local folder but reads as a hub repo
id (``owner/name``) is downloaded with ``huggingface_hub.snapshot_download`` (its cache; the hub
is reached only then); offline, a clear error says what to download.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from robovla.errors import ConfigError, RobovlaError

EXPORTED = "export.json"  # robovla.checkpoint.EXPORTED
CARD = "README.md"
REPORTS = ("metrics.csv", "loss.png")  # copied when the run has them; eval.json and eval/<checkpoint>/ too
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
NO_LINK = ["checkpoints/last", "checkpoints/last/*"]  # never uploaded: the checkpoint it links to is


class ShareError(RobovlaError, ValueError):
    """A folder cannot be exported, downloaded or pushed; the message says what and how to fix it."""


def is_repo_id(text: str | Path) -> bool:
    """Whether ``text`` reads as a Hugging Face hub repo id, ``owner/name``."""
    text = str(text)
    return REPO_ID.fullmatch(text) is not None and ".." not in text and "--" not in text \
        and not text.endswith((".git", "."))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers at all (DNS and TCP) within ``timeout`` seconds; never with HF_HUB_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def local_folder(source: str | Path, what: str = "--run") -> Path:
    """The local folder ``source`` names: itself when it exists or does not read as a repo id (the
    caller's checks then say what is wrong with it), else the hub repo's snapshot, downloaded."""
    path = Path(source).expanduser()
    if path.exists() or not is_repo_id(source):
        return path
    return download(str(source), what)


def download(repo_id: str, what: str = "--run", repo_type: str = "model", revision: str | None = None) -> Path:
    """The files of hub repo ``repo_id`` (its cached snapshot when the hub cannot be reached), or a
    :class:`ShareError` saying how to get them. ``repo_type`` "model" or "dataset"."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    online = hub_reachable()
    kind = "" if repo_type == "model" else f" --repo-type {repo_type}"
    fix = (f"download it where there is a connection (`hf download {repo_id}{kind} --local-dir DIR`) and give DIR "
           f"in place of {repo_id}")
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=not online))
    except RepositoryNotFoundError:
        raise ShareError(f"{what} {repo_id}: no such local folder, and no Hugging Face {repo_type} repo of that name "
                         "(or it is private or gated: log in with `hf auth login`, or set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ShareError(f"{what} {repo_id}: no such local folder; as a Hugging Face repo id it is not in the "
                         "Hugging Face cache, and the hub cannot be reached (offline, or HF_HUB_OFFLINE=1 is set); "
                         f"{fix}") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ShareError(f"{what} {repo_id}: downloading it from the Hugging Face hub failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); {fix}") from None


# --------------------------------------------------------------------------------- export


def export(run_dir: str | Path, out: str | Path, checkpoint: str | None = None, merge_lora: bool = False,
           repo_id: str | None = None, datasets: list[str] = (), echo: Any = print) -> Path:
    """Write checkpoint ``checkpoint`` (default: ``last``) of run folder ``run_dir`` into the new folder
    ``out`` (see the module docstring); ``repo_id`` names the hub repo in the model card. Returns ``out``.
    Every problem is found before anything is written; a failure leaves no ``out`` behind."""
    from robovla import checkpoint as ckpt
    from robovla import config as cfg
    from robovla.finetune import TRAINABLE
    from robovla.policy import checkpoint_folder
    from robovla.runs import model_changes

    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShareError(f"OUT {out}: exists and is not an empty folder; choose a new folder (nothing was written)")
    if repo_id is not None and not is_repo_id(repo_id):
        raise ShareError(f"--repo-id {repo_id!r}: not a Hugging Face repo id; give owner/name")
    config_file = ckpt.run_config(run_dir, f"RUN_DIR {run_dir}", header="cannot export", stats=True)
    folder = ckpt.last(run_dir) if checkpoint is None else checkpoint_folder(run_dir, checkpoint, "--checkpoint")
    state = ckpt.read_state(folder)
    ckpt.verify(folder, state, weights_only=True)
    run = cfg.resolve(cfg.NONE, config_file, [])
    model_changes(run, run_dir, folder, state)
    kind = ckpt.weight_files(folder, state)
    if merge_lora and kind != TRAINABLE:
        raise ShareError(f"--merge-lora: {folder} holds full weights (the run was not trained with LoRA); drop "
                         "--merge-lora")
    if kind == TRAINABLE and run.train.init is not None and not merge_lora:
        raise ShareError(f"{folder}: a LoRA adapter of a run that started from --train.init {run.train.init}; the "
                         "adapter alone does not hold those base weights, so export it with --merge-lora")
    tmp = out.parent / f".{out.name}.tmp-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        how = write_weights(tmp, run, run_dir, folder, state, kind, merge_lora)
        copy_reports(run_dir, tmp, folder.name, latest=is_last(run_dir, folder))
        record = {"robovla": version(), "run": run_dir.resolve().name, "checkpoint": folder.name,
                  "step": state["step"], "weights": how, "repo_id": repo_id,
                  "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (tmp / EXPORTED).write_text(json.dumps(record, indent=2))
        (tmp / CARD).write_text(model_card(tmp, repo_id or out.name, repo_id or str(out), list(datasets),
                                           hub=repo_id is not None))
        os.replace(tmp, out)  # an empty `out` is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"exported {run_dir} ({folder.name}, step {state['step']}, {how}) into {out}\n"
         f"  load:  robovla.Policy.from_pretrained({json.dumps(str(out))})\n"
         f"  serve: robo-run serve --run {out}\n"
         f"  share: robo-run push {out} {repo_id or 'OWNER/NAME'}")
    return out


def version() -> str:
    from robovla import __version__

    return __version__


def is_last(run_dir: Path, folder: Path) -> bool:
    """Whether ``folder`` is the run's newest checkpoint (the one its eval.json evaluated)."""
    from robovla import checkpoint as ckpt

    try:
        return ckpt.last(run_dir).resolve() == folder.resolve()
    except RobovlaError:
        return False


def write_weights(tmp: Path, run: Any, run_dir: Path, folder: Path, state: dict[str, Any], kind: str,
                  merge_lora: bool) -> str:
    """config.toml, action_stats.json and the checkpoint (weights and a state.json without training
    state) into ``tmp``; returns what the weights are, in words."""
    from robovla import checkpoint as ckpt
    from robovla import finetune
    from robovla.cli import config_toml

    shutil.copyfile(run_dir / ckpt.STATS, tmp / ckpt.STATS)
    kept = {k: v for k, v in state.items() if k not in ("files", "rng", "action_stats_sha256", "step")}
    kept["exported_from"] = {"run": run_dir.resolve().name, "checkpoint": folder.name}
    if kind in (ckpt.FULL, finetune.TRAINABLE) and not merge_lora:
        shutil.copyfile(run_dir / ckpt.CONFIG, tmp / ckpt.CONFIG)
        target = ckpt.begin(tmp, state["step"])
        names = [ckpt.FULL] if kind == ckpt.FULL else \
            [n for n in (finetune.TRAINABLE, finetune.ADAPTER) if (folder / n).is_file()]
        for name in names:
            shutil.copyfile(folder / name, target / name)
        ckpt.commit(tmp, state["step"], target, kept)
        return "full weights" if kind == ckpt.FULL else "LoRA adapter and trainable weights"
    if kind == ckpt.SHARDED:
        shutil.copyfile(run_dir / ckpt.CONFIG, tmp / ckpt.CONFIG)
        ckpt.save_weights(tmp, state["step"], ckpt.consolidated(folder), kept)
        return "full weights (gathered from a sharded checkpoint)"
    weights, plain = merged_weights(run, folder)
    (tmp / ckpt.CONFIG).write_text(config_toml(plain))
    kept["config"] = plain.to_dict()  # what the weights are now: the model without adapters
    ckpt.save_weights(tmp, state["step"], weights, kept)
    return "LoRA merged into full weights"


def merged_weights(run: Any, folder: Path) -> tuple[dict[str, Any], Any]:
    """A LoRA checkpoint's weights with every adapter merged into its base layer, and the run
    config of the same model without LoRA."""
    import torch

    from robovla import checkpoint as ckpt
    from robovla import finetune
    from robovla.vla import build

    with torch.random.fork_rng(devices=[]):  # building seeds torch; a --train.init base is read again
        vla = build(run, init=True)
    ckpt.load(folder, vla, verified=True)
    finetune.merge_lora(vla)
    plain = run._replace(lora=run.lora.model_copy(update={"enabled": False}),
                         train=run.train.model_copy(update={"init": None}))
    return {k: v.detach() for k, v in vla.state_dict().items()}, plain


def copy_reports(run_dir: Path, tmp: Path, name: str, latest: bool) -> list[Path]:
    """The run's training logs and charts, its eval.json (when ``latest``) and the reports and charts
    of checkpoint ``name`` under eval/ (not the per-chain .jsonl logs nor videos), into ``tmp``."""
    copied = []
    for file in [*REPORTS, *(["eval.json"] if latest else [])]:
        if (run_dir / file).is_file():
            copied.append(Path(shutil.copyfile(run_dir / file, tmp / file)))
    for file in sorted((run_dir / "eval" / name).glob("*")):
        if file.is_file() and file.suffix in (".json", ".png") and not file.name.startswith("."):
            (tmp / "eval" / name).mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copyfile(file, tmp / "eval" / name / file.name)))
    return copied


# ----------------------------------------------------------------------------- model card


METRICS = {"success_rate": "closed-loop success rate", "avg_len": "average length (tasks in a row)",
           "loss": "offline loss", "arm_l1": "arm L1 (normalized units)", "arm_mse": "arm MSE (normalized units)",
           "gripper_acc": "gripper accuracy"}


def evaluations(folder: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per number the card reports, from the exported reports (eval.json, then
    eval/<checkpoint>/*.json; shards' partial reports left out): the report's file, what it
    evaluated on (env, or the validation split), how much, the metric and its value as the report holds it."""
    files = [folder / "eval.json"] if (folder / "eval.json").is_file() else []
    found = []
    for file in files + sorted((folder / "eval").glob("*/*.json")):
        report, rel = json.loads(file.read_text()), file.relative_to(folder).as_posix()
        if not isinstance(report, dict) or "shard" in report:
            continue
        if report.get("protocol") == "episodes":
            env = report.get("env") or str(config["train"].get("eval_env", "none")).replace("none", "env")
            found.append(dict(file=rel, on=env, size=f"{report['episodes']} episodes", type="success_rate",
                              value=report["success_rate"], name=METRICS["success_rate"], report=report))
        elif report.get("protocol") == "long-horizon":
            n, on = len(report["chain_sr"]), report.get("env", "env")
            found.append(dict(file=rel, on=on, size=f"{report['sequences']} chains", type="avg_len",
                              value=report["avg_len"], name=METRICS["avg_len"], report=report))
            found += [dict(file=rel, on=on, size=f"{report['sequences']} chains", type=f"success_{k}_of_{n}", value=v,
                           name=f"{k}/{n} tasks in a row", report=report) for k, v in report["chain_sr"].items()]
        elif "arm_l1" in report and "windows" in report:
            found += [dict(file=rel, on="validation split", size=f"{report['windows']} windows", type=key,
                           value=report[key], name=METRICS[key], report=report)
                      for key in ("loss", "arm_l1", "arm_mse", "gripper_acc")]
    return found


def hub_ids(section: dict[str, Any]) -> list[str]:
    """The hub repo ids among a config section's values (not local paths), unless the section says
    its weights are random (``size`` other than full, or ``weights`` random)."""
    if section.get("size", "full") != "full" or section.get("weights", "pretrained") != "pretrained":
        return []
    return [v for k, v in section.items() if k != "name" and isinstance(v, str) and is_repo_id(v)
            and not Path(v).expanduser().exists()]


def card_metadata(folder: Path, name: str, datasets: list[str]) -> tuple[Any, list[dict[str, Any]]]:
    """The model card's YAML metadata (huggingface_hub's ModelCardData) and the results it reports."""
    from robovla.registry_file import tomllib  # tomli before Python 3.11

    from huggingface_hub import EvalResult, ModelCardData

    config = tomllib.loads((folder / "config.toml").read_text())
    found = evaluations(folder, config)
    lora = config.get("lora", {}).get("enabled") is True
    tags = ["robovla", "robotics", "vision-language-action", config["backbone"]["name"], config["head"]["name"],
            config["action_space"]["name"], config["dataset"]["name"]] + (["lora"] if lora else [])
    results = [EvalResult(task_type="robotics", task_name="robot control", dataset_type=str(e["on"]),
                          dataset_name=f"{e['on']} ({e['size']})", dataset_config=e["file"],  # one result a report
                          metric_type=e["type"], metric_value=e["value"],
                          metric_name=e["name"], metric_config=e["file"]) for e in found]
    base = hub_ids(config["backbone"])
    data = ModelCardData(library_name="robovla", pipeline_tag="robotics", tags=list(dict.fromkeys(tags)),
                         datasets=list(dict.fromkeys(datasets + hub_ids(config["dataset"]))) or None,
                         base_model=(base[0] if len(base) == 1 else base) or None,
                         metrics=list(dict.fromkeys(e["type"] for e in found)) or None, model_name=name,
                         eval_results=results or None)
    return data, found


def value_text(metric: str, value: float) -> str:
    return f"{100 * value:.1f}%" if metric.startswith(("success", "gripper")) else f"{value:.4f}"


def results_table(found: list[dict[str, Any]]) -> list[str]:
    """The results as markdown: one row per number, then each closed-loop report's tasks."""
    if not found:
        return ["No evaluation reports were exported with this checkpoint: evaluate it with `robo-run eval`."]
    lines = ["| report | evaluated on | metric | value |", "|---|---|---|---|"]
    lines += [f"| `{e['file']}` | {e['on']} ({e['size']}) | {e['name']} | {value_text(e['type'], e['value'])} |"
              for e in found]
    for e in found:
        tasks = e["report"].get("per_task") if e["type"] == "success_rate" else \
            e["report"].get("task_info") if e["type"] == "avg_len" else None
        if tasks:
            lines += ["", f"Per task, `{e['file']}` ({e['on']}):", "", "| task | success |", "|---|---|"]
            lines += [f"| {task} | " + (f"{100 * v['success_rate']:.1f}% of {v['episodes']} |" if "episodes" in v
                                        else f"{v['success']} of {v['total']} |") for task, v in tasks.items()]
    return lines


def model_card(folder: Path, name: str, ref: str, datasets: list[str], hub: bool) -> str:
    """README.md of an exported folder: YAML metadata, what the policy is, its results and charts,
    and how to load, serve, evaluate and fine-tune it (``ref``: the repo id when ``hub``, else the local folder)."""
    import tomllib

    data, found = card_metadata(folder, name, datasets)
    c = tomllib.loads((folder / "config.toml").read_text())
    record = json.loads((folder / EXPORTED).read_text())
    t, b = c["train"], c["backbone"]
    env = next((e["on"] for e in found if e["type"] in ("success_rate", "avg_len")), t.get("eval_env", "none"))
    eval_env = f" --env {env}" if env not in (None, "none") else ""
    lora = f", LoRA r={c['lora']['r']} alpha={c['lora']['alpha']}" if c["lora"].get("enabled") is True else ""
    charts = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*.png"))]
    config_line = (f"hf download {ref} config.toml --local-dir policy-config\n"
                   f"robo-run --config policy-config/config.toml --train.init {ref} --dataset.path DATA"
                   if hub else f"robo-run --config {ref}/config.toml --train.init {ref} --dataset.path DATA")
    body = [
        f"# {name}", "",
        f"A vision-language-action policy trained with robovla: the `{b['name']}` backbone read through "
        f"{t.get('lrn_tokens', 1)} learnable action token(s), the `{c['head']['name']}` policy head, "
        f"`{c['action_space']['name']}` actions; cameras {', '.join(b.get('cameras', [])) or '(the backbone)'}, "
        f"window {t['window']}, chunk {t['chunk']}. Trained for {record['step']} steps on `{c['dataset']['name']}` "
        f"data{lora}; exported from run `{record['run']}`, checkpoint `{record['checkpoint']}` "
        f"({record['weights']}), with robovla {record['robovla']}.", "",
        "## Results", "", *results_table(found), "",
        *(["## Charts", "", *[f"![{p}]({p})" for p in charts], ""] if charts else []),
        "## Use", "", "In Python (`pip install robovla`):", "", "```python", "import robovla", "",
        f"policy = robovla.Policy.from_pretrained({json.dumps(ref)})",
        "policy.reset()                                   # a new episode",
        "command = policy.act(observation, instruction)   # observation: robovla.Observation(images, robot_obs)",
        "```", "", "Serve it over HTTP, evaluate it, or fine-tune it on your own data:", "", "```bash",
        f"robo-run serve --run {ref}", f"robo-run eval --run {ref}{eval_env}", config_line, "```", "",
        "## Files", "",
        "`config.toml` (the resolved run configuration), `action_stats.json` (the fitted action space), "
        f"`checkpoints/{record['checkpoint']}/` (safetensors weights and `state.json` with their sha256), "
        "`export.json` (what was exported), and the run's reports and charts.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


# ------------------------------------------------------------------------------- pushing


def push(run_dir: str | Path, repo_id: str, private: bool = False, checkpoint: str | None = None,
         merge_lora: bool = False, datasets: list[str] = (), echo: Any = print) -> str:
    """Export ``run_dir`` (a run folder or an exported one) into a temporary folder whose card names
    ``repo_id``, create the hub model repo (``private`` when new) and upload the folder; returns its URL."""
    import tempfile

    if not is_repo_id(repo_id):
        raise ShareError(f"REPO_ID {repo_id!r}: not a Hugging Face repo id; give owner/name (e.g. your user name "
                         "and a name for the policy)")
    if not hub_reachable():
        raise ShareError(f"push {repo_id}: huggingface.co cannot be reached (offline, or HF_HUB_OFFLINE=1 is set); "
                         f"export it here (`robo-run export {run_dir} OUT`), and run `robo-run push OUT {repo_id}` "
                         "where there is a connection")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    with tempfile.TemporaryDirectory(prefix="robovla-push-") as tmp:
        folder = export(run_dir, Path(tmp) / "policy", checkpoint, merge_lora, repo_id, datasets, echo=lambda _: None)
        api = HfApi()
        try:
            url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), ignore_patterns=NO_LINK,
                              commit_message=f"robovla export of {Path(run_dir).name}")
        except HfHubHTTPError as exc:
            raise ShareError(f"push {repo_id}: the hub refused it ({str(exc).splitlines()[0][:200]}); log in with "
                             "`hf auth login` (or set HF_TOKEN) with a token that may write to it") from None
    echo(f"pushed {run_dir} to {url}\n  load:  robovla.Policy.from_pretrained({json.dumps(repo_id)})\n"
         f"  serve: robo-run serve --run {repo_id}")
    return str(url)


# --------------------------------------------------------------------------- command line


def shared_flags(p: argparse.ArgumentParser) -> None:
    from robovla.evaluation import CHECKPOINT_HELP

    p.add_argument("--checkpoint", default=None, help=CHECKPOINT_HELP)
    p.add_argument("--merge-lora", action="store_true", help="a LoRA run: merge its adapters into full weights "
                   "(default: the adapter and the trainable weights, read on top of the base backbone)")
    p.add_argument("--datasets", default="", help="Hugging Face dataset ids the policy was trained on, comma-"
                   "separated, for the model card's metadata (hub ids in the dataset's config are found anyway)")


def main_export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="robo-run export", allow_abbrev=False,
        description="Export a trained run as a self-contained folder: config, safetensors weights, action statistics, "
                    "the eval reports and charts, and a model card (README.md) for the Hugging Face hub. "
                    "robovla.Policy.from_pretrained, robo-run eval/serve --run and --train.init read it.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (runs/<name>)")
    p.add_argument("out", metavar="OUT", help="the folder to write (new, or an empty folder)")
    p.add_argument("--repo-id", default=None, help="the hub repo the card names (owner/name; default: OUT's name)")
    shared_flags(p)
    args = p.parse_args(argv)
    export(args.run_dir, args.out, args.checkpoint, args.merge_lora, args.repo_id, split(args.datasets))
    return 0


def main_push(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="robo-run push", allow_abbrev=False,
        description="Export a trained run (as robo-run export does) and upload it to a Hugging Face hub model repo, "
                    "created if needed. Needs a connection and a token with write access (hf auth login, or HF_TOKEN).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (runs/<name>), or a folder robo-run export wrote")
    p.add_argument("repo_id", metavar="REPO_ID", help="the hub model repo: owner/name")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                          "visibility)")
    shared_flags(p)
    args = p.parse_args(argv)
    push(args.run_dir, args.repo_id, args.private, args.checkpoint, args.merge_lora, split(args.datasets))
    return 0


def split(text: str) -> list[str]:
    """``--datasets a/b,c/d`` -> its repo ids, each checked."""
    ids = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in ids if not is_repo_id(d)]
    if bad:
        raise ConfigError([f"--datasets: {', '.join(bad)}: not a Hugging Face dataset id; give owner/name"],
                          header="invalid arguments")
    return ids
