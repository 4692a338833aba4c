"""Sharing trained policies (robovla.sharing): robo-run export writes a folder that the reader of
run folders reads (Policy.from_pretrained / from_run, eval and serve --run, --train.init), with a
model card whose numbers are the reports'; a hub repo id is read from the Hugging Face cache
offline, or refused with the download to make; robo-run push uploads the export.

What cannot run offline is the upload itself: push is tested against a fake HfApi (the calls it
makes and the folder it uploads), never against huggingface.co.
"""

import json
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import robovla
from robovla import checkpoint, sharing
from robovla.cli import main
from robovla.policy import Policy
from robovla.rollout import evaluate

from helpers import ROBO_RUN, TINY_CNN_LSTM, clean_env, synth_split, train_tiny

STEP = "step-000002"
KOSMOS = ["--backbone", "kosmos", "--backbone.size", "tiny", "--backbone.cameras", "static", "--head", "lstm",
          "--head.hidden_size", "16", "--head.num_layers", "1", "--head.mlp_widths", "16"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A trained tiny run with the reports training and robo-run eval write (eval.json, eval/STEP/),
    and its export."""
    root = tmp_path_factory.mktemp("sharing")
    synth = synth_split(root / "synth")
    run = train_tiny(root / "runs", "cnn", synth, *TINY_CNN_LSTM)
    env = robovla.create("env", "synthetic", {})
    try:  # what training's closed-loop evaluation writes, with 3-step episodes
        report = evaluate(Policy.from_run(run), env, episodes=2, seed=7, max_steps=3)
    finally:
        env.close()
    (run / "eval.json").write_text(json.dumps(report, indent=2))
    assert main(["eval", "--run", str(run), "--env", "synthetic", "--protocol", "episodes", "--episodes", "1",
                 "--steps", "3", "--batches", "2", "--no-progress"]) == 0
    exported = sharing.export(run, root / "exported", echo=lambda _: None)
    return {"root": root, "synth": synth, "run": run, "exported": exported}


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


def steps(policy: Policy, n: int = 4) -> np.ndarray:
    """The normalized chunks [n, C * A] of ``n`` steps of one episode, on scenes of the synthetic env."""
    env = robovla.create("env", "synthetic", {})
    try:
        frames = [env.reset(seed) for seed in range(n)]
    finally:
        env.close()
    policy.reset()
    return np.stack([policy.predict([obs], ["move to the red block"])[0].ravel() for obs in frames])


def hub_copy(folder, cache, repo_id="robovla-tests/tiny-policy"):
    """``folder`` as huggingface_hub caches a downloaded repo: files under snapshots/<commit>/, no links."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("last"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return repo_id


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


# ------------------------------------------------------------------------------ the folder


def test_export_holds_the_weights_config_statistics_and_reports_without_training_state(shared):
    run, out = shared["run"], shared["exported"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and "last" not in p.parts)
    assert files == sorted(["README.md", "config.toml", "action_stats.json", "export.json", "eval.json", "loss.png",
                            "metrics.csv", f"checkpoints/{STEP}/model.safetensors", f"checkpoints/{STEP}/state.json",
                            *[f"eval/{STEP}/{n}" for n in ("episodes.json", "episodes.png", "offline.json",
                                                           "offline.png")]])
    assert (out / "checkpoints" / "last").is_symlink() and checkpoint.last(out).name == STEP
    state = checkpoint.read_state(out / "checkpoints" / STEP)
    source = checkpoint.read_state(run / "checkpoints" / STEP)
    assert set(state["files"]) == {"model.safetensors"}  # no optimizer.pt, no rng-0.json
    assert state["files"]["model.safetensors"] == source["files"]["model.safetensors"]
    assert state["config"] == source["config"] and state["step"] == 2
    assert checkpoint.verify(out / "checkpoints" / STEP, state)  # every file it lists, and action_stats.json
    assert (out / "config.toml").read_text() == (run / "config.toml").read_text()
    assert json.loads((out / "export.json").read_text())["weights"] == "full weights"
    with pytest.raises(checkpoint.CheckpointError, match="holds weights but no optimizer state"):
        checkpoint.resumable(out)


def test_the_model_cards_metadata_parses_and_its_numbers_are_the_reports(shared):
    from huggingface_hub import ModelCard

    out = shared["exported"]
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert ModelCard(card).data.to_dict() == meta  # huggingface_hub reads the same metadata
    assert meta["library_name"] == "robovla" and meta["pipeline_tag"] == "robotics"
    assert {"robotics", "vision-language-action", "cnn-pool", "lstm", "rel-world"} <= set(meta["tags"])
    assert "base_model" not in meta and "datasets" not in meta  # cnn-pool trains from scratch, on local data
    metrics = {(m["config"], m["type"]): m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    eval_json = json.loads((out / "eval.json").read_text())
    offline = json.loads((out / "eval" / STEP / "offline.json").read_text())
    episodes = json.loads((out / "eval" / STEP / "episodes.json").read_text())
    keys = ("loss", "arm_l1", "arm_mse", "gripper_acc")
    assert metrics == {("eval.json", "success_rate"): eval_json["success_rate"],
                       (f"eval/{STEP}/episodes.json", "success_rate"): episodes["success_rate"],
                       **{(f"eval/{STEP}/offline.json", k): offline[k] for k in keys}}
    assert f"| `eval/{STEP}/offline.json` | validation split ({offline['windows']} windows) | arm L1 (normalized " \
           f"units) | {offline['arm_l1']:.4f} |" in card
    for task, value in eval_json["per_task"].items():
        assert f"| {task} | {100 * value['success_rate']:.1f}% of {value['episodes']} |" in card
    assert f'robovla.Policy.from_pretrained("{out}")' in card and f"robo-run serve --run {out}" in card
    assert "![loss.png](loss.png)" in card and f"![eval/{STEP}/offline.png](eval/{STEP}/offline.png)" in card


# --------------------------------------------------------------------------------- loading


def test_from_pretrained_acts_as_from_run_from_the_folder_and_from_the_hub_cache(shared, hub_cache, monkeypatch):
    expected = steps(Policy.from_run(shared["run"]))
    np.testing.assert_allclose(steps(Policy.from_pretrained(shared["exported"])), expected, atol=1e-6, rtol=0)
    repo_id = hub_copy(shared["exported"], hub_cache)  # as downloaded: no checkpoints/last link
    policy = Policy.from_pretrained(repo_id)
    assert policy.info["source"] == repo_id and str(hub_cache) in policy.info["run"]
    np.testing.assert_allclose(steps(policy), expected, atol=1e-6, rtol=0)
    monkeypatch.chdir(shared["root"])  # a relative folder that happens to read as a repo id is a folder
    np.testing.assert_allclose(steps(Policy.from_pretrained("exported")), expected, atol=1e-6, rtol=0)


def test_eval_and_serve_read_the_exported_folder(shared, capsys):
    out = shared["exported"]
    assert main(["eval", "--run", str(out), "--offline", "--batches", "2", "--no-progress",
                 "--out", str(shared["root"] / "again")]) == 0
    assert json.loads((shared["root"] / "again" / "offline.json").read_text()) == \
        json.loads((out / "eval" / STEP / "offline.json").read_text())  # the same weights, the same numbers
    capsys.readouterr()
    served = subprocess.Popen([str(ROBO_RUN), "serve", "--run", str(out), "--port", "0"], env=clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in served.stdout:  # waits for the line that says it listens
            seen.append(line)
            if line.startswith("serving "):
                break
        url = re.search(r" at (http://\S+):", seen[-1]).group(1)
        meta = json.load(urllib.request.urlopen(f"{url}/metadata"))
        assert meta["checkpoint"] == STEP and meta["step"] == 2 and meta["run"] == "exported"
    finally:
        served.send_signal(signal.SIGTERM)
        served.communicate(timeout=120)
    assert served.returncode == 0, "".join(seen)


def test_train_init_reads_an_exported_folder_and_a_cached_hub_repo(shared, hub_cache, tmp_path):
    from robovla.vla import build

    source = Policy.from_run(shared["run"]).vla.state_dict()
    repo_id = hub_copy(shared["exported"], hub_cache)
    for init in (str(shared["exported"]), repo_id):
        run = robovla.config.resolve("none", shared["exported"] / "config.toml", [("train.init", init),
                                                                                  ("train.seed", "5")])
        with torch.random.fork_rng():
            started = build(run).state_dict()
        for name, tensor in source.items():
            torch.testing.assert_close(started[name], tensor, rtol=0, atol=0, msg=f"{init}: {name}")
    tuned = train_tiny(tmp_path, "tuned", shared["synth"], *TINY_CNN_LSTM, "--train.init", repo_id)
    assert robovla.config.resolve("none", tuned / "config.toml", []).train.init == repo_id


def test_a_lora_run_exports_as_adapter_or_merged_with_the_same_actions(shared, tmp_path):
    run = train_tiny(tmp_path, "lora", shared["synth"], *KOSMOS, "--lora.enabled", "--lora.r", "4")
    adapter = sharing.export(run, tmp_path / "adapter", echo=lambda _: None)
    merged = sharing.export(run, tmp_path / "merged", merge_lora=True, echo=lambda _: None)
    assert sorted(p.name for p in (adapter / "checkpoints" / STEP).iterdir()) == \
        ["adapter_config.json", "state.json", "trainable.safetensors"]
    assert sorted(p.name for p in (merged / "checkpoints" / STEP).iterdir()) == ["model.safetensors", "state.json"]
    expected = steps(Policy.from_run(run))
    np.testing.assert_allclose(steps(Policy.from_pretrained(adapter)), expected, atol=1e-6, rtol=0)
    plain = Policy.from_pretrained(merged)
    assert not any("lora_" in n for n, _ in plain.vla.named_parameters())
    assert robovla.config.resolve("none", merged / "config.toml", []).lora.enabled is False
    np.testing.assert_allclose(steps(plain), expected, atol=1e-5, rtol=0)  # W + BA summed once: rounding only
    meta = front_matter((adapter / "README.md").read_text())
    assert "lora" in meta["tags"] and "base_model" not in meta  # a random-init tiny Kosmos-2 has no hub base
    with pytest.raises(sharing.ShareError, match="--merge-lora: .* holds full weights"):
        sharing.export(shared["run"], tmp_path / "not-lora", merge_lora=True)
    assert not (tmp_path / "not-lora").exists()


def test_a_lora_run_from_train_init_loads_and_resumes_on_the_init_weights(shared, tmp_path):
    """A LoRA checkpoint holds the trained weights only; the frozen base it trained on is
    --train.init's, so loading (and resuming) builds on those, not on the backbone's own."""
    from robovla.vla import build

    base = train_tiny(tmp_path, "base", shared["synth"], *KOSMOS)
    tuned = train_tiny(tmp_path, "lora-on-base", shared["synth"], *KOSMOS, "--lora.enabled", "--lora.r", "4",
                       "--train.init", str(base))
    plain = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach()
             for n, p in Policy.from_run(tuned).vla.named_parameters() if "lora_" not in n and not p.requires_grad}
    trained = dict(Policy.from_run(base).vla.named_parameters())
    fresh = dict(build(robovla.config.resolve("none", base / "config.toml", [])).named_parameters())
    moved = [n for n in plain if not torch.equal(trained[n], fresh[n])]
    assert len(plain) > 10 and moved  # the base run changed frozen weights, so the test can tell them apart
    for name, tensor in plain.items():
        torch.testing.assert_close(tensor, trained[name].detach(), rtol=0, atol=0, msg=name)
    assert main(["--resume", str(tuned), "--train.max_steps", "3"]) == 0
    resumed = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach()
               for n, p in Policy.from_run(tuned).vla.named_parameters() if "lora_" not in n and not p.requires_grad}
    for name in moved:
        torch.testing.assert_close(resumed[name], trained[name].detach(), rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------------- offline, refusals


def test_a_hub_id_offline_is_an_error_naming_what_to_download(shared, capsys, tmp_path, monkeypatch, hub_cache):
    monkeypatch.chdir(tmp_path)
    fix = "hf download someone/missing --local-dir DIR"
    with pytest.raises(sharing.ShareError, match=re.escape("Policy.from_pretrained someone/missing: no such local "
                                                           "folder; as a Hugging Face repo id it is not in")) as exc:
        Policy.from_pretrained("someone/missing")
    assert "HF_HUB_OFFLINE=1" in str(exc.value) and fix in str(exc.value)
    for command in (["eval", "--run", "someone/missing"], ["serve", "--run", "someone/missing"]):
        assert main(command) == 1
        assert "--run someone/missing: no such local folder" in capsys.readouterr().err
    argv = [*TINY_CNN_LSTM, "--dataset.path", str(shared["synth"]), "--train.output_dir", str(tmp_path)]
    assert main([*argv, "--train.init", "someone/missing"]) == 2
    assert "--train.init someone/missing: no such local folder" in capsys.readouterr().err
    assert main([*argv, "--train.init", "no/such/folder"]) == 2  # not a repo id either: the folder error
    assert "--train.init no/such/folder: no such run or checkpoint folder" in capsys.readouterr().err
    with pytest.raises(checkpoint.NotARunError, match="no config.toml or action_stats.json there"):
        Policy.from_pretrained(tmp_path / "nothing")


def test_bad_inputs_are_refused_before_anything_is_written(shared, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert main(["export", str(shared["run"]), str(full)]) == 1
    assert f"OUT {full}: exists and is not an empty folder; choose a new folder" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["notes.txt"] and (full / "notes.txt").read_text() == "mine"
    assert main(["export", str(shared["synth"]), str(tmp_path / "a")]) == 2
    assert "no config.toml or action_stats.json there" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["export", str(shared["run"]), str(tmp_path / "b"), "--checkpoint", "step-9"]) == 1
    assert "--checkpoint 'step-9': neither a folder nor one of the run's checkpoints" in capsys.readouterr().err
    assert main(["export", str(shared["run"]), str(tmp_path / "c"), "--repo-id", "no repo"]) == 1
    assert "--repo-id 'no repo': not a Hugging Face repo id" in capsys.readouterr().err
    assert main(["export", str(shared["run"]), str(tmp_path / "d"), "--datasets", "a/b,bad id"]) == 2
    assert "--datasets: bad id: not a Hugging Face dataset id" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcd") and sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is taken
    assert main(["export", str(shared["run"]), str(empty), "--repo-id", "me/policy", "--datasets", "me/data"]) == 0
    meta = front_matter((empty / "README.md").read_text())
    assert meta["model-index"][0]["name"] == "me/policy" and meta["datasets"] == ["me/data"]


# --------------------------------------------------------------------------------- pushing


class FakeHub:
    """huggingface_hub.HfApi as push uses it: records the calls and what the uploaded folder holds."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        FakeHub.calls.append(("HfApi", args, kwargs))

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = kwargs["folder_path"]
        files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                       if p.is_file())
        uploaded = list(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))
        card = (Path(folder) / "README.md").read_text()
        FakeHub.calls.append(("upload_folder", kwargs, uploaded, card))


def test_push_exports_and_uploads_through_huggingface_hub_faked(shared, monkeypatch, capsys):
    """The real upload is not exercised here (no network): HfApi is replaced by FakeHub."""
    import huggingface_hub

    with pytest.raises(sharing.ShareError, match="huggingface.co cannot be reached .*robo-run push OUT me/policy"):
        sharing.push(shared["run"], "me/policy")  # HF_HUB_OFFLINE=1 here
    monkeypatch.setattr(sharing, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    assert main(["push", str(shared["exported"]), "me/policy", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    (_, create, upload) = FakeHub.calls
    assert create == ("create_repo", "me/policy", {"repo_type": "model", "private": True, "exist_ok": True})
    kwargs, uploaded, card = upload[1:]
    assert kwargs["repo_id"] == "me/policy" and kwargs["repo_type"] == "model"
    assert f"checkpoints/{STEP}/model.safetensors" in uploaded and "README.md" in uploaded
    assert not any(f.startswith("checkpoints/last") for f in uploaded)
    assert 'robovla.Policy.from_pretrained("me/policy")' in card and "robo-run serve --run me/policy" in card
    assert front_matter(card)["model-index"][0]["name"] == "me/policy"
    assert not Path(kwargs["folder_path"]).exists()  # the temporary export is gone
    assert main(["push", str(shared["run"]), "not a repo"]) == 1
    assert "REPO_ID 'not a repo': not a Hugging Face repo id" in capsys.readouterr().err
