"""Every command and code block of README.md and docs/*.md works as written.

Each one runs here, in document order, in a quick form where the real one trains or evaluates
at length: fewer steps, episodes and chains; a small synthetic task where the docs name CALVIN
data; `--backbone.size tiny` (random weights, offline) where they name hub checkpoints; the fake
simulator (tests/fake_calvin.py, through `--env.simulator`) where they need calvin_env. A few
are run by another test, named in the table (and checked to exist there): the pip installs of
the example plugins and the plugin guide's package. Installing calvin_env from GitHub is the one
thing not run. A command or block the tables do not know fails the test, so the docs cannot
gain an example that nobody runs.
"""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import robovla
from robovla.cli import main

from helpers import EXAMPLE, ROBO_RUN, ROOT, clean_env, synth_split

DOCS = {"README.md": ROOT / "README.md", **{f"docs/{p.name}": p for p in sorted((ROOT / "docs").glob("*.md"))}}
WORDS = ("robo-run", "python", "python3", "pip", "git", "cd", "OMP_NUM_THREADS=1")
QUICK = ["--train.max_steps", "2", "--train.batch_size", "2", "--train.num_workers", "0", "--fabric.precision",
         "32-true", "--train.val_path", "none", "--train.output_dir", "quick", "--train.eval_env", "none"]
TINY = ["--backbone.size", "tiny", "--train.window", "2", "--train.chunk", "2", *QUICK]
CALVIN = ["--env.simulator", "fake_calvin:get_env", "--env.max_steps", "3", "--workers", "inline", "--no-progress"]


# ------------------------------------------------------------------------ reading the docs


def items(text: str) -> list[tuple[str, str, str]]:
    """(kind, key, body) in document order: each command of a shell block (fenced bash, sh or
    console, or indented by four spaces) and each other fenced block."""
    fence = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    found = [(m.start(), m.group(1), m.group(2)) for m in fence.finditer(text)]
    lines = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text).split("\n")
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines])
    i = 0
    while i < len(lines):
        if lines[i].startswith("    ") and lines[i].strip() and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            found.append((int(offsets[i]), "sh", "\n".join(lines[i:j])))
            i = j
        else:
            i += 1
    out = []
    for _, lang, body in sorted(found):
        if lang in ("sh", "bash", "console"):
            out += [("command", command, command) for command in commands(body)]
        else:
            rest = [line.strip() for line in body.splitlines() if line.strip()]
            key = next((line for line in rest if not line.startswith(("import ", "from "))), rest[0])
            out.append(("code", f"{lang}: {re.sub(r'  +# .*$', '', key)}", body))
    return out


def commands(body: str) -> list[str]:
    """The command lines of a shell block: continuations joined, prompts and comments dropped."""
    out = []
    for line in re.sub(r"\\\n\s*", "", body).splitlines():
        line = line.strip().removeprefix("$ ")
        if line.split(" ", 1)[0] in WORDS:
            out.append(re.sub(r"\s+", " ", re.sub(r"\s+#\s.*$", "", line)).strip())
    return out


# --------------------------------------------------------------------------- the tables


def elsewhere(test: str) -> tuple[str, str]:
    return ("elsewhere", test)


def run(*argv: str) -> tuple[str, list[str]]:
    return ("run", list(argv))


SYNOPSIS = {  # the grammar block: each command's own help
    "robo-run [train] [--preset NAME] [--config FILE] [--KIND NAME] [--SECTION.FIELD VALUE ...]": run("--help"),
    "robo-run --resume RUN_DIR [--train.max_steps N] continue a stopped run exactly where it": run("--help"),
    "robo-run config [same flags] print the resolved configuration as TOML": run("config", "--help"),
    "robo-run plugins [--json] every registered component, and broken plugins": run("plugins", "--json"),
    "robo-run presets [--json] the named recipes in registry.toml": run("presets", "--json"),
    "robo-run data check|stats|synth|cache ... dataset tools (see Data)": run("data", "--help"),
    "robo-run eval --run RUN_DIR [...] offline metrics and closed-loop evaluation of a run": run("eval", "--help"),
    "robo-run serve --run RUN_DIR [...] a policy server (HTTP, numpy payloads)": run("serve", "--help"),
    "robo-run convert SOURCE CKPT --base BASE --out RUN_DIR [--config JSON]": run("convert", "--help"),
    "robo-run export RUN_DIR OUT [...] a run as a folder to share: weights, config, reports, model card":
        run("export", "--help"),
    "robo-run push RUN_DIR REPO_ID [--private] export a run and upload it to the Hugging Face hub":
        run("push", "--help"),
    "robo-run pretrain --backbone kosmos OUT [...] pre-train a backbone's own weights (Kosmos-2:":
        run("pretrain", "--backbone", "kosmos", "--help"),
}
EVAL_CALVIN = ["eval", "--run", "runs/demo", "--env", "calvin", "--env.path", "{calvin}", *CALVIN]
README = {
    **SYNOPSIS,
    "robo-run --backbone kosmos --head lstm --dataset calvin --dataset.path /data/task_ABCD_D/training":
        run("--backbone", "kosmos", "--head", "lstm", "--dataset", "calvin", "--dataset.path", "{synth}", *TINY),
    'python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && .venv/bin/robo-run --preset demo':
        ("demo", []),  # the install is .ci/run's; the demo itself runs here, shortened, into runs/demo
    "robo-run train: error: invalid configuration (6 problems):":
        elsewhere("tests/test_readme.py::test_readme_error_example_is_what_robo_run_says"),
    "robo-run data synth --out data/synth --episodes 200 --seed 0":
        run("data", "synth", "--out", "data/synth", "--episodes", "3", "--seed", "0"),
    "robo-run data check data/synth/training [--window 8] [--json]":
        run("data", "check", "data/synth/training", "--window", "8", "--json"),
    "robo-run data stats data/synth/training": run("data", "stats", "data/synth/training"),
    "robo-run data cache data/synth/training": run("data", "cache", "data/synth/training"),
    "robo-run data export --to lerobot data/synth/training data/lerobot/training":
        run("data", "export", "--to", "lerobot", "data/synth/training", "data/lerobot/training"),
    "robo-run data check --dataset lerobot data/lerobot/training":
        run("data", "check", "--dataset", "lerobot", "data/lerobot/training"),
    "robo-run --preset demo --dataset lerobot --dataset.path data/lerobot/training --dataset.cameras gripper "
    "--action-space continuous":
        run("--preset", "demo", "--dataset", "lerobot", "--dataset.path", "data/lerobot/training", "--dataset.cameras",
            "gripper", "--action-space", "continuous", *QUICK, "--train.run_name", "lerobot"),
    "robo-run --backbone kosmos --head lstm --dataset.path /data/task_ABCD_D/training":
        run("--backbone", "kosmos", "--head", "lstm", "--dataset.path", "{synth}", *TINY),
    "robo-run --preset calvin-paligemma-lstm --dataset.path /data/task_ABCD_D/training --lora.enabled":
        run("--preset", "calvin-paligemma-lstm", "--dataset.path", "{synth}", "--lora.enabled", *TINY),
    "python: policy = robovla.Policy.from_run(\"runs/demo\")": ("python", []),
    "robo-run eval --run runs/demo --env synthetic --sequences 1000 --envs 8":
        run("eval", "--run", "runs/demo", "--env", "synthetic", "--sequences", "4", "--envs", "2", "--steps", "5",
            "--no-progress"),
    "robo-run eval --run RUN_DIR --env calvin --env.path /data/task_D_D/validation --sequences 1000":
        run(*EVAL_CALVIN, "--sequences", "2"),
    "python: with PolicyClient(\"http://127.0.0.1:8000\") as policy:": ("client", []),
    "robo-run export runs/demo exports/demo": run("export", "runs/demo", "exports/demo"),
    "robo-run push runs/demo your-name/robovla-demo --private":  # uploads: against a fake HfApi there
        elsewhere("tests/test_sharing.py::test_push_exports_and_uploads_through_huggingface_hub_faked"),
    "python: policy = robovla.Policy.from_pretrained(\"exports/demo\")": ("python", []),
    "robo-run serve --run exports/demo": ("serve", ["exports/demo"]),
    "robo-run eval --run exports/demo --env synthetic --sequences 1000":
        run("eval", "--run", "exports/demo", "--env", "synthetic", "--sequences", "2", "--steps", "5", "--no-progress"),
    "robo-run --config exports/demo/config.toml --train.init exports/demo --dataset.path /data/my_task/training":
        run("--config", "exports/demo/config.toml", "--train.init", "exports/demo", "--dataset.path", "{synth}",
            *QUICK),
    "robo-run convert robovlms kosmos_ph_calvin_abcd.pt --base microsoft/kosmos-2-patch14-224 --out "
    "runs/kosmos-ph-abcd --config <exp>-project.json":
        run("convert", "robovlms", "{ckpt}", "--base", "{base}", "--out", "runs/kosmos-ph-abcd", "--config", "{json}"),
    "robo-run eval --run runs/kosmos-ph-abcd --env calvin":
        run("eval", "--run", "runs/kosmos-ph-abcd", "--env", "calvin", "--env.path", "{calvin}", *CALVIN,
            "--sequences", "1"),
    "robo-run serve --run runs/kosmos-ph-abcd": ("serve", ["runs/kosmos-ph-abcd"]),
    "robo-run --config runs/kosmos-ph-abcd/config.toml --train.init runs/kosmos-ph-abcd --dataset.path "
    "/data/my_task/training":
        run("--config", "runs/kosmos-ph-abcd/config.toml", "--train.init", "runs/kosmos-ph-abcd", "--dataset.path",
            "{synth}", *QUICK),  # the converted run's window and chunk
    "toml: [build-system]": elsewhere("tests/test_readme.py::test_readme_shows_the_example_plugin_as_it_is"),
    'python: """robovla-example: the hooks. Kept free of torch, so `robo-run plugins` stays fast."""':
        elsewhere("tests/test_install.py::test_out_of_tree_plugin_installed_with_pip"),
    'python: """Clip-and-scale actions: arm deltas clipped to +-bound and scaled to [-1, 1]."""':
        elsewhere("tests/test_install.py::test_out_of_tree_plugin_installed_with_pip"),
    "pip install ./plugin_example": elsewhere("tests/test_install.py::test_out_of_tree_plugin_installed_with_pip"),
    "robo-run plugins": run("plugins"),
    "robo-run config --head example-linear --help": ("example", ["config", "--head", "example-linear", "--help"]),
    'python: robovla.list_components("head", "example-*")': ("example-python", []),
    "python: # conftest.py": elsewhere("tests/test_plugin_guide.py::test_the_pages_plugin_installs_with_pip_and_"
                                       "passes_the_kit"),
}
CALVIN_EVAL = {
    **{c: ("not run", "installs calvin_env from GitHub; its interface is tested through tests/fake_calvin.py")
       for c in ("git clone --recurse-submodules https://github.com/mees/calvin_env.git", "cd calvin_env",
                 "git checkout 1431a46bd36bde5903fb6345e68b5ccc30def666", "git submodule update --init",
                 "pip install -e tacto", "pip install -e .", "pip install rich")},
    "robo-run eval --run RUN_DIR --env calvin --env.path /data/task_D_D/validation --sequences 10":
        run(*EVAL_CALVIN, "--sequences", "3", "--overwrite"),
    "robo-run eval --run RUN_DIR --env calvin --env.path /data/task_D_D/validation --sequences 1000":
        run(*EVAL_CALVIN, "--sequences", "4", "--overwrite"),
    "OMP_NUM_THREADS=1 robo-run eval --run RUN_DIR --closed-loop --env calvin --env.path /data/task_D_D/validation "
    "--envs 8": run(*[a for a in EVAL_CALVIN if a not in ("--workers", "inline")], "--closed-loop", "--envs", "2",
                    "--sequences", "2", "--overwrite"),
    "robo-run eval --merge RUN_DIR/eval/*/long_horizon-shard-*-of-4.json": ("merge", []),
}
GUIDE_TEST = "tests/test_plugin_guide.py::"
MINI = ["--backbone.image_size", "32", "--backbone.channels", "8,16", "--backbone.hidden_size", "32",
        "--backbone.layers", "2", "--backbone.heads", "2"]
GUIDE = {
    "python: tokens = pad_tokens([[5, 6, 7], [8]], pad_id=0)": ("python", []),
    "toml: [build-system]": elsewhere(GUIDE_TEST + "test_the_page_holds_one_complete_package"),
    **{f'python: """{first}': elsewhere(GUIDE_TEST + "test_the_pages_plugin_installs_with_pip_and_passes_the_kit")
       for first in ("robovla-minivlm: the hook. Free of torch, so that `robo-run plugins` stays fast.\"\"\"",
                     "mini-vlm: a small CNN's image tokens and the instruction's bytes, read by a small causal")},
    'python: pytest_plugins = ["robovla.testing"]':
        elsewhere(GUIDE_TEST + "test_the_pages_plugin_installs_with_pip_and_passes_the_kit"),
    "python: from robovla.testing import test_conformance":
        elsewhere(GUIDE_TEST + "test_the_pages_plugin_installs_with_pip_and_passes_the_kit"),
    "pip install ./robovla-minivlm":
        elsewhere(GUIDE_TEST + "test_the_pages_plugin_installs_with_pip_and_passes_the_kit"),
    "robo-run plugins": ("minivlm", ["plugins"]),
    "cd robovla-minivlm && pytest tests --robovla-distribution robovla-minivlm":
        elsewhere(GUIDE_TEST + "test_the_pages_plugin_installs_with_pip_and_passes_the_kit"),
    "robo-run --backbone mini-vlm --head lstm --dataset.path /data/task_ABCD_D/training":
        ("minivlm", ["--backbone", "mini-vlm", *MINI, "--head", "lstm", "--dataset.path", "{synth}", *TINY[2:]]),
    "robo-run config --backbone mini-vlm --help": ("minivlm", ["config", "--backbone", "mini-vlm", "--help"]),
    "python: def test_mini_vlm_reads_64_tokens_a_camera(robovla_plugin):":
        elsewhere(GUIDE_TEST + "test_the_pages_test_without_installing_passes"),
}
TABLES = {"README.md": README, "docs/calvin-eval.md": CALVIN_EVAL, "docs/writing-plugins.md": GUIDE}


# ------------------------------------------------------------------------------ running


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """The folder the commands run in, and what their quick forms point at: a small synthetic task
    for CALVIN data, a folder for the fake simulator, and a RoboVLMs checkpoint with its base
    model and JSON config (a tiny Kosmos-2 under RoboVLMs' names, as tests/test_convert.py makes)."""
    from test_convert import robovlms_config, robovlms_names

    from robovla.head import Dims
    from robovla.vla import VLA

    work = tmp_path_factory.mktemp("work")
    torch.manual_seed(1)
    backbone = robovla.create("backbone", "kosmos", {"size": "tiny", "cameras": ["static"]})
    backbone.save_pretrained(work / "base")
    head = robovla.create("head", "lstm", {"hidden_size": 16, "num_layers": 1, "mlp_widths": [16]},
                          dims=Dims(D=backbone.hidden_size, K=1, T=4, C=3))
    torch.save(robovlms_names("kosmos", VLA(backbone, head).state_dict()), work / "policy.pt")
    (work / "exp-project.json").write_text(json.dumps(robovlms_config()))
    (work / "calvin").mkdir()
    place = {"W": work, "synth": str(synth_split(work / "synth", episodes=4)), "calvin": str(work / "calvin"),
             "ckpt": str(work / "policy.pt"), "base": str(work / "base"), "json": str(work / "exp-project.json")}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        place["demo"] = demo(place)
    return place


def filled(argv: list[str], place: dict) -> list[str]:
    return [a.format(**place) if "{" in a else a for a in argv]


def robo_run(argv: list[str]) -> str:
    """``robo-run argv`` in this process: its output, or a failure showing it."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's --help
            code = exc.code
    text = out.getvalue() + err.getvalue()
    assert code == 0, f"robo-run {' '.join(argv)} exited {code}:\n{text[-3000:]}"
    return text


def demo(place: dict) -> str:
    """The quick start's demo, shortened: 30 steps on 12 episodes into runs/demo, 3 episodes."""
    out = robo_run(["--preset", "demo", "--dataset.path", str(place["W"] / "demo-task" / "training"),
                    "--dataset.synthesize", "12", "--train.max_steps", "30", "--train.val_every", "15",
                    "--train.checkpoint_every", "15", "--train.eval_episodes", "3"])
    assert "closed-loop success in synthetic:" in out and "run saved in runs/demo. Next:" in out
    assert (place["W"] / "runs" / "demo" / "loss.png").is_file()
    return out


def python(body: str, namespace: dict) -> None:
    """Run a block; a line ``expression  # literal`` must give that literal."""
    exec(compile(body, "<docs>", "exec"), namespace)
    for line in body.splitlines():
        code, _, comment = line.partition("  # ")
        try:
            expected = ast.literal_eval(comment.strip())
            ast.parse(code.strip(), mode="eval")
        except (ValueError, SyntaxError):
            continue
        assert eval(code.strip(), namespace) == expected, line


def observation_namespace() -> dict:
    env = robovla.create("env", "synthetic", {})
    obs = env.reset(3)
    return {"observation": obs, "rgb_static": obs.images["static"], "rgb_gripper": obs.images["gripper"],
            "robot_obs": obs.robot_obs}


class Served:
    """``robo-run serve --run RUN --port 0`` in its own process, up once it prints its address."""

    def __init__(self, run_dir: str, cwd: Path):
        self.process = subprocess.Popen([str(ROBO_RUN), "serve", "--run", run_dir, "--port", "0"], cwd=cwd,
                                        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.seen = []
        for line in self.process.stdout:  # waits for the line, not for a time
            self.seen.append(line)
            if line.startswith("serving "):
                self.url = re.search(r" at (http://\S+):", line).group(1)
                return
        raise AssertionError(f"robo-run serve --run {run_dir} ended without serving:\n{''.join(self.seen)[-3000:]}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)  # drains and exits 0
        rest, _ = self.process.communicate(timeout=300)
        assert self.process.returncode == 0, "".join(self.seen) + rest


def perform(doc: str, key: str, body: str, action: tuple, place: dict, robovla_plugin, tmp_path) -> None:
    """Run one command or block in its quick form (``action``, from the tables)."""
    kind, what = action
    if kind == "run":
        robo_run(filled(what, place))
    elif kind == "demo":  # run by the fixture, which the other docs' commands need too
        assert "run saved in runs/demo. Next:" in place["demo"]
    elif kind == "python":
        namespace = observation_namespace()
        python(body, namespace)
        if "policy" in namespace:
            assert namespace["command"].shape == (7,) and abs(namespace["command"][6]) == 1.0
    elif kind in ("client", "serve"):
        served = Served(what[0] if what else "runs/demo", place["W"])
        try:
            assert json.load(urllib.request.urlopen(f"{served.url}/health"))["status"] == "ok"
            if kind == "client":  # the README's snippet against the demo run, both cameras sent
                namespace = observation_namespace()
                python(body.replace("http://127.0.0.1:8000", served.url), namespace)
                assert namespace["command"].shape == (7,)
        finally:
            served.stop()
    elif kind == "merge":
        shards = [[*filled(EVAL_CALVIN, place), "--closed-loop", "--sequences", "4", "--shard", f"{i}/4"]
                  for i in range(4)]
        for argv in shards:
            robo_run(argv)
        merged = sorted(place["W"].glob("runs/demo/eval/*/long_horizon-shard-*-of-4.json"))
        assert len(merged) == 4, merged
        robo_run(["eval", "--merge", *map(str, merged)])
    elif kind in ("example", "example-python", "minivlm"):
        register(kind, robovla_plugin, tmp_path)
        if kind == "example-python":
            namespace = {}
            python(body, namespace)
            assert namespace["head"].config.gripper_weight == 0.1
        else:
            out = robo_run(filled(what, place))
            assert kind != "example" or "--head.gripper_weight" in out
    elif kind == "elsewhere":
        path, name = what.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{what} does not exist"
    else:
        assert kind == "not run" and doc == "docs/calvin-eval.md", (doc, key, action)


def register(kind: str, robovla_plugin, tmp_path: Path) -> None:
    """The README's example plugin or the guide's backbone plugin, registered for this test."""
    import importlib

    if kind == "minivlm":
        from test_plugin_guide import write_package

        folder, name, dist = write_package(tmp_path / "robovla-minivlm"), "robovla_minivlm", "robovla-minivlm"
    else:
        folder, name, dist = EXAMPLE, "robovla_example", "robovla-example"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    if not any(c.plugin.distribution == dist for c in robovla.registry.registry().components):  # once per test
        robovla_plugin(importlib.import_module(name), name=name, distribution=dist, version="0.1.0")


@pytest.mark.parametrize("doc", list(DOCS))
def test_every_command_and_code_block_runs(doc, place, robovla_plugin, monkeypatch, tmp_path):
    monkeypatch.chdir(place["W"])
    table, found = TABLES[doc], items(DOCS[doc].read_text())
    unknown = [key for _, key, _ in found if key not in table]
    assert not unknown, (f"{doc} shows commands or code that no test runs; add each to TABLES in {__name__} with "
                         "its quick form:\n  " + "\n  ".join(unknown))
    stale = sorted(set(table) - {key for _, key, _ in found})
    assert not stale, f"{doc} no longer shows these; remove them from TABLES in {__name__}: {stale}"
    try:
        for n, (_, key, body) in enumerate(found):
            action = table[key]
            if action[0] in ("run", "minivlm") and action[1][0].startswith("--"):  # a training run: its own folder
                action = (action[0], [*action[1], "--train.run_name", f"{doc.replace('/', '-')}-{n}"])
            perform(doc, key, body, action, place, robovla_plugin, tmp_path)
    finally:
        for module in [m for m in sys.modules if m.split(".")[0] in ("robovla_minivlm", "robovla_example")]:
            del sys.modules[module]
