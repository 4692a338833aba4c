"""robovla.Policy: rebuilt from a run folder, stepped online one frame at a time, and equal
to the batched training forward on the same frames; batched episodes, execution policies
and input validation."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import robovla
from robovla import checkpoint
from robovla.env import Observation
from robovla.loader import Preprocess, make_loader
from robovla.policy import Execution, ObservationError, Policy
from robovla.vla import VLA
from robovla.windows import WindowDataset

from helpers import TINY_CNN_LSTM, clean_env, synth_split, train_tiny

T = 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return synth_split(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def runs(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    kosmos = ["--backbone", "kosmos", "--backbone.size", "tiny", "--head", "lstm", "--head.hidden_size", "32",
              "--head.num_layers", "2", "--head.mlp_widths", "32", "--lora.enabled", "--lora.r", "4"]
    return {"cnn-pool": train_tiny(out, "cnn", synth, *TINY_CNN_LSTM), "kosmos-lora": train_tiny(out, "kosmos", synth, *kosmos)}


def episode_frames(synth, start, n):
    """n consecutive frames of the synthetic data as Observations, and its first instruction."""
    data = robovla.create("dataset", "calvin", {"path": str(synth)})
    segment = data.segments()[0]
    frames = data.load(segment.start + start, segment.start + start + n - 1)
    observations = [Observation({cam: frames.images[cam][i] for cam in frames.images}, frames.robot_obs[i])
                    for i in range(n)]
    return observations, segment.instruction, data


@pytest.mark.parametrize("name", ["cnn-pool", "kosmos-lora"])
def test_online_steps_equal_the_batched_training_forward(runs, synth, name):
    """Step n of the policy equals the training forward (loader, Preprocess without
    augmentation, VLA.forward) over the window of the last T frames, at its last frame."""
    policy = Policy.from_run(runs[name])
    vla, space = policy.vla, policy.action_space
    windows = WindowDataset(robovla.create("dataset", "calvin", {"path": str(synth)}), space, T, 3)
    loader = make_loader(windows, 1, preprocess=Preprocess.for_backbone(vla.backbone, train=False),
                         shuffle=False, num_workers=0, drop_last=False)
    batches = [b for _, b in zip(range(3), loader)]  # windows starting at frames 0, 1, 2 of the first segment
    with torch.no_grad():
        forward = [vla.head.actions(vla(b))[0].numpy() for b in batches]  # [T, C, A] each
    observations, instruction, _ = episode_frames(synth, 0, T + 2)
    assert batches[0].instruction == [instruction]
    policy.reset()
    online = [policy.predict([o], [instruction])[0] for o in observations]  # [C, A] each
    for n in range(T):  # inside the first window: position n of the first window
        np.testing.assert_allclose(online[n], forward[0][n], atol=1e-5, rtol=0, err_msg=f"{name}, step {n + 1}")
    for k in (1, 2):  # past T frames: the last position of the window that ends at this frame
        np.testing.assert_allclose(online[T - 1 + k], forward[k][T - 1], atol=1e-5, rtol=0,
                                   err_msg=f"{name}, step {T + k}")
    # act decodes the first action of the same chunk with the current robot_obs
    policy.reset()
    command = policy.act(observations[0], instruction)
    np.testing.assert_allclose(command, space.decode(forward[0][0, 0].astype(np.float64),
                                                     observations[0].robot_obs), atol=1e-5)
    assert command[6] in (-1.0, 1.0)


def test_from_run_loads_the_saved_weights_and_statistics_without_training_code(runs):
    from safetensors.torch import load_file

    run = runs["cnn-pool"]
    policy = Policy.from_run(run)
    saved = load_file(str(checkpoint.last(run) / checkpoint.FULL))
    state = policy.vla.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert policy.action_space.state_dict() == json.loads((run / "action_stats.json").read_text())
    meta = policy.metadata()
    assert meta["cameras"] == ["gripper", "static"] and meta["image_size"] == 32
    assert (meta["window"], meta["chunk"], meta["action_dim"], meta["step"]) == (4, 3, 7, 2)
    assert meta["checkpoint"] == "step-000002" and meta["execution"] == "first"
    assert meta["action_space"]["name"] == "rel-world"
    # a checkpoint by name, and the LoRA run (adapter + trainable weights over the base)
    assert Policy.from_run(run, "step-000002").info["step"] == 2
    lora = Policy.from_run(runs["kosmos-lora"])
    assert any("lora_" in n for n, _ in lora.vla.named_parameters())
    code = (f"import sys, robovla; p = robovla.Policy.from_run({str(run)!r}); "
            "print(sorted(m for m in ('robovla.train', 'lightning_fabric', 'robovla.loader') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "robovla.train" not in out.stdout and "lightning_fabric" not in out.stdout


def test_from_run_errors_name_the_fix(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.toml or action_stats.json there; give a run folder"):
        Policy.from_run(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint 'step-000099': neither a folder nor one of .*step-000002"):
        Policy.from_run(runs["cnn-pool"], "step-000099")
    with pytest.raises(ValueError, match="chunk:5: a chunk holds only C=3 actions"):
        Policy.from_run(runs["cnn-pool"], execution="chunk:5")


def test_several_episodes_in_one_batch_equal_each_stepped_alone(runs, synth):
    policy = Policy.from_run(runs["cnn-pool"])
    obs, instruction, data = episode_frames(synth, 0, 6)
    other_obs, _, _ = episode_frames(synth, 3, 6)
    other = data.segments()[1].instruction
    alone = {}
    for key, (frames, text) in {"a": (obs, instruction), "b": (other_obs, other)}.items():
        policy.reset(key)
        alone[key] = [policy.predict([o], [text], [key])[0] for o in frames]
    for key in ("a", "b"):
        policy.reset(key)
    together = [policy.predict([o1, o2], [instruction, other], ["a", "b"]) for o1, o2 in zip(obs, other_obs)]
    for n, pair in enumerate(together):
        np.testing.assert_allclose(pair[0], alone["a"][n], atol=1e-5)
        np.testing.assert_allclose(pair[1], alone["b"][n], atol=1e-5)
    # resetting one episode leaves the other's history alone
    policy.reset("a")
    first = policy.predict([obs[0], other_obs[0]], [instruction, other], ["a", "b"])
    np.testing.assert_allclose(first[0], alone["a"][0], atol=1e-5)
    assert np.abs(first[1] - alone["b"][0]).max() > 1e-4  # b is at its 7th frame, not its first
    commands = policy.act_batch([obs[1], other_obs[1]], [instruction, other], ["a", "b"])
    assert commands.shape == (2, 7) and set(np.unique(commands[:, 6])) <= {-1.0, 1.0}


def test_execution_policies(runs, synth):
    obs, instruction, _ = episode_frames(synth, 0, 7)
    reference = Policy.from_run(runs["cnn-pool"])
    chunks = [reference.predict([o], [instruction])[0] for o in obs]  # what "first" re-plans each step
    space = reference.action_space

    def commands(execution):
        policy = Policy.from_run(runs["cnn-pool"], execution=execution)
        return [policy.act(o, instruction) for o in obs]

    decode = lambda a, n: space.decode(a.astype(np.float64), obs[n].robot_obs)  # noqa: E731
    for n, c in enumerate(commands("first")):
        np.testing.assert_allclose(c, decode(chunks[n][0], n), atol=1e-5)
    for n, c in enumerate(commands("chunk:2")):  # re-plan at 0, 2, 4, 6
        np.testing.assert_allclose(c, decode(chunks[n - n % 2][n % 2], n), atol=1e-5)
    m = 0.5
    for n, c in enumerate(commands(f"ensemble:{m}")):
        made = [t for t in range(n + 1) if n - t < 3]  # chunks that reach step n, oldest first
        w = np.exp(-m * np.arange(len(made)))
        want = sum(wi * chunks[t][n - t] for wi, t in zip(w, made)) / w.sum()
        np.testing.assert_allclose(c, decode(want, n), atol=1e-5)
    assert str(Execution.parse("ensemble")) == "ensemble:0.01" and Execution.parse("chunk:3").steps == 3
    for bad in ("chunk", "chunk:0", "ensemble:-1", "last", "first:2"):
        with pytest.raises(ValueError, match="first, chunk:K|at least 1|decay must be"):
            Execution.parse(bad)


def reads_past_frames(head):
    """Whether a head's step depends on the frames stepped before: frame 3 after frames 1
    and 2, against frame 3 right after a reset."""
    d = head.dims
    frames = torch.randn(3, 2, 1, d.K, d.D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head.reset()
        after = [head.step(f) for f in frames][-1]
        head.reset()
        alone = head.step(frames[-1])
    return any(not torch.allclose(after[k], alone[k]) for k in alone)


@pytest.mark.parametrize("name", robovla.list_components("head"))
def test_chunk_execution_runs_the_vlm_as_often_as_the_head_needs(name):
    """Under chunk:K the VLM runs at every step for a head whose steps read past frames, and
    once per K steps for a head that reads each frame alone (the policy module's promise);
    a head declares a history (history_attributes) exactly when its steps read the past."""
    backbone_cls = robovla.get_component("backbone", "cnn-pool").load()
    torch.manual_seed(0)
    backbone = backbone_cls(backbone_cls.Config.model_validate(backbone_cls.test_config))
    head = robovla.create("head", name, robovla.get_component("head", name).load().test_config,
                          dims=robovla.Dims(D=backbone.hidden_size, T=3, C=4))
    history = reads_past_frames(head)
    calls = []
    run_lm = backbone.forward_embeddings
    backbone.forward_embeddings = lambda *args, **kwargs: calls.append(1) or run_lm(*args, **kwargs)
    k, steps = 3, 7
    policy = Policy(VLA(backbone, head), robovla.create("action_space", "rel-world", {"clip_bound": 1.0}),
                    execution=f"chunk:{k}")
    rng = np.random.default_rng(0)
    policy.reset()
    for _ in range(steps):
        images = {cam: rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for cam in backbone.cameras}
        assert policy.act(Observation(images, np.zeros(15)), "lift the red block").shape == (7,)
    assert len(calls) == (steps if history else math.ceil(steps / k)), (
        f"head {name!r} ({'with' if history else 'without'} a history): {len(calls)} VLM passes in {steps} "
        f"steps of chunk:{k}")
    assert bool(head.history_attributes) == history, (
        f"head {name!r}: its steps {'read' if history else 'do not read'} past frames, but it declares "
        f"history_attributes {type(head).history_attributes}")


def test_bad_observations_are_refused_with_the_reason(runs, synth):
    policy = Policy.from_run(runs["cnn-pool"])
    (good,), instruction, _ = episode_frames(synth, 0, 1)
    gripper, static, robot_obs = good.images["gripper"], good.images["static"], good.robot_obs
    cases = {
        "no image for camera\\(s\\) \\['static'\\]": Observation({"gripper": gripper}, robot_obs),
        "images are uint8": Observation({"gripper": gripper.astype(np.float32), "static": static}, robot_obs),
        "expected an RGB image \\[H, W, 3\\], got shape \\[84, 84\\]": Observation(
            {"gripper": gripper[..., 0], "static": static}, robot_obs),
        "each side must be": Observation({"gripper": np.zeros((5000, 4, 3), np.uint8), "static": static}, robot_obs),
        "robot_obs must be a float array \\[15\\]": Observation(good.images, robot_obs[:7]),
        "non-finite values at indices \\[3\\]": Observation(good.images, np.where(np.arange(15) == 3, np.nan, robot_obs)),
    }
    for message, observation in cases.items():
        with pytest.raises(ObservationError, match=message):
            policy.act(observation, instruction)
    with pytest.raises(ObservationError, match="instruction must be a string"):
        policy.act(good, 3)
    with pytest.raises(ObservationError, match="keys must be distinct"):
        policy.act_batch([good, good], [instruction, instruction], [1, 1])
    assert not policy.episodes or all(ep.steps == 0 for ep in policy.episodes.values())  # nothing was stepped
    assert policy.act(good, instruction).shape == (7,)
